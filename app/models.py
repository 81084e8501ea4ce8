"""The database tables: subscribers, the per-subscriber send log, send runs, broadcasts, and background jobs."""
import enum
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import orm as so

from app.database import utcnow
from app.extensions import db


class Client(db.Model):
    """A subscriber. `num_newsletter` is the last drip stage received (0 when new). Someone imported from a
    file (app/imports.py) whose admin said they had consented already is confirmed without a confirmation
    email; who said so, and when, is kept as the record of their consent.

    One row a mailbox: an address is unique whatever the case of its letters. Two rows for Jane@ and jane@
    would each get every mailing, and each its own confirmation every CONFIRM_RESEND_SECONDS. The address is
    kept as it was first given (the suppression list keeps it in lower case)."""
    __tablename__ = 'clients'
    __table_args__ = (sa.Index('ix_clients_drip', 'num_newsletter', 'id'),
                      sa.Index('ix_clients_email_lower', sa.text('lower(email)'), unique=True))

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    email: so.Mapped[str] = so.mapped_column(sa.String(254), unique=True)
    active: so.Mapped[bool] = so.mapped_column(default=True)
    num_newsletter: so.Mapped[int] = so.mapped_column(default=0)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    email_confirmed_at: so.Mapped[datetime | None]
    unsubscribed_at: so.Mapped[datetime | None]
    confirmation_sent_at: so.Mapped[datetime | None]  # the latest: at most one every CONFIRM_RESEND_SECONDS
    name: so.Mapped[str | None] = so.mapped_column(sa.String(100))  # from an imported file's name column
    consent_recorded_by: so.Mapped[str | None] = so.mapped_column(sa.String(254))  # the admin who imported them as consenting
    consent_recorded_at: so.Mapped[datetime | None]

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
    sending: so.Mapped[list | None] = so.mapped_column(sa.JSON(none_as_null=True))  # the ids of the claimed
    # deliveries whose data may be going out now: each one, not a range, which would take in claims between
    taken_over_at: so.Mapped[datetime | None]  # its lease ran out, and another run took its claims on
    started_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    finished_at: so.Mapped[datetime | None]  # None: running, or killed
    sent: so.Mapped[int] = so.mapped_column(default=0)
    failed: so.Mapped[int] = so.mapped_column(default=0)
    unknown: so.Mapped[int] = so.mapped_column(default=0)
    deferred: so.Mapped[int] = so.mapped_column(default=0)
    skipped: so.Mapped[int] = so.mapped_column(default=0)
    stopped: so.Mapped[str | None] = so.mapped_column(sa.Text)  # why it ended early, if it did


class BroadcastStatus(enum.StrEnum):
    """Where a broadcast stands. Every move is one of BROADCAST_MOVES, made by app/broadcasts.py."""
    SCHEDULED = 'scheduled'  # written, waiting for send_at
    SENDING = 'sending'  # its audience fixed; sent, or to be sent, by its job
    PAUSED = 'paused'  # stopped by an admin after a batch; resumed, it carries on where it stopped
    SENT = 'sent'  # nobody left due or deferred
    CANCELLED = 'cancelled'


@dataclass(frozen=True)
class Move:
    """One allowed change of state: from any of `sources` to `to`."""
    sources: tuple
    to: enum.StrEnum


BROADCAST_MOVES = {
    'start': Move((BroadcastStatus.SCHEDULED,), BroadcastStatus.SENDING),  # its job, when send_at comes
    'finish': Move((BroadcastStatus.SENDING,), BroadcastStatus.SENT),  # its job, once nobody is left
    'pause': Move((BroadcastStatus.SENDING,), BroadcastStatus.PAUSED),  # an admin
    'resume': Move((BroadcastStatus.PAUSED,), BroadcastStatus.SENDING),  # an admin: a new job carries on
    'cancel': Move((BroadcastStatus.SCHEDULED, BroadcastStatus.PAUSED), BroadcastStatus.CANCELLED),  # an admin
    'reopen': Move((BroadcastStatus.SENT,), BroadcastStatus.SENDING),  # an admin resends its unknown ones
}


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
    status: so.Mapped[str] = so.mapped_column(sa.String(10), default=BroadcastStatus.SCHEDULED)
    created_by: so.Mapped[str] = so.mapped_column(sa.String(254))
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    started_at: so.Mapped[datetime | None]  # when its audience was fixed
    finished_at: so.Mapped[datetime | None]

    @property
    def mailing(self):
        return f'broadcast{self.id}'


