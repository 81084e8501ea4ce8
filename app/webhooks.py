"""What mail providers tell us afterwards: SendGrid's Event Webhook (`POST /webhooks/sendgrid`).

A request counts only with a valid signature (ECDSA over the timestamp and the raw body, checked with the
`sendgrid` library's own helper against SENDGRID_WEBHOOK_PUBLIC_KEY) and a fresh timestamp (a recorded
request replayed later is refused); with no key configured, every request is refused. Events come in
batches and may be delivered again: each is acted on once, by its sg_event_id. A bounce, a drop for the
address, a spam report or an unsubscribe puts the address on the suppression list (app/suppression.py),
with why."""
import re
import time

from flask import Blueprint, abort, current_app, request
from sendgrid.helpers.eventwebhook import EventWebhook, EventWebhookHeader

from app.database import insert_ignoring_conflicts, utcnow
from app.extensions import csrf, db
from app.models import SuppressionReason, WebhookEvent
from app.suppression import suppress

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
    acted = 0
    for event in events:
        kind, email, event_id = _text(event.get('event')), _text(event.get('email')), _text(event.get('sg_event_id'))
        if not (kind in SUPPRESSING and email and event_id) or not _first_time(event_id, event):
            continue
        if not (reason := _suppressing(event)):
            continue
        detail = f"SendGrid {event['event']}: {event.get('reason') or ''}".replace('\x00', '').strip()
        suppress(email, reason, detail)
        acted += 1
    db.session.commit()
    return {'received': len(events), 'suppressed': acted}


def _suppressing(event):
    """:return: why `event` puts its address on the suppression list, or None."""
    if event['event'] == 'bounce' and event.get('type') == 'blocked':
        return None  # refused for now (a block), not an address that does not exist
    if event['event'] == 'dropped':
        return DROPPED_FOR_THE_ADDRESS.get(str(event.get('reason') or '').strip().lower())
    return SUPPRESSING[event['event']]


def _text(value):
    """`value` if it is a string a database can store (PostgreSQL refuses NUL in text), else None."""
    return value if isinstance(value, str) and value and '\x00' not in value else None


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


def _first_time(event_id, event):
    """Record the event; False if it was recorded before (a replay)."""
    return db.session.execute(insert_ignoring_conflicts(WebhookEvent, ['id']).values(
        id=event_id[:100], event=str(event.get('event'))[:30], received_at=utcnow()).returning(WebhookEvent.id)
    ).first() is not None
