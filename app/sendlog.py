"""The send log: `deliveries`, one row per subscriber and mailing, and the only module that writes it.
Each SendLog method is one of the moves DeliveryStatus lists, made by one run of one mailing, and
every one of them is conditional on the row still being in the state it moves from and, while a run
holds it, on the run still owning it: a run that stalled past its lease can neither send nor record
what another run has taken over since.

Which thread calls what: the claims (claim, claim_deferred, take_over, held_by_others) on the send's
claims thread, the checkpoint on the sending thread (through a connection of its own), renew on the
heartbeat. The object itself holds nothing that changes, but that connection.

Also here, because they are questions about the send log: who is due a mailing, and an admin's
"send it again" (requeue)."""
from dataclasses import dataclass, field

import sqlalchemy as sa
from flask import current_app

from app import db
from app.leases import claim, db_later, db_now, new_owner, renew
from app.mailing import Recipient
from app.models import Client, Delivery, among, insert_ignoring_conflicts, utcnow, values_table
from app.models import DeliveryStatus as Status

TAKEN_OVER = ('the run sending it stopped (killed, or stalled past its lease) before the answer came: '
              'it may have arrived')


@dataclass(frozen=True)
class Claimed:
    """A delivery this run holds: whom it is for, and how many answers it has had before (deferrals)."""
    delivery_id: int
    recipient: Recipient
    attempts: int = 0


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed delivery. `status` None: nothing of it went out (it is released)."""
    delivery_id: int
    recipient: Recipient
    status: Status | None
    answers: int = 0  # answers about it from the way out, in this claim
    error: str | None = None
    retry_after: float = 0.0  # deferred: seconds until its next attempt


@dataclass(frozen=True)
class Found:
    """What a claim found: the deliveries this run now holds, and those it settled on the way."""
    claimed: list = field(default_factory=list)  # [Claimed]
    skipped: int = 0  # due, but claimed first by another run
    unknown: list = field(default_factory=list)  # (email, reason): sent by a run that died
    failed: list = field(default_factory=list)  # (email, reason): deferred for too long


def due_subscribers(mailing, after, limit):
    """The next `limit` subscribers by id after `after` who are due `mailing` and have no row for it."""
    # `client_id > after` repeats the outer bound so PostgreSQL starts its walk of the send log there
    # too, instead of from the beginning, for every batch.
    logged = sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.mailing == mailing.key,
                                          Delivery.client_id > after)
    rows = db.session.execute(
        sa.select(Client.id, Client.email)
        .where(*mailing.conditions(), Client.id > after, ~sa.exists(logged))
        .order_by(Client.id).limit(limit))
    return [Recipient(*row) for row in rows]


def iter_due(mailing):
    """Everyone due `mailing`, read a batch at a time (for --dry-run)."""
    after, batch = 0, current_app.config['SEND_BATCH_SIZE']
    while recipients := due_subscribers(mailing, after, batch):
        yield from recipients
        after = recipients[-1].client_id


def count_due(mailing, with_retries=False):
    """Due `mailing` with no row for it yet; `with_retries`, and deferred ones whose time has come."""
    logged = sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.mailing == mailing.key)
    due = sa.select(sa.func.count(Client.id)).where(*mailing.conditions(), ~sa.exists(logged)).scalar_subquery()
    retries = sa.select(sa.func.count(Delivery.id)).where(
        Delivery.mailing == mailing.key, Delivery.status == Status.DEFERRED,
        Delivery.next_attempt_at <= db_now()).scalar_subquery()
    return db.session.scalar(sa.select(due + retries if with_retries else due))


def next_retry(mailing):
    """When the earliest of the mailing's deferred deliveries is tried again, or None."""
    return db.session.scalar(sa.select(sa.func.min(Delivery.next_attempt_at)).where(
        Delivery.mailing == mailing.key, Delivery.status == Status.DEFERRED))


