"""Sending at scale: parallel connections, the rate limit, and RQ workers on several processes."""
import signal
import socket
import subprocess
import uuid
from collections import Counter
from datetime import timedelta

import pytest
import redis
import rq
import sqlalchemy as sa

from app.extensions import db
from app.models import Client, Delivery
from app.ratelimit import LocalSchedule, SharedSchedule
from tests.support.processes import finish
from tests.support.smtp import MailSink


def test_mail_concurrency_sends_over_that_many_connections_and_still_once_each(app, runner, smtp, subscribers):
    app.config['MAIL_CONCURRENCY'] = 4
    emails = subscribers(40)
    smtp.delay = 0.02

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert smtp.connections == 4
    assert Counter(smtp.recipients()) == Counter(emails)


def test_with_parallel_connections_a_dead_server_still_loses_nothing(app, runner, smtp, subscribers):
    app.config['MAIL_CONCURRENCY'] = 4
    subscribers(30)
    smtp.stop()

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 1 and 'cannot connect' in result.output
    with app.app_context():
        assert db.session.scalars(sa.select(Delivery)).all() == []


def test_the_local_schedule_spaces_sends_one_interval_apart():
    now = [100.0]
    schedule = LocalSchedule(rate=50, clock=lambda: now[0], sleep=lambda seconds: None)

    waits = [schedule.reserve() for _ in range(5)]
    now[0] += 1.0  # after a pause, no credit is saved up: the next send waits for nothing
    after_pause = schedule.reserve()

    assert waits == pytest.approx([0, 0.02, 0.04, 0.06, 0.08])
    assert after_pause == 0


def test_processes_sharing_redis_share_one_schedule(redis_url, redis_client):
    # One send a second: the six reservations (which do not wait for their slots) fall well inside the
    # first slot however busy the machine is. At 200 a second, a reservation coming more than 5 ms after
    # the one before found the schedule free and took the present instead (seen under load in CI).
    key = f'test:rate:{uuid.uuid4().hex}'
    first = SharedSchedule(redis.Redis.from_url(redis_url), rate=1, key=key)
    second = SharedSchedule(redis.Redis.from_url(redis_url), rate=1, key=key)

    slots = []
    for schedule in (first, second, first, second, second, first):
        schedule.reserve()
        slots.append(int(redis_client.get(key)))

    assert [b - a for a, b in zip(slots, slots[1:], strict=False)] == [1_000_000] * 5, 'each send one slot later'
    redis_client.delete(key)


@pytest.fixture
def rq_settings(settings, redis_url):
    settings.update(REDIS_URL=redis_url, RQ_QUEUE=f'test-{uuid.uuid4().hex[:10]}')
    return settings


@pytest.mark.parametrize('jobs', ['0', '-3'])
def test_queueing_no_jobs_or_fewer_is_a_usage_error_and_queues_nothing(rq_settings, request, redis_client, subscribers,
                                                                      flask_command, jobs):
    """`--queue 0` queued one job (and -3 one), and said so: the operator who meant "none" had the stage sent."""
    request.getfixturevalue('app')
    subscribers(3)

    code, out, err = finish(flask_command('send-newsletter-email', 'week1', '--queue', jobs))

    assert code == 2 and f"Invalid value for '--queue': {jobs} is not in the range x>=1" in err, (out, err)
    assert not redis_client.exists(f"rq:queue:{rq_settings['RQ_QUEUE']}")


def test_four_rq_workers_send_every_subscriber_once_even_when_one_is_killed(rq_settings, request, smtp,
                                                                            subscribers, flask_command, promise_kept):
    app = request.getfixturevalue('app')
    emails = subscribers(120)
    smtp.delay = 0.02

    code, out, err = finish(flask_command('send-newsletter-email', 'week1', '--queue', '4'))
    assert code == 0 and '4 job(s) queued' in out, (out, err)
    workers = [flask_command('rq-worker', '--burst', SEND_BATCH_SIZE='5', LEASE_SECONDS='2') for _ in range(4)]
    assert smtp.wait_for(20) >= 20
    workers[0].send_signal(signal.SIGKILL)
    workers[0].communicate()
    results = [finish(worker) for worker in workers[1:]]

    assert all(code == 0 for code, _, _ in results), results
    outcome = promise_kept('week1', emails)
    unknown = outcome.get('unknown', [])
    assert len(unknown) <= 2, 'at 20 ms a message, each is marked on its own: only the one on the wire'
    assert len(outcome['sent']) + len(unknown) == 120
    with app.app_context():
        stages = Counter(db.session.scalars(sa.select(Client.num_newsletter)))
    assert stages == {1: 120 - len(unknown), **({0: len(unknown)} if unknown else {})}


