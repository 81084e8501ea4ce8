"""The drip's guarantees with real `flask send-newsletter-email` processes sharing one database, as
when cron fires twice, an admin runs it by hand while cron runs, or the machine kills a run."""
import json
import os
import pty
import re
import signal
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.database import utcnow
from app.extensions import db
from app.models import Client, Delivery
from tests.support.processes import finish

SUBSCRIBERS = 60


def assert_everyone_advanced(app):
    with app.app_context():
        stages = Counter(db.session.scalars(sa.select(Client.num_newsletter)))
        statuses = Counter(db.session.scalars(sa.select(Delivery.status)))
    assert stages == {1: SUBSCRIBERS}
    assert statuses == {'sent': SUBSCRIBERS}


def test_week1_is_sent_once_when_two_runs_overlap(app, smtp, subscribers, flask_command):
    emails = subscribers(SUBSCRIBERS)
    smtp.delay = 0.05  # ~3 s of sending: the second run starts while the first is mid-way

    first = flask_command('send-newsletter-email', 'week1', SEND_BATCH_SIZE='5')
    assert smtp.wait_for(5) >= 5, first.communicate()
    second = flask_command('send-newsletter-email', 'week1', SEND_BATCH_SIZE='5')
    results = [finish(first), finish(second)]

    for code, out, err in results:
        assert code == 0, (out, err)
    assert Counter(smtp.recipients()) == Counter({email: 1 for email in emails})
    sent = [int(out.split('sent ')[-1].split(',')[0]) for _, out, _ in results]
    assert sum(sent) == SUBSCRIBERS
    assert all(sent), f'the runs did not overlap (sent {sent}); the test proves nothing'
    assert_everyone_advanced(app)


def test_a_killed_run_can_simply_be_run_again_and_repeats_nothing(app, smtp, subscribers, flask_command,
                                                                  promise_kept):
    emails = subscribers(SUBSCRIBERS)
    smtp.delay = 0.03
    record_every = 10

    doomed = flask_command('send-newsletter-email', 'week1', SEND_BATCH_SIZE='20', LEASE_SECONDS='2',
                           SEND_RECORD_EVERY=str(record_every))
    assert smtp.wait_for(25) >= 25
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    received_before_kill = len(smtp.messages)
    assert received_before_kill < SUBSCRIBERS

    code, out, err = finish(flask_command('send-newsletter-email', 'week1', SEND_BATCH_SIZE='20'))

    outcome = promise_kept('week1', emails)
    unknown = outcome.get('unknown', [])
    assert len(unknown) <= record_every + 1, 'at most a group, and the one on the wire'
    assert len(outcome['sent']) + len(unknown) == SUBSCRIBERS
    assert code == (1 if unknown else 0), (out, err)
    assert all(f'unknown: {email}' in out for email in unknown), 'the run that found them names them'


def test_a_run_killed_while_moving_from_new_claims_to_older_ones_leaves_only_what_it_was_sending_unknown(
        app, settings, smtp, subscribers, flask_command, promise_kept, tmp_path):
    """Over two connections, messages of the new claims (high delivery ids) are still on the wire as the
    run declares its first group of deliveries deferred earlier (low ids). Everything the run holds in
    between went nowhere, and must stay due: one kill, at most a group and what is on the wire unknown."""
    settings.update(MAIL_CONCURRENCY=2, SEND_BATCH_SIZE=50, SEND_RECORD_EVERY=10, LEASE_SECONDS=2)
    everyone, report = [], tmp_path / 'kill.json'
    for _ in range(3):
        greylisted = subscribers(60, start=len(everyone))
        with app.app_context():
            an_hour_ago = utcnow() - timedelta(hours=1)
            db.session.execute(sa.insert(Delivery), [
                {'client_id': client_id, 'mailing': 'week1', 'status': 'deferred', 'attempts': 1,
                 'message_id': f'<newsletter.week1.{client_id}@example.com>', 'error': '451 4.7.1 Greylisted',
                 'next_attempt_at': an_hour_ago, 'deferred_since': an_hour_ago, 'created_at': an_hour_ago}
                for client_id in db.session.scalars(sa.select(Client.id).where(Client.email.in_(greylisted)))])
            db.session.commit()
        newcomers = subscribers(60, start=len(everyone) + 60)  # no row yet: claimed first, with higher ids
        everyone += greylisted + newcomers
        smtp.delay = 0.05

        code, out, err = finish(flask_command('send-newsletter-email', 'week1', KILL_REPORT=str(report),
                                              program=[sys.executable, '-m', 'tests.support.killed_at_a_checkpoint']))
        if report.exists():
            break
        # On a machine busy enough, the claim the run makes ahead can come back empty at the seam, and the run
        # then records what is on the wire before it claims the older ones: the moment never came, and the
        # run sent everyone. A fresh list tries again.
        assert code == 0, (out, err)
    assert code == -signal.SIGKILL and report.exists(), (out, err)
    declared = json.loads(report.read_text())['declared']
    time.sleep(2.5)  # its lease runs out
    smtp.delay = 0
    code, out, err = finish(flask_command('send-newsletter-email', 'week1'))

    outcome = promise_kept('week1', everyone)
    with app.app_context():
        unknown = set(db.session.scalars(sa.select(Delivery.id).where(Delivery.status == 'unknown')))
    assert unknown <= set(declared), 'unknown: only what the killed run said was going out'
    assert len(outcome['sent']) + len(outcome.get('unknown', [])) == len(everyone)


