"""The job mechanism (app/jobs.py): defined once, applied with keyword arguments, run once under a
lease by any number of workers, retried with back-off, and kept with its outcome for admins."""
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app import create_app
from app.database import utcnow
from app.drip import send_stage
from app.email import Email, queue_email
from app.extensions import db
from app.jobs import Interrupted, Worker, define_task, report_progress, run_next, stopping
from app.leases import Heartbeat
from app.models import Client, Job
from config import Config
from tests.support.jobs import jobs, make_jobs_due_now, queue_emails, run_due_jobs
from tests.support.smtp import free_port


@define_task()
def add(a, b):
    return {'sum': a + b}


@define_task()
def flaky(message):
    raise ValueError(message)


@define_task()
def subscribe_then(email, fail):
    db.session.add(Client(email=email))
    db.session.flush()
    if fail:
        raise RuntimeError('failed after writing')


ran = []  # the tag of each run of `noted`, in order
halt = threading.Event()  # what `noted` sets, when asked to, as a worker's shutdown would


@define_task()
def noted(tag, seconds=0, stop_the_worker=False):
    ran.append(tag)
    if stop_the_worker:
        halt.set()
    time.sleep(seconds)


@define_task(queue='bulk')
def slow_counter(steps, step_seconds):
    for step in range(steps):
        report_progress(step, steps)
        if stopping():
            raise Interrupted
        time.sleep(step_seconds)
    return {'steps': steps}


@define_task(queue='bulk')
def holding_a_connection(hold_seconds, steps, step_seconds):
    """Holds a connection of the pool for `hold_seconds` (a long read, a transaction left open), then counts."""
    db.session.execute(sa.select(1))
    time.sleep(hold_seconds)
    db.session.commit()
    for step in range(steps):
        report_progress(step, steps)
        time.sleep(step_seconds)
    return {'steps': steps}


@pytest.fixture
def app(app):
    """The app, with this module's tasks registered beside its own, as the factory registers those."""
    app.extensions['tasks'].add(add, flaky, subscribe_then, noted, slow_counter, holding_a_connection)
    ran.clear()
    halt.clear()
    return app


def test_a_task_runs_with_its_keyword_arguments_and_its_result_and_timings_are_kept(app):
    with app.app_context():
        add.apply(a=2, b=3)
        db.session.commit()

    assert run_due_jobs(app) == 1

    [job] = jobs(app)
    assert (job.task, job.payload, job.status, job.result, job.attempts) == ('add', {'a': 2, 'b': 3}, 'done',
                                                                             {'sum': 5}, 1)
    assert job.created_at <= job.started_at <= job.finished_at and job.claimed_by is None
    assert run_due_jobs(app) == 0, 'a done job is not run again'


def test_an_argument_that_cannot_be_stored_is_refused_where_the_task_is_applied(app):
    with app.app_context(), pytest.raises(TypeError):
        add.apply(a=object(), b=1)


def test_a_failing_job_is_retried_with_growing_back_off_then_kept_as_failed_with_its_error(app):
    app.config.update(JOB_MAX_ATTEMPTS=3, JOB_RETRY_BACKOFF=60)
    with app.app_context():
        flaky.apply(message='the disk is full')
        db.session.commit()

    waits = []
    for _ in range(3):
        before = utcnow()
        run_due_jobs(app)
        [job] = jobs(app)
        waits.append((job.run_after - before).total_seconds())
        assert run_due_jobs(app) == 0, 'not before its back-off has passed'
        make_jobs_due_now(app)

    assert job.status == 'failed' and job.attempts == 3 and job.error == 'ValueError: the disk is full'
    assert 59 <= waits[0] <= 61 and 119 <= waits[1] <= 121, waits


