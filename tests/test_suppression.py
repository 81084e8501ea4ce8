"""One suppression list (app/suppression.py), fed by the address's owner (the block link), by SendGrid's
signed Event Webhook (app/webhooks.py) and by our relay's refusals, and applied to every mailing."""
import base64
import json
import re
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app import broadcasts, create_app
from app.database import utcnow
from app.extensions import db
from app.models import Client, Delivery, Job, Suppression, WebhookEvent
from app.suppression import suppress
from config import Config
from tests.support.forms import sign_up
from tests.support.jobs import run_due_jobs


@pytest.fixture(scope='module')
def signing_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def webhook(settings, signing_key, request):
    """The app with SendGrid's verification key set (ask for it before `app`); `post(events, ...)` sends a
    batch as SendGrid does."""
    public = signing_key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    settings['SENDGRID_WEBHOOK_PUBLIC_KEY'] = base64.b64encode(public).decode()
    client = request.getfixturevalue('app').test_client()

    def post(events, timestamp=None, key=signing_key, signature=None):
        body, timestamp = json.dumps(events), str(timestamp or int(time.time()))
        signed = key.sign((timestamp + body).encode(), ec.ECDSA(hashes.SHA256()))
        return client.post('/webhooks/sendgrid', data=body, content_type='application/json', headers={
            'X-Twilio-Email-Event-Webhook-Signature': signature or base64.b64encode(signed).decode(),
            'X-Twilio-Email-Event-Webhook-Timestamp': timestamp})
    return post


def suppressed(app):
    with app.app_context():
        return dict(db.session.execute(sa.select(Suppression.email, Suppression.reason)).all())


def event(kind, email, event_id, **fields):
    return {'event': kind, 'email': email, 'sg_event_id': event_id, 'timestamp': int(time.time()), **fields}


def test_a_suppressed_address_gets_no_drip_stage_and_no_broadcast(app, runner, smtp, subscribers, broadcast_now):
    emails = subscribers(3)
    with app.app_context():
        suppress(emails[1].upper(), 'bounced', 'a test')
        db.session.commit()

    runner.invoke(args=['send-newsletter-email', 'week1'])
    broadcast_now()

    assert sorted(set(smtp.recipients())) == [emails[0], emails[2]]
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Delivery.id)).join(Client).where(Client.email == emails[1])) == 0
        assert db.session.scalar(sa.select(Client.active).where(Client.email == emails[1])) is False


@pytest.fixture
def broadcast_now(app):
    """Send a broadcast to everyone, now."""
    def send():
        with app.app_context():
            broadcasts.schedule_broadcast('News', 'Hi {{ greeting_name }}', '<p>Hi</p>',
                                          datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(minutes=1),
                                          'UTC', 'admin@example.com')
            db.session.execute(sa.text("UPDATE jobs SET run_after = CURRENT_TIMESTAMP"))
            db.session.commit()
        run_due_jobs(app)
    return send


def test_the_confirmation_emails_block_link_really_blocks_the_address(app, client, smtp):
    sign_up(client, 'stranger@example.com')
    run_due_jobs(app)
    link = re.search(r'http://newsletter.test(/block/\S+)', smtp.messages[0].get_body(('plain',)).get_content()).group(1)

    asked = client.get(link)
    blocked = client.post(link)
    sign_up(client, 'stranger@example.com')
    run_due_jobs(app)

    assert asked.status_code == 200 and 'Never send anything to <strong>stranger@example.com</strong>' in asked.get_data(as_text=True)
    assert blocked.status_code == 200 and suppressed(app) == {'stranger@example.com': 'blocked'}
    assert len(smtp.messages) == 1, 'no second confirmation, whoever signs it up'
    assert client.get('/block/forged.token').status_code == 400


def test_the_block_link_blocks_from_a_browser_that_keeps_no_cookie(app, client, smtp):
    """The signed link is the proof: a mail app's web view keeps no session, and its reader asked to be left
    alone (checked against a session, the press was 'Form expired' and nothing was blocked)."""
    sign_up(client, 'stranger@example.com')
    run_due_jobs(app)
    link = re.search(r'http://newsletter.test(/block/\S+)', smtp.messages[0].get_body(('plain',)).get_content()).group(1)
    reader = app.test_client(use_cookies=False)

    assert 'Block stranger@example.com' in reader.get(link).get_data(as_text=True)
    blocked = reader.post(link)

    assert blocked.status_code == 200 and suppressed(app) == {'stranger@example.com': 'blocked'}


