"""The committed migrations build exactly the schema the models describe."""
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.extensions import db


def test_flask_db_upgrade_builds_the_models_schema(settings, flask_command):
    out, err = (upgrade := flask_command('db', 'upgrade')).communicate(timeout=60)
    assert upgrade.returncode == 0, err

    engine = sa.create_engine(settings['SQLALCHEMY_DATABASE_URI'])
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), db.metadata)
    finally:
        engine.dispose()
    assert differences == []

    out, err = (downgrade := flask_command('db', 'downgrade', 'base')).communicate(timeout=60)
    assert downgrade.returncode == 0, err