class JobStatus(enum.StrEnum):
    """Where a job stands. Every move, and the function of app/jobs.py that makes it:

        (new)     -> queued     Task.apply, Task.apply_once
        (new)     -> skipped    Task.apply_once(status=SKIPPED): a schedule's due time missed long ago
        queued    -> running    execute: a worker has claimed it and starts it
        running   -> running    execute: its worker died; another took it over once its lease ran out
        running   -> done       execute: the task returned (its own writes are committed with this)
        running   -> queued     execute: it raised, and has attempts left (back-off), or it was
                                interrupted (its worker stopping) or rescheduled (Reschedule)
        running   -> failed     execute: it raised GiveUp, or on its last attempt; or its workers kept dying
        queued    -> cancelled  app/broadcasts.py cancel: the broadcast it would send was cancelled
    """
    QUEUED = 'queued'
    RUNNING = 'running'
    DONE = 'done'
    FAILED = 'failed'
    SKIPPED = 'skipped'
    CANCELLED = 'cancelled'


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
    status: so.Mapped[str] = so.mapped_column(sa.String(10), default=JobStatus.QUEUED)
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


class AdminSession(db.Model):
    """An admin signed in, from one sign-in link (app/admin/auth.py). The session cookie holds only this
    row's id: logging out, or ADMIN_SESSION_HOURS passing, ends the session here, whatever copy of the
    cookie is still about; and a link's nonce is unique, so each sign-in link works once."""
    __tablename__ = 'admin_sessions'

    id: so.Mapped[str] = so.mapped_column(sa.String(64), primary_key=True)  # random; the cookie's only content
    email: so.Mapped[str] = so.mapped_column(sa.String(254))
    link_nonce: so.Mapped[str] = so.mapped_column(sa.String(32), unique=True)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    expires_at: so.Mapped[datetime]
    ended_at: so.Mapped[datetime | None]  # logged out


class SuppressionReason(enum.StrEnum):
    BLOCKED = 'blocked'  # the address's owner asked never to be mailed again (the confirmation's block link)
    BOUNCED = 'bounced'  # the provider said it does not exist (a bounce or a drop)
    COMPLAINED = 'complained'  # marked as spam
    UNSUBSCRIBED = 'unsubscribed'  # unsubscribed at the provider (its own link or a list-unsubscribe)
    REFUSED = 'refused'  # our relay refused it for good SUPPRESS_AFTER_FAILURES times


class Suppression(db.Model):
    """An address that gets nothing more from us, whatever mailing, whoever signs it up (app/suppression.py).
    Kept by address, not by subscriber: it outlives the subscriber's row and a new sign-up."""
    __tablename__ = 'suppressions'

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    email: so.Mapped[str] = so.mapped_column(sa.String(254), unique=True)  # lower-cased
    reason: so.Mapped[str] = so.mapped_column(sa.String(20))  # a SuppressionReason
    detail: so.Mapped[str | None] = so.mapped_column(sa.Text)  # what said so: the event, the relay's answer
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)


class WebhookEvent(db.Model):
    """An event a provider's webhook delivered, by its own id: a replayed batch counts once."""
    __tablename__ = 'webhook_events'

    id: so.Mapped[str] = so.mapped_column(sa.String(100), primary_key=True)  # SendGrid's sg_event_id
    event: so.Mapped[str] = so.mapped_column(sa.String(30))
    received_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
