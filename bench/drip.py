"""The drip send at scale, measured in one run against the transport's own limit.

    .venv/bin/python bench/drip.py --subscribers 100000 --database sqlite
    .venv/bin/python bench/drip.py --subscribers 100000 --database sqlite --no-pipelining
    .venv/bin/python bench/drip.py --subscribers 100000 --database postgresql --connections 8 --delay 0.02
    .venv/bin/python bench/drip.py --subscribers 600 --round-trip 50
    .venv/bin/python bench/drip.py --subscribers 1600 --round-trip 50 --connections 8 --raw-connections 1

Seeds N confirmed subscribers into a fresh database, starts a counting SMTP server on 127.0.0.1,
runs `flask send-newsletter-email week1` as a user would, and reports wall time, messages per second,
peak RSS of the command, SQL statements issued, and duplicates and losses counted at the server.

In the same run it pushes N pre-rendered messages over the same number of raw smtplib connections to
the same server (the transport limit), and prints the app's ratio to it. The limit is measured in
slices woven into the app's run: each time the app has delivered another 1/SLICES of its messages,
the app is paused (SIGSTOP), as many raw messages are pushed, and the app resumes (SIGCONT). The app's
time is its wall time less those pauses. A shared machine's speed drifts by a third within minutes;
measured side by side in the same stretches of time, both sides feel the same drift. The raw
connections stay open from one slice to the next, as the app's do, so that neither side connects more
often than the other.

With --round-trip MS, both the app and the raw smtplib connections reach the server through one
bench/latency_proxy.py, which adds MS milliseconds to every round trip (half each way): a relay far
away, where a client that waits for each reply pays a round trip per command.
"""
import argparse
import contextlib
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency_proxy import LatencyProxy  # noqa: E402
from bench.sink import LIMIT_PREFIX, Sink  # noqa: E402

POSTGRESQL_URL = os.environ.get('TEST_POSTGRESQL_URL', 'postgresql://postgres@127.0.0.1:5432/test')


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class FreshDatabase:
    """A SQLite file in a temporary folder, or a schema of its own in the PostgreSQL test database."""

    def __init__(self, kind, folder):
        self.kind, self.schema = kind, f'bench_{uuid.uuid4().hex[:10]}'
        if kind == 'sqlite':
            self.url = f'sqlite:///{folder}/bench.db'
        else:
            self.url = f'{POSTGRESQL_URL}?options=-csearch_path%3D{self.schema}'

    def __enter__(self):
        if self.kind == 'postgresql':
            with sa.create_engine(POSTGRESQL_URL).begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA {self.schema}'))
        return self

    def __exit__(self, *exc_info):
        if self.kind == 'postgresql':
            with sa.create_engine(POSTGRESQL_URL).begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA {self.schema} CASCADE'))


def seed(url, count, week1_days_ago=None):
    """N confirmed subscribers due week1; or, with `week1_days_ago`, past week1, delivered that long ago."""
    engine = sa.create_engine(url)
    clients = sa.table('clients', *(sa.column(c) for c in (
        'email', 'active', 'num_newsletter', 'created_at', 'email_confirmed_at')))
    now = sa.func.now() if url.startswith('postgresql') else sa.text("CURRENT_TIMESTAMP")
    with engine.begin() as conn:
        for start in range(0, count, 10_000):
            conn.execute(clients.insert().values(active=True, num_newsletter=0 if week1_days_ago is None else 1,
                                                 created_at=now, email_confirmed_at=now),
                         [{'email': f'reader{n}@example.com'} for n in range(start, min(start + 10_000, count))])
        if week1_days_ago is not None:
            then = sa.literal(datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=week1_days_ago))
            conn.execute(sa.text('INSERT INTO deliveries (client_id, mailing, status, attempts, created_at, sent_at) '
                                 "SELECT id, 'week1', 'sent', 1, :then, :then FROM clients"), {'then': then.value})
    engine.dispose()


