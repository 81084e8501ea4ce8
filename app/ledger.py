"""The ledger of one mailing, as an admin reads it: whom it is for (its audience), and where each of
them stands: sent, failed, unknown, deferred, or pending (due and not yet sent, or being sent right
now). The audience is counted from the subscribers' own records, not from the send log, so a gap
between the two (a stage recorded sent to someone it did not move on, a subscriber moved past a stage
nobody recorded sending) shows as counts that do not balance, with the reason, instead of being
trusted away."""
from dataclasses import dataclass

import sqlalchemy as sa

from app.broadcasts import BroadcastMailing
from app.database import as_integer
from app.drip import STAGE_NAME, DripStage
from app.extensions import db
from app.models import Broadcast, BroadcastStatus, Client, Delivery, DeliveryStatus
from app.sendlog import count_due, iter_due

PENDING = 'pending'  # due, or claimed and not yet answered: no outcome yet
STATES = (DeliveryStatus.SENT, DeliveryStatus.FAILED, DeliveryStatus.UNKNOWN, DeliveryStatus.DEFERRED, PENDING)


@dataclass(frozen=True)
class Ledger:
    mailing: str
    audience: int
    sent: int
    failed: int
    unknown: int
    deferred: int
    pending: int
    in_flight: int  # of the pending: claimed by a run right now
    mismatches: tuple = ()  # what does not add up, in words

    @property
    def accounted(self):
        return self.sent + self.failed + self.unknown + self.deferred + self.pending

    @property
    def balances(self):
        return self.audience == self.accounted and not self.mismatches


def mailing_named(key):
    """'week2' or 'broadcast7' as a Mailing, or None if there is no such mailing."""
    if (stage := STAGE_NAME.fullmatch(key)) and as_integer(stage.group(1)) is not None:
        return DripStage(key)
    if key.startswith('broadcast') and (broadcast_id := as_integer(key[len('broadcast'):])) is not None:
        broadcast = db.session.get(Broadcast, broadcast_id)
        return BroadcastMailing.of(broadcast) if broadcast else None
    return None


def ledger(mailing):
    """:return: the Ledger of `mailing` as it stands now."""
    rows = dict(db.session.execute(sa.select(Delivery.status, sa.func.count()).where(Delivery.mailing == mailing.key)
                                   .group_by(Delivery.status)).all())
    in_flight = rows.get(DeliveryStatus.CLAIMED, 0)
    counts = {state: rows.get(state, 0) for state in STATES[:-1]}
    due = count_due(mailing)
    if isinstance(mailing, DripStage):
        audience, mismatches = _drip_audience(mailing)
    else:
        audience = sum(rows.values()) + due
        mismatches = _broadcast_mismatches(mailing, due + in_flight + counts['deferred'])
    return Ledger(mailing.key, audience, **counts, pending=due + in_flight, in_flight=in_flight,
                  mismatches=tuple(mismatches))


def _drip_audience(stage):
    """Those who reached the stage, and those one stage before it who are due it or have a row for it."""
    logged = sa.exists(sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.mailing == stage.key))
    before, reached = Client.num_newsletter == stage.number - 1, Client.num_newsletter >= stage.number
    audience = db.session.scalar(sa.select(sa.func.count(Client.id)).where(
        sa.or_(reached, sa.and_(before, sa.or_(logged, sa.and_(*stage.conditions()))))))

    def count_rows(*conditions):
        return db.session.scalar(sa.select(sa.func.count(Delivery.id)).join(Client, Client.id == Delivery.client_id)
                                 .where(Delivery.mailing == stage.key, *conditions))
    mismatches = []
    if n := count_rows(Delivery.status == DeliveryStatus.SENT, ~reached):
        mismatches.append(f'{n} recorded sent but not moved on to {stage.key}: they would never get the next stage')
    if n := count_rows(Delivery.status != DeliveryStatus.SENT, reached):
        mismatches.append(f'{n} moved on past {stage.key} although it is not recorded sent to them')
    if n := db.session.scalar(sa.select(sa.func.count(Client.id)).where(reached, ~logged)):
        mismatches.append(f'{n} past {stage.key} with no record of it (imported at a later stage, or sent before '
                          'the send log)')
    return audience, mismatches


def _broadcast_mismatches(mailing, unfinished):
    status = db.session.scalar(sa.select(Broadcast.status).where(Broadcast.id == mailing.id))
    if status == BroadcastStatus.SENT and unfinished:
        return [f'marked sent while {unfinished} are still pending or deferred']
    return []


def members(mailing, state):
    """Who is in `state` (one of STATES), by subscriber id, read as it is used (a CSV of a whole list
    streams): (email, detail)..."""
    if state == PENDING:
        held = db.session.scalars(
            sa.select(Client.email).join(Delivery, Client.id == Delivery.client_id)
            .where(Delivery.mailing == mailing.key, Delivery.status == DeliveryStatus.CLAIMED)
            .order_by(Client.id).execution_options(yield_per=1000))
        yield from ((email, 'claimed by a run now') for email in held)
        yield from ((recipient.email, 'due') for recipient in iter_due(mailing))
        return
    rows = db.session.execute(
        sa.select(Client.email, Delivery.error, Delivery.next_attempt_at, Delivery.attempts)
        .join(Delivery, Client.id == Delivery.client_id)
        .where(Delivery.mailing == mailing.key, Delivery.status == state).order_by(Client.id)
        .execution_options(yield_per=1000))
    for email, error, retry, attempts in rows:
        if state == DeliveryStatus.DEFERRED:
            yield email, f'next attempt {retry:%Y-%m-%d %H:%M:%S} UTC, {attempts} so far: {error}'
        else:
            yield email, error or ''
