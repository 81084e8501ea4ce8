"""Subscribers as an admin finds them and sees what happened to each: a list that pages by id (keyset:
a page costs the same at a million rows as at the first), searched by address and filtered by state and
stage; one subscriber's timeline, from sign-up through every message to unsubscribing; and what an admin
may do to one subscriber. Nothing here sends: a resend goes back through the send log (app/sendlog.py)
and the next run or job, with all of its guarantees."""
import enum
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from flask import current_app

from app import broadcasts, imports
from app.database import utcnow
from app.drip import DripStage, send_stage
from app.extensions import db
from app.main.email import queue_confirmation_email
from app.models import Client, Delivery, DeliveryStatus, Job, SendRun, Suppression
from app.sendlog import requeue
from app.suppression import is_suppressed, not_suppressed

PAGE_SIZE = 50


class SubscriberState(enum.StrEnum):
    """How an admin filters subscribers (derived from a row, not stored)."""
    ACTIVE = 'active'  # confirmed, and receiving the drip
    UNCONFIRMED = 'unconfirmed'  # signed up, has not followed the confirmation link
    UNSUBSCRIBED = 'unsubscribed'  # left (or was deactivated by an admin)
    SUPPRESSED = 'suppressed'  # on the suppression list: gets nothing, whatever else (app/suppression.py)

    def condition(self):
        return {SubscriberState.ACTIVE: sa.and_(Client.active, Client.email_confirmed_at.is_not(None),
                                                not_suppressed()),
                SubscriberState.UNCONFIRMED: sa.and_(Client.email_confirmed_at.is_(None), not_suppressed()),
                SubscriberState.UNSUBSCRIBED: sa.and_(~Client.active, Client.email_confirmed_at.is_not(None),
                                                      not_suppressed()),
                SubscriberState.SUPPRESSED: ~not_suppressed()}[self]

    @classmethod
    def of(cls, client):
        return cls.SUPPRESSED if is_suppressed(client.email) else cls.of_unsuppressed(client)

    @classmethod
    def of_unsuppressed(cls, client):
        """For a subscriber known not to be on the suppression list."""
        if client.email_confirmed_at is None:
            return cls.UNCONFIRMED
        return cls.ACTIVE if client.active else cls.UNSUBSCRIBED


def with_states(select):
    """`select` of Client rows, each with its SubscriberState: whether it is suppressed comes in the same
    statement, not one query per subscriber."""
    suppressed = Suppression.id.is_not(None)
    return (select.add_columns(suppressed)
            .outerjoin(Suppression, Suppression.email == sa.func.lower(Client.email)))


def state_of(client, suppressed):
    return SubscriberState.SUPPRESSED if suppressed else SubscriberState.of_unsuppressed(client)


@dataclass(frozen=True)
class Page:
    subscribers: list  # of (Client, SubscriberState)
    after: int | None  # the id to ask for the next page after, if there is one


def find(search='', state=None, stage=None, after=0, size=PAGE_SIZE):
    """One page of subscribers by id after `after`: those whose address contains `search` (any case),
    in `state` (a SubscriberState) and at drip `stage` (num_newsletter), when given."""
    conditions = [Client.id > after]
    if search:
        escaped = search.strip().lower().replace('\\', '\\\\').replace('%', '\\%').replace('_', '\\_')
        conditions.append(sa.func.lower(Client.email).like(f'%{escaped}%', escape='\\'))
    if state:
        conditions.append(SubscriberState(state).condition())
    if stage is not None:
        conditions.append(Client.num_newsletter == stage)
    rows = db.session.execute(with_states(sa.select(Client)).where(*conditions).order_by(Client.id)
                              .limit(size + 1)).all()
    return Page([(client, state_of(client, suppressed)) for client, suppressed in rows[:size]],
                rows[size - 1][0].id if len(rows) > size else None)


@dataclass(frozen=True)
class Moment:
    at: datetime | None
    what: str  # signed up (or imported), confirmed, a mailing, unsubscribed
    delivery: Delivery | None = None


def timeline(client):
    """Everything that happened to `client`, oldest first: a delivery is placed at its latest move."""
    moments = [Moment(client.created_at, 'imported' if client.consent_recorded_at else 'signed up')]
    if client.consent_recorded_at:
        moments.append(Moment(client.consent_recorded_at, f'confirmed: consent recorded by {client.consent_recorded_by}'))
    elif client.email_confirmed_at:
        moments.append(Moment(client.email_confirmed_at, 'confirmed'))
    for delivery in db.session.scalars(sa.select(Delivery).where(Delivery.client_id == client.id)):
        moments.append(Moment(delivery.sent_at or delivery.updated_at or delivery.created_at, delivery.mailing,
                              delivery))
    if client.unsubscribed_at:
        moments.append(Moment(client.unsubscribed_at, 'unsubscribed'))
    return sorted(moments, key=lambda moment: moment.at or datetime.min)


def deactivate(client):
    """An admin's unsubscribe: the same as the subscriber's own."""
    if client.active:
        client.active, client.unsubscribed_at = False, utcnow()
    db.session.commit()


def reactivate(client):
    """Back on the list only through a fresh confirmation email, never silently: the subscriber's own
    click on its link is what subscribes them again. Its time is kept, as sign-up keeps it: the clean-up
    of unconfirmed sign-ups counts from it (app/retention.py)."""
    client.confirmation_sent_at = utcnow()
    queue_confirmation_email(client)
    db.session.commit()


