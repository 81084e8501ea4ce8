"""Leases: how several processes (cron runs, web processes, workers, on one machine or many) share work
with nothing but the database between them. A row is claimed by writing an owner token and an expiry
into it with one conditional UPDATE, which only one process can win; a row whose lease has run out is
free again, so the work of a process that died is picked up by another instead of being stuck forever.

Expiry is written and compared on the database's clock (db_now), never on a machine's own: a worker
whose clock runs a few minutes ahead would otherwise see every live lease as run out, and take over
work that is still being done."""
import logging
import os
import queue
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
    """`model`: a mapped class, or a table's columns (`Job.__table__.c`)."""
    return sa.or_(model.lease_until.is_(None), model.lease_until < db_now())


class Claim:
    """Claims up to `limit` rows of `model`'s table matching `conditions` whose lease is free, first by
    `order_by` (the id by default), setting `values` on them too, and commits: `claim(owner=..., seconds=...,
    **params)` returns the rows claimed, by id, each its id and then the `returning` columns, where `params`
    are the values of the bind parameters in `conditions` and `values`.

    Built once and called for every claim (a worker's queue, claimed from after every job), on the table
    rather than the mapped class: built anew each time, or run through the ORM's bulk update, the two
    statements cost SQLAlchemy several times what the database took to run them (bench/signups.py)."""

    def __init__(self, model, *conditions, limit, order_by=None, values=None, returning=()):
        table = model.__table__
        free = lease_is_free(table.c)
        due = (sa.select(table.c.id).where(*conditions, free)
               .order_by(table.c.id if order_by is None else order_by).limit(limit))
        self.two_steps = db.engine.dialect.name == 'postgresql'
        if self.two_steps:
            # Two statements, not UPDATE ... WHERE id IN (SELECT ... FOR UPDATE): PostgreSQL cannot flatten a
            # locking subquery, and with statistics from before a send filled the table (an ANALYZE at its
            # start) it ran that subquery once per row, a cost growing with the square of the rows.
            # SKIP LOCKED lets PostgreSQL workers pass over rows another worker is claiming right now; the
            # repeated `free` test in the UPDATE is what makes the claim safe.
            self.candidates = due.with_for_update(skip_locked=True)
            chosen = [table.c.id.in_(sa.bindparam('claim_ids', expanding=True)), *conditions, free]
        else:
            # One statement: SQLite runs it under its one write lock, so processes claiming at once each get
            # other rows (in two, they all read the same oldest row, and all but one claimed nothing), and
            # the conditions need no second test. Repeated, they made SQLite walk every row they match.
            chosen = [table.c.id.in_(due.scalar_subquery())]
        self.update = (sa.update(table).where(*chosen)
                       .values(claimed_by=sa.bindparam('claim_owner'),
                               lease_until=db_later(sa.bindparam('claim_seconds', type_=sa.Float)), **(values or {}))
                       .returning(table.c.id, *returning))

    def __call__(self, owner, seconds, **params):
        params, rows = {**params, 'claim_owner': owner, 'claim_seconds': float(seconds)}, []
        if self.two_steps:
            params['claim_ids'] = db.session.scalars(self.candidates, params).all()
        if not self.two_steps or params['claim_ids']:
            rows = db.session.execute(self.update, params).all()
        db.session.commit()
        return sorted(rows, key=lambda row: row[0])


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
    whatever the work itself is waiting on (a slow SMTP server, a long back-off). A beat that fails, however
    (the database gone, every connection of the pool busy), is logged and tried again at the next beat, well
    within the lease: a heartbeat that ended on it would let the lease run out under work still going on."""

    def __init__(self, beat, every, name):
        self.app = current_app._get_current_object()
        self.beat, self.every, self.name = beat, every, name
        self.stopped, self.ended = threading.Event(), threading.Event()

    def __enter__(self):
        _BeatingThread.take().assigned.put(self)
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.ended.wait()  # no beat after the block: it may be what records the work's end

    def _run(self):
        while not self.stopped.wait(self.every):
            try:
                with self.app.app_context():  # whose end removes its session, after a failure too
                    if self.beat() is False:
                        return
            except Exception:
                log.exception('%s: could not renew its lease; trying again at the next beat', self.name)


class _BeatingThread:
    """A thread that runs heartbeats, one at a time, and waits for the next once one ends: a thread of its
    own for each heartbeat still, but not a new one for each. Starting a thread for every job cost about
    100 us of CPU and a switch of threads, where a sign-up's whole confirmation email costs about 1.5 ms
    (bench/signups.py); handing the heartbeat to a waiting thread costs about 20 us."""

    idle, lock = [], threading.Lock()

    def __init__(self):
        self.assigned = queue.SimpleQueue()
        threading.Thread(target=self._serve, name='heartbeat', daemon=True).start()

    @classmethod
    def take(cls):
        with cls.lock:
            return cls.idle.pop() if cls.idle else cls()

    def _serve(self):
        while True:
            heartbeat = self.assigned.get()
            try:
                heartbeat._run()
            finally:
                with self.lock:
                    self.idle.append(self)
                heartbeat.ended.set()


def _forked():
    """A forked child (a gunicorn worker) has none of its parent's threads, and a lock that one of them
    held stays held."""
    _BeatingThread.idle, _BeatingThread.lock = [], threading.Lock()


os.register_at_fork(after_in_child=_forked)