def test_an_rq_worker_told_to_stop_stops_its_send_after_the_batch_and_another_worker_carries_on(
        rq_settings, request, smtp, subscribers, flask_command, promise_kept):
    """On SIGTERM (systemd stopping or restarting it, a deploy) RQ lets the job running finish: a send of the
    whole list, long past the few seconds systemd waits before its SIGKILL, which left what was on the wire
    unknown. As `flask worker` does, the send stops after its batch, and another worker carries on."""
    request.getfixturevalue('app')
    emails = subscribers(200)
    smtp.delay = 0.05
    assert finish(flask_command('send-newsletter-email', 'week1', '--queue', '1'))[0] == 0
    worker = flask_command('rq-worker', SEND_BATCH_SIZE='5')
    assert smtp.wait_for(10) >= 10

    worker.send_signal(signal.SIGTERM)
    try:
        worker.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        worker.kill()  # as systemd does once its stop timeout is over
        worker.communicate()
    stopped_at = len(smtp.messages)
    code, out, err = finish(flask_command('rq-worker', '--burst', SEND_BATCH_SIZE='5'))

    assert stopped_at < 100 and worker.returncode == 0, 'it stopped on its own, well before the end of the list'
    assert promise_kept('week1', emails) == {'sent': emails}, err


def test_an_rq_send_stopped_by_lost_answers_waits_for_an_admin_instead_of_retrying(rq_settings, request, smtp,
                                                                                  subscribers, flask_command,
                                                                                  redis_client, promise_kept):
    """Three answers lost in a row stop a send, which must not be tried again unasked: each retry would
    lose three more subscribers to 'unknown' (as the app's own jobs, test_faults.py)."""
    request.getfixturevalue('app')
    emails = subscribers(10)
    for email in emails[:6]:
        smtp.after_dot[email] = MailSink.DROP  # a relay that takes mail and loses its answers

    assert finish(flask_command('send-newsletter-email', 'week1', '--queue', '1'))[0] == 0
    finish(flask_command('rq-worker', '--burst'))

    queue = rq.Queue(rq_settings['RQ_QUEUE'], connection=redis_client)
    assert queue.scheduled_job_registry.get_job_ids() == [], 'no retry of its own, a minute later'
    [failed] = queue.failed_job_registry.get_job_ids()
    assert '3 messages in a row got no answer' in rq.job.Job.fetch(failed, connection=redis_client).latest_result().exc_string
    assert promise_kept('week1', emails[:3]) == {'unknown': emails[:3]}, 'the others untouched, still due'


def test_an_rq_worker_runs_what_rq_has_scheduled_for_later_as_a_retry_is(rq_settings, request, smtp, subscribers,
                                                                          flask_command, redis_client):
    """RQ keeps a retry with an interval (a drip job stopped on an error, tried again a minute later) among
    its scheduled jobs, and only a worker running RQ's scheduler puts it back on the queue: without one,
    the retry waited there for ever."""
    request.getfixturevalue('app')
    [email] = subscribers(1)
    queue = rq.Queue(rq_settings['RQ_QUEUE'], connection=redis_client)
    queue.enqueue_in(timedelta(seconds=1), 'app.scaleout.rq_send_stage', 'week1', 0)
    worker = flask_command('rq-worker')
    try:
        assert smtp.wait_for(1, timeout=30) == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    assert smtp.recipients() == [email]


def test_queueing_without_redis_is_a_clear_error(runner, subscribers):
    subscribers(1)
    result = runner.invoke(args=['send-newsletter-email', 'week1', '--queue', '2'])
    assert result.exit_code == 2 and '--queue needs REDIS_URL' in result.output


@pytest.mark.parametrize('command', [['send-newsletter-email', 'week1', '--queue', '2'], ['rq-worker', '--burst']])
def test_queueing_or_working_with_redis_out_of_reach_is_a_clear_error(settings, request, command):
    """A Redis that is down, or a REDIS_URL that names the wrong port: it was redis's traceback."""
    with socket.socket() as closed:
        closed.bind(('127.0.0.1', 0))
        settings['REDIS_URL'] = f'redis://:secret@127.0.0.1:{closed.getsockname()[1]}/0'
    request.getfixturevalue('subscribers')(1)

    result = request.getfixturevalue('runner').invoke(args=command)

    assert result.exit_code == 1 and 'Error: cannot reach Redis (REDIS_URL)' in result.output, result.output
    assert 'Traceback' not in result.output and 'secret' not in result.output


def test_a_run_starting_part_way_comes_back_round_for_everyone_before_its_start(app, smtp, subscribers):
    from app.drip import DripStage
    from app.sendlog import spread_starts
    from app.sending import MailingSend
    from app.transports import SenderPool
    emails = subscribers(35)

    with app.app_context():
        starts = spread_starts(DripStage('week1'), 3)
        with SenderPool(1) as pool:
            report = MailingSend(DripStage('week1'), pool, 'cli', start_after=starts[2]).run()

    assert starts[0] == 0 and starts[0] < starts[1] < starts[2]
    assert report.sent == 35 and Counter(smtp.recipients()) == Counter(emails)
    assert smtp.recipients()[0] != emails[0], 'it began part-way through the list'
