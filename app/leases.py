"""Leases: how several processes (cron runs, web processes, workers, on one machine or many) share work
with nothing but the database between them. A row is claimed by writing an owner token and an expiry
into it with one conditional UPDATE, which only one process can win; a row whose lease has run out is
free again, so the work of a process that died is picked up by another instead of being stuck forever.

Expiry is written and compared on the database's clock (db_now), never on a machine's own: a worker
whose clock runs a few minutes ahead would otherwise see every live lease as run out, and take over
work that is still being done."""
import logging
import secrets
import threading

import sqlalchemy as sa
from flask import current_app

from app.extensions import db

log = logging.getLogger(__name__)

# SQLite's %f is "SS.SSS"; the three zeros make the six digits of a fraction that SQLAlchemy reads back.
_SQLITE_NOW = '%Y-%m-%d %H:%M:%f000'


def new_owner():
    return secrets.token_hex(16)


def db_now():
    """The database's current time, as naive UTC (how every time is stored), as an SQL expression."""
    if db.engine.dialect.name == 'postgresql':
        return sa.type_coerce(sa.func.timezone('UTC', sa.func.statement_timestamp()), sa.DateTime)
    return sa.type_coerce(sa.func.strftime(_SQLITE_NOW, 'now'), sa.DateTime)


def db_later(seconds):
    """`seconds` (a number, or an SQL expression of one) after db_now(), as an SQL expression."""
    if not isinstance(seconds, sa.ColumnElement):
        seconds = sa.bindparam(None, float(seconds), sa.Float)
    if db.engine.dialect.name == 'postgresql':
        interval = sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)
        return sa.type_coerce(sa.func.timezone('UTC', sa.func.statement_timestamp()) + interval, sa.DateTime)
    return sa.type_coerce(sa.func.strftime(_SQLITE_NOW, 'now', sa.func.printf('%+f seconds', seconds)), sa.DateTime)


def lease_is_free(model):
    return sa.or_(model.lease_until.is_(None), model.lease_until < db_now())


def claim(model, *conditions, owner, seconds, limit, values=None):
    """Claim up to `limit` rows matching `conditions` whose lease is free, oldest first (setting `values`
    on them too), and commit.  :return: the ids claimed."""
    free = lease_is_free(model)
    # Two statements, not UPDATE ... WHERE id IN (SELECT ... FOR UPDATE): PostgreSQL cannot flatten a
    # locking subquery, and with statistics from before a send filled the table (an ANALYZE at its
    # start) it ran that subquery once per row, a cost growing with the square of the rows.
    # SKIP LOCKED lets PostgreSQL workers pass over rows another worker is claiming right now; the
    # repeated `free` test in the UPDATE is what makes the claim safe (SQLite serialises writers anyway).
    candidates = db.session.scalars(
        sa.select(model.id).where(*conditions, free).order_by(model.id).limit(limit)
        .with_for_update(skip_locked=True)).all()
    ids = db.session.scalars(
        sa.update(model).where(model.id.in_(candidates), *conditions, free)
        .values(claimed_by=owner, lease_until=db_later(seconds), **(values or {})).returning(model.id)
        .execution_options(synchronize_session=False)).all() if candidates else []
    db.session.commit()
    return sorted(ids)


def renew(model, *conditions, owner, seconds, **values):
    """Push back the expiry of every lease `owner` holds on rows matching `conditions` (and set
    `values`), and commit.  :return: how many rows `owner` still holds."""
    held = db.session.execute(
        sa.update(model).where(model.claimed_by == owner, *conditions)
        .values(lease_until=db_later(seconds), **values).execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    return held


class Heartbeat:
    """Calls `beat()` every `every` seconds, on a thread and in an app context of its own, from entering
    the `with` block to leaving it (or until `beat()` returns False): a lease it keeps never waits on
    whatever the work itself is waiting on (a slow SMTP server, a long back-off). A database hiccup is
    logged and tried again at the next beat, well within the lease."""

    def __init__(self, beat, every, name):
        self.app = current_app._get_current_object()
        self.beat, self.every = beat, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.thread.join()

    def _run(self):
        while not self.stopped.wait(self.every):
            with self.app.app_context():
                try:
                    if self.beat() is False:
                        return
                except sa.exc.DBAPIError:
                    db.session.rollback()
                    log.exception('%s: could not renew its lease; trying again at the next beat', self.thread.name)
