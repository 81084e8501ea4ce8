"""The weekly drip, run as cron runs it (`flask send-newsletter-email weekN`), against a real SMTP server."""
import re
import shutil
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app import create_app
from app.database import utcnow
from app.drip import send_stage
from app.email import greeting_name
from app.extensions import db
from app.jobs import run_due
from app.models import Client, Delivery, Job
from config import Config


def clients(app):
    with app.app_context():
        return {c.email: c for c in db.session.scalars(sa.select(Client))}


def deliveries(app, stage=1):
    with app.app_context():
        return {d.client.email: (d.status, d.error) for d in db.session.scalars(
            sa.select(Delivery).where(Delivery.mailing == f'week{stage}').options(sa.orm.joinedload(Delivery.client)))}


def test_week1_goes_to_confirmed_active_new_subscribers_and_advances_them(app, runner, smtp, subscribers):
    due = subscribers(3)
    subscribers(1, start=10, email_confirmed_at=None)  # never confirmed
    subscribers(1, start=11, active=False)  # unsubscribed
    subscribers(1, start=12, num_newsletter=1)  # already had week1

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert 'week1: sent 3, skipped 0, failed 0' in result.output
    assert sorted(smtp.recipients()) == sorted(due)
    stages = {email: c.num_newsletter for email, c in clients(app).items()}
    assert stages == {**{e: 1 for e in due}, 'reader10@example.com': 0, 'reader11@example.com': 0,
                      'reader12@example.com': 1}


def test_week2_goes_only_to_those_who_received_week1(app, runner, smtp, subscribers):
    subscribers(2)
    at_stage_one = subscribers(2, start=5, num_newsletter=1)

    result = runner.invoke(args=['send-newsletter-email', 'week2'])

    assert result.exit_code == 0, result.output
    assert sorted(smtp.recipients()) == sorted(at_stage_one)
    assert all(clients(app)[email].num_newsletter == 2 for email in at_stage_one)


def test_a_second_run_of_the_same_stage_sends_nothing(runner, smtp, subscribers):
    subscribers(25)
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0

    again = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert again.exit_code == 0
    assert 'week1: sent 0, skipped 0, failed 0' in again.output
    assert len(smtp.messages) == 25


def test_newsletter_is_personal_and_carries_one_click_unsubscribe_headers(app, runner, smtp, subscribers):
    subscribers(1, start=0, email='jane.doe@example.com')

    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0

    [message] = smtp.messages
    client = clients(app)['jane.doe@example.com']
    assert message['To'] == 'jane.doe@example.com'
    assert message['From'] == 'The Newsletter <news@example.com>'
    assert message['Subject'] == 'Welcome aboard, Jane Doe: week 1'
    assert re.fullmatch(rf'<newsletter\.week1\.{client.id}\.[0-9a-f]{{10}}@example\.com>', message['Message-ID'])
    text = message.get_body(('plain',)).get_content()
    html = message.get_body(('html',)).get_content()
    assert 'Hello Jane Doe,' in text and 'Hello Jane Doe,' in html
    link = re.search(r'Unsubscribe: (\S+)', text).group(1)
    assert link.startswith('http://newsletter.test/unsubscribe/')
    assert f'href="{link}"' in html
    assert message['List-Unsubscribe'].startswith(f'<{link}>, <mailto:unsubscribe@example.com?subject=unsubscribe')
    assert message['List-Unsubscribe-Post'] == 'List-Unsubscribe=One-Click'


def test_unsubscribe_link_from_a_received_newsletter_works(app, runner, smtp, subscribers):
    [email] = subscribers(1)
    runner.invoke(args=['send-newsletter-email', 'week1'])
    link = re.search(r'<(http[^>]+)>', smtp.messages[0]['List-Unsubscribe']).group(1)

    # What Gmail does for an RFC 8058 one-click: a bare POST, no cookies, no CSRF token.
    response = app.test_client().post(link.removeprefix('http://newsletter.test'),
                                      data={'List-Unsubscribe': 'One-Click'})

    assert response.status_code == 200
    assert clients(app)[email].active is False
    again = runner.invoke(args=['send-newsletter-email', 'week2'])
    assert 'sent 0' in again.output and len(smtp.messages) == 1


