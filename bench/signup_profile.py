"""Where a sign-up's CPU goes, in one process: N sign-up POSTs through Flask's test client (a browser's
session and CSRF token, as bench/signups.py sends them), then their N confirmation emails sent by the job
runner as a worker thread would, to a real SMTP server (bench/sink.py). Each half is timed in CPU seconds
and profiled (cProfile); the top functions by own time and by cumulative time are printed.

    .venv/bin/python bench/signup_profile.py --signups 2000 --database sqlite
    .venv/bin/python bench/signup_profile.py --signups 2000 --database postgresql --top 40

The settings are those of bench/signups.py (abuse limits and the DNS look-up off, real SMTP)."""
import argparse
import cProfile
import io
import os
import pstats
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.drip import FreshDatabase, free_port, run_flask  # noqa: E402
from bench.sink import Sink  # noqa: E402


def profiled(work, top, label):
    """Run `work()` under cProfile.  :return: CPU seconds it took (without the profiler, measured apart first)."""
    started = time.process_time()
    work(False)
    plain = time.process_time() - started
    profile = cProfile.Profile()
    profile.enable()
    work(True)
    profile.disable()
    for order in ('tottime', 'cumulative'):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(top)
        print(f'--- {label}, by {order}')
        print(re.sub(r'^.*?(?=\s+ncalls)', '', out.getvalue(), count=1, flags=re.DOTALL).rstrip())
    return plain


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--signups', type=int, default=2000, help='per half: once timed alone, once profiled')
    parser.add_argument('--database', choices=['sqlite', 'postgresql'], default='sqlite')
    parser.add_argument('--top', type=int, default=25)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder, FreshDatabase(args.database, folder) as database, \
            Sink(free_port()) as sink:
        env = {'FLASK_SKIP_DOTENV': '1', 'INSTANCE_PATH': folder, 'DATABASE_URL': database.url,
               'SECRET_KEY': 'bench-secret-key-0123456789', 'BASE_URL': 'https://news.example.com',
               'MAIL_SERVER': '127.0.0.1', 'MAIL_PORT': str(sink.port),
               'MAIL_DEFAULT_SENDER': 'The Newsletter <news@example.com>',
               'RATELIMIT_ENABLED': '0', 'EMAIL_CHECK_DELIVERABILITY': '0', 'JOB_WORKER': 'off'}
        run_flask({**os.environ, **env}, 'db', 'upgrade')
        os.environ.update(env)
        from app.jobs import kept_between_jobs, run_next
        from main import app

        client = app.test_client()
        page = client.get('/').get_data(as_text=True)
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
        counter = iter(range(10 ** 9))

        def sign_up(_):
            for _ in range(args.signups):
                answer = client.post('/', data={'email': f'load-{next(counter)}@example.com', 'csrf_token': token})
                assert answer.status_code == 200 and b'sent a confirmation link' in answer.data, answer.data[:500]

        def send_emails(_):
            with app.app_context(), kept_between_jobs():
                while run_next('mail'):
                    pass

        sign_up(False)  # the first requests compile templates and connect: not what a sign-up costs
        send_emails(False)
        requests = profiled(sign_up, args.top, 'sign-up requests')
        # The emails of both halves of the sign-ups wait: send half of them timed alone, half profiled.
        sent = []
        emails = profiled(lambda profiling: sent.append(_send_some(app, args.signups)), args.top, 'confirmation emails')
        received, _, _ = sink.counts()
        print(f'\n{args.database}: a sign-up request {requests / args.signups * 1000:.2f} ms CPU, its email '
              f'{emails / sent[0] * 1000:.2f} ms CPU (in this process; {len(received)} emails at the server)')


def _send_some(app, count):
    """`count` of the emails waiting, as a worker sends them back to back: up to a batch more (the worker
    claims JOB_MAIL_BATCH at a time), or fewer if fewer wait.  :return: how many it sent."""
    from app.jobs import kept_between_jobs, run_next
    with app.app_context(), kept_between_jobs():
        ran = 0
        # A worker under load looks for abandoned jobs once a poll, not at each claim.
        while ran < count and (ran_now := run_next('mail', abandoned=False)):
            ran += ran_now
    return ran


if __name__ == '__main__':
    main()
