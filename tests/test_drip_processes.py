"""The drip's guarantees with real `flask send-newsletter-email` processes sharing one database, as
when cron fires twice, an admin runs it by hand while cron runs, or the machine kills a run."""
import signal
from collections import Counter

import sqlalchemy as sa

from app import db
from app.models import Client, Delivery

SUBSCRIBERS = 60


def finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


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


def test_a_killed_run_can_simply_be_run_again(app, smtp, subscribers, flask_command):
    emails = subscribers(SUBSCRIBERS)
    smtp.delay = 0.03
    batch = 10

    doomed = flask_command('send-newsletter-email', 'week1', SEND_BATCH_SIZE=str(batch), LEASE_SECONDS='2')
    assert smtp.wait_for(25) >= 25
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    received_before_kill = len(smtp.messages)
    assert received_before_kill < SUBSCRIBERS

    code, out, err = finish(flask_command('send-newsletter-email', 'week1', SEND_BATCH_SIZE=str(batch)))

    assert code == 0, (out, err)
    counts = Counter(smtp.recipients())
    assert set(counts) == set(emails), 'every subscriber receives week1'
    repeated = [email for email, n in counts.items() if n > 1]
    assert all(counts[email] == 2 for email in repeated)
    assert len(repeated) <= batch, 'only the batch in flight at the kill may be repeated'
    for email in repeated:
        first, second = smtp.received_by(email)
        assert first['Message-ID'] == second['Message-ID'], 'a repeat is the same message'
    assert_everyone_advanced(app)
