"""The committed migrations build exactly the schema the models describe."""
import warnings

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
