"""The database tables: subscribers, the per-subscriber send log, broadcasts, and background jobs."""
import json
import re
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy import orm as so
from sqlalchemy.dialects import postgresql, sqlite

from app import db


def utcnow():
    """Naive UTC everywhere: SQLite keeps no time zone, and mixing aware and naive values breaks comparisons."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def insert_ignoring_conflicts(model, unique_columns):
    """INSERT that leaves out rows colliding on `unique_columns`: how the database, not the code,
    decides which of two racing processes claims something first."""
    insert = (postgresql if db.engine.dialect.name == 'postgresql' else sqlite).insert
    return insert(model).on_conflict_do_nothing(index_elements=unique_columns)


def values_table(rows, **columns):
    """`rows` (tuples) as a table with `columns` (name=type), sent as one parameter per column, or one in
    all, however many rows: a drip batch claims 100 subscribers in one INSERT ... SELECT from it. As 100
    VALUES rows the claim had 800 placeholders, and psycopg parses placeholders in Python: that cost
    more than the insert itself. On PostgreSQL each column is an array (unnest); on SQLite the rows are
    one JSON array (json_each)."""
    names = list(columns)
    if db.engine.dialect.name == 'postgresql':
        arrays = (sa.bindparam(f'{name}_values', [row[i] for row in rows], type_=postgresql.ARRAY(type_))
                  for i, (name, type_) in enumerate(columns.items()))
        table = sa.func.unnest(*arrays).table_valued(*names).render_derived()
        return sa.select(*table.c).subquery()
    table = sa.func.json_each(sa.bindparam('rows_json', json.dumps(rows))).table_valued('value')
    return sa.select(*(sa.type_coerce(sa.func.json_extract(table.c.value, f'$[{i}]'), type_).label(name)
                       for i, (name, type_) in enumerate(columns.items()))).subquery()


def among(column, values):
    """`column IN values`, as one array parameter on PostgreSQL, for the reason values_table gives."""
    if db.engine.dialect.name == 'postgresql':
        return column == sa.any_(sa.bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def greeting_name(email):
    """'jane.doe+news@example.com' -> 'Jane Doe', 'john.smith1990@' -> 'John Smith'; an address with no
    letters before the @ gets 'there'."""
    local = email.split('@', 1)[0].split('+', 1)[0]
    words = [word for word in re.split(r'[\W\d_]+', local) if word]
    return ' '.join(word.capitalize() for word in words) or 'there'


class Client(db.Model):
    """A subscriber. `num_newsletter` is the last drip stage received (0 when new)."""
    __tablename__ = 'clients'
    __table_args__ = (sa.Index('ix_clients_drip', 'num_newsletter', 'id'),)

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    email: so.Mapped[str] = so.mapped_column(sa.String(254), unique=True)
    active: so.Mapped[bool] = so.mapped_column(default=True)
    num_newsletter: so.Mapped[int] = so.mapped_column(default=0)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    email_confirmed_at: so.Mapped[datetime | None]
    unsubscribed_at: so.Mapped[datetime | None]

    @property
    def greeting_name(self):
        return greeting_name(self.email)

    def __repr__(self):
        return f'<Client {self.id} {self.email}>'


class Delivery(db.Model):
    """One row per subscriber and mailing (a drip stage such as 'week1', or a broadcast such as
    'broadcast7'), and the guard that makes every send at most once: the unique (client_id, mailing)
    pair is claimed *before* the message goes out. While `status` is 'sending' the claim belongs to
    `claimed_by` until `lease_until`; after that another run may take it over (the first one died)."""
    __tablename__ = 'deliveries'
    __table_args__ = (
        sa.UniqueConstraint('client_id', 'mailing', name='uq_deliveries_client_mailing'),
        # Only claims in flight are indexed by mailing: a full (mailing) index tempts PostgreSQL, with
        # stale statistics, into rescanning a mailing's whole send log for every subscriber it checks.
        sa.Index('ix_deliveries_in_flight', 'mailing', postgresql_where=sa.text("status = 'sending'"),
                 sqlite_where=sa.text("status = 'sending'")),
    )

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    client_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey('clients.id', ondelete='CASCADE'))
    mailing: so.Mapped[str] = so.mapped_column(sa.String(40))
    status: so.Mapped[str] = so.mapped_column(sa.String(10))  # sending, sent, failed
    claimed_by: so.Mapped[str | None] = so.mapped_column(sa.String(32))
    lease_until: so.Mapped[datetime | None]
    attempts: so.Mapped[int] = so.mapped_column(default=1)
    message_id: so.Mapped[str | None] = so.mapped_column(sa.String(255))
    error: so.Mapped[str | None] = so.mapped_column(sa.Text)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    sent_at: so.Mapped[datetime | None]

    client: so.Mapped[Client] = so.relationship()


class Broadcast(db.Model):
    """A one-off issue, written by an admin and sent once, at `send_at`, to every active subscriber
    confirmed by the time it starts. Its send log is the `deliveries` rows of mailing 'broadcast<id>'."""
    __tablename__ = 'broadcasts'

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    subject: so.Mapped[str] = so.mapped_column(sa.String(255))
    text: so.Mapped[str] = so.mapped_column(sa.Text)
    html: so.Mapped[str] = so.mapped_column(sa.Text)
    send_at: so.Mapped[datetime]  # UTC
    timezone: so.Mapped[str] = so.mapped_column(sa.String(64))  # the one the admin wrote send_at in
    # scheduled -> sending -> sent; scheduled -> cancelled; sending <-> paused
    status: so.Mapped[str] = so.mapped_column(sa.String(10), default='scheduled')
    created_by: so.Mapped[str] = so.mapped_column(sa.String(254))
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    started_at: so.Mapped[datetime | None]  # when its audience was fixed
    finished_at: so.Mapped[datetime | None]

    @property
    def mailing(self):
        return f'broadcast{self.id}'


class Job(db.Model):
    """A unit of background work (app/jobs.py): a task name and its keyword arguments, with everything an
    admin needs to see what became of it. `unique_key`, when set, makes a job exist at most once (a
    schedule's firing for one due time)."""
    __tablename__ = 'jobs'
    __table_args__ = (sa.Index('ix_jobs_due', 'queue', 'status', 'run_after'),)

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    task: so.Mapped[str] = so.mapped_column(sa.String(100))
    queue: so.Mapped[str] = so.mapped_column(sa.String(20))
    payload: so.Mapped[dict] = so.mapped_column(sa.JSON)
    unique_key: so.Mapped[str | None] = so.mapped_column(sa.String(200), unique=True)
    # queued -> running -> done | failed (or queued again, to retry); queued -> cancelled; skipped
    status: so.Mapped[str] = so.mapped_column(sa.String(10), default='queued')
    attempts: so.Mapped[int] = so.mapped_column(default=0)
    max_attempts: so.Mapped[int]
    run_after: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    claimed_by: so.Mapped[str | None] = so.mapped_column(sa.String(32))
    lease_until: so.Mapped[datetime | None]
    progress_done: so.Mapped[int | None]
    progress_total: so.Mapped[int | None]
    result: so.Mapped[dict | None] = so.mapped_column(sa.JSON)
    error: so.Mapped[str | None] = so.mapped_column(sa.Text)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    started_at: so.Mapped[datetime | None]
    finished_at: so.Mapped[datetime | None]
