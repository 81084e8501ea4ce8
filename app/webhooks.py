"""What mail providers tell us afterwards: SendGrid's Event Webhook (`POST /webhooks/sendgrid`).

A request counts only with a valid signature (ECDSA over the timestamp and the raw body, checked with the
`sendgrid` library's own helper against SENDGRID_WEBHOOK_PUBLIC_KEY) and a fresh timestamp (a recorded
request replayed later is refused); with no key configured, every request is refused. Events come in
batches and may be delivered again: each is acted on once, by its sg_event_id. A bounce, a drop for the
address, a spam report or an unsubscribe puts the address on the suppression list (app/suppression.py),
with why."""
import re
import time

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, request
from sendgrid.helpers.eventwebhook import EventWebhook, EventWebhookHeader

from app.addresses import MAX_EMAIL_LENGTH
from app.database import RowsParameter, built_once, insert_ignoring_conflicts, utcnow
from app.extensions import csrf, db
from app.models import SuppressionReason, WebhookEvent
from app.suppression import suppress_all

bp = Blueprint('webhooks', __name__, url_prefix='/webhooks')

SUPPRESSING = {'bounce': SuppressionReason.BOUNCED, 'dropped': None,  # by its reason: DROPPED_FOR_THE_ADDRESS
               'spamreport': SuppressionReason.COMPLAINED, 'unsubscribe': SuppressionReason.UNSUBSCRIBED,
               'group_unsubscribe': SuppressionReason.UNSUBSCRIBED}
# A drop is SendGrid sending nothing at all. Only these reasons say it was for the address (on one of
# SendGrid's own lists); the others are about the message ("Spam Content" from its spam checker, "Invalid
# SMTPAPI header"), and suppressing on them would take every reader of a mailing off the list for good.
DROPPED_FOR_THE_ADDRESS = {'bounced address': SuppressionReason.BOUNCED, 'invalid': SuppressionReason.BOUNCED,
                           'unsubscribed address': SuppressionReason.UNSUBSCRIBED,
                           'spam reporting address': SuppressionReason.COMPLAINED}
DIGITS = re.compile(r'[0-9]{1,12}')  # a Unix time, as int() reads it


def init_app(app):
    """Say no at start-up to a verification key that cannot be read, not at the provider's first call."""
    key = app.config['SENDGRID_WEBHOOK_PUBLIC_KEY']
    try:
        app.extensions['sendgrid_webhook_key'] = EventWebhook().convert_public_key_to_ecdsa(key) if key else None
    except ValueError as exc:
        raise ValueError('SENDGRID_WEBHOOK_PUBLIC_KEY is not a public key (paste the verification key from '
                         "SendGrid's Mail Settings, Signed Event Webhook)") from exc


@bp.route('/sendgrid', methods=['POST'])
@csrf.exempt  # SendGrid signs its requests instead
def sendgrid_events():
    """:raise 403: no key configured, a missing or wrong signature, a stale timestamp.  :raise 400: not
    a batch of events."""
    _verify(request)
    events = request.get_json(silent=True)
    if not isinstance(events, list) or not all(isinstance(event, dict) for event in events):
        abort(400, 'Expected a JSON array of events.')
    wanted = {}  # the events that may suppress, by id; an id twice in the batch is one event
    for event in events:
        kind, email, event_id = _text(event.get('event')), _text(event.get('email')), _text(event.get('sg_event_id'))
        if kind in SUPPRESSING and email and len(email.lower()) <= MAX_EMAIL_LENGTH and event_id:  # as it is stored
            wanted.setdefault(event_id[:100], event)
    acting = [(event, reason) for event in _first_time(wanted) if (reason := _suppressing(event))]
    suppress_all((event['email'], reason, _detail(event)) for event, reason in acting)
    db.session.commit()
    return {'received': len(events), 'suppressed': len(acting)}


def _suppressing(event):
    """:return: why `event` puts its address on the suppression list, or None."""
    if event['event'] == 'bounce' and event.get('type') == 'blocked':
        return None  # refused for now (a block), not an address that does not exist
    if event['event'] == 'dropped':
        return DROPPED_FOR_THE_ADDRESS.get(str(event.get('reason') or '').strip().lower())
    return SUPPRESSING[event['event']]


def _detail(event):
    return _storable(f"SendGrid {event['event']}: {event.get('reason') or ''}").strip()


def _text(value):
    """`value` if it is a string a database can store, else None."""
    return value if isinstance(value, str) and value and _storable(value) == value else None


def _storable(text):
    """`text` as a database can store it: PostgreSQL's text refuses a NUL, and a lone surrogate (which
    JSON's "\\ud800" makes) has no UTF-8 for either database."""
    return text.replace('\x00', '').encode('utf-8', 'replace').decode()


def _verify(request):
    key = current_app.extensions['sendgrid_webhook_key']
    signature = request.headers.get(EventWebhookHeader.SIGNATURE, '')
    timestamp = request.headers.get(EventWebhookHeader.TIMESTAMP, '')
    if key is None or not signature or not DIGITS.fullmatch(timestamp):  # not isdigit(): '²' is a digit to it
        abort(403)
    if abs(time.time() - int(timestamp)) > current_app.config['WEBHOOK_MAX_AGE']:
        abort(403)
    try:
        valid = EventWebhook().verify_signature(request.get_data(as_text=False).decode(), signature, timestamp, key)
    except (ValueError, UnicodeDecodeError):  # not base64, not text
        valid = False
    if not valid:
        abort(403)


def _first_time(events):
    """Record `events` (by id), in one statement however many.  :return: those recorded before now
    left out (a replay), in their order."""
    if not events:
        return []
    recorded, insert = built_once('webhook: record events', _recording)
    rows = [(event_id, event['event'][:30]) for event_id, event in events.items()]
    new = set(db.session.scalars(insert, {**recorded.params(rows), 'now': utcnow()}))
    return [event for event_id, event in events.items() if event_id in new]


def _recording():
    recorded, table = RowsParameter('recorded', id=sa.String, event=sa.String), WebhookEvent.__table__
    rows = sa.select(recorded.c.id, recorded.c.event, sa.bindparam('now', type_=sa.DateTime)).where(sa.true())
    return recorded, (insert_ignoring_conflicts(table, ['id']).from_select(['id', 'event', 'received_at'], rows)
                      .returning(table.c.id))
