"""The send's promise (never twice, never skipped, and it says which) under the faults real mail servers
and infrastructure have: an answer lost after the final dot, greylisting, a transaction that outlasts
the lease, the database dropping a run's connection, the rate limiter's Redis gone, several connections
at once, an untrusted certificate, a silent server, a process missing its mail settings, and every way
of starting a send."""
import dataclasses
import socket
import ssl
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import rq
import sqlalchemy as sa

from app import broadcasts
from app.broadcasts import BroadcastMailing
from app.database import utcnow
from app.extensions import db
from app.mailing import Recipient
from app.models import Broadcast, Client, Delivery, Job, SendRun
from app.subscribers import erase
from tests.support.jobs import run_due_jobs
from tests.support.processes import finish
from tests.support.smtp import MailSink, free_port

TEXT, HTML = 'Hello {{ greeting_name }}, our sale starts today.', '<p>Hello {{ greeting_name }}</p>'


@pytest.fixture
def ledger_of(app):
    """{email: (status, attempts, error)} of one mailing's send log."""
    def read(mailing='week1'):
        with app.app_context():
            return {email: (status, attempts, error) for email, status, attempts, error in db.session.execute(
                sa.select(Client.email, Delivery.status, Delivery.attempts, Delivery.error)
                .join(Client, Client.id == Delivery.client_id).where(Delivery.mailing == mailing))}
    return read


@pytest.fixture
def stages(app):
    def read():
        with app.app_context():
            return dict(db.session.execute(sa.select(Client.email, Client.num_newsletter)).all())
    return read


