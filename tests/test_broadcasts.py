"""Dated broadcasts (app/broadcasts.py): written once, sent at their time to everyone confirmed, at most
once per subscriber, resumable after a kill, and cancellable, pausable and resumable by an admin."""
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from app import broadcasts
from app.database import utcnow
from app.extensions import db
from app.ledger import ledger, mailing_named
from app.models import Broadcast, Client, Delivery, Job
from tests.support.forms import confirm, confirm_link, sign_up
from tests.support.jobs import make_jobs_due_now, run_due_jobs

TEXT = 'Hello {{ greeting_name }},\n\nOur winter sale starts today.'
HTML = '<p>Hello {{ greeting_name }},</p><p>Our <b>winter sale</b> starts today.</p>'


def schedule(app, at=None, zone='UTC', subject='Winter sale, {{ greeting_name }}', text=TEXT, html=HTML):
    """Schedule a broadcast for `at` (local time in `zone`), a minute from now by default."""
    at = at or datetime.now().replace(microsecond=0) + timedelta(minutes=1)
    with app.app_context():
        return broadcasts.schedule_broadcast(subject, text, html, at, zone, created_by='admin@example.com').id


def state(app, broadcast_id):
    with app.app_context():
        broadcast = db.session.get(Broadcast, broadcast_id)
        return broadcast.status, broadcasts.delivery_counts(broadcast)


def test_a_broadcast_goes_at_its_time_once_to_every_active_confirmed_subscriber(app, smtp, subscribers):
    emails = subscribers(25)
    subscribers(1, start=100, email_confirmed_at=None)
    subscribers(1, start=200, active=False)
    broadcast_id = schedule(app, zone='Europe/Paris', at=datetime.now() + timedelta(hours=3))

    assert run_due_jobs(app) == 0 and smtp.messages == [], 'not before its time'
    make_jobs_due_now(app)
    run_due_jobs(app)
    run_due_jobs(app)

    assert Counter(smtp.recipients()) == Counter(emails)
    message = smtp.messages[0]
    assert message['Subject'] == 'Winter sale, Reader'  # personalised: reader7@ -> Reader
    assert 'Our winter sale starts today.' in message.get_body(('plain',)).get_content()
    assert '<b>winter sale</b>' in message.get_body(('html',)).get_content()
    assert 'Unsubscribe' in message.get_body(('html',)).get_content() and message['List-Unsubscribe']
    assert message['Message-ID'].startswith(f'<broadcast.{broadcast_id}.')
    assert state(app, broadcast_id) == ('sent', {'sent': 25})


def test_a_broadcast_that_breaks_for_one_subscriber_fails_that_one_and_reaches_the_rest(app, smtp, subscribers):
    subscribers(3)
    broadcast_id = schedule(app, text=TEXT + '{% if email.startswith("reader1@") %}{{ 1 // 0 }}{% endif %}')
    make_jobs_due_now(app)

    run_due_jobs(app)

    assert sorted(smtp.recipients()) == ['reader0@example.com', 'reader2@example.com']
    assert state(app, broadcast_id) == ('sent', {'sent': 2, 'failed': 1})
    with app.app_context():
        error = db.session.scalar(sa.select(Delivery.error).where(Delivery.status == 'failed'))
    assert error == 'cannot compose the message: ZeroDivisionError: integer division or modulo by zero'


def test_send_at_is_read_in_the_time_zone_the_admin_chose(app):
    broadcast_id = schedule(app, at=datetime(2031, 7, 1, 9, 0), zone='America/New_York')
    with app.app_context():
        broadcast = db.session.get(Broadcast, broadcast_id)
        job = db.session.scalar(sa.select(Job))
    assert broadcast.send_at == datetime(2031, 7, 1, 13, 0) == job.run_after  # EDT is UTC-4


@pytest.mark.parametrize('changes, error', [
    ({'at': datetime(2020, 1, 1, 9, 0)}, 'is in the past'),
    ({'zone': 'Mars/Olympus_Mons'}, "unknown time zone 'Mars/Olympus_Mons'"),
    ({'subject': 'Sale\r\nBcc: everyone@example.com'}, 'the subject must be one line'),
    ({'text': 'Hello {{ greeting_name'}, 'cannot be rendered'),
    ({'html': '{{ greeting_name.__class__.__mro__[1].__subclasses__() }}'}, 'cannot be rendered'),
    ({'text': 'Hello {{ first_name }}'}, "'first_name' is undefined"),
    ({'html': '  '}, 'needs a subject, a text version and an HTML version'),
    ({'html': '<p>{{ 1 / 0 }}</p>'}, 'cannot be rendered: division by zero'),
    ({'at': datetime(9999, 12, 31, 23, 0), 'zone': 'America/Los_Angeles'}, 'outside the years 1 to 9999 in UTC'),
    ({'at': datetime(1, 1, 1, 0, 0), 'zone': 'Asia/Tokyo'}, 'outside the years 1 to 9999 in UTC'),
])
def test_a_broadcast_that_cannot_be_sent_as_written_is_refused_and_nothing_is_stored(app, changes, error):
    with pytest.raises(broadcasts.BroadcastError, match=error):
        schedule(app, **changes)
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Broadcast.id))) == 0
        assert db.session.scalar(sa.select(sa.func.count(Job.id))) == 0


