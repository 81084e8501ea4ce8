"""The database tables: subscribers, the per-subscriber send log, send runs, broadcasts, and background jobs."""
import enum
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


class RowsParameter:
    """Rows (tuples) as a table with `columns` (name=type) in a statement that is built once and run many
    times, each time with `params(rows)`: one parameter per column on PostgreSQL (arrays, unnest), one
    in all on SQLite (a JSON array, json_each), however many rows. A drip batch claims 100 subscribers
    in one INSERT ... SELECT from it; as 100 VALUES rows the claim had 800 placeholders, and psycopg
    parses placeholders in Python: that cost more than the insert itself. And built anew for each run,
    a statement costs SQLAlchemy more than the database takes to run it (bench/README.md)."""

    def __init__(self, name, **columns):
        self.name, self.columns = name, columns
        # An array is of one type: psycopg refuses [120, 0.5] for a float column.
        self.python_types = [sa.types.to_instance(type_).python_type for type_ in columns.values()]
        if db.engine.dialect.name == 'postgresql':
            self.arrays = {column: sa.bindparam(f'{name}_{column}', type_=postgresql.ARRAY(type_))
                           for column, type_ in columns.items()}
            table = sa.func.unnest(*self.arrays.values()).table_valued(*columns).render_derived()
            self.table = sa.select(*table.c).subquery()
        else:
            table = sa.func.json_each(sa.bindparam(f'{name}_json')).table_valued('value')
            self.table = sa.select(*(sa.type_coerce(sa.func.json_extract(table.c.value, f'$[{i}]'), type_).label(column)
                                     for i, (column, type_) in enumerate(columns.items()))).subquery()
        self.c = self.table.c

    def holds(self, key, column):
        """`key IN` this table's `column`: on PostgreSQL as `= ANY` of its array, which the planner can use
        to fetch those rows by index however wrong its statistics, where a join may scan them all."""
        if db.engine.dialect.name == 'postgresql':
            return key == sa.any_(self.arrays[column])
        return key.in_(sa.select(self.c[column]))

    def params(self, rows):
        if db.engine.dialect.name == 'postgresql':
            return {f'{self.name}_{column}': [None if row[i] is None else python_type(row[i]) for row in rows]
                    for i, (column, python_type) in enumerate(zip(self.columns, self.python_types, strict=True))}
        return {f'{self.name}_json': json.dumps(rows)}


def among(column, name):
    """`column IN :name`, its values given when the statement runs: one array parameter on PostgreSQL,
    for the reason RowsParameter gives."""
    if db.engine.dialect.name == 'postgresql':
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(sa.bindparam(name, expanding=True))


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


class DeliveryStatus(enum.StrEnum):
    """Where one subscriber's copy of one mailing stands. Every move, and the only module that makes
    them (app/sendlog.py), method by method:

        (due)     -> claimed    claim: a run reserves the subscriber (its run's row is the lease)
        deferred  -> claimed    claim_deferred: its next attempt has come
        claimed   -> sent | failed | deferred | unknown    checkpoint: the answer, or its absence
        claimed   -> unknown    take_over: its run died (or stalled past its lease) while sending it
        claimed   -> claimed    take_over: its run died before sending it; another run takes it on
        claimed   -> (due) or deferred    release: nothing of it went out, the run stopped first
        deferred  -> failed     claim_deferred: deferred for longer than MAIL_GIVE_UP_AFTER
        failed, unknown -> deferred   requeue: an admin asks for it to be sent again
    """
    CLAIMED = 'claimed'
    SENT = 'sent'
    FAILED = 'failed'  # refused for good, or deferred for too long
    DEFERRED = 'deferred'  # refused for now; tried again from next_attempt_at
    UNKNOWN = 'unknown'  # may have arrived; never sent again unless an admin asks


class Delivery(db.Model):
    """One row per subscriber and mailing (a drip stage such as 'week1', or a broadcast such as
    'broadcast7'): the ledger of who got what, and the guard that makes every send at most once. The
    unique (client_id, mailing) pair is claimed before anything goes out (DeliveryStatus has every move)."""
    __tablename__ = 'deliveries'
    __table_args__ = (
        sa.UniqueConstraint('client_id', 'mailing', name='uq_deliveries_client_mailing'),
        # Deferred rows are found by their next attempt. A delivery moves twice in a send, and an index
        # on its status would keep an entry for each move until the next vacuum: PostgreSQL, planning on
        # statistics from before the send, walked those dead entries at every step, more each time.
        sa.Index('ix_deliveries_retries', 'next_attempt_at', postgresql_where=sa.text('next_attempt_at IS NOT NULL'),
                 sqlite_where=sa.text('next_attempt_at IS NOT NULL')),
    )

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    client_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey('clients.id', ondelete='CASCADE'))
    mailing: so.Mapped[str] = so.mapped_column(sa.String(40))
    status: so.Mapped[str] = so.mapped_column(sa.String(10))  # a DeliveryStatus
    claimed_by: so.Mapped[str | None] = so.mapped_column(sa.String(32))  # the owner of the SendRun holding it
    attempts: so.Mapped[int] = so.mapped_column(default=0)  # answers had from the way out, retries included
    message_id: so.Mapped[str | None] = so.mapped_column(sa.String(255))
    error: so.Mapped[str | None] = so.mapped_column(sa.Text)  # the latest answer that was not a success
    next_attempt_at: so.Mapped[datetime | None]  # while deferred
    deferred_since: so.Mapped[datetime | None]  # while deferred: gives up MAIL_GIVE_UP_AFTER later
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    updated_at: so.Mapped[datetime | None]  # its latest move
    sent_at: so.Mapped[datetime | None]

    client: so.Mapped[Client] = so.relationship()


class SendRun(db.Model):
    """One run of one mailing (a cron command, a job, an RQ worker): its lease on the deliveries it has
    claimed, which of them it is sending right now, and, once over, where its mail went and how it
    ended. Admins see every run; and a database that has sent real mail refuses, from then on, to have
    its mailings written into the local folder by a process that lacks the mail settings."""
    __tablename__ = 'send_runs'

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    mailing: so.Mapped[str] = so.mapped_column(sa.String(40))
    trigger: so.Mapped[str] = so.mapped_column(sa.String(20))  # cli, schedule, admin, retry, broadcast, rq
    via: so.Mapped[str] = so.mapped_column(sa.String(255))  # the way out, as describe_transport() says it
    owner: so.Mapped[str] = so.mapped_column(sa.String(32), unique=True)  # Delivery.claimed_by of its claims
    lease_until: so.Mapped[datetime | None]  # while it runs: renewed by its heartbeat
    sending_from: so.Mapped[int | None]  # the ids of the claimed deliveries whose data may be going out now
    sending_to: so.Mapped[int | None]
    taken_over_at: so.Mapped[datetime | None]  # its lease ran out, and another run took its claims on
    started_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    finished_at: so.Mapped[datetime | None]  # None: running, or killed
    sent: so.Mapped[int] = so.mapped_column(default=0)
    failed: so.Mapped[int] = so.mapped_column(default=0)
    unknown: so.Mapped[int] = so.mapped_column(default=0)
    deferred: so.Mapped[int] = so.mapped_column(default=0)
    skipped: so.Mapped[int] = so.mapped_column(default=0)
    stopped: so.Mapped[str | None] = so.mapped_column(sa.Text)  # why it ended early, if it did


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