@pytest.fixture
def broadcast(app):
    """Schedule a broadcast and make it due now.  :return: its id."""
    def make():
        with app.app_context():
            created = broadcasts.schedule_broadcast('Sale', TEXT, HTML, utcnow() + timedelta(minutes=5), 'UTC',
                                                    created_by='admin@example.com')
            db.session.execute(sa.update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
            db.session.commit()
            return created.id
    return make


@pytest.fixture
def time_passes(app):
    """What an hour's wait would do: every queued job and every deferred delivery becomes due."""
    def wait():
        with app.app_context():
            an_hour_ago = utcnow() - timedelta(hours=1)
            db.session.execute(sa.update(Job).where(Job.status == 'queued').values(run_after=an_hour_ago))
            db.session.execute(sa.update(Delivery).where(Delivery.status == 'deferred')
                               .values(next_attempt_at=an_hour_ago))
            db.session.commit()
    return wait


# 1. The answer to the final dot is lost.

@pytest.mark.parametrize('misbehaviour', [MailSink.DROP, MailSink.SILENT, MailSink.GARBLED])
def test_a_message_whose_answer_is_lost_after_the_final_dot_is_unknown_and_never_sent_again(
        app, runner, smtp, subscribers, ledger_of, stages, misbehaviour):
    app.config['MAIL_DATA_TIMEOUT'] = 1
    emails = subscribers(5)
    smtp.after_dot['reader2@example.com'] = misbehaviour  # the server took it, then hung up, fell silent or
    # answered a line that is no reply: not a refusal, which `--retry-failed` would send again

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1
    assert 'sent 4, skipped 0, failed 0, unknown 1, deferred 0' in result.output
    assert 'unknown: reader2@example.com: SMTP 127.0.0.1' in result.output and '--resend-unknown' in result.output
    assert Counter(smtp.recipients()) == Counter(emails), 'it arrived, once, like everyone else'
    status, attempts, error = ledger_of()['reader2@example.com']
    assert (status, attempts) == ('unknown', 1) and 'no answer after the end of the data' in error
    assert stages()['reader2@example.com'] == 0, 'not moved on to a stage it may not have had'

    again = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert again.exit_code == 0 and 'sent 0,' in again.output
    assert smtp.recipients().count('reader2@example.com') == 1, 'never sent again unasked'


def test_the_answer_to_the_final_dot_is_awaited_longer_than_a_command(app, runner, smtp, subscribers, ledger_of):
    app.config.update(MAIL_TIMEOUT=0.5, MAIL_DATA_TIMEOUT=10)
    emails = subscribers(3)
    smtp.after_dot['reader1@example.com'] = 1.5  # scans the message for longer than a command may take

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert Counter(smtp.recipients()) == Counter(emails)
    assert {status for status, _, _ in ledger_of().values()} == {'sent'}


def test_an_admin_sends_an_unknown_one_again_only_when_asked(app, runner, smtp, subscribers, ledger_of, stages):
    subscribers(3)
    smtp.after_dot['reader1@example.com'] = [MailSink.DROP, None]  # lost the first time only
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 1

    status = runner.invoke(args=['mailing', 'status', 'week1', '--list', 'unknown'])
    assert status.exit_code == 0, status.output
    assert 'unknown         1' in status.output and 'balances: 2 + 0 + 1 + 0 + 0 = 3' in status.output
    assert 'reader1@example.com\tSMTP 127.0.0.1' in status.output

    resent = runner.invoke(args=['send-newsletter-email', 'week1', '--resend-unknown'])

    assert resent.exit_code == 0, resent.output
    assert 'week1: 1 subscriber(s) to send again' in resent.output and 'sent 1,' in resent.output
    assert smtp.recipients().count('reader1@example.com') == 2, 'the admin asked for it'
    assert ledger_of()['reader1@example.com'][:2] == ('sent', 2)
    assert stages()['reader1@example.com'] == 1


def test_three_answers_lost_in_a_row_stop_the_run_and_leave_the_rest_due(app, runner, smtp, subscribers, ledger_of):
    emails = subscribers(10)
    for email in emails[:3]:
        smtp.after_dot[email] = MailSink.DROP

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1 and '3 messages in a row got no answer' in result.output
    assert 'sent 0, skipped 0, failed 0, unknown 3' in result.output
    assert set(ledger_of()) == set(emails[:3]), 'the others are still due, not claimed'
    smtp.after_dot.clear()
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    assert Counter(smtp.recipients()) == Counter(emails)


def test_a_broadcast_job_stopped_by_lost_answers_waits_for_an_admin_instead_of_retrying(app, smtp, subscribers,
                                                                                     broadcast, ledger_of):
    emails = subscribers(6)
    for email in emails[:3]:
        smtp.after_dot[email] = MailSink.DROP
    broadcast_id = broadcast()

    run_due_jobs(app)

    with app.app_context():
        job = db.session.scalar(sa.select(Job).where(Job.task == 'send_broadcast'))
        assert db.session.get(Broadcast, broadcast_id).status == 'sending', 'not finished'
    assert (job.status, job.attempts) == ('failed', 1) and '3 messages in a row got no answer' in job.error
    assert sorted(status for status, _, _ in ledger_of(f'broadcast{broadcast_id}').values()) == ['unknown'] * 3

    smtp.after_dot.clear()  # the admin has looked at the relay, and pauses and resumes the broadcast
    with app.app_context():
        broadcasts.pause(broadcast_id)
        broadcasts.resume(broadcast_id)
    run_due_jobs(app)

    with app.app_context():
        assert db.session.get(Broadcast, broadcast_id).status == 'sent'
    assert {email: status for email, (status, _, _) in ledger_of(f'broadcast{broadcast_id}').items()} == {
        **{email: 'unknown' for email in emails[:3]}, **{email: 'sent' for email in emails[3:]}}
    assert sorted(smtp.recipients()) == sorted(emails), 'the unknown ones are not sent again'


# 2. Greylisting that outlasts a run's retries.

def test_a_greylisted_subscriber_keeps_a_broadcast_open_until_they_have_it(app, smtp, subscribers, broadcast,
                                                                         ledger_of, time_passes):
    app.config.update(MAIL_RETRIES=0, MAIL_RETRY_BACKOFF=60)  # its next attempt is after this run
    emails = subscribers(5)
    smtp.refuse_for_now['reader3@example.com'] = 2  # for two runs
    broadcast_id = broadcast()

    for _ in range(2):
        run_due_jobs(app)
        with app.app_context():
            status = db.session.get(Broadcast, broadcast_id).status
            job = db.session.scalar(sa.select(Job).where(Job.task == 'send_broadcast'))
            next_attempt = db.session.scalar(sa.select(Delivery.next_attempt_at).where(Delivery.status == 'deferred'))
        assert status == 'sending', 'not finished while someone is deferred'
        assert (job.status, job.run_after, job.attempts) == ('queued', next_attempt, 0), 'it comes back, for free'
        assert job.result['deferred'] == 1
        assert ledger_of(f'broadcast{broadcast_id}')['reader3@example.com'][0] == 'deferred'
        time_passes()

    run_due_jobs(app)

    assert Counter(smtp.recipients()) == Counter(emails)
    with app.app_context():
        assert db.session.get(Broadcast, broadcast_id).status == 'sent'
        assert db.session.scalar(sa.select(Job.status).where(Job.task == 'send_broadcast')) == 'done'
    assert ledger_of(f'broadcast{broadcast_id}')['reader3@example.com'][:2] == ('sent', 3)


def test_one_deferred_for_longer_than_the_give_up_age_fails_with_the_reason(app, smtp, subscribers, broadcast,
                                                                           ledger_of, time_passes):
    app.config.update(MAIL_RETRIES=0, MAIL_RETRY_BACKOFF=60, MAIL_GIVE_UP_AFTER=24 * 3600)
    subscribers(3)
    smtp.refuse_for_now['reader1@example.com'] = 99
    broadcast_id = broadcast()
    run_due_jobs(app)
    with app.app_context():
        db.session.execute(sa.update(Delivery).values(deferred_since=utcnow() - timedelta(days=2)))
        db.session.commit()
    time_passes()

    run_due_jobs(app)

    status, _, error = ledger_of(f'broadcast{broadcast_id}')['reader1@example.com']
    assert status == 'failed'
    assert error.startswith('gave up after 24 h of temporary failures; the last: ') and '451' in error
    with app.app_context():
        assert db.session.get(Broadcast, broadcast_id).status == 'sent'
    assert 'reader1@example.com' not in smtp.recipients()


def test_one_greylisted_after_a_thousand_answers_is_deferred_an_hour_and_the_run_goes_on(app, runner, smtp, subscribers,
                                                                                        ledger_of):
    """Sent again after giving up (--retry-failed keeps a delivery's attempts), a subscriber whose server
    greylisted them for days has a thousand answers behind them: the back-off is an hour, as after ten."""
    emails = subscribers(3)
    with app.app_context():
        greylisted = db.session.scalar(sa.select(Client).where(Client.email == emails[1]))
        db.session.add(Delivery(client_id=greylisted.id, mailing='week1', status='deferred', attempts=1100,
                                error='451 4.7.1 Greylisted', next_attempt_at=utcnow() - timedelta(minutes=1),
                                deferred_since=utcnow() - timedelta(hours=1)))
        db.session.commit()
    smtp.refuse_for_now[emails[1]] = 99

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert 'sent 2, skipped 0, failed 0, unknown 0, deferred 1' in result.output
    ledger = ledger_of()
    assert ledger[emails[1]][:2] == ('deferred', 1104) and sorted(smtp.recipients()) == [emails[0], emails[2]]
    with app.app_context():
        next_attempt = db.session.scalar(sa.select(Delivery.next_attempt_at).where(Delivery.status == 'deferred'))
    assert timedelta(minutes=59) < next_attempt - utcnow() <= timedelta(hours=1)


# 3. A live run stuck in one transaction for longer than its lease.

def test_a_run_stuck_in_one_transaction_for_longer_than_its_lease_keeps_its_claims(app, smtp, subscribers,
                                                                                  flask_command, promise_kept, stages):
    emails = subscribers(30)
    smtp.after_dot['reader3@example.com'] = 4.0  # four leases long
    slow = dict(LEASE_SECONDS='1', MAIL_TIMEOUT='30')

    stuck = flask_command('send-newsletter-email', 'week1', **slow)
    assert smtp.wait_for(4) >= 4  # reader3's message is in; its answer will take 4 s
    time.sleep(1.5)  # past its lease, had nothing renewed it
    other = flask_command('send-newsletter-email', 'week1', **slow)
    results = [finish(stuck), finish(other)]

    assert [code for code, _, _ in results] == [0, 0], results
    assert promise_kept('week1', emails) == {'sent': emails}
    assert set(stages().values()) == {1}


# 3b. The database drops the run's connection part-way.

@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)  # a server that can drop one connection
def test_a_run_whose_database_connection_drops_leaves_its_claims_to_the_next_run(
        app, smtp, subscribers, settings, postgresql_server, flask_command, promise_kept, ledger_of, stages):
    emails = subscribers(40)
    smtp.delay = 0.05
    name = f'send-{time.time_ns()}'  # the doomed run's connections, as pg_stat_activity lists them
    doomed = flask_command('send-newsletter-email', 'week1', LEASE_SECONDS='2',
                           DATABASE_URL=f"{settings['SQLALCHEMY_DATABASE_URI']}&application_name={name}")

    assert smtp.wait_for(12) >= 12
    with postgresql_server.begin() as connection:  # a proxy's idle timeout, a failover: the checkpoint's line goes
        dropped = connection.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name "
            "AND query LIKE 'WITH recorded AS%'"), {'name': name}).scalars().all()  # the checkpoint's statement
    code, out, err = finish(doomed)
    assert dropped == [True] and code == 1 and 'the database failed' in out, (dropped, out, err)
    left = ledger_of()
    assert any(status == 'claimed' for status, _, _ in left.values()), 'it stopped holding claims'

    time.sleep(2)  # its lease runs out, as a killed run's would
    code, out, err = finish(flask_command('send-newsletter-email', 'week1'))

    by_status = promise_kept('week1', emails)
    assert code == (1 if by_status.get('unknown') else 0), (out, err)  # an unknown one is for an admin to look at
    assert set(by_status) <= {'sent', 'unknown'}, f'left behind, never to be sent: {by_status.get("claimed")}'
    assert len(by_status.get('unknown', [])) <= 10 + 1, 'only what the dropped run was sending is unknown'
    assert {email for email, stage in stages().items() if stage == 1} == set(by_status['sent'])
    with app.app_context():
        first = db.session.scalar(sa.select(SendRun.stopped).order_by(SendRun.id).limit(1))
    assert 'the database failed' in first and 'taken over by run' in first, 'the admin sees why, and what came of it'