def delayed_stages(folder, days):
    """A STAGES_FOLDER whose week2 waits `days` days after week1."""
    stages = Path(folder) / 'stages'
    shutil.copytree(ROOT / 'app' / 'templates' / 'emails' / 'newsletter', stages)
    subject, _, rest = (stages / 'week2.txt').read_text().partition('\n')
    (stages / 'week2.txt').write_text(f'{subject}\nDelay: {days} days\n{rest}')
    return str(stages)


def run_flask(env, *args, while_running=None):
    """Run a flask command; return (seconds, peak RSS in MB, SQL statements, output)."""
    return run_flask_processes(env, [args], while_running)


def run_flask_processes(env, commands, while_running=None):
    """Run flask commands side by side; return (seconds until the last ended, less the time
    `while_running` kept them paused; the largest peak RSS in MB; SQL statements in all; the last one's
    output). `while_running(processes)`, if given, is called over and over until they have all ended,
    and returns the seconds it kept them paused."""
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, str(ROOT / 'bench' / 'counted_flask.py'), *args], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for args in commands]
    outputs, usages = {}, {}

    def wait(process):
        outputs[process.pid] = (process.stdout.read(), process.stderr.read())
        _, status, usages[process.pid] = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)

    waiters = [threading.Thread(target=wait, args=(p,)) for p in processes]
    for waiter in waiters:
        waiter.start()
    paused = 0.0
    while any(waiter.is_alive() for waiter in waiters):
        if while_running is None:
            time.sleep(0.05)
        else:
            paused += while_running(processes)
    seconds = time.perf_counter() - started - paused
    peak, statements = max(usage.ru_maxrss for usage in usages.values()) / 1024, 0
    for process, args in zip(processes, commands, strict=True):
        out, err = outputs[process.pid]
        if process.returncode != 0:
            raise SystemExit(f'flask {" ".join(args)} failed ({process.returncode}):\n{out}\n{err}')
        statements += int(err.rsplit('sql statements: ', 1)[1].split()[0])
    return seconds, peak, statements, out + err


@contextlib.contextmanager
def reached_through(port, round_trip_ms):
    """The port the app and the raw connections both reach the server on: its own, or given a round
    trip, a latency proxy's in front of it."""
    if round_trip_ms is None:
        yield port
    else:
        with LatencyProxy(port, round_trip_ms / 2000) as proxy:
            yield proxy.port


