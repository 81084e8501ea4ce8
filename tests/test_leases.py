"""Claims (app/leases.py) on PostgreSQL, where the planner's statistics can be far behind the table: a
send ANALYZEs at its start, then fills the send log, then takes over expired claims at its end."""
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app import db
from app.leases import claim
from app.models import Client, Delivery, utcnow


@pytest.fixture
def database_url(postgresql_url):
    return postgresql_url


def rows_examined(statements):
    """Rows every plan node of `statements` produced or filtered out, times its loops, from EXPLAIN
    ANALYZE run again in a transaction that is rolled back."""
    def walk(node):
        own = (node['Actual Rows'] + node.get('Rows Removed by Filter', 0)) * node['Actual Loops']
        return own + sum(walk(child) for child in node.get('Plans', ()))

    total = 0
    with db.engine.connect() as conn:
        for statement, parameters in statements:
            [[[plan]]] = conn.exec_driver_sql(f'EXPLAIN (ANALYZE, FORMAT JSON) {statement}', parameters).all()
            total += walk(plan['Plan'])
        conn.rollback()
    return total


def fill_send_log(sent, expired):
    """As a send does: every subscriber claimed, then all but `expired` of them sent."""
    db.session.execute(sa.insert(Client), [{'email': f'reader{n}@example.com'} for n in range(sent + expired)])
    ids = db.session.scalars(sa.select(Client.id).order_by(Client.id)).all()
    db.session.execute(sa.insert(Delivery), [
        {'client_id': client_id, 'mailing': 'week1', 'status': 'claimed', 'claimed_by': 'a dead run',
         'lease_until': utcnow() - timedelta(minutes=1)} for client_id in ids])
    db.session.commit()
    db.session.execute(sa.update(Delivery).where(Delivery.client_id.in_(ids[:sent]))
                       .values(status='sent', claimed_by=None, lease_until=None))
    db.session.commit()


def test_a_claim_reads_the_send_log_once_even_with_statistics_from_before_it_filled(app):
    sent, expired = 3000, 5
    with app.app_context():
        # A send log emptied (old mailings purged), then ANALYZEd as a send does at its start, then
        # filled by that send: the statistics say "no rows" over pages that are full again.
        fill_send_log(sent, expired)
        db.session.execute(sa.delete(Delivery))
        db.session.execute(sa.delete(Client))
        db.session.commit()
        db.session.execute(sa.text('ANALYZE clients, deliveries'))
        fill_send_log(sent, expired)
        statements = []
        sa.event.listen(db.engine, 'before_cursor_execute', lambda conn, cursor, statement, parameters, *args:
                        statements.append((statement, parameters)))

        claimed = claim(Delivery, Delivery.mailing == 'week1', Delivery.status == 'claimed',
                        owner='a live run', seconds=30, limit=10)

        assert len(claimed) == expired
        assert db.session.scalars(sa.select(Delivery.claimed_by).where(Delivery.id.in_(claimed))).all() == \
            ['a live run'] * expired
        work = rows_examined([s for s in statements if s[0].lstrip().upper().startswith(('SELECT', 'UPDATE'))])
    assert work < 3 * (sent + expired), f'{work} rows examined for a send log of {sent + expired}'
