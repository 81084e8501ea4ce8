"""The send log: `deliveries`, one row per subscriber and mailing, and `send_runs`, one row per run of
a mailing; the only module that writes them.

A run's row is its lease (`lease_until`, on the database's clock, renewed by a heartbeat) and says
which of its claimed deliveries it is sending right now (`sending`, their ids, each named: a range
would take in the claims between, when a run goes from new claims to older ones with the first still
on the wire): written, with the outcomes that came in since, before any of those messages' data goes
out. A run whose lease has run out is taken over by the next: the deliveries it was sending may have
arrived and become 'unknown'; its other claims pass to the run that took it over. Taking a run over
marks its row, and every write a run makes is conditional on its row not being marked so and on the
delivery still being claimed by it: a run that stalled past its lease can neither send nor record
what another has taken over since, and finds out.

Each SendLog method is one of the moves DeliveryStatus lists. Which thread calls what: start, the
checkpoint and finish on the sending thread (the checkpoint through a connection of its own), the
claims (claim, claim_deferred, take_over, held_by_others) on the send's claims thread, renew on the
heartbeat. The object itself holds nothing that changes but that connection.

Also here, because they are questions about the send log: who is due a mailing, and an admin's
"send it again" (requeue)."""
from dataclasses import dataclass, field

import sqlalchemy as sa
from flask import current_app

from app.database import RowsParameter, among, insert_ignoring_conflicts
from app.extensions import db
from app.leases import db_later, db_now, new_owner
from app.mailing import Recipient
from app.models import Client, Delivery, SendRun
from app.models import DeliveryStatus as Status

