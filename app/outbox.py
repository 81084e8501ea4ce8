"""The outbox: confirmation and admin emails are rows written in the same transaction as the change
that caused them, and a worker delivers them. A web request never waits on SMTP, and a crash at any
point loses nothing: an accepted email is in the database until a send has succeeded (a worker killed
mid-send leaves a lease that runs out, and the email is tried again).

The worker is a thread in the web process by default (OUTBOX_WORKER=thread), or `flask worker` as a
process of its own. Any number of them may run: each email is claimed under a lease first."""
import logging
import threading
from datetime import timedelta

import sqlalchemy as sa
from flask import current_app, has_app_context
from flask_sqlalchemy.session import Session

from app import db
from app.email import Email
from app.leases import claim, new_owner
from app.models import OutboxEmail, utcnow
from app.transports import PermanentFailure, TemporaryFailure, TransportFailure, open_sender, retry_delay

log = logging.getLogger(__name__)


class _State:
    def __init__(self):
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = None

    def stop_thread(self):
        self.stop.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join()


def init_app(app):
    state = app.extensions['outbox'] = _State()
    if app.config['OUTBOX_WORKER'] == 'thread':
        # Started by the first request rather than here, so `flask db upgrade`, cron commands and
        # gunicorn's master process (which only forks) never start a worker of their own.
        @app.before_request
        def _start_worker_thread():
            if state.thread is None:
                with state.lock:
                    if state.thread is None:
                        state.thread = threading.Thread(
                            target=run_worker, args=(app, state.stop), name='outbox-worker', daemon=True)
                        state.thread.start()


def queue_email(email):
    """Accept `email` for delivery. It is part of the caller's transaction: it will exist (and go out)
    exactly when the caller commits."""
    db.session.add(OutboxEmail(
        recipient=email.recipient, subject=email.subject, text=email.text, html=email.html,
        headers=email.headers, message_id=email.message_id))
    db.session.info['outbox_queued'] = True


@sa.event.listens_for(Session, 'after_commit')
def _wake_worker(session):
    if session.info.pop('outbox_queued', False) and has_app_context():
        current_app.extensions['outbox'].wake.set()


def deliver_due(limit=100):
    """Deliver up to `limit` emails that are due, over one connection.  :return: how many went out.

    Each email is claimed on its own and committed once sent: a worker holds one email at a time, so
    its lease cannot run out while it is busy with others, and a crash repeats at most that one."""
    owner, lease, delivered = new_owner(), current_app.config['LEASE_SECONDS'], 0
    with open_sender() as sender:
        for _ in range(limit):
            ids = claim(OutboxEmail, OutboxEmail.status == 'pending', OutboxEmail.next_attempt_at <= utcnow(),
                        owner=owner, seconds=lease, limit=1)
            if not ids:
                break
            row, transport_down = db.session.get(OutboxEmail, ids[0]), False
            try:
                sender.send(Email(row.recipient, row.subject, row.text, row.html, row.message_id, row.headers))
            except PermanentFailure as exc:
                _finish(row, 'failed', error=str(exc))
            except TemporaryFailure as exc:
                _retry_later(row, exc)
                transport_down = isinstance(exc, TransportFailure)
            else:
                _finish(row, 'sent')
                delivered += 1
            db.session.commit()
            if transport_down:
                log.warning('outbox: %s; queued emails wait for the next try', row.last_error)
                break
    return delivered


def _finish(row, status, error=None):
    row.status, row.last_error = status, error
    row.claimed_by = row.lease_until = None
    if status == 'sent':
        row.sent_at = utcnow()
    else:
        log.error('outbox: email %d to %s failed for good: %s', row.id, row.recipient, error)


def _retry_later(row, exc):
    row.attempts += 1
    if row.attempts >= current_app.config['OUTBOX_MAX_ATTEMPTS']:
        _finish(row, 'failed', error=f'gave up after {row.attempts} attempts: {exc}')
        return
    row.last_error = str(exc)
    row.claimed_by = row.lease_until = None
    delay = retry_delay(row.attempts, cap=current_app.config['OUTBOX_MAX_BACKOFF'])
    row.next_attempt_at = utcnow() + timedelta(seconds=delay)


def run_worker(app, stop):
    """Deliver due emails until `stop` is set: at once when this process queues one, and every
    OUTBOX_POLL_SECONDS for those queued by other processes or waiting for a retry."""
    state = app.extensions['outbox']
    while not stop.is_set():
        with app.app_context():
            try:
                while deliver_due():
                    pass
            except Exception:  # a database outage must not kill the worker: log it and try again later
                db.session.rollback()
                app.logger.exception('outbox: delivery pass failed; trying again in %ss',
                                     app.config['OUTBOX_POLL_SECONDS'])
        state.wake.wait(app.config['OUTBOX_POLL_SECONDS'])
        state.wake.clear()
