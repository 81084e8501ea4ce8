"""The promise, under everything at once: several overlapping `flask send-newsletter-email` runs (week1
and week2) and `flask worker` processes (a broadcast) are started, SIGKILLed and SIGSTOPped at random
moments against a server that, per recipient, hangs up or falls silent after the final dot, greylists,
refuses, answers later than the lease, or hangs up before the data. Then the server is fixed and the
mailings are run to the end. Afterwards every subscriber has exactly one message per mailing, but those
recorded unknown (at most one) or failed (none); nobody is left out; and every mailing's counts balance.
It runs over one connection, and over three to a server offering PIPELINING (MAIL_CONCURRENCY=3), where
each connection holds several messages at once.

Seeded: CHAOS_SEED=<n> replays a run's choices (the processes' own timing still varies)."""
import os
import random
import signal
import subprocess
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app import broadcasts
from app.database import utcnow
from app.extensions import db
from app.ledger import ledger, mailing_named
from app.models import Broadcast, Delivery, Job
from tests.support.smtp import MailSink

SUBSCRIBERS = 240
CHAOS_SECONDS = 20
LEASE = '2'


@pytest.fixture
def seed(database_url):
    return int(os.environ.get('CHAOS_SEED') or (1 if database_url.startswith('sqlite') else 2))


def misbehave(smtp, emails, rng):
    """Give about a third of the recipients one of the ways real servers misbehave."""
    for email in emails:
        roll = rng.random()
        if roll < 0.07:
            smtp.after_dot[email] = [MailSink.DROP, None]  # took it, hung up before the answer
        elif roll < 0.12:
            smtp.after_dot[email] = [MailSink.SILENT, None]  # took it, then said nothing
        elif roll < 0.17:
            smtp.after_dot[email] = [float(LEASE) + 1, None]  # took it, answered after more than a lease (but
            # within MAIL_DATA_TIMEOUT)
        elif roll < 0.25:
            smtp.refuse_for_now[email] = rng.randint(1, 6)  # greylisted
        elif roll < 0.29:
            smtp.refuse_for_good[email] = '550 5.1.1 No such user'
        elif roll < 0.34:
            smtp.hang_up_at_rcpt[email] = rng.randint(1, 2)


class Chaos:
    def __init__(self, flask_command, rng):
        self.flask_command, self.rng = flask_command, rng
        self.live, self.stopped, self.log = [], {}, []

    def start(self):
        kind = self.rng.choice(['week1', 'week1', 'week2', 'worker'])
        args = ('worker', '--queue', 'bulk') if kind == 'worker' else ('send-newsletter-email', kind)
        process = self.flask_command(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, LEASE_SECONDS=LEASE,
                                     JOB_POLL_SECONDS='0.2', MAIL_DATA_TIMEOUT='5', MAIL_RETRY_BACKOFF='0.05',
                                     MAIL_RETRIES='1')
        self.live.append(process)
        self.log.append(f'start {kind} ({process.pid})')

    def step(self):
        self.live = [p for p in self.live if p.poll() is None]
        for process, until in list(self.stopped.items()):
            if time.monotonic() >= until:
                self._signal(process, signal.SIGCONT)
                del self.stopped[process]
        action = self.rng.random()
        if len(self.live) < 2 or (action < 0.45 and len(self.live) < 5):
            self.start()
        elif action < 0.75:
            self._signal(self.rng.choice(self.live), signal.SIGKILL)
        else:
            process = self.rng.choice(self.live)
            if process not in self.stopped:
                self._signal(process, signal.SIGSTOP)
                self.stopped[process] = time.monotonic() + self.rng.uniform(0.5, 3 * float(LEASE))

    def _signal(self, process, signum):
        self.log.append(f'{signal.Signals(signum).name} {process.pid}')
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass

    def end(self):
        """Let the stopped go on, ask the workers to stop (they never end by themselves), and wait."""
        for process in self.stopped:
            self._signal(process, signal.SIGCONT)
        for process in self.live:
            if 'worker' in process.args:
                self._signal(process, signal.SIGTERM)
        for process in self.live:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.parametrize('database_url, connections, pipelining', [
    pytest.param('sqlite', 1, False, id='sqlite'),
    pytest.param('postgresql', 1, False, id='postgresql'),
    # Pipelining's own risks: several messages in flight per connection, envelopes announced ahead of a dot.
    pytest.param('sqlite', 3, True, id='sqlite-3-pipelining'),
], indirect=['database_url'])
def test_nothing_twice_nobody_left_out_and_every_ledger_balances_whatever_dies(
        app, smtp, settings, subscribers, flask_command, promise_kept, seed, connections, pipelining):
    settings['MAIL_CONCURRENCY'], smtp.pipelining = connections, pipelining  # for the `flask` processes
    rng = random.Random(seed)
    emails = subscribers(SUBSCRIBERS)
    smtp.delay = 0.005
    misbehave(smtp, emails, rng)
    with app.app_context():
        broadcast_id = broadcasts.schedule_broadcast('Chaos', 'Hello {{ greeting_name }}', '<p>Hello</p>',
                                                     utcnow() + timedelta(minutes=5), 'UTC', 'admin@example.com').id
        db.session.execute(sa.update(Job).values(run_after=utcnow()))
        db.session.commit()
    mailings = ['week1', 'week2', f'broadcast{broadcast_id}']

    chaos = Chaos(flask_command, rng)
    deadline = time.monotonic() + CHAOS_SECONDS
    while time.monotonic() < deadline:
        chaos.step()
        time.sleep(rng.uniform(0.2, 1.0))
    chaos.end()

    # The server is fixed, leases run out, and every mailing is run to its end, as cron, a worker and a
    # patient admin would.
    smtp.after_dot.clear(), smtp.refuse_for_now.clear(), smtp.hang_up_at_rcpt.clear()
    time.sleep(float(LEASE) + 0.5)
    looked_at = set()
    for _ in range(6):
        with app.app_context():
            db.session.execute(sa.update(Delivery).where(Delivery.status == 'deferred')
                               .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
            db.session.execute(sa.update(Job).where(Job.status == 'queued').values(run_after=utcnow()))
            db.session.commit()
            # Three lost answers in a row (more likely as several connections' answers interleave) stop the
            # broadcast's job for good, for an admin to look at the relay; the admin then pauses and resumes it.
            for job_id in set(db.session.scalars(sa.select(Job.id).where(
                    Job.task == 'send_broadcast', Job.status == 'failed'))) - looked_at:
                looked_at.add(job_id)
                if db.session.get(Broadcast, broadcast_id).status == 'sending':
                    broadcasts.pause(broadcast_id)
                    broadcasts.resume(broadcast_id)
        for args in (('send-newsletter-email', 'week1'), ('send-newsletter-email', 'week2'), ('worker', '--once')):
            flask_command(*args, LEASE_SECONDS=LEASE).communicate(timeout=120)
        with app.app_context():
            unfinished = [(name, account) for name in mailings
                          if (account := ledger(mailing_named(name))).pending or account.deferred]
        if not unfinished:
            break

    assert not unfinished, (f'seed {seed}: left out', unfinished, chaos.log)
    for name in mailings:
        outcome = promise_kept(name, emails)
        assert set(outcome) <= {'sent', 'unknown', 'failed', None}, (seed, name, outcome.keys())
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).where(Delivery.status == 'sent')) > SUBSCRIBERS, \
            f'seed {seed}: the chaos left too little sent to prove anything'
    assert any(entry.startswith('SIGKILL') for entry in chaos.log) and any(
        entry.startswith('SIGSTOP') for entry in chaos.log), chaos.log
