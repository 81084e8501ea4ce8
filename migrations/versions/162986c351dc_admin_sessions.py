"""admin sessions

An admin's session lives on the server: the cookie holds only its id, so logging out ends it, and each
sign-in link (its nonce, unique here) works once. Admins signed in before this must sign in again.

Revision ID: 162986c351dc
Revises: c3df7c934c07
Create Date: 2026-11-30 19:00:56.088491

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '162986c351dc'
down_revision = 'c3df7c934c07'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('admin_sessions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('link_nonce', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('ended_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_sessions')),
    sa.UniqueConstraint('link_nonce', name=op.f('uq_admin_sessions_link_nonce'))
    )


def downgrade():
    op.drop_table('admin_sessions')