def test_a_broadcast_cancelled_before_it_starts_is_never_sent(app, smtp, subscribers):
    subscribers(5)
    broadcast_id = schedule(app)

    with app.app_context():
        broadcasts.cancel(broadcast_id)
    make_jobs_due_now(app)
    run_due_jobs(app)

    assert smtp.messages == [] and state(app, broadcast_id) == ('cancelled', {})
    with app.app_context():
        assert db.session.scalar(sa.select(Job.status)) == 'cancelled'
        with pytest.raises(broadcasts.BroadcastError, match='is cancelled: only a sending one can be paused'):
            broadcasts.pause(broadcast_id)


def test_a_paused_broadcast_stops_after_its_batch_and_resumes_where_it_stopped(app, smtp, subscribers):
    emails = subscribers(60)
    broadcast_id = schedule(app)
    make_jobs_due_now(app)
    smtp.delay = 0.03
    sender = threading.Thread(target=run_due_jobs, args=(app,))
    sender.start()
    smtp.wait_for(5, timeout=30)

    with app.app_context():
        broadcasts.pause(broadcast_id)
    sender.join(timeout=60)

    status, counts = state(app, broadcast_id)
    assert status == 'paused' and 0 < counts['sent'] < 60 and set(counts) == {'sent'}, counts
    paused_at = len(smtp.messages)
    assert paused_at == counts['sent'], 'nothing in flight is left unrecorded'
    time.sleep(0.3)
    assert len(smtp.messages) == paused_at, 'nothing more goes out while paused'

    with app.app_context():
        broadcasts.resume(broadcast_id)
    run_due_jobs(app)

    assert Counter(smtp.recipients()) == Counter(emails), 'the rest, and nobody twice'
    assert state(app, broadcast_id) == ('sent', {'sent': 60})


def test_subscribers_who_confirm_after_a_broadcast_started_do_not_get_it(app, smtp, subscribers):
    emails = subscribers(10)
    broadcast_id = schedule(app)
    make_jobs_due_now(app)
    with app.app_context():
        db.session.execute(sa.update(Broadcast).values(status='paused', started_at=utcnow()))
        db.session.commit()
    subscribers(3, start=50)  # confirmed while it is paused

    with app.app_context():
        broadcasts.resume(broadcast_id)
    run_due_jobs(app)

    assert Counter(smtp.recipients()) == Counter(emails)


def test_a_subscriber_who_comes_back_after_a_broadcast_started_does_not_get_it_and_its_ledger_balances(
        app, client, smtp, subscribers):
    """Coming back keeps the first confirmation's time: the broadcast took someone who had left before it
    started, and came back while it was paused, for one of its audience, sent it to them on resume, and its
    ledger then counted them: once it was sent, as pending ('marked sent while 1 are still pending')."""
    emails = subscribers(5)
    subscribers(1, start=50, active=False, unsubscribed_at=utcnow() - timedelta(days=1))
    broadcast_id = schedule(app)
    make_jobs_due_now(app)
    with app.app_context():
        db.session.execute(sa.update(Broadcast).values(status='paused', started_at=utcnow()))
        db.session.commit()
    sign_up(client, 'reader50@example.com')  # comes back while it is paused
    run_due_jobs(app)
    assert confirm(client, confirm_link(smtp.messages[-1])).status_code == 200
    run_due_jobs(app)  # the admins' notice of them
    smtp.messages.clear()

    with app.app_context():
        broadcasts.resume(broadcast_id)
    run_due_jobs(app)

    assert Counter(smtp.recipients()) == Counter(emails)
    with app.app_context():
        account = ledger(mailing_named(f'broadcast{broadcast_id}'))
    assert (account.audience, account.sent, account.pending, account.balances) == (5, 5, 0, True), account


