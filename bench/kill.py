"""What a SIGKILL at any moment costs the drip, at full speed: messages sent twice, and messages left
"unknown" (they may have arrived, so they are not sent again unasked).

    .venv/bin/python bench/kill.py --subscribers 20000 --kills 10 --database postgresql

Seeds N confirmed subscribers, starts a counting SMTP server, and runs `flask send-newsletter-email
week1`; at a random moment (seeded) it SIGKILLs the run and starts another, which takes the dead run over
once its lease has run out; K times, then a last run finishes the stage. Right after each kill it reads
how many deliveries the dead run had declared as going out (what the take-over will make unknown); at
the end it counts, at the server, the recipients who got week1 twice or never, and the send log's
unknown ones.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.drip import FreshDatabase, free_port, run_flask, seed  # noqa: E402
from bench.sink import Sink  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--subscribers', type=int, default=20_000)
    parser.add_argument('--kills', type=int, default=10)
    parser.add_argument('--database', choices=['sqlite', 'postgresql'], default='sqlite')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--record-every', type=int, default=None, help="SEND_RECORD_EVERY (default: the app's)")
    args = parser.parse_args()
    n, rng, lease = args.subscribers, random.Random(args.seed), 2.0

    with tempfile.TemporaryDirectory() as folder, FreshDatabase(args.database, folder) as database, \
            Sink(free_port()) as sink:
        env = {**os.environ, 'FLASK_SKIP_DOTENV': '1', 'INSTANCE_PATH': folder, 'DATABASE_URL': database.url,
               'SECRET_KEY': 'bench-secret-key-0123456789', 'BASE_URL': 'https://news.example.com', 'MAIL_SERVER': '127.0.0.1',
               'MAIL_PORT': str(sink.port), 'MAIL_DEFAULT_SENDER': 'The Newsletter <news@example.com>',
               'JOB_WORKER': 'off', 'LEASE_SECONDS': str(lease)}
        if args.record_every:
            env['SEND_RECORD_EVERY'] = str(args.record_every)
        run_flask(env, 'db', 'upgrade')
        seed(database.url, n)
        command = [sys.executable, '-m', 'flask', '--app', 'main', 'send-newsletter-email', 'week1']
        shares = []
        for _ in range(args.kills):
            run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(2.0, 6.0))  # past its start-up (about a second), into its sending
            run.send_signal(signal.SIGKILL)
            run.wait()
            shares.append(declared_by_the_last_run(database.url))
        last = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        counts, _, _ = sink.counts()
        unknown = count_unknown(database.url)

    twice = sum(1 for c in counts.values() if c > 1)
    print(f'drip send, {n} subscribers, {args.database}, {args.kills} SIGKILLs at random moments (seed {args.seed})')
    print(f'  sent twice: {twice}    recorded unknown: {unknown}    never sent: {n - len(counts)}')
    print(f'  declared as going out at each kill: {shares} (at most {max(shares, default=0)}; '
          f'in all {sum(shares)})')
    summary = [line for line in last.stdout.splitlines() if line.startswith('week1: sent')]
    print(f'  last run: {summary[-1] if summary else last.stderr[-300:]}')


def declared_by_the_last_run(url):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        owner, sending = conn.execute(sa.text('SELECT owner, sending FROM send_runs ORDER BY id DESC LIMIT 1')).one()
        held = set(conn.scalars(sa.text("SELECT id FROM deliveries WHERE claimed_by = :owner AND status = 'claimed'"),
                                {'owner': owner}))
    engine.dispose()
    return len(held & set(json.loads(sending) if isinstance(sending, str) else sending or []))  # SQLite: text


def count_unknown(url):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.scalar(sa.text("SELECT count(*) FROM deliveries WHERE status = 'unknown'"))
    engine.dispose()
    return count


if __name__ == '__main__':
    main()
