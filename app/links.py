"""Signed links that go out in emails. Confirmation links expire; unsubscribe links never do, because
a subscriber may click one in a months-old email and must still be able to leave."""
import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit

from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer


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


def confirm_token(client):
    # The address is signed too, so a link cannot confirm a row that was later reused for another address.
    serializer = URLSafeTimedSerializer(current_app.config['SECRET_KEY'], salt='confirm')
    return serializer.dumps({'id': client.id, 'email': client.email})


def load_confirm_token(token):
    """:return: (client id, email).  :raise ExpiredLink, InvalidLink:"""
    serializer = URLSafeTimedSerializer(current_app.config['SECRET_KEY'], salt='confirm')
    try:
        data = serializer.loads(token, max_age=current_app.config['CONFIRM_MAX_AGE'])
    except SignatureExpired as exc:
        raise ExpiredLink('This confirmation link has expired.') from exc
    except BadSignature as exc:
        raise InvalidLink('This confirmation link is not valid.') from exc
    return data['id'], data['email']


def unsubscribe_token(client_id):
    return URLSafeSerializer(current_app.config['SECRET_KEY'], salt='unsubscribe').dumps(client_id)


def load_unsubscribe_token(token):
    """:return: the client id.  :raise InvalidLink:"""
    try:
        return URLSafeSerializer(current_app.config['SECRET_KEY'], salt='unsubscribe').loads(token)
    except BadSignature as exc:
        raise InvalidLink('This unsubscribe link is not valid.') from exc


def public_url(endpoint, **values):
    """An absolute URL under BASE_URL. Emails are built by cron and workers with no request to take a
    host from, and behind a proxy the request's host would be the wrong one anyway."""
    adapter = current_app.extensions.get('public_url_adapter')
    if adapter is None:
        base = urlsplit(current_app.config['BASE_URL'])
        adapter = current_app.url_map.bind(base.netloc, script_name=base.path or '/', url_scheme=base.scheme)
        current_app.extensions['public_url_adapter'] = adapter
    return adapter.build(endpoint, values, force_external=True)


def unsubscribe_url(client_id):
    return public_url('main.unsubscribe', token=unsubscribe_token(client_id))


def list_unsubscribe_headers(unsubscribe_link, client_id):
    """RFC 2369 List-Unsubscribe plus RFC 8058 one-click: Gmail and Yahoo require both of bulk senders."""
    targets = [f'<{unsubscribe_link}>']
    mailto = current_app.config.get('UNSUBSCRIBE_MAILTO')
    if mailto:
        targets.append(f'<mailto:{mailto}?subject={quote("unsubscribe " + unsubscribe_token(client_id))}>')
    return {
        'List-Unsubscribe': ', '.join(targets),
        'List-Unsubscribe-Post': 'List-Unsubscribe=One-Click',
    }
