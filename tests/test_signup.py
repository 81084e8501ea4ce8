"""Sign-up with double opt-in: the form, the confirmation email and link, and every bad input."""
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.database import utcnow
from app.extensions import db
from app.models import Client, Job, SuppressionReason
from app.subscribers import deactivate
from app.suppression import suppress
from tests.support.forms import confirm, confirm_link, csrf_token, sign_up
from tests.support.jobs import run_due_jobs

CHECK_INBOX = 'We have sent a confirmation link to'


def rows(app, model):
    with app.app_context():
        return db.session.scalars(sa.select(model).order_by(model.id)).all()


def test_a_confirmation_link_is_made_as_its_email_goes_out_and_never_stored(app, client, smtp):
    sign_up(client, 'jane@example.com')
    [job] = rows(app, Job)
    assert job.task == 'send_confirmation' and set(job.payload) == {'recipient', 'client_id', 'asked_at', 'message_id'}

    assert run_due_jobs(app) == 1

    [confirmation] = smtp.messages
    token = confirm_link(confirmation).rsplit('/', 1)[1]
    assert all(token not in str(job.payload) for job in rows(app, Job))
    assert confirmation['Message-ID'] == job.payload['message_id'], 'the one made with the sign-up, whatever the tries'
    assert 'You are subscribed' in confirm(client, confirm_link(confirmation)).get_data(as_text=True)


@pytest.mark.parametrize('meanwhile, why', [('blocked', 'the address is on the suppression list'),
                                             ('unsubscribed', 'unsubscribed after it was asked for'),
                                             ('confirmed', 'already confirmed')])
def test_a_confirmation_still_waiting_to_go_out_is_not_sent_once_its_address_has_left_or_confirmed(
        app, client, smtp, meanwhile, why):
    """Its link, made as it goes out, would be newer than the leaving, and the confirmation page refuses
    only older ones: sent, it would let a link scanner subscribe again someone who had just blocked us."""
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    sign_up(client, 'jane@example.com')  # a second one, still waiting (its server refusing for now, say)
    with app.app_context():
        jane = db.session.scalar(sa.select(Client))
        if meanwhile == 'blocked':
            suppress(jane.email, SuppressionReason.BLOCKED, 'the block link in the first email')
        elif meanwhile == 'unsubscribed':
            deactivate(jane)
        else:
            jane.email_confirmed_at = utcnow()
        db.session.commit()

    assert run_due_jobs(app) == 1

    assert len(smtp.messages) == 1, 'only the first went out'
    second = rows(app, Job)[-1]
    assert (second.status, second.result) == ('done', {'not sent': why})


def test_sign_up_page_has_a_csrf_protected_form(client):
    page = client.get('/').get_data(as_text=True)
    assert '<form method="post"' in page and 'name="csrf_token"' in page and 'name="email"' in page


def test_sign_up_sends_a_confirmation_and_the_link_confirms(app, client, smtp):
    response = sign_up(client, '  Jane.Doe@Example.COM ')

    assert response.status_code == 200 and CHECK_INBOX in response.get_data(as_text=True)
    [subscriber] = rows(app, Client)
    assert subscriber.email == 'Jane.Doe@example.com'  # trimmed, domain lower-cased
    assert subscriber.email_confirmed_at is None and subscriber.num_newsletter == 0
    assert smtp.messages == [], 'the request only queues the email'

    assert run_due_jobs(app) == 1
    [confirmation] = smtp.messages
    assert confirmation['To'] == 'Jane.Doe@example.com'
    assert confirmation['Subject'] == 'Please confirm your subscription'
    assert 'Hello Jane Doe,' in confirmation.get_body(('plain',)).get_content()

    page = confirm(client, confirm_link(confirmation))
    assert page.status_code == 200 and 'You are subscribed' in page.get_data(as_text=True)
    [subscriber] = rows(app, Client)
    assert subscriber.email_confirmed_at is not None and subscriber.active


