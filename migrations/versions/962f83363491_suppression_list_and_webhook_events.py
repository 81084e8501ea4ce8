"""suppression list and webhook events

One list of addresses that get nothing more (blocked by their owner, bounced, complained, refused for
good), applied to every mailing; and the provider's webhook events by id, so a replay counts once.

Revision ID: 962f83363491
Revises: 71636786f57c
Create Date: 2026-11-30 19:30:04.755541

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '962f83363491'
down_revision = '71636786f57c'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('suppressions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('reason', sa.String(length=20), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suppressions')),
    sa.UniqueConstraint('email', name=op.f('uq_suppressions_email'))
    )
    op.create_table('webhook_events',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('event', sa.String(length=30), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_events'))
    )


def downgrade():
    op.drop_table('webhook_events')
    op.drop_table('suppressions')