def test_a_broadcast_resumes_after_its_worker_is_killed(app, smtp, subscribers, flask_command, promise_kept):
    emails = subscribers(60)
    broadcast_id = schedule(app)
    make_jobs_due_now(app)
    smtp.delay = 0.05

    doomed = flask_command('worker', LEASE_SECONDS='2')
    assert smtp.wait_for(15, timeout=30) >= 15
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    with app.app_context():
        lease_until = db.session.scalar(sa.select(Job.lease_until))
    while utcnow() <= lease_until:
        time.sleep(0.1)

    out, err = flask_command('worker', '--once').communicate(timeout=120)

    outcome = promise_kept(f'broadcast{broadcast_id}', emails)
    unknown = outcome.get('unknown', [])
    assert len(unknown) <= 2, 'at this pace, each message is marked on its own'
    expected = {'sent': 60 - len(unknown), **({'unknown': len(unknown)} if unknown else {})}
    assert state(app, broadcast_id) == ('sent', expected), (out, err)


def test_a_broadcast_every_copy_of_which_the_relay_refused_is_sent_again_once_the_cause_is_fixed(
        app, runner, smtp, subscribers, promise_kept):
    """A relay that refuses every recipient for a reason of its own (our credentials missing: Postfix's '554
    5.7.1 Relay access denied', at RCPT) fails each copy for good, and the broadcast ends 'sent'. The drip
    has --retry-failed for that; a broadcast had no way to send again, and the whole list never got it."""
    emails = subscribers(12)
    for email in emails:
        smtp.refuse_for_good[email] = f'554 5.7.1 <{email}>: Relay access denied'
    broadcast_id = schedule(app)
    make_jobs_due_now(app)
    run_due_jobs(app)
    assert state(app, broadcast_id) == ('sent', {'failed': 12}) and smtp.messages == []

    smtp.refuse_for_good.clear()  # the operator sets MAIL_USERNAME and MAIL_PASSWORD
    again = runner.invoke(args=['broadcast', 'retry-failed', str(broadcast_id)])
    run_due_jobs(app)

    assert again.exit_code == 0 and f'broadcast {broadcast_id}: 12 to send again' in again.output, again.output
    assert state(app, broadcast_id) == ('sent', {'sent': 12})
    assert promise_kept(f'broadcast{broadcast_id}', emails) == {'sent': emails}


def test_a_copy_sent_again_reaches_a_subscriber_who_left_and_came_back_since_and_stays_in_its_ledger(
        app, client, runner, smtp, subscribers, promise_kept):
    """A copy refused for good (or unknown) is theirs: they were of its audience when it started. Coming
    back confirms them as of then, after the broadcast started, and retry-failed then let their copy go as
    if they were not of its audience: the command said '1 to send again', nothing went, and their row was
    deleted, the broadcast's ledger forgetting them."""
    emails = subscribers(3)
    smtp.refuse_for_good['reader1@example.com'] = '554 5.7.1 <reader1@example.com>: Relay access denied'
    broadcast_id = schedule(app)
    make_jobs_due_now(app)
    run_due_jobs(app)
    assert state(app, broadcast_id) == ('sent', {'sent': 2, 'failed': 1})
    smtp.refuse_for_good.clear()  # the operator fixes the cause
    with app.app_context():  # they unsubscribe, and sign up again
        db.session.execute(sa.update(Client).where(Client.email == 'reader1@example.com')
                           .values(active=False, unsubscribed_at=utcnow()))
        db.session.commit()
    sign_up(client, 'reader1@example.com')
    run_due_jobs(app)
    assert confirm(client, confirm_link(smtp.messages[-1])).status_code == 200
    run_due_jobs(app)  # the admins' notice of them

    again = runner.invoke(args=['broadcast', 'retry-failed', str(broadcast_id)])
    run_due_jobs(app)

    assert f'broadcast {broadcast_id}: 1 to send again' in again.output, again.output
    assert state(app, broadcast_id) == ('sent', {'sent': 3})
    assert promise_kept(f'broadcast{broadcast_id}', emails) == {'sent': emails}


def test_retry_failed_leaves_a_suppressed_subscribers_refusal_in_the_ledger_and_does_not_count_it(
        app, runner, smtp, subscribers, promise_kept):
    """A suppressed address is sent nothing again: its copy was counted as sent again ('2 to send again'),
    and the send, finding it due nothing, deleted its row, so that the ledger forgot it was refused."""
    app.config['SUPPRESS_AFTER_FAILURES'] = 1
    emails = subscribers(3)
    smtp.refuse_for_good['reader1@example.com'] = '550 5.1.1 <reader1@example.com>: User unknown'
    smtp.refuse_for_good['reader2@example.com'] = '554 5.7.1 <reader2@example.com>: Relay access denied'
    broadcast_id = schedule(app)
    make_jobs_due_now(app)
    run_due_jobs(app)
    assert state(app, broadcast_id) == ('sent', {'sent': 1, 'failed': 2})
    smtp.refuse_for_good.clear()  # the operator fixes the relay; reader1@ is on the suppression list

    again = runner.invoke(args=['broadcast', 'retry-failed', str(broadcast_id)])
    run_due_jobs(app)

    assert state(app, broadcast_id) == ('sent', {'sent': 2, 'failed': 1})
    assert f'broadcast {broadcast_id}: 1 to send again' in again.output, again.output
    assert promise_kept(f'broadcast{broadcast_id}', emails) == {
        'sent': ['reader0@example.com', 'reader2@example.com'], 'failed': ['reader1@example.com']}


