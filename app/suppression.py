"""One suppression list, by address, applied to every mailing: the drip and broadcasts leave suppressed
addresses out when they look for whom a mailing is due (so a suppressed subscriber's claim is never
made), and sign-up sends them no confirmation. An address gets on it when its owner asks (the block link
in the confirmation email), when the provider reports a bounce, a drop for the address, a spam complaint or
an unsubscribe (app/webhooks.py), or when our relay refuses it for good SUPPRESS_AFTER_FAILURES times."""
import sqlalchemy as sa
from flask import current_app

from app.database import insert_ignoring_conflicts, utcnow
from app.extensions import db
from app.models import Client, Delivery, DeliveryStatus, Suppression, SuppressionReason


def not_suppressed():
    """A condition on Client: its address is not on the list."""
    return ~sa.exists(sa.select(Suppression.id).where(Suppression.email == sa.func.lower(Client.email))
                      .correlate_except(Suppression))  # its own look at the list, whatever the outer query joins


def is_suppressed(email):
    return db.session.scalar(sa.select(Suppression.id).where(Suppression.email == email.lower())) is not None


def suppress(email, reason, detail=None):
    """Put `email` on the list (once: the first reason stands), and take its subscriber off the drip.
    The caller commits."""
    db.session.execute(insert_ignoring_conflicts(Suppression, ['email']).values(
        email=email.lower(), reason=SuppressionReason(reason), detail=detail, created_at=utcnow()))
    db.session.execute(sa.update(Client).where(sa.func.lower(Client.email) == email.lower(), Client.active)
                       .values(active=False, unsubscribed_at=utcnow()).execution_options(synchronize_session=False))


def suppress_refused(emails):
    """After a send: of `emails` (refused for good in it), those our relay has now refused for good in
    SUPPRESS_AFTER_FAILURES mailings, each time saying the address itself is bad (an enhanced status
    5.1.x: no such mailbox, no such domain), go on the list.  :return: them.

    Only those: a relay that refuses every recipient for a reason of its own ("554 5.7.1 relay access
    denied") must not put the whole list on it, and --retry-failed must still reach them once it is fixed."""
    limit = current_app.config['SUPPRESS_AFTER_FAILURES']
    if not limit or not emails:
        return []
    counted = db.session.execute(
        sa.select(Client.email, sa.func.count(Delivery.id)).join(Delivery, Delivery.client_id == Client.id)
        .where(Client.email.in_(emails), Delivery.status == DeliveryStatus.FAILED,
               Delivery.error.like('%: 5__ 5.1.%'))
        .group_by(Client.email)).all()
    refused = [email for email, count in counted if count >= limit]
    for email in refused:
        suppress(email, SuppressionReason.REFUSED, f'refused for good in {limit} mailing(s)')
    db.session.commit()
    return refused