@pytest.mark.parametrize('who', ['a new address', 'a former subscriber'])
def test_the_confirm_link_in_the_same_email_does_not_subscribe_a_blocked_address(app, client, smtp, subscribers, who):
    """A stranger signs someone up; they press "block", then a link scanner (or a slip of the finger)
    follows the confirm link of that same email. For a former subscriber the leaving was long before the
    link was made, so only the suppression list can refuse it."""
    if who == 'a former subscriber':
        subscribers(1, active=False, unsubscribed_at=utcnow() - timedelta(days=30), num_newsletter=3)
    sign_up(client, 'reader0@example.com')
    run_due_jobs(app)
    body = smtp.messages[-1].get_body(('plain',)).get_content()
    confirm, block = (re.search(rf'http://newsletter.test(/{path}/\S+)', body).group(1)
                      for path in ('confirm', 'block'))
    client.post(block)

    answer = client.get(confirm)

    assert answer.status_code == 400 and 'does not subscribe it' in answer.get_data(as_text=True)
    with app.app_context():
        assert not db.session.scalar(sa.select(Client.active))
        assert db.session.scalar(sa.select(sa.func.count(Job.id)).where(Job.task == 'send_email')) == 0, \
            'no "new subscriber" notice to the admins'


def test_a_suppressed_address_signing_up_gets_the_usual_answer_and_no_email(app, client, smtp):
    with app.app_context():
        suppress('gone@example.com', 'bounced')
        db.session.commit()

    answer = sign_up(client, 'gone@example.com')
    run_due_jobs(app)

    assert answer.status_code == 200 and 'Check your inbox' in answer.get_data(as_text=True)
    assert smtp.messages == []
    with app.app_context():
        assert db.session.scalars(sa.select(Client)).all() == []


def test_bounces_drops_complaints_and_unsubscribes_reported_by_sendgrid_suppress_once_each(webhook, app, subscribers):
    emails = subscribers(6)
    events = [event('bounce', emails[0], 'e1', reason='550 no such user'),
              event('dropped', emails[1], 'e2', reason='Bounced Address'),
              event('spamreport', emails[2], 'e3'), event('unsubscribe', emails[3], 'e4'),
              event('delivered', emails[4], 'e5'), event('bounce', emails[5], 'e6', type='blocked')]

    first = webhook(events)
    replayed = webhook(events)

    assert first.status_code == 200 and first.get_json() == {'received': 6, 'suppressed': 4}
    assert replayed.get_json() == {'received': 6, 'suppressed': 0}, 'a replayed batch counts once'
    assert suppressed(app) == {emails[0]: 'bounced', emails[1]: 'bounced', emails[2]: 'complained',
                               emails[3]: 'unsubscribed'}
    with app.app_context():
        assert db.session.scalar(sa.select(Suppression.detail).where(Suppression.email == emails[0])) == \
            'SendGrid bounce: 550 no such user'
        assert db.session.scalar(sa.select(sa.func.count(WebhookEvent.id))) == 5, 'all but the delivery, once'
        assert [c.email for c in db.session.scalars(sa.select(Client).where(Client.active))] == emails[4:]


def test_a_signed_event_of_an_odd_shape_is_passed_over(webhook, app, subscribers):
    [email] = subscribers(1)
    response = webhook([event(['bounce'], email, 'e1'), event({'bounce': 1}, email, 'e2'),
                        event('bounce', [email], 'e3'), event('dropped', email, 'e4', reason=['Bounced Address'])])
    assert response.status_code == 200 and response.get_json() == {'received': 4, 'suppressed': 0}


def test_a_drop_suppresses_only_when_sendgrid_says_it_is_the_address(webhook, app, subscribers):
    """SendGrid drops a message, sending nothing, for the address (on one of its own lists) or for the
    message: its spam checker on a broadcast's content, a bad header. Suppressing on the latter would take
    every reader of that mailing off the list for good."""
    emails = subscribers(6)
    reasons = ['Bounced Address', 'Invalid', 'Unsubscribed Address', 'Spam Reporting Address', 'Spam Content',
               'Invalid SMTPAPI header']

    response = webhook([event('dropped', email, f'd{n}', reason=reason)
                        for n, (email, reason) in enumerate(zip(emails, reasons))])

    assert response.get_json() == {'received': 6, 'suppressed': 4}
    assert suppressed(app) == {emails[0]: 'bounced', emails[1]: 'bounced', emails[2]: 'unsubscribed',
                               emails[3]: 'complained'}