def test_dry_run_lists_who_is_due_and_sends_nothing(app, runner, smtp, subscribers):
    due = subscribers(12)
    subscribers(1, start=50, email_confirmed_at=None)

    result = runner.invoke(args=['send-newsletter-email', 'week1', '--dry-run'])

    assert result.exit_code == 0
    assert result.stdout.split() == due
    assert '12 subscriber(s) would be sent' in result.stderr
    assert smtp.messages == [] and deliveries(app) == {}
    assert all(c.num_newsletter == 0 for c in clients(app).values())


def test_help_lists_the_stages(runner):
    result = runner.invoke(args=['send-newsletter-email', '--help'])
    assert '[week1|week2]' in result.output


@pytest.mark.parametrize('folder, why', [
    ('stagez', 'does not exist'),  # a typo for stages
    ('half-a-stage', 'holds no stages'),  # week1.txt without its week1.html
])
def test_a_stages_folder_that_is_missing_or_holds_no_stages_stops_the_app_at_start_up(settings, tmp_path, folder,
                                                                                       why):
    (tmp_path / 'half-a-stage').mkdir()
    (tmp_path / 'half-a-stage' / 'week1.txt').write_text('Subject: Welcome\nWelcome.\n')
    settings.update(STAGES_FOLDER=str(tmp_path / folder))

    with pytest.raises(ValueError, match=f'STAGES_FOLDER: .*{folder} {why}'):
        create_app(type('TestConfig', (Config,), settings))


def test_stages_gone_after_start_up_are_an_error_for_a_due_run_and_a_due_job(stage_templates, app, runner, smtp,
                                                                             subscribers, tmp_path):
    subscribers(3)
    shutil.rmtree(tmp_path / 'stages')  # the folder moved while the app runs

    result = runner.invoke(args=['send-newsletter-email', '--due'])
    with app.app_context():
        send_stage.apply(stage='due', trigger='schedule')
        db.session.commit()
        run_due()
        job = db.session.scalars(sa.select(Job)).one()

    assert result.exit_code == 1 and 'STAGES_FOLDER' in result.output and 'does not exist' in result.output
    assert job.status != 'done' and 'STAGES_FOLDER' in job.error
    assert smtp.messages == []


def test_unknown_stage_is_refused(runner, smtp, subscribers):
    subscribers(1)
    result = runner.invoke(args=['send-newsletter-email', 'week99'])
    assert result.exit_code == 2 and "'week99' is not one of" in result.output
    assert smtp.messages == []


def test_permanent_failure_is_recorded_for_that_subscriber_and_the_rest_are_sent(app, runner, smtp, subscribers):
    emails = subscribers(5)
    smtp.refuse_for_good['reader2@example.com'] = '550 5.1.1 No such user here'

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1
    assert 'week1: sent 4, skipped 0, failed 1' in result.output
    assert 'failed: reader2@example.com: reader2@example.com: 550 5.1.1 No such user here' in result.output
    assert sorted(smtp.recipients()) == sorted(set(emails) - {'reader2@example.com'})
    status, error = deliveries(app)['reader2@example.com']
    assert status == 'failed' and '550 5.1.1 No such user here' in error
    assert clients(app)['reader2@example.com'].num_newsletter == 0

    # A later run does not hammer the refused address; --retry-failed does, once the admin fixed it.
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    del smtp.refuse_for_good['reader2@example.com']
    retried = runner.invoke(args=['send-newsletter-email', 'week1', '--retry-failed'])
    assert retried.exit_code == 0 and 'sent 1,' in retried.output
    assert smtp.recipients().count('reader2@example.com') == 1


def test_a_refusal_whose_text_holds_a_nul_is_recorded_and_the_rest_are_sent(app, runner, smtp, subscribers):
    """A server's reply is its own to write; PostgreSQL's text refuses a NUL."""
    emails = subscribers(3)
    smtp.refuse_for_good['reader1@example.com'] = '550 5.1.1 No such user \x00here'

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1 and 'week1: sent 2, skipped 0, failed 1' in result.output, result.output
    assert sorted(smtp.recipients()) == sorted(set(emails) - {'reader1@example.com'})
    status, error = deliveries(app)['reader1@example.com']
    assert status == 'failed' and '550 5.1.1 No such user' in error


