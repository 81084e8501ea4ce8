"""a run names each delivery it is sending

A run's row said which deliveries it was sending as a range of ids (sending_from to sending_to). Going
from its new claims (high ids) to older ones (deferred, low ids) with the first still on the wire, the
range took in every claim between, and a kill made them all unknown though they never went out. Now
the row keeps the ids themselves (`sending`, a JSON list). A run left killed by the old code keeps
what its range meant then: its claims inside it.

Revision ID: 5e2f0a9c7d41
Revises: 4b1d2c3e5f60
Create Date: 2026-12-01 13:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '5e2f0a9c7d41'
down_revision = '4b1d2c3e5f60'
branch_labels = None
depends_on = None

runs = sa.table('send_runs', sa.column('id', sa.Integer), sa.column('owner', sa.String),
                sa.column('sending', sa.JSON(none_as_null=True)), sa.column('sending_from', sa.Integer),
                sa.column('sending_to', sa.Integer))
deliveries = sa.table('deliveries', sa.column('id', sa.Integer), sa.column('claimed_by', sa.String),
                      sa.column('status', sa.String))


def upgrade():
    with op.batch_alter_table('send_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sending', sa.JSON(none_as_null=True), nullable=True))
    connection = op.get_bind()
    for run_id, owner, first, last in connection.execute(
            sa.select(runs.c.id, runs.c.owner, runs.c.sending_from, runs.c.sending_to)
            .where(runs.c.sending_from.is_not(None))).all():
        ids = connection.execute(sa.select(deliveries.c.id).where(
            deliveries.c.claimed_by == owner, deliveries.c.status == 'claimed',
            deliveries.c.id.between(first, last)).order_by(deliveries.c.id)).scalars().all()
        connection.execute(sa.update(runs).where(runs.c.id == run_id).values(sending=ids or None))
    with op.batch_alter_table('send_runs', schema=None) as batch_op:
        batch_op.drop_column('sending_to')
        batch_op.drop_column('sending_from')


def downgrade():
    with op.batch_alter_table('send_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sending_from', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('sending_to', sa.Integer(), nullable=True))
    connection = op.get_bind()
    for run_id, sending in connection.execute(sa.select(runs.c.id, runs.c.sending)
                                              .where(runs.c.sending.is_not(None))).all():
        if sending:
            connection.execute(sa.update(runs).where(runs.c.id == run_id)
                               .values(sending_from=min(sending), sending_to=max(sending)))
    with op.batch_alter_table('send_runs', schema=None) as batch_op:
        batch_op.drop_column('sending')