def read_terminal(primary):
    output = b''
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the process closed the terminal
            return output.decode()
        if not chunk:
            return output.decode()
        output += chunk


def test_a_terminal_gets_a_progress_bar_and_cron_gets_log_lines(app, smtp, subscribers, flask_command):
    subscribers(30)
    primary, replica = pty.openpty()

    on_terminal = flask_command('send-newsletter-email', 'week1', stdout=replica)
    os.close(replica)
    shown = read_terminal(primary)
    on_terminal.communicate()

    assert on_terminal.returncode == 0
    assert re.search(r'week1\s+\[#+\]\s+100%', shown), shown
    assert 'due at start' not in shown

    subscribers(30, start=100)
    code, logged, _ = finish(flask_command('send-newsletter-email', 'week1'))

    assert code == 0 and '%' not in logged
    per_batch = [f'week1: sent {n}, skipped 0, failed 0, unknown 0, deferred 0 (of 30 due at start)'
                 for n in (10, 20, 30)]
    assert logged.splitlines() == per_batch + [
        f'week1: sent 30, skipped 0, failed 0, unknown 0, deferred 0 (through SMTP 127.0.0.1:{smtp.port})']


def test_adding_week3_templates_adds_the_week3_stage(app, smtp, subscribers, stage_templates, flask_command):
    stage_templates('week3', 'Subject: Week 3 for {{ greeting_name }}\nWeek three. {{ unsubscribe_url }}\n',
                    '<p>Week three.</p>')
    subscribers(2, num_newsletter=2)
    subscribers(1, start=10, num_newsletter=1)

    help_text = finish(flask_command('send-newsletter-email', '--help'))[1]
    code, out, err = finish(flask_command('send-newsletter-email', 'week3'))

    assert '[week1|week2|week3]' in help_text
    assert code == 0, (out, err)
    assert sorted(smtp.recipients()) == ['reader0@example.com', 'reader1@example.com']
    assert smtp.messages[0]['Subject'] == 'Week 3 for Reader'


def test_a_broken_stage_template_stops_the_run_before_anyone_is_claimed(app, smtp, subscribers, stage_templates,
                                                                       flask_command):
    stage_templates('week3', 'No subject line here\n', '<p>Week three.</p>')
    subscribers(3, num_newsletter=2)

    code, out, err = finish(flask_command('send-newsletter-email', 'week3'))

    assert code == 1
    assert 'the week3 templates cannot be rendered, nothing was sent' in err and 'Subject:' in err
    assert smtp.messages == []
    with app.app_context():
        assert db.session.scalars(sa.select(Delivery)).all() == []


@pytest.mark.parametrize('connections', ['1', '2'])  # sending inline, and from pool threads
def test_a_run_retrying_for_longer_than_its_lease_keeps_its_claim(app, smtp, subscribers, flask_command, connections):
    emails = subscribers(3)
    smtp.refuse_for_now['reader1@example.com'] = 3  # retried after 0.3 + 0.6 + 1.2 s: four leases long
    slow = dict(LEASE_SECONDS='0.5', MAIL_RETRY_BACKOFF='0.3', MAIL_RETRIES='3', MAIL_CONCURRENCY=connections)

    retrying = flask_command('send-newsletter-email', 'week1', **slow)
    while smtp.refuse_for_now['reader1@example.com'] > 1:  # it is in its retries
        time.sleep(0.01)
    other = flask_command('send-newsletter-email', 'week1', **slow)
    results = [finish(retrying), finish(other)]

    assert all(code == 0 for code, _, _ in results), results
    assert Counter(smtp.recipients()) == Counter(emails), 'the retried subscriber was not taken over'
