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


class DeliveryStatus(enum.StrEnum):
    """Where one subscriber's copy of one mailing stands. Every move, and the only module that makes
    them (app/sendlog.py), method by method:

        (due)            -> claimed    claim: a run reserves the subscriber, under a lease
        deferred         -> claimed    claim_deferred: its next attempt has come
        claimed          -> claimed    take_over: its run died before sending it
        claimed          -> sending    checkpoint: just before its data goes out; from here on it may arrive
        sending          -> sent | failed | deferred | unknown    checkpoint: the answer, or its absence
        sending          -> unknown    take_over: its run died or stalled past its lease while sending it
        claimed, sending -> (due) or deferred    release: nothing of it went out, the run stopped first
        deferred         -> failed     claim_deferred: deferred for longer than MAIL_GIVE_UP_AFTER
        failed, unknown  -> deferred   requeue: an admin asks for it to be sent again
    """
    CLAIMED = 'claimed'
    SENDING = 'sending'
    SENT = 'sent'
    FAILED = 'failed'  # refused for good, or deferred for too long
    DEFERRED = 'deferred'  # refused for now; tried again from next_attempt_at
    UNKNOWN = 'unknown'  # may have arrived; never sent again unless an admin asks

    @classmethod
    def held(cls):
        """The states in which a run owns the row (claimed_by, lease_until)."""
        return cls.CLAIMED, cls.SENDING


class Delivery(db.Model):
    """One row per subscriber and mailing (a drip stage such as 'week1', or a broadcast such as
    'broadcast7'): the ledger of who got what, and the guard that makes every send at most once. The
    unique (client_id, mailing) pair is claimed before anything goes out, and the row is marked
    'sending' before the message's data does (DeliveryStatus has every move)."""
    __tablename__ = 'deliveries'
    __table_args__ = (
        sa.UniqueConstraint('client_id', 'mailing', name='uq_deliveries_client_mailing'),
        # Only unfinished rows are indexed by mailing: a full (mailing) index tempts PostgreSQL, with
        # stale statistics, into rescanning a mailing's whole send log for every subscriber it checks.
        sa.Index('ix_deliveries_unfinished', 'mailing',
                 postgresql_where=sa.text("status IN ('claimed', 'sending', 'deferred')"),
                 sqlite_where=sa.text("status IN ('claimed', 'sending', 'deferred')")),
    )

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    client_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey('clients.id', ondelete='CASCADE'))
    mailing: so.Mapped[str] = so.mapped_column(sa.String(40))
    status: so.Mapped[str] = so.mapped_column(sa.String(10))  # a DeliveryStatus
    claimed_by: so.Mapped[str | None] = so.mapped_column(sa.String(32))
    lease_until: so.Mapped[datetime | None]
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
    """One run of one mailing (a cron command, a job, an RQ worker): where its mail went and how it
    ended. Admins see every run; and a database that has sent real mail refuses, from then on, to have
    its mailings written into the local folder by a process that lacks the mail settings."""
    __tablename__ = 'send_runs'

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    mailing: so.Mapped[str] = so.mapped_column(sa.String(40))
    trigger: so.Mapped[str] = so.mapped_column(sa.String(20))  # cli, schedule, admin, job, rq
    via: so.Mapped[str] = so.mapped_column(sa.String(255))  # the way out, as Sender.describe() says it
    started_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    finished_at: so.Mapped[datetime | None]  # None: still running, or killed
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