@pytest.mark.parametrize('tamper', ['wrong key', 'bad signature', 'not base64', 'stale', 'from the future', 'no headers',
                                    'a timestamp of digits int() refuses'])
def test_a_webhook_request_that_sendgrid_did_not_sign_now_is_refused_and_changes_nothing(webhook, app, subscribers,
                                                                                          tamper):
    [email] = subscribers(1)
    events = [event('bounce', email, 'e1')]
    if tamper == 'no headers':
        response = app.test_client().post('/webhooks/sendgrid', json=events)
    else:
        response = webhook(events, **{
            'wrong key': {'key': ec.generate_private_key(ec.SECP256R1())},
            'bad signature': {'signature': base64.b64encode(b'x' * 70).decode()},
            'not base64': {'signature': '%%%not base64%%%'},
            'stale': {'timestamp': int(time.time()) - 3600},
            'from the future': {'timestamp': int(time.time()) + 3600},
            'a timestamp of digits int() refuses': {'timestamp': '\u00b2'}}[tamper])  # '²'.isdigit() is True

    assert response.status_code == 403
    assert suppressed(app) == {}


def test_a_batch_as_large_as_sendgrid_posts_is_taken_whole(webhook, app):
    """SendGrid posts its events in batches of up to 768 KB, far above the 64 KiB a form may send: refused,
    a batch is retried for a while and then dropped, and its bounces are never suppressed."""
    reason = '550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking it.'
    events = [event('bounce', f'gone{n}@example.com', f'bounce-{n:020d}', reason=reason, status='5.1.1',
                    sg_message_id=f'14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.{n}') for n in range(1500)]
    assert len(json.dumps(events)) > 3 * app.config['MAX_CONTENT_LENGTH']

    response = webhook(events)

    assert response.status_code == 200 and response.get_json() == {'received': 1500, 'suppressed': 1500}
    assert len(suppressed(app)) == 1500


def test_a_batch_of_bounces_takes_as_many_statements_whatever_its_size(webhook, app, subscribers):
    """SendGrid waits only so long for an answer, then posts the batch again, and in the end drops it. A
    statement per event is a round trip per event to a database on another machine: 3,000 bounces took
    52 s at a 2 ms round trip (bench/webhook.py)."""
    def statements_for(count, start):
        emails, statements = subscribers(count, start=start), []

        def record(*args):
            statements.append(1)

        with app.app_context():
            sa.event.listen(db.engine, 'before_cursor_execute', record)
            response = webhook([event('bounce', email, f'bounce-{email}', reason='550 5.1.1 no such user')
                                for email in emails])
            sa.event.remove(db.engine, 'before_cursor_execute', record)
        assert response.get_json() == {'received': count, 'suppressed': count}
        return len(statements)

    assert statements_for(5, start=0) == statements_for(200, start=1000)
    assert len(suppressed(app)) == 205


def test_within_one_batch_an_event_delivered_twice_counts_once_and_an_addresss_first_reason_stands(
        webhook, app, subscribers):
    [email, other] = subscribers(2)
    response = webhook([event('spamreport', email.upper(), 'e1'), event('bounce', email, 'e2'),
                        event('spamreport', email, 'e1'), event('unsubscribe', other, 'e3'),
                        event('unsubscribe', other, 'e3')])
    assert response.get_json() == {'received': 5, 'suppressed': 3}
    assert suppressed(app) == {email: 'complained', other: 'unsubscribed'}
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(WebhookEvent.id))) == 3
        assert db.session.scalars(sa.select(Client).where(Client.active)).all() == []


@pytest.mark.parametrize('long', ['x' * 250 + '@example.com', '\u0130' * 130 + '@example.com'],
                         ids=['as given', 'once lower-cased'])  # 'İ' lower-cases to two characters
def test_an_event_no_address_can_be_is_passed_over_and_the_rest_of_its_batch_is_acted_on(webhook, app, subscribers,
                                                                                       long):
    """An address has at most 254 characters (RFC 5321's path, less its brackets): a longer one is no
    subscriber's, and storing it (lower-cased) failed the whole batch on PostgreSQL, each retry again."""
    [email] = subscribers(1)
    response = webhook([event('bounce', long, 'e1'), event('bounce', email, 'e2')])
    assert response.status_code == 200 and response.get_json() == {'received': 2, 'suppressed': 1}
    assert suppressed(app) == {email: 'bounced'}


