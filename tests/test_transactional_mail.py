"""Transactional mail (a sign-up's confirmation, an admin's sign-in link, the admins' notices): each email
is a job (`send_confirmation`, `send_email`) queued in the transaction of the request that wants it, so
it exists only if that transaction commits and the request never waits on SMTP. Any number of workers
deliver each email once (a worker killed mid-send may repeat only the one it had in flight); a temporary
failure is retried with growing back-off, and a permanent one is kept as failed for the admins to see."""
import signal
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from app.database import utcnow
from app.email import Email, queue_email
from app.extensions import db
from app.jobs import run_due
from app.models import Job
from tests.support.forms import sign_up
from tests.support.smtp import MailSink
from tests.support.jobs import make_jobs_due_now, queue_emails


def email_jobs(app):
    """The mail jobs, by recipient."""
    with app.app_context():
        return {row.payload['recipient']: row for row in db.session.scalars(sa.select(Job))}


def deliver(app):
    """Run the due jobs as one pass of a worker does.  :return: how many emails went out."""
    with app.app_context():
        before = db.session.scalar(sa.select(sa.func.count()).where(Job.status == 'done'))
        run_due()
        return db.session.scalar(sa.select(sa.func.count()).where(Job.status == 'done')) - before


def test_sign_up_does_not_wait_for_a_dead_smtp_server_and_the_email_goes_out_when_it_is_back(app, client, smtp):
    smtp.stop()

    assert sign_up(client, 'jane@example.com').status_code == 200
    assert deliver(app) == 0

    row = email_jobs(app)['jane@example.com']
    assert row.status == 'queued' and row.attempts == 1
    assert 'cannot connect' in row.error and row.run_after > row.created_at
    smtp.start()
    make_jobs_due_now(app)
    assert deliver(app) == 1
    assert smtp.recipients() == ['jane@example.com']
    assert email_jobs(app)['jane@example.com'].status == 'done'


def test_an_email_exists_only_if_its_transaction_commits(app, smtp):
    with app.app_context():
        queue_email(Email('jane@example.com', 'Hi', 'text', '<p>html</p>', '<rolled.back@example.com>'))
        db.session.rollback()
    assert email_jobs(app) == {} and deliver(app) == 0


def test_a_worker_sends_the_emails_it_finds_one_after_another_over_one_connection(app, smtp):
    queue_emails(app, 'a@example.com', 'b@example.com', 'c@example.com')

    assert deliver(app) == 3

    assert smtp.recipients() == ['a@example.com', 'b@example.com', 'c@example.com'] and smtp.connections == 1


def test_a_permanent_failure_is_kept_as_failed_and_the_rest_go_out(app, smtp):
    smtp.refuse_for_good['gone@example.com'] = '550 5.1.1 No such user'
    queue_emails(app, 'a@example.com', 'gone@example.com', 'b@example.com')

    assert deliver(app) == 2

    rows = email_jobs(app)
    assert rows['gone@example.com'].status == 'failed' and '550' in rows['gone@example.com'].error
    assert rows['gone@example.com'].attempts == 1, 'a permanent failure is not retried'
    assert sorted(smtp.recipients()) == ['a@example.com', 'b@example.com']


def test_a_temporary_failure_is_retried_with_growing_back_off_then_kept_as_failed(app, smtp):
    app.config.update(JOB_MAX_ATTEMPTS=3, JOB_RETRY_BACKOFF=60)
    smtp.refuse_for_now['busy@example.com'] = 99
    queue_emails(app, 'busy@example.com')

    waits = []
    for _ in range(3):
        before = utcnow()
        deliver(app)
        row = email_jobs(app)['busy@example.com']
        waits.append((row.run_after - before).total_seconds())
        make_jobs_due_now(app)

    assert row.status == 'failed' and row.attempts == 3 and '451' in row.error
    assert 59 <= waits[0] <= 61 and 119 <= waits[1] <= 121, waits  # 60 s, then doubled
    assert email_jobs(app)['busy@example.com'] is not None, 'kept, for the admin to see'


def test_an_email_whose_answer_is_lost_once_it_went_out_is_not_sent_again_and_its_job_says_so(app, smtp):
    """It may have arrived (the server had all of it): tried again, it went out as many times as the job had
    attempts (JOB_MAX_ATTEMPTS, 15), to a relay losing its answers, or a SendGrid slower than MAIL_TIMEOUT."""
    smtp.after_dot['jane@example.com'] = MailSink.DROP  # takes it, then hangs up before answering
    queue_emails(app, 'jane@example.com', 'b@example.com')

    for _ in range(3):
        deliver(app)
        make_jobs_due_now(app)

    assert [m['To'] for m in smtp.received_by('jane@example.com')] == ['jane@example.com']
    row = email_jobs(app)['jane@example.com']
    assert row.status == 'failed' and row.attempts == 1
    assert 'may have arrived' in row.error and 'no answer after the end of the data' in row.error
    assert email_jobs(app)['b@example.com'].status == 'done' and len(smtp.received_by('b@example.com')) == 1


def test_two_workers_deliver_each_email_once(app, smtp, flask_command):
    recipients = [f'person{n}@example.com' for n in range(30)]
    queue_emails(app, *recipients)
    smtp.delay = 0.03

    workers = [flask_command('worker', '--once') for _ in range(2)]
    results = [worker.communicate(timeout=60) + (worker.returncode,) for worker in workers]

    assert all(code == 0 for _, _, code in results), results
    assert Counter(smtp.recipients()) == Counter(recipients)
    assert {row.status for row in email_jobs(app).values()} == {'done'}
    assert {row.attempts for row in email_jobs(app).values()} == {1}


def test_emails_claimed_by_a_killed_worker_are_delivered_by_another(app, smtp, flask_command):
    recipients = [f'person{n}@example.com' for n in range(10)]
    queue_emails(app, *recipients)
    smtp.delay = 0.2

    doomed = flask_command('worker', LEASE_SECONDS='1')
    assert smtp.wait_for(2) >= 2
    lease_until = None
    while lease_until is None:  # kill it while it holds an email (the server takes 0.2 s over each)
        with app.app_context():
            lease_until = db.session.scalar(sa.select(sa.func.max(Job.lease_until)))
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()

    while utcnow() <= lease_until:
        time.sleep(0.05)

    out, err = flask_command('worker', '--once').communicate(timeout=60)

    assert set(smtp.recipients()) == set(recipients), (out, err)
    assert len(smtp.messages) <= len(recipients) + 1, 'only the email in flight at the kill may repeat'


@pytest.fixture
def threaded_settings(settings):
    settings.update(JOB_WORKER='thread', JOB_POLL_SECONDS=300)
    return settings


def test_the_web_process_delivers_with_its_own_thread_as_soon_as_the_request_commits(threaded_settings, request, smtp):
    app = request.getfixturevalue('app')

    assert sign_up(app.test_client(), 'jane@example.com').status_code == 200

    # The thread polls only every 300 s: arriving now proves the commit woke it.
    assert smtp.wait_for(1, timeout=20) == 1
    assert smtp.recipients() == ['jane@example.com']