class TransportLimit:
    """N pre-rendered messages pushed over raw smtplib connections to `port` (the sink's, or a proxy in
    front of it), in slices woven into the app's run: `step` is run_flask_processes's `while_running`,
    `finish` pushes what is left once the app is done and closes the connections, which stay open from
    one slice to the next. The messages go to LIMIT_PREFIX addresses, which the sink counts apart from
    the app's."""

    def __init__(self, sink, port, count, connections, message, slices):
        self.sink, self.port, self.count, self.message = sink, port, count, message
        self.smtps = [None] * connections
        # A whole number of messages for each connection: one left with an extra message holds up a
        # slice by a whole message's round trips while the others wait.
        self.slice = max(count // slices // connections, 1) * connections
        self.pushed, self.seconds, self.pauses = 0, 0.0, []

    def step(self, processes):
        """Once the app has delivered its next slice, pause it and push as many.  :return: seconds paused."""
        delivered, _ = self.sink.progress()
        owed = min(delivered // self.slice * self.slice, self.count) - self.pushed
        if owed <= 0:
            time.sleep(0.05)
            return 0.0
        stopped = time.monotonic()
        self._signal(processes, signal.SIGSTOP)
        self._push(owed)
        self._signal(processes, signal.SIGCONT)
        self.pauses.append((stopped, time.monotonic()))
        return self.pauses[-1][1] - stopped

    @staticmethod
    def _signal(processes, signum):
        # os.kill, not Popen.send_signal: that one polls first, and could reap a process that has just
        # ended before run_flask_processes's wait4 does.
        for process in processes:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.kill(process.pid, signum)

    def finish(self):
        if self.pushed < self.count:
            self._push(self.count - self.pushed)
        self._on_each_connection(lambda i, smtp: smtp and smtp.quit())
        assert self.sink.progress()[1] == self.count, 'the transport limit run lost messages'

    def paused_between(self, first, last):
        return sum(max(0.0, min(end, last) - max(start, first)) for start, end in self.pauses)

    def _push(self, count):
        numbers, connections = range(self.pushed, self.pushed + count), len(self.smtps)

        def push(i, smtp):
            for n in numbers[i::connections]:
                if smtp is None:
                    smtp = self.smtps[i] = smtplib.SMTP('127.0.0.1', self.port)
                try:
                    smtp.sendmail('news@example.com', [f'{LIMIT_PREFIX}{n}@example.com'], self.message)
                except smtplib.SMTPServerDisconnected:
                    # The server hung up on a connection left idle too long between slices, before
                    # taking this message (finish's count would show otherwise): connect again.
                    smtp = self.smtps[i] = smtplib.SMTP('127.0.0.1', self.port)
                    smtp.sendmail('news@example.com', [f'{LIMIT_PREFIX}{n}@example.com'], self.message)

        self._on_each_connection(push)
        self.pushed += count

    def _on_each_connection(self, work):
        """Run `work(i, connection or None)` for every connection at once, one thread each, timed."""
        threads = [threading.Thread(target=work, args=(i, smtp)) for i, smtp in enumerate(self.smtps)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.seconds += time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--subscribers', type=int, default=100_000)
    parser.add_argument('--database', choices=['sqlite', 'postgresql'], default='sqlite')
    parser.add_argument('--connections', type=int, default=1, help='MAIL_CONCURRENCY, and the raw connections')
    parser.add_argument('--raw-connections', type=int, default=None,
                        help='raw smtplib connections for the limit, if not as many as the app\'s')
    parser.add_argument('--delay', type=float, default=0.0, help='seconds the server takes over each message')
    parser.add_argument('--round-trip', type=float, default=None, metavar='MS',
                        help='reach the server through bench/latency_proxy.py, adding MS milliseconds a round trip')
    parser.add_argument('--batch-size', type=int, default=None, help='SEND_BATCH_SIZE (default: the app\'s)')
    parser.add_argument('--record-every', type=int, default=None, help='SEND_RECORD_EVERY (default: the app\'s)')
    parser.add_argument('--rate-limit', type=float, default=None, help='MAIL_RATE_LIMIT, messages per second')
    parser.add_argument('--stage-delay', type=int, default=None, metavar='DAYS',
                        help='send week2 with "Delay: DAYS days", to subscribers who got week1 DAYS+1 days ago')
    parser.add_argument('--rq-workers', type=int, default=0,
                        help='send through RQ: queue that many jobs and run that many `flask rq-worker` processes')
    parser.add_argument('--no-pipelining', action='store_true',
                        help='the server does not advertise PIPELINING: the app sends as raw smtplib does')
    parser.add_argument('--skip-limit', action='store_true', help='do not measure the transport limit')
    parser.add_argument('--slices', type=int, default=40, help='how many slices the limit is measured in')
    args = parser.parse_args()
    n = args.subscribers

    with tempfile.TemporaryDirectory() as folder, FreshDatabase(args.database, folder) as database, \
            Sink(free_port(), args.delay, not args.no_pipelining) as sink, reached_through(sink.port, args.round_trip) as port:
        env = {**os.environ, 'FLASK_SKIP_DOTENV': '1', 'INSTANCE_PATH': folder, 'DATABASE_URL': database.url,
               'SECRET_KEY': 'bench-secret-key-0123456789', 'BASE_URL': 'https://news.example.com', 'MAIL_SERVER': '127.0.0.1',
               'MAIL_PORT': str(port), 'MAIL_DEFAULT_SENDER': 'The Newsletter <news@example.com>',
               'MAIL_CONCURRENCY': str(args.connections), 'JOB_WORKER': 'off'}
        if args.batch_size:
            env['SEND_BATCH_SIZE'] = str(args.batch_size)
        if args.record_every:
            env['SEND_RECORD_EVERY'] = str(args.record_every)
        if args.rate_limit:
            env['MAIL_RATE_LIMIT'] = str(args.rate_limit)
        stage = 'week1'
        if args.stage_delay is not None:  # week2, due by its delay: the send log is read for every batch
            env['STAGES_FOLDER'], stage = delayed_stages(folder, args.stage_delay), 'week2'
        run_flask(env, 'db', 'upgrade')
        seed(database.url, n, None if args.stage_delay is None else args.stage_delay + 1)
        raw_connections = args.raw_connections or args.connections
        limit = None if args.skip_limit else TransportLimit(sink, port, n, raw_connections, _one_message(env, folder),
                                                            args.slices)
        step = limit.step if limit else None

        if args.rq_workers:
            env.update(REDIS_URL=os.environ.get('REDIS_URL', 'redis://127.0.0.1:6379/0'), RQ_QUEUE=database.schema)
            run_flask(env, 'send-newsletter-email', stage, '--queue', str(args.rq_workers))
            seconds, rss, statements, output = run_flask_processes(
                env, [('rq-worker', '--burst')] * args.rq_workers, while_running=step)
        else:
            seconds, rss, statements, output = run_flask(env, 'send-newsletter-email', stage, while_running=step)
        if limit:
            limit.finish()
        counts, first, last = sink.reset()
        duplicates = sum(c - 1 for c in counts.values() if c > 1)
        losses = n - len(counts)

        how = f'{args.rq_workers} RQ worker(s) x ' if args.rq_workers else ''
        rate = f', rate limit {args.rate_limit:g}/s' if args.rate_limit else ''
        trip = '' if args.round_trip is None else f', {args.round_trip:g} ms round trip (bench/latency_proxy.py)'
        delayed = '' if args.stage_delay is None else f', week2 with Delay: {args.stage_delay} days'
        classic = ', server without PIPELINING' if args.no_pipelining else ''
        print(f'drip send, {n} subscribers, {args.database}, {how}{args.connections} connection(s), '
              f'server delay {args.delay * 1000:g} ms{rate}{trip}{delayed}{classic}')
        print(f'  app:    {seconds:8.2f} s  {n / seconds:9.1f} msg/s  peak RSS {rss:6.1f} MB  '
              f'{statements} SQL statements  duplicates {duplicates}  losses {losses}')
        paced = (n - 1) / (last - first - (limit.paused_between(first, last) if limit else 0.0))
        off = f', {paced / args.rate_limit - 1:+.1%} off MAIL_RATE_LIMIT' if args.rate_limit else ''
        print(f'          at the server, first to last message: {paced:.1f} msg/s (no process start-up){off}')
        if limit:
            print(f'  limit:  {limit.seconds:8.2f} s  {n / limit.seconds:9.1f} msg/s  (raw smtplib, pre-rendered, '
                  f'{raw_connections} connection(s), in {len(limit.pauses)} slices woven into the app\'s run)')
            print(f'  ratio:  {limit.seconds / seconds:.2f} of the transport limit'
                  f'{"" if raw_connections == args.connections else f" on {raw_connections} connection(s)"}; '
                  f'at the server, {paced / (n / limit.seconds):.2f}')


def _one_message(env, folder):
    """A message exactly as the app renders it, for the transport-limit run (rendered by the folder transport)."""
    local = {**env, 'MAIL_SERVER': '', 'MAIL_TRANSPORT': 'folder', 'DATABASE_URL': f'sqlite:///{folder}/one.db'}
    run_flask(local, 'db', 'upgrade')
    seed(local['DATABASE_URL'], 1)
    run_flask(local, 'send-newsletter-email', 'week1')
    [eml] = Path(folder, 'mail').glob('*.eml')
    return eml.read_bytes()


if __name__ == '__main__':
    main()