def test_opening_a_confirmation_link_subscribes_nobody_until_its_button_is_pressed(app, client, smtp):
    """Mail scanners (Safe Links, Mimecast) open every link of a message before its reader does: opening
    the link subscribed whomever a stranger had signed up, without their word, and told the admins."""
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    link = confirm_link(smtp.messages[0])
    scanner = app.test_client()

    scanned = scanner.get(link)
    assert rows(app, Client)[0].email_confirmed_at is None and run_due_jobs(app) == 0, 'no notice to the admins'
    assert scanned.status_code == 200 and 'Confirm my subscription</button>' in scanned.get_data(as_text=True)

    pressed = client.post(link)

    assert pressed.status_code == 200 and 'You are subscribed' in pressed.get_data(as_text=True)
    assert rows(app, Client)[0].email_confirmed_at is not None


def test_confirmation_notifies_the_admins(app, client, smtp):
    sign_up(client, 'new@example.com')
    run_due_jobs(app)
    confirm(client, confirm_link(smtp.messages[0]))

    assert run_due_jobs(app) == 1
    notice = smtp.messages[1]
    assert notice['To'] == 'admin@example.com'
    assert notice['Subject'] == 'New subscriber: new@example.com'


def test_confirming_twice_notifies_the_admins_once(app, client, smtp):
    sign_up(client, 'new@example.com')
    run_due_jobs(app)
    link = confirm_link(smtp.messages[0])
    assert confirm(client, link).status_code == 200
    assert confirm(client, link).status_code == 200
    run_due_jobs(app)
    assert smtp.recipients().count('admin@example.com') == 1


def test_signing_up_again_never_reveals_whether_the_address_is_known(app, client, smtp):
    new = sign_up(client, 'someone@example.com').get_data(as_text=True)
    again_unconfirmed = sign_up(client, 'someone@example.com').get_data(as_text=True)
    assert run_due_jobs(app) == 2, 'the unconfirmed address gets a fresh confirmation'
    confirm(client, confirm_link(smtp.messages[-1]))
    assert run_due_jobs(app) == 1  # the admins' notice
    again_active = sign_up(client, 'someone@example.com').get_data(as_text=True)

    assert new == again_unconfirmed == again_active
    assert run_due_jobs(app) == 0, 'an active subscriber gets nothing a stranger could trigger at will'
    assert [m['Subject'] for m in smtp.messages] == ['Please confirm your subscription'] * 2 + [
        'New subscriber: someone@example.com']


def test_an_unsubscribed_reader_can_come_back_through_confirmation(app, client, smtp, subscribers):
    subscribers(1, active=False, num_newsletter=2)

    sign_up(client, 'reader0@example.com')
    assert rows(app, Client)[0].active is False, 'not back before confirming'
    run_due_jobs(app)
    confirm(client, confirm_link(smtp.messages[0]))

    [subscriber] = rows(app, Client)
    assert subscriber.active and subscriber.unsubscribed_at is None and subscriber.num_newsletter == 2


@pytest.mark.parametrize('email, error', [
    ('not-an-address', 'An email address must have an @-sign.'),
    ('jane@@example.com', 'The part after the @-sign contains invalid characters'),
    ('jane@example', 'The part after the @-sign is not valid'),
    ('jane@example.com\r\nBcc: victim@example.org', 'An email address cannot contain line breaks.'),
    ('jane@example.com\n', 'An email address cannot contain line breaks.'),
    ('x' * 300 + '@example.com', 'An email address has at most 254 characters.'),
    ('', 'Please enter your email address.'),
])
def test_a_bad_address_gets_a_form_error_and_writes_nothing(app, client, email, error):
    response = sign_up(client, email)

    assert response.status_code == 400
    assert error in response.get_data(as_text=True)
    assert rows(app, Client) == [] and rows(app, Job) == []


