"""one subscriber per mailbox

An address is unique whatever the case of its letters (a unique index on lower(email)): two rows for
Jane@ and jane@ each got every mailing. A database that already holds such twins is not changed: the
upgrade stops and names them, for the operator to keep one of each (the admin's subscriber page can
erase the other).

Revision ID: 4b1d2c3e5f60
Revises: 6da736f9be6d
Create Date: 2026-12-01 10:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '4b1d2c3e5f60'
down_revision = '6da736f9be6d'
branch_labels = None
depends_on = None


def upgrade():
    twins = op.get_bind().execute(sa.text(
        'SELECT lower(email), count(*) FROM clients GROUP BY lower(email) HAVING count(*) > 1 ORDER BY 1')).all()
    if twins:
        listed = ', '.join(f'{address} ({count} rows)' for address, count in twins[:20])
        raise SystemExit(
            f'{len(twins)} address(es) are stored more than once, in letters of different case, and each row gets '
            f'every mailing: {listed}{" ..." if len(twins) > 20 else ""}. Keep one subscriber of each (erase the '
            'others from the admin\'s subscriber page), then upgrade again.')
    op.create_index('ix_clients_email_lower', 'clients', [sa.text('lower(email)')], unique=True)


def downgrade():
    op.drop_index('ix_clients_email_lower', table_name='clients')
