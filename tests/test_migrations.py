"""The committed migrations build exactly the schema the models describe."""
import json
import warnings
from datetime import datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.extensions import db


def test_flask_db_upgrade_builds_the_models_schema(settings, flask_command):
    out, err = (upgrade := flask_command('db', 'upgrade')).communicate(timeout=60)
    assert upgrade.returncode == 0, err

    engine = sa.create_engine(settings['SQLALCHEMY_DATABASE_URI'])
    try:
        with engine.connect() as conn, warnings.catch_warnings():
            # SQLite's indexes on an expression cannot be reflected, so they are not compared: the unique one
            # on lower(email) is tried below instead.
            warnings.filterwarnings('ignore', 'Skipped unsupported reflection of expression-based index')
            warnings.filterwarnings('ignore', "autogenerate skipping metadata-specified expression-based index")
            differences = compare_metadata(MigrationContext.configure(conn), db.metadata)
        with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("INSERT INTO clients (email, active, num_newsletter, created_at) VALUES "
                                 "('jane@example.com', true, 0, '2026-12-01'), "
                                 "('Jane@example.com', true, 0, '2026-12-01')"))
    finally:
        engine.dispose()
    assert differences == []

    out, err = (downgrade := flask_command('db', 'downgrade', 'base')).communicate(timeout=60)
    assert downgrade.returncode == 0, err


def test_an_upgrade_finding_one_mailbox_stored_twice_stops_and_names_it(settings, flask_command):
    """Before one row a mailbox was the rule, Jane@ and jane@ could both sign up: the upgrade changes
    nothing then, and says which addresses to settle."""
    out, err = (upgrade := flask_command('db', 'upgrade', '6da736f9be6d')).communicate(timeout=60)
    assert upgrade.returncode == 0, err
    engine = sa.create_engine(settings['SQLALCHEMY_DATABASE_URI'])
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO clients (email, active, num_newsletter, created_at) VALUES "
                                 "('jane@example.com', true, 2, '2026-11-01'), "
                                 "('Jane@Example.com', true, 2, '2026-11-02'), ('bob@example.com', true, 2, '2026-11-03')"))

        out, err = (upgrade := flask_command('db', 'upgrade')).communicate(timeout=60)

        assert upgrade.returncode != 0
        assert '1 address(es) are stored more than once' in err and 'jane@example.com (2 rows)' in err, err
        with engine.connect() as conn:
            assert conn.scalar(sa.text('SELECT count(*) FROM clients')) == 3, 'nothing changed'
            assert conn.scalar(sa.text('SELECT version_num FROM alembic_version')) == '6da736f9be6d'
    finally:
        engine.dispose()


def test_a_run_killed_before_the_upgrade_still_leaves_unknown_only_its_claims_in_the_range_it_kept(settings,
                                                                                                  flask_command):
    """A run's row kept a range of delivery ids, and now names each: a run the old code left killed is
    taken over after the upgrade as the old code would have, its claims in the range unknown."""
    out, err = (upgrade := flask_command('db', 'upgrade', '4b1d2c3e5f60')).communicate(timeout=60)
    assert upgrade.returncode == 0, err
    tables = sa.MetaData()
    engine = sa.create_engine(settings['SQLALCHEMY_DATABASE_URI'])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'Skipped unsupported reflection of expression-based index')
            tables.reflect(engine, only=['clients', 'deliveries', 'send_runs'])
        clients, deliveries, runs = (tables.tables[name] for name in ('clients', 'deliveries', 'send_runs'))
        then = datetime(2026, 12, 1)
        with engine.begin() as conn:
            conn.execute(clients.insert(), [{'id': n, 'email': f'reader{n}@example.com', 'active': True,
                                             'num_newsletter': 0, 'created_at': then} for n in range(1, 7)])
            conn.execute(deliveries.insert(), [
                {'id': n, 'client_id': n, 'mailing': 'week1', 'status': status, 'claimed_by': owner, 'attempts': 0,
                 'created_at': then}
                for n, status, owner in [(1, 'sent', None), (2, 'claimed', 'dead'), (3, 'claimed', 'other'),
                                         (4, 'claimed', 'dead'), (5, 'claimed', 'dead'), (6, 'claimed', 'dead')]])
            conn.execute(runs.insert(), [
                {'mailing': 'week1', 'trigger': 'cli', 'via': 'SMTP', 'owner': owner, 'sending_from': first,
                 'sending_to': last, 'started_at': then, 'sent': 0, 'failed': 0, 'unknown': 0, 'deferred': 0,
                 'skipped': 0} for owner, first, last in [('dead', 1, 5), ('done', None, None)]])
        out, err = (upgrade := flask_command('db', 'upgrade')).communicate(timeout=60)
        assert upgrade.returncode == 0, err
        with engine.connect() as conn:
            sending = dict(conn.execute(sa.text('SELECT owner, sending FROM send_runs')).all())
    finally:
        engine.dispose()
    assert {owner: json.loads(ids) if isinstance(ids, str) else ids for owner, ids in sending.items()} == \
        {'dead': [2, 4, 5], 'done': None}, "its own claims in 1..5; not another run's, not the sent one"


def test_a_downgrade_that_rebuilds_the_subscribers_table_keeps_the_send_log(settings, flask_command):
    """SQLite drops a column by building the table anew and dropping the old one; with foreign keys on (as
    the app's every connection has them), that drop deleted every subscriber's deliveries with it (ON DELETE
    CASCADE), and the next upgrade and send mailed everyone again everything they had had."""
    out, err = (upgrade := flask_command('db', 'upgrade')).communicate(timeout=60)
    assert upgrade.returncode == 0, err
    engine = sa.create_engine(settings['SQLALCHEMY_DATABASE_URI'])
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO clients (id, email, active, num_newsletter, created_at) VALUES "
                                 "(1, 'jane@example.com', true, 2, '2026-11-01'), "
                                 "(2, 'bob@example.com', true, 1, '2026-11-02')"))
            conn.execute(sa.text("INSERT INTO deliveries (client_id, mailing, status, attempts, created_at) VALUES "
                                 "(1, 'week1', 'sent', 1, '2026-11-08'), (1, 'week2', 'sent', 1, '2026-11-15'), "
                                 "(2, 'week1', 'sent', 1, '2026-11-09')"))

        out, err = (downgrade := flask_command('db', 'downgrade', '962f83363491')).communicate(timeout=60)

        assert downgrade.returncode == 0, err
        with engine.connect() as conn:
            kept = conn.execute(sa.text('SELECT client_id, mailing FROM deliveries ORDER BY id')).all()
            assert conn.scalar(sa.text('SELECT count(*) FROM clients')) == 2
    finally:
        engine.dispose()
    assert kept == [(1, 'week1'), (1, 'week2'), (2, 'week1')]
