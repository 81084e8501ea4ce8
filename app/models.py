"""The database tables: subscribers, the per-subscriber send log of the drip, and the outbox."""
import re
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy import orm as so

from app import db


def utcnow():
    """Naive UTC everywhere: SQLite keeps no time zone, and mixing aware and naive values breaks comparisons."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def greeting_name(email):
    """'jane.doe+news@example.com' -> 'Jane Doe', 'john.smith1990@' -> 'John Smith'; an address with no
    letters before the @ gets 'there'."""
    local = email.split('@', 1)[0].split('+', 1)[0]
    words = [word for word in re.split(r'[\W\d_]+', local) if word]
    return ' '.join(word.capitalize() for word in words) or 'there'


class Client(db.Model):
    """A subscriber. `num_newsletter` is the last drip stage received (0 when new)."""
    __tablename__ = 'clients'
    __table_args__ = (sa.Index('ix_clients_drip', 'num_newsletter', 'id'),)

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    email: so.Mapped[str] = so.mapped_column(sa.String(254), unique=True)
    active: so.Mapped[bool] = so.mapped_column(default=True)
    num_newsletter: so.Mapped[int] = so.mapped_column(default=0)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    email_confirmed_at: so.Mapped[datetime | None]
    unsubscribed_at: so.Mapped[datetime | None]

    @property
    def greeting_name(self):
        return greeting_name(self.email)

    def __repr__(self):
        return f'<Client {self.id} {self.email}>'


class Delivery(db.Model):
    """One row per subscriber and drip stage, and the guard that makes the drip send at most once:
    the unique (client_id, stage) pair is claimed *before* the message goes out. While `status` is
    'sending' the claim belongs to `claimed_by` until `lease_until`; after that another run may take
    it over (the first one died)."""
    __tablename__ = 'deliveries'
    __table_args__ = (
        sa.UniqueConstraint('client_id', 'stage', name='uq_deliveries_client_stage'),
        # Only claims in flight are indexed by stage: a full (stage) index tempts PostgreSQL, with stale
        # statistics, into rescanning a stage's whole send log for every subscriber it checks.
        sa.Index('ix_deliveries_in_flight', 'stage', postgresql_where=sa.text("status = 'sending'"),
                 sqlite_where=sa.text("status = 'sending'")),
    )

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    client_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey('clients.id', ondelete='CASCADE'))
    stage: so.Mapped[int]
    status: so.Mapped[str] = so.mapped_column(sa.String(10))  # sending, sent, failed
    claimed_by: so.Mapped[str | None] = so.mapped_column(sa.String(32))
    lease_until: so.Mapped[datetime | None]
    attempts: so.Mapped[int] = so.mapped_column(default=1)
    message_id: so.Mapped[str | None] = so.mapped_column(sa.String(255))
    error: so.Mapped[str | None] = so.mapped_column(sa.Text)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    sent_at: so.Mapped[datetime | None]

    client: so.Mapped[Client] = so.relationship()


class OutboxEmail(db.Model):
    """An email the app has accepted (confirmation, admin notice). Written in the same transaction as
    the change that caused it, so it exists exactly when that change does; the outbox worker delivers it."""
    __tablename__ = 'outbox'
    __table_args__ = (sa.Index('ix_outbox_due', 'status', 'next_attempt_at'),)

    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    recipient: so.Mapped[str] = so.mapped_column(sa.String(254))
    subject: so.Mapped[str] = so.mapped_column(sa.String(255))
    text: so.Mapped[str] = so.mapped_column(sa.Text)
    html: so.Mapped[str] = so.mapped_column(sa.Text)
    headers: so.Mapped[dict] = so.mapped_column(sa.JSON, default=dict)
    message_id: so.Mapped[str] = so.mapped_column(sa.String(255))
    status: so.Mapped[str] = so.mapped_column(sa.String(10), default='pending')  # pending, sent, failed
    attempts: so.Mapped[int] = so.mapped_column(default=0)
    next_attempt_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    claimed_by: so.Mapped[str | None] = so.mapped_column(sa.String(32))
    lease_until: so.Mapped[datetime | None]
    last_error: so.Mapped[str | None] = so.mapped_column(sa.Text)
    created_at: so.Mapped[datetime] = so.mapped_column(default=utcnow)
    sent_at: so.Mapped[datetime | None]
