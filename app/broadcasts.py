"""Dated broadcasts: a one-off issue an admin writes (in the admin pages or with `flask broadcast`),
scheduled for a date and time in a named time zone, and sent once to every active subscriber confirmed
by the time it starts.

It is sent by the same send as the drip (app/sending.py), so it has the same guarantees: at most once
per subscriber (its send log is the `deliveries` rows of mailing 'broadcast<id>'), nothing sent twice
after a crash, an outcome per subscriber. The sending job checks the broadcast's status after each
batch, which is how pause (stop after this batch; resume applies a new job that carries on where it
stopped) and cancel work; and it is not finished while a subscriber is deferred: the job comes back.

Admins write subject, text and HTML with {{ greeting_name }}, {{ email }} and {{ unsubscribe_url }}
placeholders, rendered in Jinja's sandbox (an admin's template cannot reach into the app). The
unsubscribe footer and List-Unsubscribe headers are always added."""
import functools
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
import sqlalchemy as sa
from flask import current_app
from jinja2.sandbox import SandboxedEnvironment

from app.database import utcnow
from app.email import Email, greeting_name, make_message_id
from app.extensions import db
from app.jobs import Reschedule, define_task, stopping
from app.links import list_unsubscribe_headers, unsubscribe_url
from app.mailing import PREVIEW_RECIPIENT, address_digest
from app.models import BROADCAST_MOVES, Broadcast, BroadcastStatus, Client, Delivery, DeliveryStatus, Job, JobStatus
from app.sending import send_as_job
from app.suppression import not_suppressed
from app.sendlog import requeue


class BroadcastError(ValueError):
    """What is wrong with a broadcast as written or with what was asked of it, in words for the admin."""


@dataclass(frozen=True)
class BroadcastMailing:
    """A broadcast as a Mailing: a copy of its row, taken when its send starts, so that sender threads
    never read an ORM object that another thread's commit expires under them. Its audience is fixed
    when it starts: subscribers who confirm while it is being sent (or paused) get the drip, not this."""
    id: int
    subject: str
    text: str
    html: str
    started_at: datetime | None = None
    cancelled: bool = False

    @classmethod
    def of(cls, broadcast):
        return cls(broadcast.id, broadcast.subject, broadcast.text, broadcast.html, broadcast.started_at,
                   broadcast.status == BroadcastStatus.CANCELLED)

    @property
    def key(self):
        return f'broadcast{self.id}'

    def conditions(self, after=0):
        if self.cancelled:  # it will never go: its ledger counts whom it reached, and nobody as due it
            return (sa.false(),)
        # Its audience: those confirmed by the time it started, and those it has a row for, who were then
        # (coming back since, they are confirmed as of their return, and a copy sent again is still theirs).
        theirs = sa.exists(sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.mailing == self.key))
        return (Client.active, sa.or_(Client.email_confirmed_at <= (self.started_at or utcnow()), theirs),
                not_suppressed())

    def compose(self, recipient):
        link = unsubscribe_url(recipient.client_id, recipient.email)
        context = dict(email=recipient.email, greeting_name=greeting_name(recipient.email), unsubscribe_url=link)
        subject = _template(self.subject, html=False).render(context).strip()
        text = _template(self.text, html=False).render(context)
        body = _template(self.html, html=True).render(context)
        html = current_app.jinja_env.get_template('emails/broadcast.html').render(subject=subject, body=body,
                                                                                     **context)
        return Email(recipient.email, subject, f'{text.rstrip()}\n\n--\nUnsubscribe: {link}\n', html,
                     self.message_id(recipient), list_unsubscribe_headers(link, recipient.client_id, recipient.email))

    def message_id(self, recipient):
        return make_message_id('broadcast', self.id, recipient.client_id, address_digest(recipient.email))

    def not_now(self):
        return None  # an admin chose its time

    def advance(self, client_ids):
        return None


def _halted(broadcast_id):
    """Paused or cancelled since its send began."""
    return db.session.scalar(sa.select(Broadcast.status).where(Broadcast.id == broadcast_id)) != BroadcastStatus.SENDING