def test_temporary_failure_is_retried_with_backoff(app, runner, smtp, subscribers):
    subscribers(3)
    smtp.refuse_for_now['reader1@example.com'] = 2  # 451 twice, then accepted

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert sorted(smtp.recipients()) == ['reader0@example.com', 'reader1@example.com', 'reader2@example.com']


def test_temporary_failure_that_persists_is_deferred_and_a_job_tries_it_again(app, runner, smtp, subscribers):
    app.config.update(MAIL_RETRIES=1, MAIL_RETRY_BACKOFF=1)  # deferred for longer than this run lasts
    subscribers(3)
    smtp.refuse_for_now['reader1@example.com'] = 2  # greylisted for longer than this run's retries

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, 'deferred is not a failure: it is tried again'
    assert 'sent 2, skipped 0, failed 0, unknown 0, deferred 1' in result.output
    assert 'deferred: reader1@example.com: reader1@example.com: 451 4.7.1 Greylisted' in result.output
    with app.app_context():
        row = db.session.scalar(sa.select(Delivery).join(Client).where(Client.email == 'reader1@example.com'))
        assert (row.status, row.attempts) == ('deferred', 2) and '451' in row.error
        assert row.next_attempt_at > row.updated_at and row.deferred_since is not None
        [retry] = db.session.scalars(sa.select(Job)).all()
        assert retry.payload == {'stage': 'week1', 'trigger': 'retry', 'deferred_only': True}
        assert retry.run_after == row.next_attempt_at
        db.session.execute(sa.update(Job).values(run_after=utcnow() - timedelta(hours=1)))
        db.session.execute(sa.update(Delivery).values(next_attempt_at=utcnow() - timedelta(hours=1)))
        db.session.commit()
        run_due()
    assert smtp.recipients().count('reader1@example.com') == 1
    assert deliveries(app)['reader1@example.com'] == ('sent', None)
    assert clients(app)['reader1@example.com'].num_newsletter == 1
    assert len(smtp.messages) == 3, 'the job sent the deferred one only, not the stage again'


def test_a_connection_dropped_before_the_end_of_the_data_is_retried_on_a_new_connection(runner, smtp, subscribers):
    emails = subscribers(4)
    smtp.hang_up_at_rcpt['reader2@example.com'] = 1

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert sorted(smtp.recipients()) == sorted(emails)
    assert smtp.connections == 2


def test_dead_smtp_server_stops_the_run_and_loses_nothing(app, runner, smtp, subscribers):
    emails = subscribers(15)
    smtp.stop()

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1
    assert 'cannot connect to SMTP 127.0.0.1' in result.output and 'sent 0' in result.output
    assert deliveries(app) == {}
    assert all(c.num_newsletter == 0 for c in clients(app).values())

    smtp.start()
    rerun = runner.invoke(args=['send-newsletter-email', 'week1'])
    assert rerun.exit_code == 0, rerun.output
    assert sorted(smtp.recipients()) == sorted(emails)


def test_one_connection_is_reused_and_mail_max_emails_honoured(app, runner, smtp, subscribers):
    subscribers(25)
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    assert smtp.connections == 1

    app.extensions['mail'].max_emails = 10
    subscribers(25, start=100)
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    assert smtp.connections == 1 + 3 and len(smtp.messages) == 50


def test_database_work_grows_with_batches_not_subscribers(app, runner, smtp, subscribers, monkeypatch):
    # However fast the server: marks and records go SEND_RECORD_EVERY (10) to a commit.
    monkeypatch.setattr('app.sending.GROUP_SECONDS', 3600)
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    def statements_for_a_send_to(count, start):
        subscribers(count, start=start)
        statements.clear()
        with app.app_context():
            sa.event.listen(db.engine, 'before_cursor_execute', record)
            result = runner.invoke(args=['send-newsletter-email', 'week1'])
            sa.event.remove(db.engine, 'before_cursor_execute', record)
        assert result.exit_code == 0 and f'sent {count},' in result.output
        return len(statements)

    small, large = statements_for_a_send_to(40, start=0), statements_for_a_send_to(80, start=1000)

    # Per batch of 10 (SEND_RECORD_EVERY is 10 too): read due, insert claims, a checkpoint before the
    # batch goes out (the run's row says what it sends) and one after (records the outcomes, advances
    # the subscribers): on SQLite one and three statements, on PostgreSQL one each. The rest is per run.
    per_batch = 6 if app.config['SQLALCHEMY_DATABASE_URI'].startswith('sqlite') else 4
    assert large - small == per_batch * (80 - 40) // app.config['SEND_BATCH_SIZE']
    assert small < 40


