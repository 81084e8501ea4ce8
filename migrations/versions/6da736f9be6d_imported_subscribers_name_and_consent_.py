"""imported subscribers: name and consent record

A subscriber imported from a CSV file keeps the name its file gave; one its admin imported as having
consented already (no confirmation email) keeps who said so and when, as the record of that consent.
Every column is empty for those who signed up themselves.

Revision ID: 6da736f9be6d
Revises: 962f83363491
Create Date: 2026-11-30 19:37:22.651770

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '6da736f9be6d'
down_revision = '962f83363491'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('consent_recorded_by', sa.String(length=254), nullable=True))
        batch_op.add_column(sa.Column('consent_recorded_at', sa.DateTime(), nullable=True))


def downgrade():
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.drop_column('consent_recorded_at')
        batch_op.drop_column('consent_recorded_by')
        batch_op.drop_column('name')
