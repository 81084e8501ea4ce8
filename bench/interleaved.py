"""The one-connection drip against raw smtplib, in one process, in alternating short rounds.

    .venv/bin/python bench/interleaved.py --subscribers 3000 --rounds 6 --database postgresql

bench/drip.py runs the real command, with the limit woven into its run. This one isolates what
preparing ahead is worth: every round sends N messages three ways back to back, raw smtplib
(pre-rendered), MailingSend as the command runs it, and MailingSend without preparing the next
message in the gaps (Outgoing.prepare made a no-op), and the medians of the rounds are compared.
Each round starts from the same state: the send log emptied and every subscriber due week1 again.
"""
import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.drip import FreshDatabase, free_port, seed  # noqa: E402
from bench.sink import Sink  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--subscribers', type=int, default=3000)
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--database', choices=['sqlite', 'postgresql'], default='sqlite')
    args = parser.parse_args()
    n = args.subscribers

    with tempfile.TemporaryDirectory() as folder, FreshDatabase(args.database, folder) as database, \
            Sink(free_port()) as sink:
        os.environ.update(FLASK_SKIP_DOTENV='1', INSTANCE_PATH=folder, DATABASE_URL=database.url, SECRET_KEY='bench-secret-key-0123456789',
                          BASE_URL='https://news.example.com', MAIL_SERVER='127.0.0.1', MAIL_PORT=str(sink.port),
                          MAIL_DEFAULT_SENDER='The Newsletter <news@example.com>', MAIL_CONCURRENCY='1',
                          JOB_WORKER='off')
        from flask_migrate import upgrade

        from app import create_app
        from app.extensions import db
        from app import drip, sending
        from app.mailing import Recipient
        from app.models import Client, Delivery
        from app.transports import SenderPool

        app = create_app()
        with app.app_context():
            upgrade()
            seed(database.url, n)
            stage = drip.DripStage('week1')
            sample = stage.compose(Recipient(1, 'reader1@example.com')).mime

            def raw():
                with smtplib.SMTP('127.0.0.1', sink.port) as smtp:
                    started = time.perf_counter()
                    for i in range(n):
                        smtp.sendmail('news@example.com', [f'reader{i}@example.com'], sample)
                    return time.perf_counter() - started

            def app_send(prepare_ahead=True):
                prepare = sending.Outgoing.prepare
                if not prepare_ahead:
                    sending.Outgoing.prepare = lambda outgoing: False
                try:
                    with SenderPool(1) as pool:
                        started = time.perf_counter()
                        report = sending.MailingSend(stage, pool, 'bench').run()
                        seconds = time.perf_counter() - started
                finally:
                    sending.Outgoing.prepare = prepare
                assert report.sent == n, report.summary()
                return seconds

            ways = {'raw smtplib': raw, 'app': app_send, 'app, not preparing ahead': lambda: app_send(False)}
            rates = {name: [] for name in ways}
            for _ in range(args.rounds):
                for name, send in ways.items():
                    db.session.execute(sa.delete(Delivery))
                    db.session.execute(sa.update(Client).values(num_newsletter=0))
                    db.session.commit()
                    rates[name].append(n / send())
                    counts, _, _ = sink.reset()
                    assert len(counts) == n and set(counts.values()) == {1}, f'{name}: lost or repeated messages'

    limit = statistics.median(rates['raw smtplib'])
    print(f'{n} subscribers, {args.database}, 1 connection, {args.rounds} rounds (median msg/s, then each round)')
    for name, values in rates.items():
        print(f'  {name:26s} {statistics.median(values):7.0f}  ratio {statistics.median(values) / limit:.2f}  '
              f'{[round(v) for v in values]}')


if __name__ == '__main__':
    sys.exit(main())