@functools.lru_cache(maxsize=64)
def _template(source, html):
    """Compiled once per process and text: composing runs once per subscriber."""
    return _SANDBOXES[html].from_string(source)


_SANDBOXES = {html: SandboxedEnvironment(autoescape=html, undefined=jinja2.StrictUndefined) for html in (False, True)}


def preview(broadcast):
    """The email as a made-up subscriber would get it.  :raise BroadcastError: if it cannot be rendered."""
    try:
        email = BroadcastMailing.of(broadcast).compose(PREVIEW_RECIPIENT)
    except Exception as exc:
        # The subject, text and HTML are the admin's own template, so whatever rendering them raises (a
        # syntax error, {{ 1 / 0 }}, a format string given too few values) is theirs to fix, not the app's.
        raise BroadcastError(f'the broadcast cannot be rendered: {exc}') from exc
    if not email.subject or '\n' in email.subject or '\r' in email.subject:
        raise BroadcastError('the subject must be one line of text')
    if '\x00' in email.subject + email.text + email.html:  # from `flask broadcast create`'s files: the form refuses it
        raise BroadcastError('a broadcast cannot hold a NUL character: no email needs one, and the database refuses it')
    return email


def parse_local_time(text):
    """'2026-12-01 09:00' or '2026-12-01T09:00' -> naive datetime.  :raise BroadcastError: for anything
    else, an offset too ('09:00+02:00', 'Z'): the time zone is given apart, and would replace it unseen."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise BroadcastError(f'{text!r} is not a date and time such as 2026-12-01 09:00') from exc
    if parsed.tzinfo is not None:
        raise BroadcastError(f'{text!r} has an offset: give the time without its offset, and its zone with '
                             '--timezone (or the form\'s time zone)')
    return parsed


def local_to_utc(local_time, zone_name):
    """A wall-clock time in a named zone -> naive UTC.  :raise BroadcastError: unknown zone, or a time
    at the calendar's edge that UTC puts outside it."""
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BroadcastError(f'unknown time zone {zone_name!r} (use a name such as Europe/Paris or UTC)') from exc
    try:
        return local_time.replace(tzinfo=zone).astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError as exc:
        raise BroadcastError(f'{local_time.isoformat(" ", "minutes")} in {zone_name} falls outside the years 1 to '
                             '9999 in UTC') from exc


def utc_to_local(utc_time, zone_name):
    return utc_time.replace(tzinfo=timezone.utc).astimezone(ZoneInfo(zone_name))


def schedule_broadcast(subject, text, html, send_at, zone_name, created_by):
    """Check a broadcast, store it, and queue its send for `send_at` (wall-clock time in `zone_name`), in
    one commit.  :raise BroadcastError: with what to fix; nothing is stored then."""
    if not subject.strip() or not text.strip() or not html.strip():
        raise BroadcastError('a broadcast needs a subject, a text version and an HTML version')
    send_at_utc = local_to_utc(send_at, zone_name)
    if send_at_utc < utcnow().replace(second=0, microsecond=0):
        raise BroadcastError(f'{send_at:%Y-%m-%d %H:%M} {zone_name} is in the past')
    broadcast = Broadcast(subject=subject.strip(), text=text, html=html, send_at=send_at_utc, timezone=zone_name,
                          created_by=created_by, status=BroadcastStatus.SCHEDULED)
    preview(broadcast)
    db.session.add(broadcast)
    db.session.flush()
    send_broadcast.apply(run_after=send_at_utc, unique_key=_job_key(broadcast.id), broadcast_id=broadcast.id)
    db.session.commit()
    return broadcast


def _job_key(broadcast_id):
    return f'broadcast:{broadcast_id}'


def _move(broadcast_id, name, **values):
    """Make one of BROADCAST_MOVES, as one conditional UPDATE, so that a pause cannot cross a send that
    just finished.  :return: whether it was made (the broadcast was in a state it moves from)."""
    move = BROADCAST_MOVES[name]
    return bool(db.session.execute(
        sa.update(Broadcast).where(Broadcast.id == broadcast_id, Broadcast.status.in_(move.sources))
        .values(status=move.to, **values).execution_options(synchronize_session=False)).rowcount)