def test_an_error_holding_a_nul_is_kept_as_its_job_outcome(app):
    """A server's answer or a file's line quoted in an exception may hold a NUL, which PostgreSQL's text
    refuses: the outcome could not be written, and the job stayed running for another worker to take over."""
    with app.app_context():
        flaky.apply(message='line 3: \x00')
        db.session.commit()

    run_due_jobs(app)

    [job] = jobs(app)
    assert (job.status, job.attempts, job.error) == ('queued', 1, 'ValueError: line 3: \\x00')


@pytest.mark.parametrize('fail', [False, True])
def test_a_jobs_database_writes_are_committed_with_its_success_and_not_at_all_if_it_fails(app, fail):
    with app.app_context():
        subscribe_then.apply(email='new@example.com', fail=fail)
        db.session.commit()

    run_due_jobs(app)

    with app.app_context():
        written = db.session.scalar(sa.select(Client.email))
    [job] = jobs(app)
    assert (job.status, written) == (('queued', None) if fail else ('done', 'new@example.com'))


def test_a_job_for_a_task_this_app_does_not_have_fails_with_a_clear_error(app):
    with app.app_context():
        db.session.add(Job(task='renamed_long_ago', queue='mail', payload={}, max_attempts=3))
        db.session.commit()

    run_due_jobs(app)

    [job] = jobs(app)
    assert job.status == 'failed' and "no task named 'renamed_long_ago'" in job.error


def test_a_job_is_not_run_before_its_time(app):
    with app.app_context():
        add.apply(run_after=utcnow() + timedelta(minutes=5), a=1, b=1)
        db.session.commit()

    assert run_due_jobs(app) == 0
    make_jobs_due_now(app)
    assert run_due_jobs(app) == 1


def test_jobs_run_in_the_order_they_fell_due(app):
    with app.app_context():
        later = add.apply(a=1, b=1)
        earlier = add.apply(run_after=utcnow() - timedelta(minutes=1), a=2, b=2)  # a retry's back-off run out
        db.session.commit()

    assert run_due_jobs(app) == 2

    started = {job.id: job.started_at for job in jobs(app)}
    assert started[earlier] < started[later]


def test_quick_mail_is_claimed_in_batches_and_each_job_of_one_keeps_its_own_outcome(app):
    app.config.update(JOB_MAIL_BATCH=3)
    with app.app_context():
        add.apply(a=1, b=1)
        flaky.apply(message='refused for now')
        add.apply(a=2, b=2)
        add.apply(a=3, b=3)
        db.session.commit()

    with app.app_context():
        assert run_next('mail') == 3

    first, failed, third, fourth = jobs(app)
    assert [(job.status, job.attempts) for job in jobs(app)] == [('done', 1), ('queued', 1), ('done', 1), ('queued', 0)]
    assert failed.error == 'ValueError: refused for now' and third.result == {'sum': 4}
    assert first.started_at <= first.finished_at <= third.started_at, 'each started with its own turn'
    assert all(job.claimed_by is None for job in (first, failed, third, fourth))


def test_a_worker_asked_to_stop_mid_batch_gives_back_the_jobs_it_had_not_started_uncounted(app):
    with app.app_context():
        noted.apply(tag='first', stop_the_worker=True)
        for tag in ('second', 'third'):
            noted.apply(tag=tag)
        db.session.commit()

        assert run_next('mail', worker_stopping=halt) == 1

    assert ran == ['first']
    assert [(job.status, job.attempts, job.claimed_by) for job in jobs(app)] == [
        ('done', 1, None), ('queued', 0, None), ('queued', 0, None)]
    halt.clear()
    assert run_due_jobs(app) == 2 and ran == ['first', 'second', 'third']


