"""PostgreSQL's plan for a drip batch's due query with a delay set, at N subscribers.

    .venv/bin/python bench/due_plan.py --subscribers 100000

Seeds N subscribers into a schema of its own: a quarter new, half past week1 (delivered at moments spread
over the last fourteen days, so about half of them have waited week2's seven days), a quarter past week2.
Then, with week2 declaring `Delay: 7 days`, prints EXPLAIN (ANALYZE, BUFFERS) of the statement one batch
of the send runs (app/sendlog.py due_statement), for the first batch and for one half-way through the
list, and the time each took. What to look for: the subscribers' primary key walked from the batch's
start (an Index Scan on clients_pkey, not a Sort), and the send log reached through its unique
(client_id, mailing) index for each candidate: a batch costs the same whatever N is.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from app.drip import DripStage  # noqa: E402
from app.extensions import db  # noqa: E402
from app.sendlog import due_statement, refresh_planner_statistics  # noqa: E402
from app.timing import describe_delay  # noqa: E402
from bench.drip import FreshDatabase  # noqa: E402
from config import Config  # noqa: E402

WEEK2 = 'Subject: Week 2\nDelay: 7 days\nWeek two. {{ unsubscribe_url }}\n'


def seed(count):
    """Straight in SQL: a quarter at stage 0, half at 1, a quarter at 2, with their deliveries."""
    db.session.execute(sa.text('''
        INSERT INTO clients (id, email, active, num_newsletter, created_at, email_confirmed_at)
        SELECT n, 'reader' || n || '@example.com', true, CASE WHEN n % 4 = 0 THEN 0 WHEN n % 4 = 3 THEN 2 ELSE 1 END,
               now() - interval '30 days', now() - interval '30 days'
        FROM generate_series(1, :count) AS n'''), {'count': count})
    db.session.execute(sa.text('''
        INSERT INTO deliveries (client_id, mailing, status, attempts, created_at, sent_at)
        SELECT id, 'week' || stage, 'sent', 1, now(), timezone('UTC', now()) - (id % 14) * interval '1 day'
        FROM clients, generate_series(1, 2) AS stage WHERE num_newsletter >= stage'''))
    db.session.execute(sa.text("SELECT setval(pg_get_serial_sequence('clients', 'id'), :count)"), {'count': count})
    db.session.commit()


def explain(statement):
    sql = str(statement.compile(db.engine, compile_kwargs={'literal_binds': True}))
    started = time.perf_counter()
    plan = db.session.execute(sa.text(f'EXPLAIN (ANALYZE, BUFFERS) {sql}')).scalars().all()
    return time.perf_counter() - started, plan


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--subscribers', type=int, default=100_000)
    parser.add_argument('--batch-size', type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, FreshDatabase('postgresql', folder) as database:
        stages = Path(folder) / 'stages'
        stages.mkdir()
        for name in ('week1', 'week2'):
            (stages / f'{name}.html').write_text('<p>{{ unsubscribe_url }}</p>')
        (stages / 'week1.txt').write_text('Subject: Week 1\nWeek one. {{ unsubscribe_url }}\n')
        (stages / 'week2.txt').write_text(WEEK2)
        settings = {'SQLALCHEMY_DATABASE_URI': database.url, 'INSTANCE_PATH': folder, 'SECRET_KEY': 'bench-secret-key-0123456789',
                    'MAIL_TRANSPORT': 'folder', 'STAGES_FOLDER': str(stages), 'JOB_WORKER': 'off'}
        app = create_app(type('BenchConfig', (Config,), settings))
        with app.app_context():
            db.create_all()
            seed(args.subscribers)
            refresh_planner_statistics()
            stage = DripStage('week2')
            for label, after in (('first batch', 0), ('half-way', args.subscribers // 2)):
                seconds, plan = explain(due_statement(stage, after, args.batch_size))
                print(f'== week2 (Delay: {describe_delay(stage.delay)}), {label}, {args.subscribers} subscribers: '
                      f'{seconds * 1000:.1f} ms with EXPLAIN ANALYZE')
                print('\n'.join(plan))
            db.session.remove()
            db.engine.dispose()


if __name__ == '__main__':
    main()
