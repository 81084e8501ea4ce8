"""Sign-ups under load: the app under gunicorn against a bare Flask endpoint under the same settings, in one
run, each driven by wrk from a process of its own on loopback; then a check that every sign-up accepted
was stored and got exactly one confirmation email.

    .venv/bin/python bench/signups.py --database sqlite
    .venv/bin/python bench/signups.py --database postgresql --connections 100 --seconds 30
    .venv/bin/python bench/signups.py --jobs process
    .venv/bin/python bench/signups.py --app lean [--jobs none]

`--app lean` measures bench/lean_signup.py instead of the app: the floor under the app's sign-up on this
stack. `--jobs none` measures the request alone: nobody sends the confirmations, which stay queued.

Both servers run `gunicorn --workers N` (sync workers) on 127.0.0.1. The app runs as deployed (with the
README's `--config app/serving.py`): real SMTP (bench/sink.py, in its own process, counting what each
address receives), background jobs run by the web processes' own threads (JOB_WORKER=thread, the
default; or, with `--jobs process`, by one `flask worker --queue mail` process beside web processes that
run none, JOB_WORKER=off), a fresh SQLite file or a PostgreSQL schema of its own. Two settings differ
from a deployment's defaults: the abuse limits are off
(RATELIMIT_ENABLED=0: every client here comes from 127.0.0.1), and so is the DNS look-up of each new
address's domain (EMAIL_CHECK_DELIVERABILITY=0: this machine has no DNS, and the look-up's time is the
resolver's, not the app's).

Every request wrk sends is a sign-up: a POST of the form with an address of its own, a session cookie and
the CSRF token that came with it. The sessions are fetched before the run, one GET of the form for each
of the `--connections` browsers, as each would have loaded the page once; the POST still goes through
the whole CSRF check. The bare endpoint gets GET requests, half of its time before the app's run and half
after, so that both sides feel the same drift of this shared machine.

Figures printed: requests per second, p50 and p99 latency, errors (socket errors, time-outs, and any answer
that is not the sign-up's page), the app's ratio to the bare endpoint, confirmation emails delivered by the
end of the load and how long the rest took (so, sign-ups per second with their emails delivered: the run's
sign-ups over the load's time and the drain's), and the CPU the web processes (and the flask worker) and
the SMTP server spent per sign-up, its email included (and PostgreSQL's processes, on that database).
Then the check: sign-ups accepted but not stored (lost), stored without an email, emails twice, emails to
an address not stored, jobs not done; and the issue's targets, met or not.
It exits with status 1 when any error, or any count of the check but `stored`, is not zero."""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.drip import FreshDatabase, free_port, run_flask  # noqa: E402
from bench.sink import Sink  # noqa: E402

TICKS = os.sysconf('SC_CLK_TCK')


class Gunicorn:
    """`gunicorn [OPTIONS] --workers N --bind 127.0.0.1:PORT module:app`, answering once entered, stopped
    with SIGTERM."""

    def __init__(self, app, workers, env, folder, name, *options):
        self.port, self.log = free_port(), Path(folder) / f'{name}.log'
        self.command = [sys.executable, '-m', 'gunicorn', *options, '--workers', str(workers), '--bind',
                        f'127.0.0.1:{self.port}', app]
        self.env = env

    def __enter__(self):
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=self.log.open('w'))
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{self.port}/', timeout=5).read()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f'{" ".join(self.command)} did not start:\n{self.log.read_text()}') from None
                time.sleep(0.2)

    def __exit__(self, *exc_info):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cpu_seconds(self):
        """User and system time of the master and its workers so far."""
        master = self.process.pid
        children = Path(f'/proc/{master}/task/{master}/children').read_text().split()
        return sum(_cpu_seconds(pid) for pid in [master, *map(int, children)])

    def errors_logged(self):
        """Tracebacks, errors and warnings in its log (a job retried, a worker restarted) so far."""
        return errors_in(self.log)


def errors_in(log):
    return len(re.findall(r'^Traceback|\] (ERROR|WARNING)|\[(ERROR|WARNING|CRITICAL)\]', log.read_text(), re.MULTILINE))


