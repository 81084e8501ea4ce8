"""The emails the public side sends, queued as jobs with the change that causes them."""
import secrets

from flask import current_app

from app.email import greeting_name, make_message_id, queue_email, render_email
from app.links import block_url, confirm_token, public_url, unsubscribe_url


def queue_confirmation_email(client):
    queue_email(render_email(
        'emails/confirm', client.email, make_message_id('confirm', client.id, secrets.token_hex(6)),
        greeting_name=greeting_name(client.email), confirm_url=public_url('main.confirm', token=confirm_token(client)),
        unsubscribe_url=unsubscribe_url(client.id, client.email), block_url=block_url(client.email),
        max_age_days=current_app.config['CONFIRM_MAX_AGE'] // 86400))


def queue_new_subscriber_notice(client):
    for admin in current_app.config['ADMINS']:
        queue_email(render_email(
            'emails/new_subscriber', admin, make_message_id('admin', client.id, secrets.token_hex(6)),
            client=client))