def test_a_slow_job_gives_the_rest_of_its_batch_back_for_another_worker_to_run_uncounted(app):
    """The first job runs past its heartbeat's first beat (0.1 s) to 1 s; the second job's lease (0.6 s)
    would run out behind it. Another worker trying at 0.7 s must find it queued, not abandoned."""
    app.config.update(LEASE_SECONDS=0.6, JOB_PROGRESS_SECONDS=0.1)
    with app.app_context():
        noted.apply(tag='long', seconds=1.0)
        noted.apply(tag='next')
        db.session.commit()
    first_worker = threading.Thread(target=run_due_jobs, args=(app,))
    first_worker.start()
    while ran != ['long']:
        time.sleep(0.01)
    time.sleep(0.7)

    with app.app_context():
        assert run_next('mail', abandoned=False) == 1, 'the next job was given back to the queue'
    first_worker.join()

    assert ran == ['long', 'next'], 'the next job ran once'
    assert [(job.status, job.attempts) for job in jobs(app)] == [('done', 1), ('done', 1)]


def test_a_batch_whose_next_turn_comes_after_a_third_of_its_lease_gives_the_rest_back(app):
    """Jobs too short for a heartbeat's beat (1 s), but three of them take longer than a third of the
    lease (3 s): the fourth, whose lease has not been renewed since the claim, goes back to the queue."""
    app.config.update(LEASE_SECONDS=3, JOB_PROGRESS_SECONDS=10)
    with app.app_context():
        for tag in 'abc':
            noted.apply(tag=tag, seconds=0.4)
        noted.apply(tag='d')
        db.session.commit()

        assert run_next('mail') == 3

    assert [(job.status, job.attempts, job.claimed_by) for job in jobs(app)] == [
        ('done', 1, None), ('done', 1, None), ('done', 1, None), ('queued', 0, None)]


def test_a_job_wakes_only_the_thread_of_its_own_queue(app):
    worker = app.extensions['jobs'] = Worker(app)  # not started: its wake-ups are only looked at
    try:
        with app.app_context():
            add.apply(a=1, b=1)
            db.session.commit()
    finally:
        app.extensions['jobs'] = None

    assert {queue: wake.is_set() for queue, wake in zip(worker.queues, worker.wakes)} == {'mail': True, 'bulk': False}


def test_heartbeats_one_after_another_share_a_thread_and_none_beats_after_its_block(app):
    beats = []
    with app.app_context():
        for _ in range(3):
            with Heartbeat(lambda: beats.append(threading.current_thread()), every=0.01, name='test-heartbeat'):
                time.sleep(0.05)
            after_block = len(beats)
            time.sleep(0.05)
            assert len(beats) == after_block, 'a beat came after its block was left'

    assert len(beats) >= 3 and len(set(beats)) == 1 and threading.current_thread() not in beats


def test_a_long_job_keeps_its_lease_and_shows_its_progress_while_it_runs(app):
    app.config.update(LEASE_SECONDS=1.5, JOB_PROGRESS_SECONDS=0.2)
    with app.app_context():
        slow_counter.apply(steps=25, step_seconds=0.2)
        db.session.commit()
    worker = threading.Thread(target=run_due_jobs, args=(app,))
    worker.start()
    while not any(job.status == 'running' for job in jobs(app)):
        time.sleep(0.02)

    seen, stolen = set(), []
    while worker.is_alive():
        with app.app_context():
            stolen.append(run_next('bulk'))  # another worker trying to take it over
            seen.add(db.session.scalar(sa.select(Job.progress_done)))
        time.sleep(0.3)
    worker.join()

    [job] = jobs(app)
    assert job.status == 'done' and job.attempts == 1 and job.result == {'steps': 25}
    assert not any(stolen), 'its lease (1.5 s) was renewed through the 5 s it ran'
    assert len(seen - {None}) >= 3, f'progress was written as it went: {seen}'