# 3c. An admin erases a subscriber whose message is on the wire.

def test_a_subscriber_erased_while_their_message_is_on_the_wire_stops_nobody_else(app, runner, smtp, subscribers,
                                                                                   ledger_of, stages):
    emails = subscribers(20)
    erased = emails[3]
    smtp.after_dot[erased] = 1.0  # taken at once, answered a second later: erased in between

    def erase_once_taken():
        assert smtp.wait_for(4) >= 4 and smtp.received_by(erased)
        with app.app_context():
            erase(db.session.scalar(sa.select(Client).where(Client.email == erased)))
    eraser = threading.Thread(target=erase_once_taken)
    eraser.start()

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    eraser.join()
    assert result.exit_code == 0 and 'took this one over' not in result.output, result.output
    assert Counter(smtp.recipients()) == Counter(emails), 'the run went on to everyone after them, once'
    assert {status for status, _, _ in ledger_of().values()} == {'sent'} and erased not in ledger_of()
    assert set(stages().values()) == {1} and erased not in stages()


# 4. The rate limiter's Redis is gone.

@pytest.mark.parametrize('redis', ['refusing', 'silent'])
def test_a_rate_limiter_whose_redis_is_gone_stops_the_run_and_records_nobody_failed(
        app, smtp, subscribers, flask_command, silent_server, ledger_of, stages, redis):
    subscribers(5)
    port = free_port() if redis == 'refusing' else silent_server.port

    code, out, err = finish(flask_command('send-newsletter-email', 'week1', MAIL_RATE_LIMIT='50',
                                          REDIS_URL=f'redis://127.0.0.1:{port}/0', REDIS_TIMEOUT='0.5'), timeout=60)

    assert code == 1 and 'the rate limiter is unavailable' in out, (out, err)
    assert 'failed 0' in out and smtp.messages == []
    assert ledger_of() == {}, 'everyone is still due'
    assert set(stages().values()) == {0}