@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)
def test_on_postgresql_a_batch_takes_as_many_parameters_whatever_its_size(app, runner, smtp, subscribers):
    # psycopg parses every placeholder in Python: the 800 of a claim of 100 cost more than the insert.
    def parameters_per_statement(batch, start):
        app.config['SEND_BATCH_SIZE'] = batch
        subscribers(batch, start=start)
        largest = {}

        def record(conn, cursor, statement, parameters, *args):
            kind = statement.split(None, 2)[:2]  # INSERT INTO, UPDATE deliveries, UPDATE clients, SELECT ...
            largest[tuple(kind)] = max(largest.get(tuple(kind), 0), len(parameters))

        with app.app_context():
            sa.event.listen(db.engine, 'before_cursor_execute', record)
            result = runner.invoke(args=['send-newsletter-email', 'week1'])
            sa.event.remove(db.engine, 'before_cursor_execute', record)
        assert result.exit_code == 0 and f'sent {batch},' in result.output
        return largest

    small, large = parameters_per_statement(10, start=0), parameters_per_statement(100, start=1000)

    assert ('INSERT', 'INTO') in large and ('WITH', 'recorded') in large  # the checkpoint: record, keep, advance
    assert large == small


@pytest.mark.parametrize('address, reason', [
    ('evil@example.com\r\nBcc: victim@example.org', 'refused: line break in the To header'),
    # Needs SMTPUTF8. Sign-up refuses such addresses, but rows arrive by other ways too.
    ('zoë@example.com', "refused: non-ASCII address 'zoë@example.com'"),
])
def test_an_unsendable_stored_address_fails_alone_with_its_reason(app, runner, smtp, subscribers, address, reason):
    # In the middle of the list: each message is prepared while the one before it is on the wire, and
    # the refusal must land on this subscriber, not on that neighbour.
    subscribers(1)
    subscribers(1, start=5, email=address)
    subscribers(1, start=1)

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1
    assert 'sent 2, skipped 0, failed 1' in result.output and reason in result.output
    assert sorted(smtp.recipients()) == ['reader0@example.com', 'reader1@example.com']
    assert all('victim' not in str(m) for m in smtp.messages)
    status, error = deliveries(app)[address]
    assert status == 'failed' and reason in error


def test_a_bug_while_sending_one_message_stops_the_run_leaves_it_due_and_repeats_nothing(app, runner, smtp, subscribers,
                                                                                       monkeypatch):
    from app.smtp import SmtpSender
    send = SmtpSender.send

    def send_with_a_bug(self, email, meanwhile=None, then=None):
        if email.recipient == 'reader1@example.com':
            raise RuntimeError('a bug')
        return send(self, email, meanwhile, then)

    monkeypatch.setattr(SmtpSender, 'send', send_with_a_bug)
    emails = subscribers(25)

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1 and "stopped by an unexpected error" in result.output and 'a bug' in result.output
    assert smtp.recipients() == ['reader0@example.com'], 'nothing after the bug went out'
    assert 'reader1@example.com' not in deliveries(app), 'not recorded failed: the way out never refused it'
    assert 'failed 0' in result.output
    monkeypatch.setattr(SmtpSender, 'send', send)
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    assert sorted(smtp.recipients()) == sorted(emails), 'everyone, and no one twice'


@pytest.mark.parametrize('email, name', [
    ('jane.doe+news@example.com', 'Jane Doe'), ('john_smith1990@example.com', 'John Smith'),
    ('MARY-ANN@example.com', 'Mary Ann'), ('12345@example.com', 'there')])
def test_the_greeting_name_comes_from_the_address(email, name):
    assert greeting_name(email) == name