def resend_unknown(client, mailing_key):
    """Their copy of `mailing_key`, whose outcome is unknown, sent again (an admin found that it did not
    arrive), by a job of its own, now, if they are still its audience.  :return: whether there was one.
    :raise BroadcastError: for a cancelled broadcast, which nothing sends again."""
    if mailing_key.startswith('broadcast'):
        return bool(broadcasts.resend_unknown(int(mailing_key.removeprefix('broadcast')), client_ids=[client.id]))
    if not requeue(DripStage(mailing_key), [DeliveryStatus.UNKNOWN], client_ids=[client.id]):
        return False
    send_stage.apply(stage=mailing_key, trigger='admin', deferred_only=True)
    db.session.commit()
    return True


def totals():
    """{SubscriberState: how many}."""
    return {state: db.session.scalar(sa.select(sa.func.count(Client.id)).where(state.condition()))
            for state in SubscriberState}


def per_stage():
    """[(stage number, active subscribers who have reached exactly it)], for the funnel."""
    return db.session.execute(
        sa.select(Client.num_newsletter, sa.func.count(Client.id)).where(SubscriberState.ACTIVE.condition())
        .group_by(Client.num_newsletter).order_by(Client.num_newsletter)).all()


def per_day(days=56):
    """[(YYYY-MM-DD, (sign-ups, confirmations))] for each of the last `days` days (UTC), oldest first."""
    today = utcnow().date()
    first = today - timedelta(days=days - 1)
    counts = {}
    for column, i in ((Client.created_at, 0), (Client.email_confirmed_at, 1)):
        day = sa.func.date(column)
        for when, count in db.session.execute(sa.select(day, sa.func.count()).where(column >= datetime.combine(
                first, datetime.min.time())).group_by(day)):
            counts.setdefault(str(when), [0, 0])[i] = count
    return [(str(first + timedelta(days=n)), tuple(counts.get(str(first + timedelta(days=n)), (0, 0))))
            for n in range(days)]


def recent_runs(limit=20):
    """The latest send runs of every mailing: what started them, when, and how they ended."""
    return db.session.scalars(sa.select(SendRun).order_by(SendRun.id.desc()).limit(limit)).all()


def erase(client):
    """The subscriber, and their address and personal data everywhere the app keeps it: their row and
    their send log (deliveries), the emails queued or sent to them or about them (mail job rows; the
    admins' "New subscriber: <address>" notices keep that subject once sent, and are known by their
    Message-ID), their address in any job's error and any send run's reason for stopping, their `.eml`
    files in the mail folder and the admins' notices of them there, their suppression-list entry, and the
    uploaded import files and reports that name them (app/imports.py). The kept exports hold them too: the
    caller withdraws those (app/exports.py withdraw), as exports are built on this module. What stays is
    anonymous: each send run's counts.
    :return: what was erased, in words."""
    email, client_id = client.email, client.id
    deliveries = db.session.scalar(sa.select(sa.func.count(Delivery.id)).where(Delivery.client_id == client.id))
    jobs = db.session.execute(sa.delete(Job).where(Job.queue == 'mail', sa.or_(
        Job.payload['recipient'].as_string() == email,
        Job.payload['message_id'].as_string().startswith(f'<admin.{client_id}.'))  # queue_new_subscriber_notice
    ).execution_options(synchronize_session=False)).rowcount
    _erase_from_texts(email)
    db.session.execute(sa.delete(Suppression).where(Suppression.email == email.lower()))
    db.session.delete(client)
    db.session.commit()
    files, uploads = _erase_mail_files(email, client_id), imports.withdraw_naming(email)
    return (f'{email}: the subscriber, {deliveries} delivery record(s), {jobs} email job(s), {files} mail file(s) '
            f'and {uploads} import upload(s)')


def _erase_from_texts(email):
    """`email` out of the texts that quote it: job errors, and why send runs stopped. Written by a relay's
    reply, they spell it as the relay likes (JANE@...), so any case of its letters goes."""
    spelled = re.compile(re.escape(email), re.IGNORECASE)
    for column in (Job.error, SendRun.stopped):
        for row_id, text in db.session.execute(sa.select(column.class_.id, column).where(
                sa.func.lower(column).contains(email.lower(), autoescape=True))).all():
            db.session.execute(sa.update(column.class_).where(column.class_.id == row_id)
                               .values({column.key: spelled.sub('[erased]', text)})
                               .execution_options(synchronize_session=False))


def _erase_mail_files(email, client_id):
    """The `.eml` files in MAIL_FOLDER (the folder way out, or a deployment's copy) addressed to `email`, and
    the admins' notices of subscriber `client_id`: addressed to an admin, they name the subscriber in their
    subject and text, and are known by their Message-ID (queue_new_subscriber_notice)."""
    folder, erased = Path(current_app.config['MAIL_FOLDER']), 0
    header, notice = f'To: {email}\r\n'.encode(), f'\r\nMessage-ID: <admin.{client_id}.'.encode()
    for path in folder.glob('*.eml') if folder.is_dir() else ():
        with path.open('rb') as file:
            head = file.read(64 * 1024).split(b'\r\n\r\n', 1)[0] + b'\r\n'
        if header in head or notice in head:
            path.unlink()
            erased += 1
    return erased