def test_a_database_server_that_accepts_and_never_answers_stops_the_run_at_its_connect_timeout(
        flask_command, silent_server):
    # libpq waits for ever for a server that took the connection and says nothing (a hung PostgreSQL, a
    # proxy with nothing behind it): cron's runs piled up, each waiting, where the README promises every
    # connection a time-out of its own.
    command = flask_command('send-newsletter-email', 'week1', DATABASE_CONNECT_TIMEOUT='2',
                            DATABASE_URL=f'postgresql://postgres@127.0.0.1:{silent_server.port}/test')

    code, out, err = finish(command, timeout=60)

    assert code == 1 and 'timeout expired' in err, (out, err)


# 5. Several connections at once, for a broadcast.

def test_a_broadcast_over_several_connections_reaches_everyone(app, smtp, subscribers, broadcast, promise_kept):
    app.config.update(MAIL_CONCURRENCY=4, SEND_BATCH_SIZE=5)
    emails = subscribers(40)
    smtp.delay = 0.01
    broadcast_id = broadcast()

    run_due_jobs(app)

    assert promise_kept(f'broadcast{broadcast_id}', emails) == {'sent': emails}


def test_what_the_sender_threads_read_of_a_broadcast_is_a_frozen_copy(app, broadcast):
    broadcast_id = broadcast()
    with app.app_context():
        mailing = BroadcastMailing.of(db.session.get(Broadcast, broadcast_id))
        db.session.execute(sa.update(Broadcast).values(subject='Changed under it'))
        db.session.commit()
        db.session.remove()  # its row is gone from the session: nothing left to load lazily
    composed = []

    def on_a_sender_thread():
        with app.app_context():
            composed.append(mailing.compose(Recipient(1, 'jane@example.com')).subject)
    thread = threading.Thread(target=on_a_sender_thread)
    thread.start()
    thread.join()

    assert composed == ['Sale']
    with pytest.raises(dataclasses.FrozenInstanceError):
        mailing.subject = 'Changed'