def test_a_heartbeat_that_waited_too_long_for_a_pooled_connection_beats_on_and_so_do_the_next_ones(
        settings, request):
    """A pool's every connection busy (sqlalchemy.exc.TimeoutError, not a DBAPIError) ended the heartbeat's
    thread: the job's lease ran out while it still ran, for another worker to run it again, and the dead
    thread, handed the next heartbeat, left the next job waiting for it for ever."""
    settings.update(LEASE_SECONDS=1.5, JOB_PROGRESS_SECONDS=0.2,
                    SQLALCHEMY_ENGINE_OPTIONS={'pool_size': 1, 'max_overflow': 0, 'pool_timeout': 0.1})
    app = request.getfixturevalue('app')
    with app.app_context():
        holding_a_connection.apply(hold_seconds=0.6, steps=15, step_seconds=0.2)
        db.session.commit()
    worker = threading.Thread(target=run_due_jobs, args=(app,))
    worker.start()
    lapsed, watcher = [], sa.create_engine(settings['SQLALCHEMY_DATABASE_URI'])
    while worker.is_alive():
        with watcher.connect() as connection:
            lease_until = connection.scalar(sa.select(Job.lease_until).where(Job.status == 'running'))
        lapsed.append(lease_until is not None and lease_until < utcnow())
        time.sleep(0.1)
    worker.join()
    watcher.dispose()
    with app.app_context():
        add.apply(a=1, b=1)
        db.session.commit()
    next_worker = threading.Thread(target=run_due_jobs, args=(app,), daemon=True)
    next_worker.start()
    next_worker.join(timeout=10)

    assert not any(lapsed), 'its lease ran out while it ran'
    assert not next_worker.is_alive(), 'the next job waited for ever for its heartbeat to end'
    assert [(job.status, job.attempts) for job in jobs(app)] == [('done', 1), ('done', 1)]


def test_a_worker_asked_to_stop_puts_its_running_job_back_without_counting_an_attempt(app):
    with app.app_context():
        slow_counter.apply(steps=200, step_seconds=0.01)
        db.session.commit()
    worker = Worker(app, queues=['bulk']).start()
    while not any(job.status == 'running' for job in jobs(app)):
        time.sleep(0.02)

    worker.stop(timeout=10)

    [job] = jobs(app)
    assert (job.status, job.attempts, job.claimed_by) == ('queued', 0, None)
    assert run_due_jobs(app) == 1 and jobs(app)[0].status == 'done'