@pytest.mark.parametrize('pasted', ['jane@example.com\u00a0', '\u200bjane@example.com', '\ufeffjane@example.com\u2009'])
def test_an_address_pasted_with_invisible_characters_around_it_is_taken_without_them(app, client, pasted):
    # Copied from a web page or a document, an address comes with a no-break space or a zero-width one
    # at its end, which its reader cannot see, and was refused for "unsafe characters".
    assert sign_up(client, pasted).status_code == 200
    assert [row.email for row in rows(app, Client)] == ['jane@example.com']


def test_an_invisible_character_inside_an_address_is_refused_by_its_name(app, client):
    response = sign_up(client, 'jane\u00a0doe@example.com')

    assert response.status_code == 400 and 'NO-BREAK SPACE' in response.get_data(as_text=True)
    assert rows(app, Client) == []


def test_a_post_without_csrf_token_is_refused_and_writes_nothing(app, client):
    response = client.post('/', data={'email': 'jane@example.com'})

    assert response.status_code == 400
    assert 'security token' in response.get_data(as_text=True)
    assert rows(app, Client) == []


def test_an_oversized_request_gets_an_error_page_and_writes_nothing(app, client):
    response = client.post('/', data={'email': 'a' * 100_000 + '@example.com',
                                       'csrf_token': csrf_token(client, '/')})

    assert response.status_code == 413
    assert 'Request Entity Too Large' in response.get_data(as_text=True)
    assert rows(app, Client) == []


@pytest.mark.parametrize('tamper', [
    lambda token: token[:-2] + ('AA' if not token.endswith('AA') else 'BB'),  # forged signature
    lambda token: 'eyJpZCI6MSwiZW1haWwiOiJ4QGV4YW1wbGUuY29tIn0' + token[token.index('.'):],  # other payload
    lambda token: 'garbage',
])
def test_a_forged_confirmation_link_is_refused_and_confirms_nothing(app, client, smtp, tamper):
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    link = confirm_link(smtp.messages[0])
    prefix, token = link.rsplit('/', 1)

    response = client.get(f'{prefix}/{tamper(token)}')

    assert response.status_code == 400 and 'not valid' in response.get_data(as_text=True)
    assert rows(app, Client)[0].email_confirmed_at is None


def test_an_expired_confirmation_link_says_so_and_confirms_nothing(app, client, smtp):
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    app.config['CONFIRM_MAX_AGE'] = -1

    response = client.get(confirm_link(smtp.messages[0]))

    assert response.status_code == 400 and 'expired' in response.get_data(as_text=True)
    assert rows(app, Client)[0].email_confirmed_at is None


def test_the_confirmation_link_of_a_replaced_address_does_not_confirm_another(app, client, smtp):
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    link = confirm_link(smtp.messages[0])
    with app.app_context():
        db.session.execute(sa.update(Client).values(email='someone.else@example.com'))
        db.session.commit()

    assert client.get(link).status_code == 400
    assert rows(app, Client)[0].email_confirmed_at is None


def test_an_unknown_page_gets_a_404_page(client):
    response = client.get('/no-such-page')
    assert response.status_code == 404 and 'Not Found' in response.get_data(as_text=True)


def test_an_old_confirmation_link_does_not_subscribe_again_someone_who_left_after_it(app, client, smtp):
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    link = confirm_link(smtp.messages[0])
    confirm(client, link)
    with app.app_context():
        jane = db.session.scalar(sa.select(Client))
        jane.active, jane.unsubscribed_at = False, utcnow() + timedelta(seconds=1)  # she left after the link
        db.session.commit()

    again = client.get(link)

    assert again.status_code == 400 and 'unsubscribed after this link was sent' in again.get_data(as_text=True)
    assert rows(app, Client)[0].active is False


@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)  # SQLite's ids follow its rows
def test_a_sign_up_that_cannot_be_stored_is_an_error_not_a_check_your_inbox(app, client, smtp):
    """Only an address already known is skipped quietly. Rows copied in with their ids (a move from
    SQLite) leave PostgreSQL's id sequence behind them: such a sign-up must fail loudly, not be answered
    as done with nothing stored and no email."""
    with app.app_context():
        db.session.execute(sa.text("INSERT INTO clients (id, email, active, num_newsletter, created_at) VALUES "
                                   "(1, 'old1@example.com', true, 1, now())"))
        db.session.commit()
    app.config['PROPAGATE_EXCEPTIONS'] = False

    answer = sign_up(client, 'new@example.com')

    assert answer.status_code == 500


