"""The CSV import at scale, run as the app runs it: the file's dry run as the upload page runs it, then the
import as a background job, in a `flask worker` process of its own; with the time and peak RSS of each.

    .venv/bin/python bench/import_csv.py --rows 100000 --database sqlite
    .venv/bin/python bench/import_csv.py --rows 100000 --database postgresql --consented

Writes a CSV of N rows (an address and a name; about one in a thousand not an address, one in five hundred
a repeat of a line above, one in a hundred someone already subscribed, at 500 domains), into a fresh
database holding those subscribers. Then a process of its own does, through the app's own functions, what
an admin's upload and "Import" button do: keeps the file in the instance folder and runs its dry run
(imports.receive: time and peak RSS), and queues the import job (imports.start). `flask worker --once
--queue bulk` then runs the job as a process of its own (bench/counted_flask.py): its wall time, peak RSS
(the issue's bound: under 150 MB at 100,000 rows; an idle worker's for comparison) and SQL statements.
Meanwhile another connection writes a row every half second, as a sign-up would, and the longest it
waited is reported: SQLite has one writer at a time, and the import's transaction is it until the end.

Without --consented each newcomer gets a confirmation email: the jobs are queued, not sent.
"""
import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.drip import FreshDatabase, run_flask  # noqa: E402


def write_file(path, rows):
    """The CSV, and what importing it must do: (new, duplicate, rejected), and the subscribers already there."""
    new = duplicate = rejected = 0
    existing = []
    with open(path, 'w', encoding='utf-8', newline='') as file:
        file.write('email,name\n')
        for n in range(rows):
            if n % 1000 == 999:
                file.write(f'reader{n}-at-example{n % 500}.com,Reader {n}\n')
                rejected += 1
            elif n % 500 == 499:
                file.write(f'reader{n - 250}@example{(n - 250) % 500}.com,Reader {n - 250} again\n')
                duplicate += 1
            else:
                file.write(f'reader{n}@example{n % 500}.com,Reader {n}\n')
                if n % 100 == 50:
                    existing.append(f'reader{n}@example{n % 500}.com')
                    duplicate += 1
                else:
                    new += 1
    return (new, duplicate, rejected), existing


def seed(url, emails):
    engine = sa.create_engine(url)
    clients = sa.table('clients', *(sa.column(c) for c in ('email', 'active', 'num_newsletter', 'created_at')))
    with engine.begin() as conn:
        if emails:
            conn.execute(clients.insert().values(active=True, num_newsletter=0, created_at=sa.func.current_timestamp()),
                         [{'email': email} for email in emails])
    engine.dispose()


def upload_and_queue(env, path, consented):
    """What the upload page and the "Import" button do, through the app's own functions, in a process of its
    own (as the web process would): this one stays small, since Linux counts a child's peak RSS from its
    parent's size when it was forked.  :return: {'seconds': the upload (keeping the file, its dry run),
    'summary': its report's, 'rss': that process's peak RSS, MB}."""
    command = [sys.executable, __file__, '--upload', str(path)] + (['--consented'] if consented else [])
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f'the upload failed:\n{done.stdout}\n{done.stderr}')
    return json.loads(done.stdout.splitlines()[-1])


