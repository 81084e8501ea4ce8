"""Signed links that go out in emails. Confirmation links expire; unsubscribe links never do, because
a subscriber may click one in a months-old email and must still be able to leave."""
import secrets
from datetime import timezone
from pathlib import Path
from urllib.parse import quote, urlsplit

from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

from app.mailing import address_digest
from app.security import signing_keys


def init_app(app):
    """Without a SECRET_KEY set, the app keeps one of its own in its instance folder."""
    if not app.config['SECRET_KEY']:
        app.config['SECRET_KEY'] = _instance_secret_key(app)


def _instance_secret_key(app):
    """Links in emails are signed with SECRET_KEY, so the key must survive restarts and be the same for
    the web process and cron; a fresh random key per process would break every link already sent."""
    path = Path(app.instance_path) / 'secret_key'
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


class InvalidLink(Exception):
    """The token was forged, tampered with or truncated."""


class ExpiredLink(InvalidLink):
    """A genuine confirmation link, but older than CONFIRM_MAX_AGE."""


def serializer(salt, timed=False):
    """Signs with SECRET_KEY; verifies with it and SECRET_KEY_FALLBACKS (app/security.py)."""
    return (URLSafeTimedSerializer if timed else URLSafeSerializer)(signing_keys(current_app.config), salt=salt)


def confirm_token(client):
    # The address is signed too, so a link cannot confirm a row that was later reused for another address.
    return serializer('confirm', timed=True).dumps({'id': client.id, 'email': client.email})


def load_confirm_token(token):
    """:return: (client id, email, when the link was made, naive UTC).  :raise ExpiredLink, InvalidLink:"""
    try:
        data, made = serializer('confirm', timed=True).loads(token, max_age=current_app.config['CONFIRM_MAX_AGE'],
                                                             return_timestamp=True)
    except SignatureExpired as exc:
        raise ExpiredLink('This confirmation link has expired.') from exc
    except BadSignature as exc:
        raise InvalidLink('This confirmation link is not valid.') from exc
    return data['id'], data['email'], made.astimezone(timezone.utc).replace(tzinfo=None)


def unsubscribe_token(client_id, email):
    """Bound to the address too: a subscriber row reused for another address does not take an old link."""
    return serializer('unsubscribe').dumps([client_id, address_digest(email)])


def load_unsubscribe_token(token):
    """:return: (client id, digest of the address it was made for; None for a link made before links
    named their address, which must keep working).  :raise InvalidLink:"""
    try:
        data = serializer('unsubscribe').loads(token)
    except BadSignature as exc:
        raise InvalidLink('This unsubscribe link is not valid.') from exc
    if isinstance(data, int):
        return data, None
    if isinstance(data, list) and len(data) == 2 and isinstance(data[0], int):
        return data[0], data[1]
    raise InvalidLink('This unsubscribe link is not valid.')


def block_url(email):
    """The confirmation email's "never email this address again" link (for a stranger's sign-up)."""
    return public_url('main.block', token=serializer('block').dumps(email))


def load_block_token(token):
    """:return: the address.  :raise InvalidLink:"""
    try:
        email = serializer('block').loads(token)
    except BadSignature as exc:
        raise InvalidLink('This link is not valid.') from exc
    if not isinstance(email, str):
        raise InvalidLink('This link is not valid.')
    return email


def public_url(endpoint, **values):
    """An absolute URL under BASE_URL. Emails are built by cron and workers with no request to take a
    host from, and behind a proxy the request's host would be the wrong one anyway."""
    adapter = current_app.extensions.get('public_url_adapter')
    if adapter is None:
        base = urlsplit(current_app.config['BASE_URL'])
        adapter = current_app.url_map.bind(base.netloc, script_name=base.path or '/', url_scheme=base.scheme)
        current_app.extensions['public_url_adapter'] = adapter
    return adapter.build(endpoint, values, force_external=True)


def unsubscribe_url(client_id, email):
    return public_url('main.unsubscribe', token=unsubscribe_token(client_id, email))


def list_unsubscribe_headers(unsubscribe_link, client_id, email):
    """RFC 2369 List-Unsubscribe plus RFC 8058 one-click: Gmail and Yahoo require both of bulk senders."""
    targets = [f'<{unsubscribe_link}>']
    mailto = current_app.config.get('UNSUBSCRIBE_MAILTO')
    if mailto:
        targets.append(f'<mailto:{mailto}?subject={quote("unsubscribe " + unsubscribe_token(client_id, email))}>')
    return {
        'List-Unsubscribe': ', '.join(targets),
        'List-Unsubscribe-Post': 'List-Unsubscribe=One-Click',
    }