def test_flask_broadcast_previews_schedules_lists_and_cancels(app, runner, tmp_path):
    (tmp_path / 'sale.txt').write_text(TEXT)
    (tmp_path / 'sale.html').write_text(HTML)
    files = ['--text', str(tmp_path / 'sale.txt'), '--html', str(tmp_path / 'sale.html')]
    create = ['broadcast', 'create', '--subject', 'Winter sale', *files, '--at', '2031-12-01 09:00',
              '--timezone', 'Europe/Paris']

    preview = runner.invoke(args=[*create, '--preview'])
    assert preview.exit_code == 0 and 'Hello Preview,' in preview.output and 'Unsubscribe: http' in preview.output

    created = runner.invoke(args=create)
    assert created.exit_code == 0, created.output
    assert '2031-12-01 09:00 Europe/Paris (2031-12-01 08:00 UTC)' in created.output

    listed = runner.invoke(args=['broadcast', 'list'])
    assert 'scheduled\t2031-12-01 09:00 Europe/Paris\tsent 0, failed 0, unknown 0, deferred 0\tWinter sale' in listed.output

    assert runner.invoke(args=['broadcast', 'cancel', '1']).exit_code == 0
    again = runner.invoke(args=['broadcast', 'cancel', '1'])
    assert again.exit_code == 1 and 'broadcast 1 is cancelled' in again.output

    past = runner.invoke(args=[*create[:-4], '--at', '2020-01-01 09:00'])
    assert past.exit_code == 1 and 'is in the past' in past.output


@pytest.mark.parametrize('at', ['2031-07-01T09:00+02:00', '2031-07-01T07:00Z'])
def test_a_send_time_with_an_offset_is_refused_rather_than_read_in_the_time_zone(app, runner, tmp_path, at):
    """Python's ISO reader takes an offset, and the time zone then replaced it: 09:00+02:00 with the default
    --timezone UTC went out at 09:00 UTC, two hours late, and the command said 09:00."""
    (tmp_path / 'sale.txt').write_text(TEXT)
    (tmp_path / 'sale.html').write_text(HTML)
    result = runner.invoke(args=['broadcast', 'create', '--subject', 'Sale', '--text', str(tmp_path / 'sale.txt'),
                                 '--html', str(tmp_path / 'sale.html'), '--at', at])
    assert result.exit_code == 1 and 'give the time without its offset, and its zone with --timezone' in result.output
    with app.app_context():
        assert db.session.scalars(sa.select(Broadcast)).all() == []


def test_a_broadcast_file_holding_a_nul_is_refused_with_a_clear_error_and_nothing_is_stored(app, runner, tmp_path):
    """As the admin's form refuses it: no email needs a NUL, and PostgreSQL's text refuses one (a traceback)."""
    (tmp_path / 'sale.txt').write_text(TEXT + '\x00')
    (tmp_path / 'sale.html').write_text(HTML)
    result = runner.invoke(args=['broadcast', 'create', '--subject', 'Sale', '--text', str(tmp_path / 'sale.txt'),
                                 '--html', str(tmp_path / 'sale.html'), '--at', '2031-12-01 09:00'])
    assert result.exit_code == 1 and 'NUL' in result.output, result.output
    with app.app_context():
        assert db.session.scalars(sa.select(Broadcast)).all() == []


@pytest.mark.parametrize('verb', ['cancel', 'pause', 'resume'])
def test_each_broadcast_command_says_what_it_does(runner, verb):
    shown = runner.invoke(args=['broadcast', verb, '--help'])
    assert shown.exit_code == 0 and f'{verb.capitalize()} broadcast ID.' in shown.output
    assert 'None' not in shown.output


@pytest.mark.parametrize('verb', ['cancel', 'pause', 'resume', 'resend-unknown', 'retry-failed'])
@pytest.mark.parametrize('number', [str(2 ** 31), '9' * 20], ids=['past PostgreSQL', 'past SQLite'])
def test_a_broadcast_id_no_row_can_have_is_a_usage_error(runner, verb, number):
    """Past PostgreSQL's integer (our ids' type) the database refused the query, and the command was a
    traceback: the admin pages answer 404 for the same id."""
    result = runner.invoke(args=['broadcast', verb, number])
    assert result.exit_code == 2 and f'{number} is not in the range 1<=x<={2 ** 31 - 1}' in result.output