# 6. TLS to the relay.

@pytest.fixture(scope='session')
def certificate_authority():
    import trustme
    return trustme.CA()


class TestTls:
    @pytest.fixture(params=['starttls', 'implicit'])
    def smtp(self, request, certificate_authority):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate_authority.issue_cert('127.0.0.1').configure_cert(context)
        sink = MailSink(tls_context=context, implicit_tls=request.param == 'implicit').start()
        sink.kind = request.param
        yield sink
        sink.stop()

    @pytest.fixture
    def settings(self, settings, smtp):
        settings.update(MAIL_USE_TLS=smtp.kind == 'starttls', MAIL_USE_SSL=smtp.kind == 'implicit')
        return settings

    def test_a_relay_whose_certificate_is_not_trusted_is_refused_and_nothing_is_sent(self, runner, smtp, subscribers,
                                                                                   ledger_of):
        subscribers(3)

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1 and 'certificate verify failed' in result.output
        assert smtp.messages == [] and ledger_of() == {}

    def test_a_relay_signed_by_a_private_ca_is_trusted_through_mail_tls_ca_file(self, app, runner, smtp, subscribers,
                                                                               certificate_authority, tmp_path):
        ca_file = tmp_path / 'ca.pem'
        certificate_authority.cert_pem.write_to_path(str(ca_file))
        app.config['MAIL_TLS_CA_FILE'] = str(ca_file)
        emails = subscribers(3)

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 0, result.output
        assert sorted(smtp.recipients()) == emails

    def test_verification_is_off_only_when_asked_and_every_start_says_so(self, smtp, subscribers, flask_command):
        emails = subscribers(2)
        tls = {'MAIL_USE_TLS': 'true'} if smtp.kind == 'starttls' else {'MAIL_USE_SSL': 'true'}

        code, out, err = finish(flask_command('send-newsletter-email', 'week1', MAIL_TLS_VERIFY='false', **tls))

        assert code == 0, (out, err)
        assert 'MAIL_TLS_VERIFY is off: the certificate of 127.0.0.1 is not checked' in err
        assert sorted(smtp.recipients()) == emails


# 7. A server that accepts connections and never speaks.

class TestSilentServer:
    @pytest.fixture
    def settings(self, settings, silent_server):
        settings.update(MAIL_PORT=silent_server.port, MAIL_TIMEOUT=0.5, MAIL_RETRIES=1, MAIL_CONCURRENCY=4)
        return settings

    def test_each_connection_times_out_on_its_own_without_the_process_wide_default(self, app, runner, subscribers,
                                                                                  ledger_of, monkeypatch):
        def process_wide(seconds):
            raise AssertionError('socket.setdefaulttimeout changes every thread: one connecting at the same '
                                 'moment may be left with no time-out at all')
        monkeypatch.setattr(socket, 'setdefaulttimeout', process_wide)
        subscribers(8)

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1 and 'timed out' in result.output
        assert 'failed 0' in result.output and ledger_of() == {}


# 8. Mail settings missing from a process's environment.

def test_a_deployment_without_mail_settings_refuses_to_start_instead_of_filling_the_folder(
        settings, subscribers, flask_command, ledger_of, stages):
    subscribers(3)

    code, out, err = finish(flask_command('send-newsletter-email', 'week1', MAIL_SERVER=''))

    assert code != 0
    assert 'no mail settings, and BASE_URL is http://newsletter.test' in err and 'MAIL_TRANSPORT=folder' in err
    assert not Path(settings['MAIL_FOLDER']).exists()
    assert ledger_of() == {} and set(stages().values()) == {0}