def _cpu_seconds(pid):
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
    except FileNotFoundError:  # a worker that has just been replaced
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def postgresql_cpu_seconds():
    """User and system time of every PostgreSQL process on this machine so far (the server is local, and
    nothing else uses it during a run): its share of each sign-up, which the web processes' CPU leaves out."""
    total = 0.0
    for folder in Path('/proc').glob('[0-9]*'):
        try:
            if (folder / 'comm').read_text().strip() == 'postgres':
                total += _cpu_seconds(int(folder.name))
        except (OSError, ValueError):  # a process that ended meanwhile
            pass
    return total


@contextlib.contextmanager
def mail_worker(jobs, env, folder):
    """With `--jobs process`, `flask worker --queue mail` for as long as the block, stopped with SIGTERM.
    :return: its process, or None when the web processes send the mail themselves, or nobody does."""
    if jobs != 'process':
        yield None
        return
    with (Path(folder) / 'worker.log').open('w') as log:
        process = subprocess.Popen([sys.executable, '-m', 'flask', '--app', 'main', 'worker', '--queue', 'mail'],
                                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def browser_sessions(port, count, folder):
    """`count` browsers that have each loaded the form: a file of "cookie<TAB>token" lines for signups.lua."""
    lines = []
    for _ in range(count):
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=30) as answer:
            cookie = answer.headers['Set-Cookie'].split(';', 1)[0]
            token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', answer.read().decode()).group(1)
        lines.append(f'{cookie}\t{token}\n')
    path = Path(folder) / 'sessions.txt'
    path.write_text(''.join(lines))
    return path


def run_wrk(port, seconds, args, mode, folder, *script_args, server=None):
    """One wrk run with bench/signups.lua.  :return: its figures (see done() there), with the accepted
    addresses in 'addresses', and with `server`'s CPU seconds during it in 'cpu', when given."""
    cpu = server.cpu_seconds() if server else 0.0
    accepted = Path(folder) / 'accepted.txt'
    result = subprocess.run(
        ['wrk', '--threads', str(args.threads), '--connections', str(args.connections), '--duration', f'{seconds}s',
         '--timeout', '10s', '--script', str(ROOT / 'bench' / 'signups.lua'), f'http://127.0.0.1:{port}/', '--',
         mode, *map(str, script_args)],
        env={**os.environ, 'SIGNUPS_ACCEPTED_FILE': str(accepted)}, capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures['addresses'] = accepted.read_text().split()
    figures['cpu'] = server.cpu_seconds() - cpu if server else None
    figures['errors'] = sum(figures[kind] for kind in ('connect', 'read', 'write', 'timeout', 'refused'))
    return figures


def count_clients(engine):
    with engine.connect() as conn:
        return conn.scalar(sa.text("SELECT count(*) FROM clients"))


def emails_due(engine):
    with engine.connect() as conn:
        return conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE queue = 'mail' "
                                   "AND status IN ('queued', 'running')"))


def wait_for_mail(engine, timeout):
    """Until no confirmation email is waiting to go out.  :return: the seconds it took."""
    started = time.monotonic()
    while emails_due(engine) and time.monotonic() - started < timeout:
        time.sleep(0.1)
    return time.monotonic() - started


