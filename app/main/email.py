"""The emails the public side sends, queued as jobs with the change that causes them."""
import secrets

from flask import current_app

from app.email import deliver, greeting_name, make_message_id, queue_email, render_email
from app.jobs import define_task
from app.links import block_url, confirm_token, public_url, unsubscribe_url
from app.models import Client


def queue_confirmation_email(client):
    """Queue `client`'s confirmation email, built when it is sent (send_confirmation). Its Message-ID is
    made now, so that every try of it is the same message to the receiver."""
    send_confirmation.apply(recipient=client.email, client_id=client.id,
                            message_id=make_message_id('confirm', client.id, secrets.token_hex(6)))


@define_task(queue='mail')
def send_confirmation(recipient, client_id, message_id):
    """Built here rather than in the sign-up request: rendered there, between the new row's INSERT and
    the commit, it held SQLite's one write lock while three links were signed and two templates rendered,
    and other sign-ups waited for it (bench/README.md). The job's row holds no link, only whom it is for;
    the link is made as it goes out, so it expires CONFIRM_MAX_AGE after the email was sent."""
    client = Client(id=client_id, email=recipient)  # what the links need of the row
    deliver(render_email(
        'emails/confirm', recipient, message_id, greeting_name=greeting_name(recipient),
        confirm_url=public_url('main.confirm', token=confirm_token(client)),
        unsubscribe_url=unsubscribe_url(client_id, recipient), block_url=block_url(recipient),
        max_age_days=current_app.config['CONFIRM_MAX_AGE'] // 86400))


def queue_new_subscriber_notice(client):
    for admin in current_app.config['ADMINS']:
        queue_email(render_email(
            'emails/new_subscriber', admin, make_message_id('admin', client.id, secrets.token_hex(6)),
            client=client))
