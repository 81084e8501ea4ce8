"""Taking over a dead run's claims on PostgreSQL, where the planner's statistics can be far behind the
table: a send ANALYZEs at its start, then fills the send log, then takes over dead runs at its end."""
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.database import utcnow
from app.drip import DripStage
from app.extensions import db
from app.models import Client, Delivery, SendRun
from app.sendlog import SendLog


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


def fill_send_log(sent, left_behind):
    """As a send does: every subscriber claimed, then all but `left_behind` of them sent; those are held
    by a run that died, two of them in the group it was sending."""
    db.session.execute(sa.insert(Client), [{'email': f'reader{n}@example.com', 'email_confirmed_at': utcnow()}
                                           for n in range(sent + left_behind)])
    ids = db.session.scalars(sa.select(Client.id).order_by(Client.id)).all()
    db.session.execute(sa.insert(Delivery), [{'client_id': client_id, 'mailing': 'week1', 'status': 'claimed',
                                              'claimed_by': 'a dead run'} for client_id in ids])
    db.session.commit()
    db.session.execute(sa.update(Delivery).where(Delivery.client_id.in_(ids[:sent]))
                       .values(status='sent', claimed_by=None))
    sending = db.session.scalars(sa.select(Delivery.id).where(Delivery.status == 'claimed')
                                 .order_by(Delivery.id).limit(2)).all()
    db.session.add(SendRun(mailing='week1', trigger='cli', via='SMTP', owner='a dead run', sending=sending,
                           lease_until=utcnow() - timedelta(minutes=1)))
    db.session.commit()


def test_a_take_over_reads_the_send_log_once_even_with_statistics_from_before_it_filled(app):
    sent, left_behind = 3000, 5
    with app.app_context():
        # A send log emptied (old mailings purged), then ANALYZEd as a send does at its start, then
        # filled by that send: the statistics say "no rows" over pages that are full again.
        fill_send_log(sent, left_behind)
        for model in (SendRun, Delivery, Client):
            db.session.execute(sa.delete(model))
        db.session.commit()
        db.session.execute(sa.text('ANALYZE clients, deliveries, send_runs'))
        fill_send_log(sent, left_behind)
        log = SendLog(DripStage('week1'))
        log.start('cli', 'SMTP')
        statements = []
        sa.event.listen(db.engine, 'before_cursor_execute', lambda conn, cursor, statement, parameters, *args:
                        statements.append((statement, parameters)))

        found = log.take_over()

        assert (len(found.claimed), len(found.unknown)) == (left_behind - 2, 2)
        work = rows_examined([s for s in statements if s[0].lstrip().upper().startswith(('SELECT', 'UPDATE'))])
    assert work < 4 * (sent + left_behind), f'{work} rows examined for a send log of {sent + left_behind}'
