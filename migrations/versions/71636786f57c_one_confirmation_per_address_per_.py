"""one confirmation per address per interval

When an address was last sent a confirmation email, so that sign-up sends at most one every
CONFIRM_RESEND_SECONDS, however many requests name it.

Revision ID: 71636786f57c
Revises: 162986c351dc
Create Date: 2026-11-30 19:04:56.870937

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '71636786f57c'
down_revision = '162986c351dc'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('confirmation_sent_at', sa.DateTime(), nullable=True))



def downgrade():
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.drop_column('confirmation_sent_at')