def upload(path, consented):
    """The --upload process: see upload_and_queue."""
    from app import create_app, imports
    app = create_app()
    with app.app_context(), open(path, 'rb') as stream:
        started = time.perf_counter()
        kept = imports.receive(stream, Path(path).name, 'bench@example.com', consented)
        seconds = time.perf_counter() - started
        imports.start(kept, 'bench@example.com')
    print(json.dumps({'seconds': seconds, 'summary': kept.report.summary(),
                      'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


@contextlib.contextmanager
def writes_beside(url):
    """Another connection writing a row every half second meanwhile, as a sign-up would, with the app's busy
    timeout on SQLite (30 s, app/database.py).  :return: the seconds each write waited, and how many were
    refused."""
    engine = sa.create_engine(url, connect_args={'timeout': 30} if url.startswith('sqlite') else {})
    stop, probe = threading.Event(), SimpleNamespace(waits=[], refused=0)

    def write():
        while not stop.wait(0.5):
            started = time.perf_counter()
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text('INSERT INTO clients (email, active, num_newsletter, created_at) '
                                         'VALUES (:email, true, 0, CURRENT_TIMESTAMP)'),
                                 {'email': f'probe{len(probe.waits)}@bench.example'})
            except sa.exc.OperationalError:  # the busy timeout ran out: a sign-up's error page
                probe.refused += 1
            probe.waits.append(time.perf_counter() - started)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield probe
    finally:
        stop.set()
        writer.join()
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM clients WHERE email LIKE 'probe%@bench.example'"))
        engine.dispose()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=100_000)
    parser.add_argument('--database', choices=['sqlite', 'postgresql'], default='sqlite')
    parser.add_argument('--consented', action='store_true',
                        help='import them as having consented: no confirmation emails')
    parser.add_argument('--upload', metavar='FILE', help=argparse.SUPPRESS)  # the upload's own process
    args = parser.parse_args()
    if args.upload:
        return upload(args.upload, args.consented)

    with tempfile.TemporaryDirectory() as folder, FreshDatabase(args.database, folder) as database:
        env = {**os.environ, 'FLASK_SKIP_DOTENV': '1', 'INSTANCE_PATH': folder, 'DATABASE_URL': database.url,
               'SECRET_KEY': 'bench-secret-key-0123456789', 'BASE_URL': 'https://news.example.com',
               'MAIL_TRANSPORT': 'folder', 'JOB_WORKER': 'off', 'EMAIL_CHECK_DELIVERABILITY': 'false'}
        run_flask(env, 'db', 'upgrade')
        path = Path(folder) / 'list.csv'
        expected, existing = write_file(path, args.rows)
        seed(database.url, existing)
        idle_rss = run_flask(env, 'worker', '--once', '--queue', 'bulk')[1]  # the app alone, nothing to do
        uploaded = upload_and_queue(env, path, args.consented)
        with writes_beside(database.url) as probe:
            seconds, rss, statements, output = run_flask(env, 'worker', '--once', '--queue', 'bulk')

        engine = sa.create_engine(database.url)
        with engine.connect() as conn:
            job = conn.execute(sa.text("SELECT status, error, result, progress_done, progress_total FROM jobs "
                                       "WHERE task = 'import_subscribers'")).one()
            result = json.loads(job.result) if isinstance(job.result, str) else job.result
            subscribers = conn.scalar(sa.text('SELECT count(*) FROM clients'))
            emails = conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE task = 'send_email'"))
        engine.dispose()
        lease_misses = output.count('could not renew its lease')

        print(f'CSV import, {args.rows} rows ({path.stat().st_size / 2**20:.1f} MB), {args.database}, '
              f'{"consented" if args.consented else "confirmation emails queued"}')
        print(f'  upload + dry run (a process of its own): {uploaded["seconds"]:6.2f} s  {uploaded["summary"]}  '
              f'peak RSS {uploaded["rss"]:.1f} MB')
        print(f'  import job (flask worker --once):   {seconds:6.2f} s  {args.rows / seconds:8.0f} rows/s  '
              f'peak RSS {rss:6.1f} MB (idle: {idle_rss:.1f} MB)  {statements} SQL statements')
        print(f'    job {job.status}: {result or job.error}; progress {job.progress_done} / {job.progress_total}; '
              f'{subscribers} subscribers, {emails} confirmation emails queued; heartbeat misses {lease_misses}')
        waits = probe.waits or [0.0]
        print(f'    a write beside it (a sign-up) every 0.5 s: {len(probe.waits)} tried, longest wait {max(waits):.2f} s, '
              f'{probe.refused} refused')
        want = {'imported': expected[0], 'duplicate': expected[1], 'rejected': expected[2]}
        if job.status != 'done' or result != want or emails != (0 if args.consented else expected[0]):
            raise SystemExit(f'the import did not do what it should: {result or job.error}, expected {want}')
        if rss >= 150:
            print('    OVER the bound of 150 MB')


if __name__ == '__main__':
    main()
