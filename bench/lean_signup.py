"""The leanest sign-up the chosen libraries allow, for `bench/signups.py --app lean`: a floor under what
the app's sign-up can cost on this stack, so that a target can be told apart from the stack it is asked
of. Not an app: nothing here is safe to deploy.

It keeps what issue 12 asks of a sign-up and nothing more: a POST whose CSRF token Flask-WTF checks
against Flask's session cookie, the address checked by email-validator, the new subscriber and its email
stored in one transaction (SQLAlchemy Core, each statement built once), an answer naming the address; and
each confirmation email, plain text with its signed confirm and block links (itsdangerous), composed by
the standard library and delivered over SMTP. It leaves out everything else the app does for a sign-up:
the rate limits, the security headers, the suppression list, a resend to a known address, templates, the
ORM, and the job runner's leases, attempts, outcomes and checks before sending. Each gunicorn worker
has a thread that claims the due emails in batches of up to 100, sends them over one SMTP connection it
keeps open, and marks them done, in the app's own `jobs` table, so that bench/signups.py checks them as
it checks the app's; with LEAN_SENDER=off (`bench/signups.py --jobs none`) nobody sends them."""
import json
import os
import smtplib
import threading
import time
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import sqlalchemy as sa
from email_validator import EmailNotValidError, validate_email
from flask import Flask, request
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from itsdangerous import URLSafeTimedSerializer
from markupsafe import escape
from sqlalchemy.dialects import postgresql, sqlite
from wtforms import ValidationError

app = Flask(__name__)
app.config['SECRET_KEY'] = os.environ['SECRET_KEY']
engine = sa.create_engine(os.environ['DATABASE_URL'])
signer = URLSafeTimedSerializer(app.config['SECRET_KEY'])
BASE_URL = os.environ['BASE_URL']

if engine.dialect.name == 'sqlite':
    @sa.event.listens_for(engine, 'connect')
    def _as_the_app_does(dbapi_connection, _):  # app/database.py's settings
        for pragma in ('journal_mode=WAL', 'synchronous=NORMAL', 'busy_timeout=30000'):
            dbapi_connection.execute(f'PRAGMA {pragma}')

clients, jobs = (sa.Table(name, sa.MetaData(), autoload_with=engine) for name in ('clients', 'jobs'))
_insert = (postgresql if engine.dialect.name == 'postgresql' else sqlite).insert
NEW_CLIENT = (_insert(clients).values(email=sa.bindparam('email'), active=False, num_newsletter=0,
                                      created_at=sa.bindparam('now'), confirmation_sent_at=sa.bindparam('now'))
              .on_conflict_do_nothing(index_elements=[sa.func.lower(clients.c.email)]).returning(clients.c.id))
NEW_EMAIL = jobs.insert().values(task='send_confirmation', queue='mail', payload=sa.bindparam('payload'),
                                 status='queued', attempts=0, max_attempts=1, run_after=sa.bindparam('now'),
                                 created_at=sa.bindparam('now'))
_due = sa.select(jobs.c.id).where(jobs.c.queue == 'mail', jobs.c.status == 'queued').order_by(jobs.c.id).limit(100)
CLAIM = (jobs.update().where(jobs.c.id.in_(_due.with_for_update(skip_locked=True)
                                            if engine.dialect.name == 'postgresql' else _due))
         .values(status='running').returning(jobs.c.id, jobs.c.payload))
DONE = jobs.update().where(jobs.c.id.in_(sa.bindparam('ids', expanding=True))).values(status='done')
ANSWER = ('<!doctype html><title>Check your inbox</title><p>We have sent a confirmation link to {}. '
          'Open it and press Confirm to start receiving the newsletter.</p>')


@app.get('/')
def form():
    return (f'<!doctype html><form method="post"><input id="csrf_token" name="csrf_token" type="hidden" '
            f'value="{generate_csrf()}"><input name="email" type="email"><input name="website" hidden>'
            '<button>Subscribe</button></form>')


@app.post('/')
def sign_up():
    try:
        validate_csrf(request.form.get('csrf_token'))
        address = validate_email(request.form.get('email', ''), check_deliverability=False).normalized
    except (CSRFError, ValidationError, EmailNotValidError) as exc:
        return f'<!doctype html><p>{escape(exc)}</p>', 400
    if not request.form.get('website'):  # the honeypot
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        with engine.begin() as connection:
            client_id = connection.scalar(NEW_CLIENT, {'email': address, 'now': now})
            if client_id is not None:
                connection.execute(NEW_EMAIL, {'payload': {'recipient': address, 'client_id': client_id},
                                               'now': now})
    return ANSWER.format(escape(address))


def _confirmation(payload):
    message = EmailMessage()
    message['From'], message['To'] = os.environ['MAIL_DEFAULT_SENDER'], payload['recipient']
    message['Subject'], message['Date'], message['Message-ID'] = 'Confirm your subscription', formatdate(), make_msgid()
    confirm = signer.dumps([payload['client_id'], payload['recipient']], salt='confirm')
    block = signer.dumps(payload['recipient'], salt='block')
    message.set_content(f'Confirm your subscription: {BASE_URL}/confirm/{confirm}\n\n'
                        f'Did not sign up? Block further sign-ups: {BASE_URL}/block/{block}\n')
    return message


def _send_due():
    relay = smtplib.SMTP(os.environ['MAIL_SERVER'], int(os.environ['MAIL_PORT']))
    while True:
        with engine.begin() as connection:
            due = connection.execute(CLAIM).all()
        if not due:
            time.sleep(0.05)
            continue
        for _, payload in due:
            relay.send_message(_confirmation(payload if isinstance(payload, dict) else json.loads(payload)))
        with engine.begin() as connection:
            connection.execute(DONE, {'ids': [job_id for job_id, _ in due]})


if os.environ.get('LEAN_SENDER', 'on') == 'on':  # off: the request alone, its emails left queued
    threading.Thread(target=_send_due, daemon=True, name='lean-sender').start()
