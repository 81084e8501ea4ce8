"""One suppression list, by address, applied to every mailing: the drip and broadcasts leave suppressed
addresses out when they look for whom a mailing is due (so a suppressed subscriber's claim is never
made), and sign-up sends them no confirmation. An address gets on it when its owner asks (the block link
in the confirmation email), when the provider reports a bounce, a drop for the address, a spam complaint or
an unsubscribe (app/webhooks.py), or when our relay refuses it for good SUPPRESS_AFTER_FAILURES times."""
import re
from collections import Counter

import sqlalchemy as sa
from flask import current_app

from app.database import RowsParameter, among, built_once, insert_ignoring_conflicts, utcnow
from app.extensions import db
from app.models import Client, Delivery, DeliveryStatus, Suppression, SuppressionReason


def not_suppressed():
    """A condition on Client: its address is not on the list."""
    return ~sa.exists(sa.select(Suppression.id).where(Suppression.email == sa.func.lower(Client.email))
                      .correlate_except(Suppression))  # its own look at the list, whatever the outer query joins


def is_suppressed(email):
    return db.session.scalar(sa.select(Suppression.id).where(Suppression.email == email.lower())) is not None


def reasons_among(addresses):
    """{address: why it is on the list} of those of `addresses` (lower-case) that are: in one query, for a
    batch of them (an import's chunk)."""
    if not addresses:
        return {}
    return dict(db.session.execute(sa.select(Suppression.email, Suppression.reason).where(
        among(Suppression.email, 'addresses')), {'addresses': addresses}).all())


def suppress(email, reason, detail=None):
    """Put `email` on the list (once: the first reason stands), and take its subscriber off the drip.
    The caller commits."""
    suppress_all([(email, reason, detail)])


def suppress_all(entries):
    """Put each (email, reason, detail) of `entries` on the list, once: an address's first reason stands,
    an earlier entry's within `entries` too. Their subscribers leave the drip. Two statements however many
    entries: a webhook batch of thousands of bounces is answered within SendGrid's patience even with the
    database a round trip away (bench/webhook.py). The caller commits."""
    first = {}
    for email, reason, detail in entries:
        first.setdefault(email.lower(), (email.lower(), SuppressionReason(reason), detail))
    if not first:
        return
    listed, insert, leave = built_once('suppress', _listing_statements)
    params = {**listed.params(list(first.values())), 'now': utcnow()}
    db.session.execute(insert, params)
    db.session.execute(leave, params)


def _listing_statements():
    listed = RowsParameter('listed', email=sa.String, reason=sa.String, detail=sa.Text)
    now = sa.bindparam('now', type_=sa.DateTime)
    rows = sa.select(listed.c.email, listed.c.reason, listed.c.detail, now).where(sa.true())
    insert = insert_ignoring_conflicts(Suppression.__table__, ['email']).from_select(
        ['email', 'reason', 'detail', 'created_at'], rows)
    clients = Client.__table__
    leave = (sa.update(clients).where(listed.holds(sa.func.lower(clients.c.email), 'email'), clients.c.active)
             .values(active=False, unsubscribed_at=now))
    return listed, insert, leave


# RFC 3463's statuses saying the recipient's address is bad (5.1.1 no such mailbox, 5.1.2 no such domain,
# 5.1.3 its syntax, 5.1.6 moved, 5.1.10 null MX), in the error as a send records it ("address: 550 5.1.1 ...").
# Not 5.1.7 and 5.1.8, our sender's address, nor 5.1.0, which Postfix answers at RCPT for the sender too.
BAD_RECIPIENT = re.compile(r': 5\d\d 5\.1\.(1|2|3|6|10)\b')


def suppress_refused(emails):
    """After a send: of `emails` (refused for good in it), those our relay has now refused for good in
    SUPPRESS_AFTER_FAILURES mailings, each time saying the address itself is bad (an enhanced status
    5.1.x: no such mailbox, no such domain: BAD_RECIPIENT), go on the list.  :return: them.

    Only those: a relay that refuses every recipient for a reason of its own ("554 5.7.1 relay access
    denied") must not put the whole list on it, and --retry-failed must still reach them once it is fixed."""
    limit = current_app.config['SUPPRESS_AFTER_FAILURES']
    if not limit or not emails:
        return []
    failures = db.session.execute(
        sa.select(Client.email, Delivery.error).join(Delivery, Delivery.client_id == Client.id)
        .where(Client.email.in_(emails), Delivery.status == DeliveryStatus.FAILED,
               Delivery.error.like('%: 5__ 5.1.%'))).all()
    counted = Counter(email for email, error in failures if BAD_RECIPIENT.search(error))
    refused = [email for email, count in counted.items() if count >= limit]
    suppress_all((email, SuppressionReason.REFUSED, f'refused for good in {limit} mailing(s)') for email in refused)
    db.session.commit()
    return refused