def check(engine, sink, accepted, mailed=True):
    """Sign-ups against the database against the SMTP server (unless nobody was to send them their emails:
    `mailed` false).  :return: the counts, all zero when right."""
    with engine.connect() as conn:
        stored = set(conn.scalars(sa.text("SELECT email FROM clients WHERE email LIKE 'load-%'")))
        failed = conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE queue = 'mail' AND status <> 'done'"))
    received, _, _ = sink.counts()
    received = Counter(received)
    if not mailed:
        return {'stored': len(stored), 'lost': len(set(accepted) - stored), 'emails': received.total()}
    return {
        'stored': len(stored),
        'lost': len(set(accepted) - stored),
        'without an email': sum(1 for address in stored if not received[address]),
        'emails twice': sum(count - 1 for address, count in received.items() if count > 1),
        'emails to nobody stored': sum(count for address, count in received.items() if address not in stored),
        'jobs not done': failed,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--database', choices=['sqlite', 'postgresql'], default='sqlite')
    parser.add_argument('--workers', type=int, default=4, help='gunicorn workers, for the app and the bare endpoint')
    parser.add_argument('--connections', type=int, default=100, help="wrk's concurrent clients")
    parser.add_argument('--threads', type=int, default=2, help="wrk's threads")
    parser.add_argument('--seconds', type=int, default=30,
                        help="the app's run; the bare endpoint's too, in two halves (at least 2)")
    parser.add_argument('--warm-up', type=int, default=3, help='seconds of load on each server before measuring')
    parser.add_argument('--app', choices=['newsletter', 'lean'], default='newsletter',
                        help="the app's sign-up, or bench/lean_signup.py's: the floor under it on this stack")
    parser.add_argument('--jobs', choices=['thread', 'process', 'none'], default='thread',
                        help="who sends the confirmation emails: the web processes' own threads, or one "
                             "`flask worker --queue mail` process beside them; or nobody (the request alone: "
                             "its emails stay queued, and only the sign-ups are checked)")
    args = parser.parse_args()
    if args.app == 'lean' and args.jobs == 'process':
        parser.error('--app lean sends its emails from its own threads only')
    if not shutil.which('wrk'):
        raise SystemExit('wrk is not installed, and this benchmark drives the load with it: apt-get install wrk')
    load_before = ' '.join(f'{load:.2f}' for load in os.getloadavg())

    with tempfile.TemporaryDirectory() as folder, FreshDatabase(args.database, folder) as database, \
            Sink(free_port()) as sink:
        env = {**os.environ, 'FLASK_SKIP_DOTENV': '1', 'INSTANCE_PATH': folder, 'DATABASE_URL': database.url,
               'SECRET_KEY': 'bench-secret-key-0123456789', 'BASE_URL': 'https://news.example.com',
               'MAIL_SERVER': '127.0.0.1', 'MAIL_PORT': str(sink.port),
               'MAIL_DEFAULT_SENDER': 'The Newsletter <news@example.com>',
               'RATELIMIT_ENABLED': '0', 'EMAIL_CHECK_DELIVERABILITY': '0',
               'JOB_WORKER': 'thread' if args.jobs == 'thread' else 'off',
               'LEAN_SENDER': 'off' if args.jobs == 'none' else 'on'}
        run_flask(env, 'db', 'upgrade')
        engine = sa.create_engine(database.url)
        with Gunicorn('bench.bare_flask:app', args.workers, env, folder, 'bare') as bare, \
                Gunicorn(*(('main:app', args.workers, env, folder, 'app', '--config', 'app/serving.py')
                           if args.app == 'newsletter' else ('bench.lean_signup:app', args.workers, env, folder,
                                                             'app'))) as app, \
                mail_worker(args.jobs, env, folder) as worker:
            worker_cpu = (lambda: _cpu_seconds(worker.pid)) if worker else (lambda: 0.0)
            sessions = browser_sessions(app.port, args.connections, folder)
            run_wrk(bare.port, args.warm_up, args, 'bare', folder)
            warm = run_wrk(app.port, args.warm_up, args, 'signup', folder, sessions, 'warm')
            mailed = args.jobs != 'none'
            if mailed:
                wait_for_mail(engine, 120)

            bare_runs = [run_wrk(bare.port, args.seconds // 2, args, 'bare', folder, server=bare)]
            stored_before, delivered_before = count_clients(engine), sink.progress()[0]
            cpu, sink_cpu, database_cpu = app.cpu_seconds(), _cpu_seconds(sink.process.pid), postgresql_cpu_seconds()
            mailer_cpu = worker_cpu()
            run = run_wrk(app.port, args.seconds, args, 'signup', folder, sessions, 'run')
            delivered_by_end = sink.progress()[0] - delivered_before
            drained = wait_for_mail(engine, 300) if mailed else 0.0
            cpu, sink_cpu = app.cpu_seconds() - cpu, _cpu_seconds(sink.process.pid) - sink_cpu
            mailer_cpu = worker_cpu() - mailer_cpu
            database_cpu = postgresql_cpu_seconds() - database_cpu
            bare_runs.append(run_wrk(bare.port, args.seconds - args.seconds // 2, args, 'bare', folder, server=bare))
            stored_in_run = count_clients(engine) - stored_before
            errors_logged = app.errors_logged() + (errors_in(Path(folder) / 'worker.log') if worker else 0)
            results = check(engine, sink, warm['addresses'] + run['addresses'], mailed)
        engine.dispose()

    bare_rate = sum(r['requests'] for r in bare_runs) / sum(r['seconds'] for r in bare_runs)
    rate = len(run['addresses']) / run['seconds']
    with_mail = stored_in_run / (run['seconds'] + drained)
    load_after = ' '.join(f'{load:.2f}' for load in os.getloadavg())
    print(f'sign-ups under load{"" if args.app == "newsletter" else " (bench/lean_signup.py)"}, {args.database}, gunicorn --workers {args.workers} (sync), mail sent by '
          f'{ {"thread": "their threads", "process": "one flask worker", "none": "nobody"}[args.jobs]}, wrk {args.threads} '
          f'threads x {args.connections} connections, {args.seconds} s; load average before {load_before}, '
          f'after {load_after}')
    for name, figures in (('bare (before)', bare_runs[0]), ('bare (after)', bare_runs[1])):
        print(f'  {name:14} {figures["requests"] / figures["seconds"]:8.1f} req/s       p50 {figures["p50_ms"]:7.1f} '
              f'ms  p99 {figures["p99_ms"]:7.1f} ms  errors {figures["errors"]}')
    print(f'  {"app":14} {rate:8.1f} sign-ups/s  p50 {run["p50_ms"]:7.1f} ms  p99 {run["p99_ms"]:7.1f} ms  '
          f'errors {run["errors"]}  (max {run["max_ms"]:.0f} ms; {len(run["addresses"])} accepted of '
          f'{run["requests"]} answered; server errors and warnings logged {errors_logged})')
    bare_cpu = sum(r['cpu'] for r in bare_runs) / sum(r['requests'] for r in bare_runs)
    print(f'  ratio:         {rate / bare_rate:.3f} of the bare endpoint ({bare_rate:.1f} req/s, its web processes\' '
          f'CPU {bare_cpu * 1000:.3f} ms a request)')
    per_sign_up = {'web processes': cpu, 'SMTP sink': sink_cpu,
                   **({'flask worker': mailer_cpu} if args.jobs == 'process' else {}),
                   **({'PostgreSQL': database_cpu} if args.database == 'postgresql' else {})}
    spent = ', '.join(f'{name} {seconds / stored_in_run * 1000:.2f} ms' for name, seconds in per_sign_up.items())
    if mailed:
        print(f'  mail:          {delivered_by_end} of the run\'s {stored_in_run} sign-ups emailed by the end of the '
              f'load, the rest {drained:.1f} s after: {with_mail:.1f} sign-ups/s with their emails delivered; CPU a '
              f'sign-up, its email included: {spent}')
    else:
        print(f'  mail:          none sent (--jobs none: the request alone); CPU a sign-up: {spent}')
    print('  check:         ' + ', '.join(f'{name} {count}' for name, count in results.items())
          + f' (stored includes {len(warm["addresses"])} warm-up sign-ups, and any answered after wrk stopped)')
    bad = {name: count for name, count in results.items() if name not in ('stored', 'emails') and count}
    targets = {'p99 < 200 ms': (run['p99_ms'] < 200, f'{run["p99_ms"]:.0f} ms'),
               '>= 500 sign-ups/s with their emails': (mailed and with_mail >= 500,
                                                       f'{with_mail:.0f}/s' if mailed else 'none sent'),
               '>= 0.15 of the bare endpoint': (rate / bare_rate >= 0.15, f'{rate / bare_rate:.3f}'),
               'no errors': (not run['errors'] and not errors_logged, run['errors'] + errors_logged),
               'nothing lost': (not bad, sum(bad.values()))}
    print('  targets:       ' + '; '.join(f'{name}: {"met" if met else "not met"} ({value})'
                                          for name, (met, value) in targets.items()))
    if run['errors'] or bad or errors_logged:
        raise SystemExit(f'FAILED: errors {run["errors"]}, server errors logged {errors_logged}, {bad}')

if __name__ == '__main__':
    main()
