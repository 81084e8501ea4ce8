"""The emails the public side sends, queued as jobs with the change that causes them."""
import secrets
from datetime import datetime

import sqlalchemy as sa
from flask import current_app

from app.database import alone, built_once, utcnow
from app.email import deliver, greeting_name, make_message_id, queue_email, render_email
from app.jobs import define_task
from app.links import block_url, confirm_token, public_url, unsubscribe_url
from app.models import Client
from app.suppression import not_suppressed


def queue_confirmation_email(client):
    """Queue `client`'s confirmation email, built when it is sent (send_confirmation). Its Message-ID is
    made now, so that every try of it is the same message to the receiver."""
    send_confirmation.apply(recipient=client.email, client_id=client.id, asked_at=utcnow().isoformat(),
                            message_id=make_message_id('confirm', client.id, secrets.token_hex(6)))


@define_task(queue='mail')
def send_confirmation(recipient, client_id, asked_at, message_id):
    """Built here rather than in the sign-up request: rendered there, between the new row's INSERT and
    the commit, it held SQLite's one write lock while three links were signed and two templates rendered,
    and other sign-ups waited for it (bench/README.md). The job's row holds no link, only whom it is for.

    The link is made as the email goes out, which may be hours after it was asked for (a server refusing
    for now), so its seven days count from then. (The clean-up of unconfirmed sign-ups counts from when
    it was asked for, app/retention.py: a late email's link stops matching a little sooner.) And the
    confirmation page refuses only links made before their address left. So the email is not sent at all
    if, since it was asked for, its sign-up was erased, confirmed, or left (unsubscribed, blocked), or its
    address was suppressed.  :return: why it was not sent, if it was not."""
    if why_not := _not_wanted(client_id, recipient, datetime.fromisoformat(asked_at)):
        return {'not sent': why_not}
    client = Client(id=client_id, email=recipient)  # what the links need of the row
    deliver(render_email(
        'emails/confirm', recipient, message_id, greeting_name=greeting_name(recipient),
        confirm_url=public_url('main.confirm', token=confirm_token(client)),
        unsubscribe_url=unsubscribe_url(client_id, recipient), block_url=block_url(recipient),
        max_age_days=current_app.config['CONFIRM_MAX_AGE'] // 86400))


def _not_wanted(client_id, recipient, asked_at):
    """:return: why the confirmation asked for at `asked_at` must not go out now, or None. One statement,
    read outside a transaction, so that the job's outcome is still recorded on its own (app/jobs.py)."""
    with alone() as connection:
        row = connection.execute(built_once('confirmation: still wanted', _standing), {'client_id': client_id}).first()
    if row is None or row.email != recipient:
        return 'the sign-up is gone'
    if row.suppressed:
        return 'the address is on the suppression list'
    if row.active and row.email_confirmed_at is not None:
        return 'already confirmed'
    if row.unsubscribed_at is not None and row.unsubscribed_at >= asked_at:
        return 'unsubscribed after it was asked for'
    return None


def _standing():
    return (sa.select(Client.email, Client.active, Client.email_confirmed_at, Client.unsubscribed_at,
                      (~not_suppressed()).label('suppressed'))
            .where(Client.id == sa.bindparam('client_id', type_=sa.Integer)))


def queue_new_subscriber_notice(client):
    for admin in current_app.config['ADMINS']:
        queue_email(render_email(
            'emails/new_subscriber', admin, make_message_id('admin', client.id, secrets.token_hex(6)),
            client=client))