@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)
def test_one_address_signed_up_many_times_at_once_gets_the_usual_answer_each_time(app, smtp):
    """A double click, or a bot. PostgreSQL's ON CONFLICT looks only at the index it is given (lower(email)):
    a twin request that passed that look a moment before this one's row was in it met the row on the
    exact-address constraint instead, and its reader got a 500."""
    app.config.update(PROPAGATE_EXCEPTIONS=False, CONFIRM_RESEND_SECONDS=600)
    answers = []

    def sign_up_with(client, token, ready):
        ready.wait()
        answers.append(client.post('/', data={'email': address, 'csrf_token': token}).status_code)

    for n in range(150):
        address, ready = f'twin{n}@example.com', threading.Barrier(8)
        clients = [app.test_client() for _ in range(8)]
        twins = [threading.Thread(target=sign_up_with, args=(client, csrf_token(client, '/'), ready))
                 for client in clients]
        for twin in twins:
            twin.start()
        for twin in twins:
            twin.join()

    assert set(answers) == {200}
    assert len(rows(app, Client)) == 150 and len(rows(app, Job)) == 150, 'one sign-up and one confirmation each'


@pytest.mark.parametrize('browser', ['keeps no cookie', 'pressed an hour later'])
def test_a_reader_who_opened_a_valid_confirmation_link_is_subscribed_by_pressing_its_button(app, client, smtp,
                                                                                          monkeypatch, browser):
    """The signed link is the proof, for CONFIRM_MAX_AGE: a browser that keeps no cookie (a mail app's web
    view, another phone than the one that signed up), or a press after a session's CSRF token has expired
    (an hour), still confirms. Checked against the session, both were 'Form expired' and stayed unsubscribed."""
    import itsdangerous
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    link = confirm_link(smtp.messages[0])
    reader = app.test_client(use_cookies=browser != 'keeps no cookie')

    assert 'Confirm my subscription</button>' in reader.get(link).get_data(as_text=True)
    if browser == 'pressed an hour later':
        later = int(itsdangerous.TimestampSigner.get_timestamp(None)) + 3601
        monkeypatch.setattr(itsdangerous.TimestampSigner, 'get_timestamp', lambda self: later)
    pressed = reader.post(link)

    assert 'You are subscribed' in pressed.get_data(as_text=True), pressed.get_data(as_text=True)
    assert rows(app, Client)[0].email_confirmed_at is not None


def test_pressing_the_confirm_button_twice_at_once_notifies_the_admins_once(app, client, smtp, monkeypatch):
    """A double click sends two POSTs, which both read the sign-up unconfirmed; only the one whose UPDATE
    confirms it notifies the admins. A barrier holds the two together at the notice, so that both would
    reach it if both confirmed (before, 40 sign-ups pressed twice at once got 63 notices on SQLite and 79
    on PostgreSQL)."""
    import app.main.routes as routes
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)
    link = confirm_link(smtp.messages[0])
    both_read = threading.Barrier(2)
    notice = routes.queue_new_subscriber_notice

    def held_notice(subscriber):
        try:
            both_read.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        notice(subscriber)
    monkeypatch.setattr(routes, 'queue_new_subscriber_notice', held_notice)
    app.config['PROPAGATE_EXCEPTIONS'] = False
    answers = []

    def press():
        answers.append(client.post(link).status_code)
    presses = [threading.Thread(target=press) for _ in range(2)]
    for thread in presses:
        thread.start()
    for thread in presses:
        thread.join()
    run_due_jobs(app)

    assert answers == [200, 200]
    assert smtp.recipients().count('admin@example.com') == 1, 'one notice of one new subscriber'
