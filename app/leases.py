"""Leases: how several processes (cron runs, web processes, workers, on one machine or many) share work
with nothing but the database between them. A row is claimed by writing an owner token and an expiry
into it with one conditional UPDATE, which only one process can win; a row whose lease has run out is
free again, so the work of a process that died is picked up by another instead of being stuck forever."""
import secrets
from datetime import timedelta

import sqlalchemy as sa

from app import db
from app.models import utcnow


def new_owner():
    return secrets.token_hex(16)


def lease_end(seconds):
    return utcnow() + timedelta(seconds=seconds)


def claim(model, *conditions, owner, seconds, limit):
    """Claim up to `limit` rows matching `conditions` whose lease is free, oldest first, and commit.
    :return: the ids claimed."""
    now = utcnow()
    free = sa.or_(model.lease_until.is_(None), model.lease_until < now)
    # Two statements, not UPDATE ... WHERE id IN (SELECT ... FOR UPDATE): PostgreSQL cannot flatten a
    # locking subquery, and with statistics from before a send filled the table (an ANALYZE at its
    # start) it ran that subquery once per row: 6 seconds at 3,000 rows, growing with the square.
    # SKIP LOCKED lets PostgreSQL workers pass over rows another worker is claiming right now; the
    # repeated `free` test in the UPDATE is what makes the claim safe (SQLite serialises writers anyway).
    candidates = db.session.scalars(
        sa.select(model.id).where(*conditions, free).order_by(model.id).limit(limit)
        .with_for_update(skip_locked=True)).all()
    ids = db.session.scalars(
        sa.update(model).where(model.id.in_(candidates), free)
        .values(claimed_by=owner, lease_until=lease_end(seconds)).returning(model.id)
        .execution_options(synchronize_session=False)).all() if candidates else []
    db.session.commit()
    return sorted(ids)


def renew(model, *conditions, owner, seconds, **values):
    """Push back the expiry of every lease `owner` holds on rows matching `conditions` (and set
    `values`), and commit.  :return: how many rows `owner` still holds."""
    held = db.session.execute(
        sa.update(model).where(model.claimed_by == owner, *conditions)
        .values(lease_until=lease_end(seconds), **values).execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    return held