TAKEN_OVER = ('the run sending it stopped (killed, or stalled past its lease) before its answer came: '
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
    return [Recipient(*row) for row in db.session.execute(due_statement(mailing, after, limit))]


def due_statement(mailing, after, limit):
    """One statement per batch, walking the subscribers' primary key from `after` (bench/due_plan.py
    shows PostgreSQL's plan for it)."""
    # `client_id > after` repeats the outer bound so PostgreSQL starts its walk of the send log there
    # too, instead of from the beginning, for every batch.
    logged = sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.mailing == mailing.key,
                                          Delivery.client_id > after)
    return (sa.select(Client.id, Client.email).where(*mailing.conditions(after), Client.id > after, ~sa.exists(logged))
            .order_by(Client.id).limit(limit))


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
    batch instead of walking the index in id order (bench/README.md has what that cost). Skipped with
    a warning where the database user may not analyze."""
    if db.engine.dialect.name != 'postgresql':
        return
    try:
        db.session.execute(sa.text('ANALYZE clients, deliveries'))
        db.session.commit()
    except sa.exc.DBAPIError as exc:
        db.session.rollback()
        current_app.logger.warning('could not ANALYZE before sending (the send may be slower): %s', exc)


def requeue(mailing, statuses, client_ids=None):
    """failed | unknown -> deferred, due now: an admin's explicit "send it again" (after fixing the cause
    of a failure, or after finding that an unknown one did not arrive). The row and its history stay. Only
    the rows of those `mailing` is still for: the send lets go anyone it is not (unsubscribed or suppressed
    since), and with them the row and what it recorded.  :return: how many."""
    now = db_now()
    which = [Delivery.mailing == mailing.key, Delivery.status.in_(statuses),
             Delivery.client_id.in_(sa.select(Client.id).where(*mailing.conditions()))]
    if client_ids is not None:
        which.append(Delivery.client_id.in_(client_ids))
    count = db.session.execute(
        sa.update(Delivery).where(*which)
        .values(status=Status.DEFERRED, next_attempt_at=now, deferred_since=now, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    return count


class SendLog:
    """The send log as one run of `mailing` writes it. Its frequent statements are built once, here:
    SQLAlchemy takes longer to build and key a statement like these than the database takes to run it."""

    def __init__(self, mailing):
        config = current_app.config
        self.mailing, self.owner, self.run_id = mailing, new_owner(), None
        self.lease, self.give_up_after = config['LEASE_SECONDS'], config['MAIL_GIVE_UP_AFTER']
        self.connection = None
        deliveries, runs, now = Delivery.__table__, SendRun.__table__, db_now()
        mine = (deliveries.c.claimed_by == self.owner, deliveries.c.status == Status.CLAIMED)

        self.wanted = RowsParameter('wanted', client_id=sa.Integer, message_id=sa.String)
        claims = sa.select(self.wanted.c.client_id, self.wanted.c.message_id, sa.literal(mailing.key),
                           sa.literal(Status.CLAIMED.value), sa.literal(self.owner), now, now, sa.literal(0))
        self.claim_statement = (
            insert_ignoring_conflicts(deliveries, ['client_id', 'mailing'])
            .from_select(['client_id', 'message_id', 'mailing', 'status', 'claimed_by', 'created_at', 'updated_at',
                          'attempts'], claims.where(sa.true()))  # SQLite parses ON CONFLICT only after a WHERE
            .returning(deliveries.c.client_id, deliveries.c.id))

        # The run's row, renewed, with the deliveries about to be sent; nothing if taken over.
        self.keep_statement = (
            sa.update(runs).where(runs.c.owner == self.owner, runs.c.taken_over_at.is_(None))
            .values(lease_until=db_later(self.lease), sending=sa.bindparam('sending', type_=runs.c.sending.type))
            .returning(runs.c.id))
        self.given = RowsParameter('given', id=sa.Integer, status=sa.String, answers=sa.Integer, error=sa.String,
                                   retry_after=sa.Float)
        given, deferred = self.given.c, self.given.c.status == Status.DEFERRED.value
        self.record_statement = (
            sa.update(deliveries).where(self.given.holds(deliveries.c.id, 'id'), deliveries.c.id == given.id, *mine)
            .values(status=given.status, attempts=deliveries.c.attempts + given.answers, error=given.error,
                    sent_at=sa.case((given.status == Status.SENT.value, now)),
                    next_attempt_at=sa.case((deferred, db_later(given.retry_after))),
                    deferred_since=sa.case((deferred, sa.func.coalesce(deliveries.c.deferred_since, now))),
                    updated_at=now, claimed_by=None)
            .returning(deliveries.c.id, deliveries.c.client_id, deliveries.c.status))
        if db.engine.dialect.name == 'postgresql':
            # The whole checkpoint in one statement, one round trip, its own transaction.
            kept, recorded = self.keep_statement.cte('kept'), self.record_statement.cte('recorded')
            self.checkpoint_statement = sa.union_all(sa.select(kept.c.id, sa.literal(None, sa.String)),
                                                     sa.select(recorded.c.id, recorded.c.status))
            sent = sa.select(recorded.c.client_id).where(recorded.c.status == Status.SENT.value)
            if (advance := mailing.advance(sent)) is not None:
                self.checkpoint_statement = self.checkpoint_statement.add_cte(advance.cte('advanced'))
        else:
            self.advance_statement = mailing.advance(sa.bindparam('client_ids', expanding=True))
        self.release_statements = (
            sa.delete(deliveries).where(among(deliveries.c.id, 'ids'), *mine, deliveries.c.attempts == 0),
            sa.update(deliveries).where(among(deliveries.c.id, 'ids'), *mine)
            .values(status=Status.DEFERRED, claimed_by=None, updated_at=now,
                    next_attempt_at=sa.func.coalesce(deliveries.c.next_attempt_at, now),
                    deferred_since=sa.func.coalesce(deliveries.c.deferred_since, now)))

    # On the sending thread.

    def start(self, trigger, via):
        """The run's row, and with it its lease."""
        self.run_id = db.session.execute(
            sa.insert(SendRun).values(mailing=self.mailing.key, trigger=trigger, via=via, owner=self.owner,
                                      lease_until=db_later(self.lease), started_at=db_now())
            .returning(SendRun.id)).scalar_one()
        db.session.commit()

    def checkpoint(self, outcomes=(), sending=(), release=()):
        """In one commit: the run's row renewed with `sending` (claimed delivery ids, in order), about to
        go out; claimed -> each outcome's status (a drip stage moving its sent subscribers on); release
        `release`.  :return: ({delivery id: status} of the outcomes recorded, whether the run still holds
        its claims). An outcome missing from the first was on a delivery that was taken over."""
        connection = self._connection()
        given = self.given.params([(o.delivery_id, o.status.value, o.answers, o.error, o.retry_after) for o in outcomes])
        going = {'sending': list(sending) or None}
        if db.engine.dialect.name == 'postgresql':
            moved = connection.execute(self.checkpoint_statement, {**given, **going}).all()
        else:
            moved = [(run_id, None) for run_id in connection.execute(self.keep_statement, going).scalars()]
            if outcomes:
                rows = connection.execute(self.record_statement, given).all()
                moved += [(delivery_id, status) for delivery_id, _, status in rows]
                sent = [client_id for _, client_id, status in rows if status == Status.SENT]
                if sent and self.advance_statement is not None:
                    connection.execute(self.advance_statement, {'client_ids': sent})
        if release:
            self._release(connection, release)
        connection.commit()
        return {delivery_id: Status(status) for delivery_id, status in moved if status}, \
            any(status is None for _, status in moved)

    def release(self, ids):
        if ids:
            connection = self._connection()
            self._release(connection, ids)
            connection.commit()

    def _release(self, connection, ids):
        """claimed -> (due), or back to deferred for a delivery tried before: nothing of these went out."""
        for statement in self.release_statements:
            connection.execute(statement, {'ids': list(ids)})

    def finish(self, report, abandoned=False):
        """The run's row, as the run ended: kept for admins, and its lease given up. `abandoned`: the run
        stopped on a database error, maybe holding claims and outcomes it could not record; then its lease
        and what it was sending stay, so that once the lease runs out the next run takes it over exactly as
        it would a killed one. Given up, they would leave those claims to nobody."""
        ended = {} if abandoned else {'finished_at': db_now(), 'lease_until': None, 'sending': None}
        db.session.execute(sa.update(SendRun).where(SendRun.id == self.run_id).values(
            **ended, sent=report.sent, failed=len(report.failed), unknown=len(report.unknown),
            deferred=len(report.deferred), skipped=report.skipped,
            stopped=report.aborted or ('asked to stop' if report.stopped else None)))
        db.session.commit()

    def _connection(self):
        """The checkpoint's own connection, held for the run. On PostgreSQL each statement is its own
        transaction (autocommit), and its commit does not wait for the disk (synchronous_commit off): a
        killed client loses nothing the server has acknowledged, and only a crash of the server itself
        could lose the last fraction of a second of them. SQLite runs in WAL mode with synchronous=NORMAL
        for the same reason (app/__init__.py).

        Every statement on it finds its rows by primary key, and says so (enable_seqscan off, and ids as
        `= ANY`): planned once for all (a prepared statement's generic plan) on statistics from before the
        send filled the send log, the checkpoint otherwise scanned the whole send log each time, longer at
        each step."""
        if self.connection is None:
            if db.engine.dialect.name == 'postgresql':
                self.connection = db.engine.connect().execution_options(isolation_level='AUTOCOMMIT')
                for setting in ('synchronous_commit TO OFF', 'enable_seqscan TO OFF'):
                    self.connection.exec_driver_sql(f'SET {setting}')
            else:
                self.connection = db.engine.connect()
        return self.connection

    def close(self):
        """Its connection is closed rather than handed back to the pool, where its setting would linger."""
        if self.connection is not None:
            self.connection.invalidate()
            self.connection.close()
            self.connection = None

    # On the claims thread.

    def claim(self, recipients):
        """(due) -> claimed. A subscriber another run claimed first is silently not ours.
        :return: [Claimed]"""
        won = dict(db.session.execute(self.claim_statement, self.wanted.params(
            [(r.client_id, self.mailing.message_id(r)) for r in recipients])).all())
        db.session.commit()
        return sorted((Claimed(won[r.client_id], r) for r in recipients if r.client_id in won),
                      key=lambda claimed: claimed.delivery_id)

    def claim_deferred(self, limit):
        """deferred -> claimed, for those whose next attempt has come; deferred -> failed, for those
        deferred longer than MAIL_GIVE_UP_AFTER. :return: Found"""
        failed = self._settle(
            sa.update(Delivery).where(Delivery.mailing == self.mailing.key, Delivery.status == Status.DEFERRED,
                                      Delivery.deferred_since < db_later(-self.give_up_after))
            .values(status=Status.FAILED, next_attempt_at=None, updated_at=db_now(),
                    error=sa.literal(f'gave up after {self.give_up_after / 3600:g} h of temporary failures; the '
                                     'last: ') + sa.func.coalesce(Delivery.error, '')))
        retries = (Delivery.next_attempt_at <= db_now(), Delivery.mailing == self.mailing.key,
                   Delivery.status == Status.DEFERRED)
        # Two statements, so that PostgreSQL workers pass over rows another is claiming this moment (SKIP
        # LOCKED); repeating the conditions in the UPDATE is what makes the claim safe.
        ids = db.session.scalars(sa.select(Delivery.id).where(*retries).order_by(Delivery.id).limit(limit)
                                 .with_for_update(skip_locked=True)).all()
        claimed = db.session.execute(
            sa.update(Delivery).where(Delivery.id.in_(ids), *retries)
            .values(status=Status.CLAIMED, claimed_by=self.owner, updated_at=db_now())
            .returning(Delivery.id, Delivery.client_id, Delivery.attempts)
            .execution_options(synchronize_session=False)).all() if ids else []
        db.session.commit()
        return Found(self._still_due(claimed), failed=failed)

    def take_over(self):
        """The runs of this mailing whose lease ran out (killed, or stalled past it): each marked taken
        over, the deliveries it was sending claimed -> unknown, for they may have arrived; its other
        claims passed to this run, to send. :return: Found"""
        runs = SendRun.__table__
        dead = db.session.execute(
            sa.update(runs).where(runs.c.mailing == self.mailing.key, runs.c.finished_at.is_(None),
                                  runs.c.taken_over_at.is_(None), runs.c.lease_until < db_now())
            .values(taken_over_at=db_now(),
                    stopped=sa.func.coalesce(runs.c.stopped + '; ', '') + f'taken over by run {self.run_id}')
            .returning(runs.c.owner, runs.c.sending)).all()
        unknown, claimed = [], []
        for owner, sending in dead:
            theirs = (Delivery.mailing == self.mailing.key, Delivery.claimed_by == owner,
                      Delivery.status == Status.CLAIMED)
            if sending:
                unknown += self._settle(
                    sa.update(Delivery).where(*theirs, Delivery.id.in_(sending))
                    .values(status=Status.UNKNOWN, claimed_by=None, updated_at=db_now(),
                            attempts=Delivery.attempts + 1, error=TAKEN_OVER), commit=False)
            claimed += db.session.execute(
                sa.update(Delivery).where(*theirs).values(claimed_by=self.owner)
                .returning(Delivery.id, Delivery.client_id, Delivery.attempts)
                .execution_options(synchronize_session=False)).all()
        db.session.commit()
        return Found(self._still_due(claimed), unknown=unknown)

    def _settle(self, update, commit=True):
        """Run a move that ends some rows.  :return: [(email, error)] of the rows it moved."""
        moved = db.session.execute(update.returning(Delivery.client_id, Delivery.error)
                                   .execution_options(synchronize_session=False)).all()
        if commit:
            db.session.commit()
        if not moved:
            return []
        emails = dict(db.session.execute(sa.select(Client.id, Client.email)
                                         .where(Client.id.in_([client_id for client_id, _ in moved]))).all())
        return [(emails[client_id], error) for client_id, error in moved]

    def _still_due(self, claimed):
        """Of the rows just claimed ((delivery id, client id, attempts), as the claim returned them: the
        send log is not read again), those whose subscriber is still due the mailing, in the order of
        their ids; the rest (they unsubscribed since) are let go. :return: [Claimed]"""
        if not claimed:
            return []
        subscribers = {client_id: (email, due) for client_id, email, due in db.session.execute(
            sa.select(Client.id, Client.email, sa.and_(*self.mailing.conditions()))
            .where(Client.id.in_([client_id for _, client_id, _ in claimed])))}
        gone = [delivery_id for delivery_id, client_id, _ in claimed if not subscribers[client_id][1]]
        if gone:
            db.session.execute(sa.delete(Delivery).where(Delivery.id.in_(gone), Delivery.claimed_by == self.owner))
            db.session.commit()
        return [Claimed(delivery_id, Recipient(client_id, subscribers[client_id][0]), attempts)
                for delivery_id, client_id, attempts in sorted(claimed) if subscribers[client_id][1]]

    def held_by_others(self):
        """:return: (deliveries other live runs hold on this mailing, seconds until the first of their
        leases ends)."""
        held, soonest, now = db.session.execute(
            sa.select(sa.func.count(Delivery.id), sa.func.min(SendRun.lease_until), db_now())
            .join(SendRun, SendRun.owner == Delivery.claimed_by)
            .where(SendRun.mailing == self.mailing.key, SendRun.finished_at.is_(None),
                   SendRun.taken_over_at.is_(None), SendRun.owner != self.owner,
                   Delivery.mailing == self.mailing.key, Delivery.status == Status.CLAIMED)).one()
        db.session.commit()
        return held, (soonest - now).total_seconds() if held else 0.0

    # On the heartbeat thread.

    def renew(self):
        """:return: False once the run has been taken over (it stalled past its lease)."""
        kept = db.session.execute(sa.update(SendRun).where(SendRun.id == self.run_id, SendRun.taken_over_at.is_(None))
                                  .values(lease_until=db_later(self.lease))).rowcount
        db.session.commit()
        return bool(kept)