def _admin_move(broadcast_id, name, **values):
    """An admin's move.  :raise BroadcastError: saying why it cannot be made; nothing is changed then."""
    if _move(broadcast_id, name, **values):
        return
    db.session.rollback()
    status = db.session.scalar(sa.select(Broadcast.status).where(Broadcast.id == broadcast_id))
    if status is None:
        raise BroadcastError(f'there is no broadcast {broadcast_id}')
    move = BROADCAST_MOVES[name]
    raise BroadcastError(f'broadcast {broadcast_id} is {status}: only a {" or ".join(move.sources)} one can be '
                         f'{move.to}')


def cancel(broadcast_id):
    """Before it starts, or while paused; its queued send job is cancelled with it."""
    _admin_move(broadcast_id, 'cancel', finished_at=utcnow())
    db.session.execute(
        sa.update(Job).where(Job.unique_key == _job_key(broadcast_id), Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow()).execution_options(synchronize_session=False))
    db.session.commit()


def pause(broadcast_id):
    """The send stops once its current batch is recorded."""
    _admin_move(broadcast_id, 'pause')
    db.session.commit()


def resume(broadcast_id):
    """A paused one carries on where it stopped: nobody gets it twice."""
    _admin_move(broadcast_id, 'resume')
    send_broadcast.apply(broadcast_id=broadcast_id)
    db.session.commit()


def resend_unknown(broadcast_id, client_ids=None):
    """Its unknown deliveries (of `client_ids`, or all) sent again, at an admin's explicit request (after
    finding they did not arrive).  :return: how many.  :raise BroadcastError: for a cancelled one, which
    nothing sends again."""
    return _send_again(broadcast_id, DeliveryStatus.UNKNOWN, client_ids)


def retry_failed(broadcast_id):
    """Its deliveries refused for good sent again, at an admin's explicit request, once the cause is fixed:
    a relay that refuses every recipient for a reason of its own (our credentials missing, "554 5.7.1 Relay
    access denied") fails the whole list.  :return: how many.  :raise BroadcastError: as resend_unknown."""
    return _send_again(broadcast_id, DeliveryStatus.FAILED)


def _send_again(broadcast_id, status, client_ids=None):
    broadcast = db.session.get(Broadcast, broadcast_id)
    if broadcast is None:
        raise BroadcastError(f'there is no broadcast {broadcast_id}')
    if broadcast.status == BroadcastStatus.CANCELLED:
        raise BroadcastError(f'broadcast {broadcast_id} is cancelled: nothing of it is sent again')
    count = requeue(BroadcastMailing.of(broadcast), [status], client_ids)
    if count:
        _move(broadcast_id, 'reopen', finished_at=None)
        send_broadcast.apply(broadcast_id=broadcast_id)
        db.session.commit()
    return count


def delivery_counts(broadcast):
    """{status: n} from its send log."""
    return dict(db.session.execute(
        sa.select(Delivery.status, sa.func.count()).where(Delivery.mailing == broadcast.mailing)
        .group_by(Delivery.status)).all())


@define_task(queue='bulk')
def send_broadcast(broadcast_id):
    """Sent when it is due, and again after a resume. It is finished (sent) only once nobody is left
    deferred: until then its job comes back at their next attempt time."""
    started = _move(broadcast_id, 'start', started_at=utcnow())
    db.session.commit()
    broadcast = db.session.get(Broadcast, broadcast_id)
    if broadcast.status != BroadcastStatus.SENDING:
        return {'not sent': f'the broadcast is {broadcast.status}'}
    report = send_as_job(BroadcastMailing.of(broadcast), 'broadcast',
                         should_stop=lambda: stopping() or _halted(broadcast_id))
    result = {**report.as_dict(), 'started': bool(started)}
    if report.stopped:
        return result
    if report.retry_at:
        raise Reschedule(report.retry_at, result)
    _move(broadcast_id, 'finish', finished_at=utcnow())
    return result