@pytest.mark.parametrize('database_url', ['sqlite'], indirect=True)  # a server database is a deployment already
def test_a_database_that_sent_real_mail_is_not_written_into_the_folder_unless_asked(
        app, runner, smtp, settings, subscribers, flask_command, stages):
    subscribers(2)
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    bare = dict(MAIL_SERVER='', BASE_URL='http://localhost:5000')  # a cron line with none of the settings

    code, out, err = finish(flask_command('send-newsletter-email', 'week2', **bare))

    assert code == 1, (out, err)
    assert f'this database sent through SMTP 127.0.0.1:{smtp.port} on' in out and 'MAIL_TRANSPORT=folder' in out
    assert not Path(settings['MAIL_FOLDER']).exists() and set(stages().values()) == {1}

    code, out, err = finish(flask_command('send-newsletter-email', 'week2', MAIL_TRANSPORT='folder', **bare))

    assert code == 0, (out, err)
    assert f'(through folder {settings["MAIL_FOLDER"]})' in out
    assert len(list(Path(settings['MAIL_FOLDER']).glob('*.eml'))) == 2


# 9. One send, whatever starts it.

def test_every_way_of_starting_a_send_is_the_same_send_and_fails_the_way_its_runner_understands(
        app, runner, smtp, subscribers, settings, redis_url, redis_client, flask_command):
    app.config.update(MAIL_RETRIES=0, JOB_RETRY_BACKOFF=60)  # one try each; a job retried a minute later
    subscribers(3)
    smtp.stop()  # the way out is down for all of them
    queue_name = f'test-{time.time_ns()}'

    from_cron = runner.invoke(args=['send-newsletter-email', 'week1'])
    with app.app_context():  # "Send now" queues the same job a schedule fires: run it as a worker would
        from app.drip import send_stage
        send_stage.apply(stage='week1')
        db.session.commit()
    run_due_jobs(app)
    code, out, err = finish(flask_command('send-newsletter-email', 'week1', '--queue', '1',
                                          REDIS_URL=redis_url, RQ_QUEUE=queue_name))
    assert code == 0, (out, err)
    finish(flask_command('rq-worker', '--burst', REDIS_URL=redis_url, RQ_QUEUE=queue_name))

    assert from_cron.exit_code == 1 and 'cannot connect to SMTP' in from_cron.output
    with app.app_context():
        job = db.session.scalar(sa.select(Job).where(Job.task == 'send_stage'))
        runs = db.session.execute(sa.select(SendRun.trigger, SendRun.via, SendRun.sent, SendRun.stopped)).all()
    assert job.status == 'queued' and job.run_after > job.started_at and 'cannot connect to SMTP' in job.error
    queue = rq.Queue(queue_name, connection=redis_client)
    [rq_job_id] = queue.scheduled_job_registry.get_job_ids() + queue.failed_job_registry.get_job_ids()
    rq_job = rq.job.Job.fetch(rq_job_id, connection=redis_client)
    assert rq_job.get_status() == 'scheduled' and rq_job.retries_left == 2, 'RQ saw it fail, and retries it'

    assert sorted(trigger for trigger, _, _, _ in runs) == ['admin', 'cli', 'rq']
    assert {(via, sent) for _, via, sent, _ in runs} == {(f'SMTP 127.0.0.1:{smtp.port}', 0)}
    assert all('cannot connect to SMTP' in stopped for _, _, _, stopped in runs)


# The database's clock, not each machine's.

@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)  # one SQLite file is on one machine's clock
def test_a_machine_whose_clock_runs_ahead_takes_over_no_live_claim(app, smtp, subscribers, flask_command,
                                                                   promise_kept):
    from libfaketime import get_reload_information
    _, faked = get_reload_information()
    emails = subscribers(30)
    smtp.delay = 0.1

    live = flask_command('send-newsletter-email', 'week1', LEASE_SECONDS='60')
    assert smtp.wait_for(3) >= 3
    ten_minutes_ahead = flask_command('send-newsletter-email', 'week1', LEASE_SECONDS='60', FAKETIME='+600', **faked)
    results = [finish(live), finish(ten_minutes_ahead)]

    assert [code for code, _, _ in results] == [0, 0], results
    assert promise_kept('week1', emails) == {'sent': emails}