def test_a_webhook_body_above_its_own_limit_is_refused_before_anything_is_read(webhook, app):
    app.config['WEBHOOK_MAX_BYTES'] = 10_000
    response = webhook([event('bounce', f'gone{n}@example.com', f'e{n}') for n in range(200)])
    assert response.status_code == 413 and suppressed(app) == {}


def test_without_a_verification_key_every_webhook_request_is_refused(app, subscribers):
    [email] = subscribers(1)
    response = app.test_client().post('/webhooks/sendgrid', json=[event('bounce', email, 'e1')])
    assert response.status_code == 403 and suppressed(app) == {}


def test_a_key_that_cannot_be_read_stops_the_app_at_start_up(settings):
    settings['SENDGRID_WEBHOOK_PUBLIC_KEY'] = 'bm90IGEga2V5'
    with pytest.raises(ValueError, match='SENDGRID_WEBHOOK_PUBLIC_KEY is not a public key'):
        create_app(type('TestConfig', (Config,), settings))


def test_an_address_the_relay_refuses_as_bad_in_so_many_mailings_is_suppressed(app, runner, smtp, subscribers):
    app.config['SUPPRESS_AFTER_FAILURES'] = 2
    emails = subscribers(3)
    smtp.refuse_for_good[emails[0]] = '550 5.1.1 no such user'
    smtp.refuse_for_good[emails[1]] = '554 5.7.1 relay access denied'  # the relay's reason, not the address

    runner.invoke(args=['send-newsletter-email', 'week1'])
    after_one = suppressed(app)
    runner.invoke(args=['send-newsletter-email', 'week2'])  # emails[2] got week1: week2 is its second mailing
    with app.app_context():
        db.session.execute(sa.update(Client).values(num_newsletter=1))  # everyone due week2 now
        db.session.commit()
    runner.invoke(args=['send-newsletter-email', 'week2'])

    assert after_one == {}, 'not after one mailing'
    assert suppressed(app) == {emails[0]: 'refused'}


def test_a_relay_refusing_our_sender_address_at_every_recipient_suppresses_nobody(app, runner, smtp, subscribers):
    """Postfix checks the sender at RCPT, and says so with a 5.1.x of the sender's (RFC 3463: 5.1.7 its
    syntax, 5.1.8 its domain; 5.1.0 with 'Sender address rejected'): each such refusal counted as the
    recipient's address being bad, so a MAIL_DEFAULT_SENDER with a typo in its domain put the whole list on
    the suppression list after SUPPRESS_AFTER_FAILURES mailings, for good."""
    app.config['SUPPRESS_AFTER_FAILURES'] = 2
    emails = subscribers(3)
    for email, status in zip(emails, ('5.1.8', '5.1.7', '5.1.0')):
        smtp.refuse_for_good[email] = f'553 {status} <news@exmaple.com>: Sender address rejected: Domain not found'

    runner.invoke(args=['send-newsletter-email', 'week1'])
    runner.invoke(args=['send-newsletter-email', 'week1', '--retry-failed'])  # same mailing: counted once
    with app.app_context():
        db.session.execute(sa.update(Client).values(num_newsletter=1))  # as if week1 had reached them
        db.session.commit()
    runner.invoke(args=['send-newsletter-email', 'week2'])

    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Delivery).where(Delivery.status == 'failed')) == 6
    assert suppressed(app) == {}


def test_the_drips_retry_failed_leaves_a_suppressed_subscribers_refusal_in_the_ledger_and_does_not_count_it(
        app, runner, smtp, subscribers, promise_kept):
    """As a broadcast's retry-failed: a suppressed address was counted among those sent the stage again,
    and the send, finding it due nothing, deleted its row, so that the ledger forgot it was refused."""
    app.config['SUPPRESS_AFTER_FAILURES'] = 1
    emails = subscribers(3)
    smtp.refuse_for_good[emails[1]] = f'550 5.1.1 <{emails[1]}>: User unknown'
    smtp.refuse_for_good[emails[2]] = f'554 5.7.1 <{emails[2]}>: Relay access denied'
    runner.invoke(args=['send-newsletter-email', 'week1'])
    assert suppressed(app) == {emails[1]: 'refused'}
    smtp.refuse_for_good.clear()  # the operator fixes the relay; emails[1] stays on the suppression list

    again = runner.invoke(args=['send-newsletter-email', 'week1', '--retry-failed'])

    assert 'week1: 1 subscriber(s) to send again' in again.output, again.output
    assert promise_kept('week1', emails) == {'sent': [emails[0], emails[2]], 'failed': [emails[1]]}