def test_a_job_whose_worker_keeps_dying_is_failed_instead_of_retried_forever(app):
    with app.app_context():
        db.session.add(Job(task='add', queue='mail', payload={'a': 1, 'b': 1}, max_attempts=3, attempts=3,
                           status='running', claimed_by='dead', lease_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()

    run_due_jobs(app)

    [job] = jobs(app)
    assert job.status == 'failed' and 'stopped 3 time(s) mid-job' in job.error


def test_a_job_given_up_on_still_drops_what_its_task_forgets(app):
    """A sign-in email whose workers kept dying must not leave its link readable in the jobs table."""
    with app.app_context():
        db.session.add(Job(task='send_email', queue='mail', max_attempts=3, attempts=3, status='running',
                           claimed_by='dead', lease_until=utcnow() - timedelta(seconds=1), payload={
                               'recipient': 'admin@example.com', 'subject': 'Your sign-in link',
                               'text': 'https://news.example.com/admin/sign-in/SECRET', 'html': None,
                               'message_id': '<sign-in.1@example.com>', 'headers': {}}))
        db.session.commit()

    run_due_jobs(app)

    [job] = jobs(app)
    assert job.status == 'failed' and job.payload == {
        'recipient': 'admin@example.com', 'subject': 'Your sign-in link', 'message_id': '<sign-in.1@example.com>'}


def test_two_workers_racing_for_one_job_run_it_once(app, smtp, flask_command):
    queue_emails(app, 'jane@example.com')
    smtp.delay = 0.5

    racers = [flask_command('worker', '--once') for _ in range(2)]
    outputs = [racer.communicate(timeout=60) for racer in racers]

    assert smtp.recipients() == ['jane@example.com'], outputs
    [job] = jobs(app)
    assert job.status == 'done' and job.attempts == 1
    assert sorted(out for out, _ in outputs) == ['jobs: ran 0\n', 'jobs: ran 1\n']


def test_a_job_whose_worker_is_killed_mid_job_is_finished_by_another(app, smtp, subscribers, flask_command,
                                                                     promise_kept):
    emails = subscribers(60)
    with app.app_context():
        send_stage.apply(stage='week1')
        db.session.commit()
    smtp.delay = 0.05

    doomed = flask_command('worker', '--queue', 'bulk', LEASE_SECONDS='2', JOB_POLL_SECONDS='0.1')
    assert smtp.wait_for(15, timeout=30) >= 15
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    [job] = jobs(app)
    assert job.status == 'running' and job.attempts == 1
    while utcnow() <= job.lease_until:
        time.sleep(0.1)

    out, err = flask_command('worker', '--once').communicate(timeout=120)

    [job] = jobs(app)
    assert job.status == 'done' and job.attempts == 2, (out, err, job.error)
    outcome = promise_kept('week1', emails)
    assert len(outcome['sent']) + len(outcome.get('unknown', [])) == 60
    assert len(outcome.get('unknown', [])) <= 2, 'at this pace, each message is marked on its own'


def wait_past_a_take_over(app):
    """Until the one job is done, or past a 6 s lease; then as long again: what a worker taking the job over
    would do, it would have done by then."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and jobs(app)[0].status != 'done':
        time.sleep(0.2)
    time.sleep(7)


@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)  # a server that can drop connections
def test_an_email_the_relay_took_is_not_sent_again_when_the_database_dropped_the_workers_connections(
        app, smtp, settings, postgresql_server, flask_command):
    """PostgreSQL restarted, or failed over, or a proxy closed idle connections, while the relay took an
    email: its outcome was written on a pooled connection that was dead, failed, and the job, left
    running, was taken over once its lease ran out and sent again, though its worker knew it had gone."""
    queue_emails(app, 'jane@example.com')
    smtp.delay = 1.0  # the relay answers the final dot a second after the data
    name = f'worker-{time.time_ns()}'
    worker = flask_command('worker', '--queue', 'mail', LEASE_SECONDS='6', JOB_POLL_SECONDS='0.2',
                           DATABASE_URL=f"{settings['SQLALCHEMY_DATABASE_URI']}&application_name={name}")
    try:
        assert smtp.wait_for(1) == 1
        with postgresql_server.begin() as connection:
            dropped = connection.execute(sa.text('SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                                                 'WHERE application_name = :name'), {'name': name}).scalars().all()
        assert dropped and all(dropped)
        wait_past_a_take_over(app)
    finally:
        worker.terminate()
        worker.communicate(timeout=30)

    [job] = jobs(app)
    assert smtp.recipients() == ['jane@example.com'] and (job.status, job.attempts) == ('done', 1)


@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)  # a server that can be out of reach
def test_an_email_the_relay_took_is_not_sent_again_when_the_database_was_out_of_reach_for_a_moment(
        app, smtp, settings, postgresql_proxy, flask_command, tmp_path):
    """PostgreSQL restarting, or failing over, for a few seconds just as the relay took an email: its outcome
    could not be written then, and the job, left running, was taken over once its lease ran out and sent
    again, though the database was back long before and its worker knew the email had gone."""
    queue_emails(app, 'jane@example.com')
    smtp.delay = 1.0  # the relay answers the final dot a second after the data
    through_proxy = sa.make_url(settings['SQLALCHEMY_DATABASE_URI']).set(port=postgresql_proxy.port)
    with open(tmp_path / 'worker.log', 'w+') as log:  # a pipe left unread fills with its tracebacks, and it waits
        worker = flask_command('worker', '--queue', 'mail', LEASE_SECONDS='6', JOB_POLL_SECONDS='0.2', stderr=log,
                               DATABASE_URL=through_proxy.render_as_string(hide_password=False))
        try:
            assert smtp.wait_for(1) == 1
            postgresql_proxy.cut()
            time.sleep(3)  # the relay's answer comes in meanwhile
            postgresql_proxy.restore()
            wait_past_a_take_over(app)
        finally:
            worker.terminate()
            worker.communicate(timeout=30)
        log.seek(0)
        err = log.read()

    [job] = jobs(app)
    assert smtp.recipients() == ['jane@example.com'] and (job.status, job.attempts) == ('done', 1), err[-3000:]


def test_an_email_the_relay_took_is_not_sent_again_when_every_pooled_connection_was_busy_a_moment(
        settings, request, smtp):
    """Every connection of the pool busy (a web process's requests, its other job threads) just as the relay
    took an email: its outcome waited for one no longer than the pool's time-out, sqlalchemy.exc.TimeoutError
    (not a DBAPIError) left the job running, and once its lease ran out it was run, and sent, again."""
    settings.update(LEASE_SECONDS=3, SQLALCHEMY_ENGINE_OPTIONS={'pool_size': 1, 'max_overflow': 0, 'pool_timeout': 0.2})
    app = request.getfixturevalue('app')
    queue_emails(app, 'jane@example.com')
    smtp.delay = 0.5  # the relay answers the final dot half a second after the data
    worker = threading.Thread(target=run_due_jobs, args=(app,))
    worker.start()
    assert smtp.wait_for(1) == 1
    with app.app_context(), db.engine.connect():
        time.sleep(1.5)  # the relay's answer comes in meanwhile
    worker.join()

    time.sleep(3.5)  # its lease (3 s) has run out
    run_due_jobs(app)  # another worker, looking for jobs whose worker died

    [job] = jobs(app)
    assert smtp.recipients() == ['jane@example.com'] and (job.status, job.attempts) == ('done', 1)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="a signal to one thread: Linux's tgkill")
@pytest.mark.parametrize('database_url', ['sqlite'], indirect=True)  # signals, whatever the database
def test_a_worker_stops_on_sigterm_whichever_of_its_threads_takes_it(app, flask_command):
    """The kernel hands a process's signal to any of its threads, and Python runs the handler on the main one
    only, when it wakes: after a SIGSTOP, the chaos test's SIGCONT and SIGTERM went to another thread one
    time in three, and the worker slept on (for the test's whole minute)."""
    worker = flask_command('worker')
    while 'serving' not in worker.stderr.readline():
        pass
    other_thread = min(int(tid) for tid in os.listdir(f'/proc/{worker.pid}/task') if int(tid) != worker.pid)

    assert ctypes.CDLL(None).tgkill(worker.pid, other_thread, signal.SIGTERM) == 0

    try:
        worker.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.communicate()
        pytest.fail('the worker went on after SIGTERM')
    assert worker.returncode == 0


def test_a_worker_killed_mid_batch_leaves_the_emails_it_had_not_started_to_the_next_worker(app, smtp, flask_command):
    recipients = [f'reader{n}@example.com' for n in range(12)]
    queue_emails(app, *recipients)
    smtp.delay = 0.2

    doomed = flask_command('worker', '--queue', 'mail', LEASE_SECONDS='2', JOB_POLL_SECONDS='0.1',
                           JOB_MAIL_BATCH='6')
    assert smtp.wait_for(2, timeout=30) >= 2
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    with app.app_context():
        held = db.session.scalar(sa.select(sa.func.max(Job.lease_until)))
    while utcnow() <= held:
        time.sleep(0.1)

    out, err = flask_command('worker', '--once').communicate(timeout=120)

    received = Counter(smtp.recipients())
    assert set(received) == set(recipients), (out, err)
    assert sum(received.values()) - len(recipients) <= 1, f'only the email on the wire may go twice: {received}'
    assert all(job.status == 'done' for job in jobs(app)), err


def test_a_web_process_that_exits_gives_back_the_mail_it_had_claimed_and_not_started(app, smtp, flask_command):
    queue_emails(app, *[f'reader{n}@example.com' for n in range(12)])
    smtp.delay = 0.5
    web = flask_command('--config', 'app/serving.py', '--workers', '1', '--bind', f'127.0.0.1:{free_port()}',
                        'main:app', program=[sys.executable, '-m', 'gunicorn'], JOB_WORKER='thread', JOB_MAIL_BATCH='6')
    assert smtp.wait_for(1, timeout=60) >= 1, 'its job threads started with it'

    web.send_signal(signal.SIGTERM)  # gunicorn's graceful shutdown, as on a deploy
    out, err = web.communicate(timeout=60)

    outcomes = Counter((job.status, job.attempts, job.claimed_by) for job in jobs(app))
    sent = len(smtp.recipients())
    assert outcomes == {('done', 1, None): sent, ('queued', 0, None): 12 - sent}, err
    assert sent < 6, 'it stopped mid-batch'


def test_a_web_process_runs_what_is_due_from_its_start_without_waiting_for_a_request(app, smtp, flask_command):
    queue_emails(app, 'jane@example.com')  # queued while no web process ran: a deploy, a restart

    web = flask_command('--config', 'app/serving.py', '--workers', '1', '--bind', f'127.0.0.1:{free_port()}',
                        'main:app', program=[sys.executable, '-m', 'gunicorn'], JOB_WORKER='thread')
    try:
        delivered = smtp.wait_for(1, timeout=60)  # and nobody visits the site
    finally:
        web.terminate()
        out, err = web.communicate(timeout=60)

    assert delivered == 1 and smtp.recipients() == ['jane@example.com'], err


def test_with_the_rq_backend_a_job_handed_to_rq_twice_still_runs_once(settings, redis_url, redis_client, request,
                                                                     smtp, flask_command):
    settings.update(JOB_BACKEND='rq', REDIS_URL=redis_url, RQ_QUEUE=f'jobs-test-{time.time_ns()}')
    app = request.getfixturevalue('app')
    with app.app_context():
        queue_email(Email('jane@example.com', 'Hi', 'text', '<p>html</p>', '<rq.1@example.com>'))
        db.session.commit()
        assert run_next('mail'), 'handed to RQ'
        # Its hand-over lease runs out before an RQ worker got to it, so it is handed over again.
        db.session.execute(sa.update(Job).values(lease_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert run_next('mail')
    assert redis_client.llen(f'rq:queue:{settings["RQ_QUEUE"]}') == 2

    out, err = flask_command('rq-worker', '--burst', JOB_BACKEND='rq', REDIS_URL=settings['REDIS_URL'],
                             RQ_QUEUE=settings['RQ_QUEUE']).communicate(timeout=60)

    assert smtp.recipients() == ['jane@example.com'], err
    [job] = jobs(app)
    assert job.status == 'done' and job.attempts == 1


def test_the_rq_backend_without_redis_stops_the_app_at_start_up(settings):
    settings.update(JOB_BACKEND='rq', REDIS_URL=None)
    with pytest.raises(ValueError, match='JOB_BACKEND=rq needs REDIS_URL'):
        create_app(type('TestConfig', (Config,), settings))


@pytest.mark.parametrize('value', ['threads', 'on', 'yes'])
def test_a_job_worker_setting_it_does_not_know_stops_the_app_at_start_up(settings, value):
    """It ran no job at all, without a word: no confirmation email, no schedule, no clean-up."""
    settings.update(JOB_WORKER=value)
    with pytest.raises(ValueError, match=f'^JOB_WORKER must be "thread" or "off", not {value!r}$'):
        create_app(type('TestConfig', (Config,), settings))


def test_two_tasks_of_one_name_stop_the_app_instead_of_one_running_in_the_others_place(app):
    @define_task()
    def send_email(recipient):  # the name of the app's own task
        pass

    with pytest.raises(ValueError, match="two tasks are named 'send_email'"):
        app.extensions['tasks'].add(send_email)


def test_a_task_the_app_has_not_registered_is_refused_where_it_is_applied(app):
    @define_task()
    def forgotten():
        pass

    with app.app_context(), pytest.raises(LookupError, match='not registered'):
        forgotten.apply()