def spread_starts(mailing, runs):
    """Where `runs` parallel runs should start in the list of due subscribers (by id) so that they
    do not all contend for the same first batch."""
    due = count_due(mailing)
    starts = [0]
    for i in range(1, runs):
        starts.append(db.session.scalar(
            sa.select(Client.id).where(*mailing.conditions()).order_by(Client.id)
            .offset(max(due * i // runs - 1, 0)).limit(1)) or 0)
    return starts


def refresh_planner_statistics():
    """On PostgreSQL, ANALYZE before a send. Subscribers are often imported in bulk just before one,
    and with statistics from before the import the planner sorts every remaining subscriber for each
    batch instead of walking the index in id order (bench/README.md: thirty times slower). Skipped with
    a warning where the database user may not analyze."""
    if db.engine.dialect.name != 'postgresql':
        return
    try:
        db.session.execute(sa.text('ANALYZE clients, deliveries'))
        db.session.commit()
    except sa.exc.DBAPIError as exc:
        db.session.rollback()
        current_app.logger.warning('could not ANALYZE before sending (the send may be slower): %s', exc)


def requeue(mailing_key, statuses, client_ids=None):
    """failed | unknown -> deferred, due now: an admin's explicit "send it again" (after fixing the cause
    of a failure, or after finding that an unknown one did not arrive). The row and its history stay.
    :return: how many."""
    now = db_now()
    which = [Delivery.mailing == mailing_key, Delivery.status.in_(statuses)]
    if client_ids is not None:
        which.append(Delivery.client_id.in_(client_ids))
    count = db.session.execute(
        sa.update(Delivery).where(*which)
        .values(status=Status.DEFERRED, next_attempt_at=now, deferred_since=now, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    return count


class SendLog:
    """The send log as one run of `mailing` writes it."""

    def __init__(self, mailing):
        config = current_app.config
        self.mailing, self.owner = mailing, new_owner()
        self.lease, self.give_up_after = config['LEASE_SECONDS'], config['MAIL_GIVE_UP_AFTER']
        self.connection = None

    # On the claims thread.

    def claim(self, recipients):
        """(due) -> claimed. A subscriber another run claimed first is silently not ours.
        :return: [Claimed]"""
        deliveries = Delivery.__table__
        wanted = values_table([(r.client_id, self.mailing.message_id(r)) for r in recipients],
                              client_id=sa.Integer, message_id=sa.String)
        now = db_now()
        rows = sa.select(wanted.c.client_id, wanted.c.message_id, sa.literal(self.mailing.key),
                         sa.literal(Status.CLAIMED.value), sa.literal(self.owner), db_later(self.lease), now, now,
                         sa.literal(0))
        won = dict(db.session.execute(
            insert_ignoring_conflicts(deliveries, ['client_id', 'mailing'])
            .from_select(['client_id', 'message_id', 'mailing', 'status', 'claimed_by', 'lease_until', 'created_at',
                          'updated_at', 'attempts'], rows.where(sa.true()))  # SQLite parses ON CONFLICT only after a WHERE
            .returning(deliveries.c.client_id, deliveries.c.id)).all())
        db.session.commit()
        return [Claimed(won[r.client_id], r) for r in recipients if r.client_id in won]

    def claim_deferred(self, limit):
        """deferred -> claimed, for those whose next attempt has come; deferred -> failed, for those
        deferred longer than MAIL_GIVE_UP_AFTER. :return: Found"""
        failed = self._settle(
            sa.update(Delivery).where(Delivery.mailing == self.mailing.key, Delivery.status == Status.DEFERRED,
                                      Delivery.deferred_since < db_later(-self.give_up_after))
            .values(status=Status.FAILED, next_attempt_at=None, updated_at=db_now(),
                    error=sa.literal(f'gave up after {self.give_up_after / 3600:g} h of temporary failures; the '
                                     'last: ') + sa.func.coalesce(Delivery.error, '')))
        ids = claim(Delivery, Delivery.mailing == self.mailing.key, Delivery.status == Status.DEFERRED,
                    Delivery.next_attempt_at <= db_now(), owner=self.owner, seconds=self.lease, limit=limit,
                    values={'status': Status.CLAIMED, 'updated_at': db_now()})
        return Found(self._still_due(ids), failed=failed)

    def take_over(self, limit):
        """What runs that died (or stalled past their lease) left behind: sending -> unknown, for it may
        have arrived; claimed -> claimed by this run, to send. :return: Found"""
        unknown = self._settle(
            sa.update(Delivery).where(Delivery.mailing == self.mailing.key, Delivery.status == Status.SENDING,
                                      Delivery.lease_until < db_now())
            .values(status=Status.UNKNOWN, claimed_by=None, lease_until=None, updated_at=db_now(),
                    attempts=Delivery.attempts + 1, error=TAKEN_OVER))
        ids = claim(Delivery, Delivery.mailing == self.mailing.key, Delivery.status == Status.CLAIMED,
                    owner=self.owner, seconds=self.lease, limit=limit, values={'updated_at': db_now()})
        return Found(self._still_due(ids), unknown=unknown)

    def _settle(self, update):
        """Run a move that ends some rows, and commit.  :return: [(email, error)] of the rows it moved."""
        moved = db.session.execute(update.returning(Delivery.client_id, Delivery.error)
                                   .execution_options(synchronize_session=False)).all()
        db.session.commit()
        if not moved:
            return []
        emails = dict(db.session.execute(sa.select(Client.id, Client.email)
                                         .where(Client.id.in_([client_id for client_id, _ in moved]))).all())
        return [(emails[client_id], error) for client_id, error in moved]

    def _still_due(self, ids):
        """The claimed rows whose subscriber is still due the mailing; the rest (they unsubscribed since)
        are let go. :return: [Claimed]"""
        if not ids:
            return []
        rows = db.session.execute(
            sa.select(Delivery.id, Client.id, Client.email, Delivery.attempts, sa.and_(*self.mailing.conditions()))
            .join(Client, Client.id == Delivery.client_id).where(Delivery.id.in_(ids)).order_by(Client.id)).all()
        gone = [delivery_id for delivery_id, _, _, _, due in rows if not due]
        if gone:
            db.session.execute(sa.delete(Delivery).where(Delivery.id.in_(gone), Delivery.claimed_by == self.owner))
            db.session.commit()
        return [Claimed(delivery_id, Recipient(client_id, email), attempts)
                for delivery_id, client_id, email, attempts, due in rows if due]

    def held_by_others(self):
        """:return: (rows other runs hold on this mailing, seconds until the first of their leases ends)."""
        held, soonest, now = db.session.execute(
            sa.select(sa.func.count(Delivery.id), sa.func.min(Delivery.lease_until), db_now())
            .where(Delivery.mailing == self.mailing.key, Delivery.status.in_(Status.held()),
                   Delivery.claimed_by != self.owner)).one()
        db.session.commit()
        return held, (soonest - now).total_seconds() if held else 0.0

    # On the sending thread.

    def checkpoint(self, outcomes=(), sending=(), release=()):
        """In one commit: sending -> each outcome's status (a drip stage moving its sent subscribers on);
        claimed -> sending for `sending`, whose data is about to go out; release `release`.
        :return: ({delivery id: status} of the outcomes recorded, {delivery ids marked sending}); an
        outcome or a mark missing from them was on a row this run no longer holds."""
        connection = self._connection()
        deliveries = Delivery.__table__
        recorded, marked = {}, set()
        if outcomes:
            given = values_table([(o.delivery_id, o.status.value, o.answers, o.error, o.retry_after) for o in outcomes],
                                 id=sa.Integer, status=sa.String, answers=sa.Integer, error=sa.String,
                                 retry_after=sa.Float)
            now, deferred = db_now(), given.c.status == Status.DEFERRED.value
            rows = connection.execute(
                sa.update(deliveries)
                .where(deliveries.c.id == given.c.id, deliveries.c.claimed_by == self.owner,
                       deliveries.c.status == Status.SENDING)
                .values(status=given.c.status, attempts=deliveries.c.attempts + given.c.answers, error=given.c.error,
                        sent_at=sa.case((given.c.status == Status.SENT.value, now)),
                        next_attempt_at=sa.case((deferred, db_later(given.c.retry_after))),
                        deferred_since=sa.case((deferred, sa.func.coalesce(deliveries.c.deferred_since, now))),
                        updated_at=now, claimed_by=None, lease_until=None)
                .returning(deliveries.c.id, deliveries.c.client_id, deliveries.c.status)).all()
            recorded = {delivery_id: Status(status) for delivery_id, _, status in rows}
            sent = [client_id for _, client_id, status in rows if status == Status.SENT]
            if sent and (advance := self.mailing.advance(sent)) is not None:
                connection.execute(advance)
        if sending:
            marked = set(connection.execute(
                sa.update(deliveries)
                .where(among(deliveries.c.id, sending), deliveries.c.claimed_by == self.owner,
                       deliveries.c.status == Status.CLAIMED)
                .values(status=Status.SENDING, lease_until=db_later(self.lease), updated_at=db_now())
                .returning(deliveries.c.id)).scalars())
        if release:
            self._release(connection, release)
        connection.commit()
        return recorded, marked

    def release(self, ids):
        if ids:
            connection = self._connection()
            self._release(connection, ids)
            connection.commit()

    def _release(self, connection, ids):
        """claimed | sending -> (due), or back to deferred for a row that has been tried before: nothing
        of these went out."""
        deliveries, now = Delivery.__table__, db_now()
        held = (among(deliveries.c.id, ids), deliveries.c.claimed_by == self.owner,
                deliveries.c.status.in_(Status.held()))
        connection.execute(sa.delete(deliveries).where(*held, deliveries.c.attempts == 0))
        connection.execute(
            sa.update(deliveries).where(*held)
            .values(status=Status.DEFERRED, claimed_by=None, lease_until=None, updated_at=now,
                    next_attempt_at=sa.func.coalesce(deliveries.c.next_attempt_at, now),
                    deferred_since=sa.func.coalesce(deliveries.c.deferred_since, now)))

    def _connection(self):
        """The checkpoint's own connection, held for the run. On PostgreSQL its commits do not wait for
        the disk (synchronous_commit off): a killed client loses nothing the server has acknowledged,
        and only a crash of the server itself could lose the last fraction of a second of them. SQLite
        runs in WAL mode with synchronous=NORMAL for the same reason (app/__init__.py)."""
        if self.connection is None:
            self.connection = db.engine.connect()
            if db.engine.dialect.name == 'postgresql':
                self.connection.exec_driver_sql('SET synchronous_commit TO OFF')
                self.connection.commit()
        return self.connection

    def close(self):
        """Its connection is closed rather than handed back to the pool, where its setting would linger."""
        if self.connection is not None:
            self.connection.invalidate()
            self.connection.close()
            self.connection = None

    # On the heartbeat thread.

    def renew(self):
        """:return: how many rows this run still holds."""
        return renew(Delivery, Delivery.mailing == self.mailing.key, Delivery.status.in_(Status.held()),
                     owner=self.owner, seconds=self.lease)
