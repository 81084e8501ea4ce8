"""What every answer carries so that a browser holds the app to its own rules: cookies that travel only
where they should (Secure once BASE_URL is https, HttpOnly, SameSite=Lax), an admin session that ends
(ADMIN_SESSION_HOURS, and at logout: app/admin/auth.py), and headers that forbid what the app never
does: scripts, framing by other sites, guessing content types, leaking its links' tokens in a Referer.

And the key every link and session is signed with: a deployment must set its own SECRET_KEY (a key
generated into the instance folder would differ between machines, and a known one lets anyone forge an
admin session); SECRET_KEY_FALLBACKS keeps links signed with an earlier key working while it is rotated.

And one rule for every query string: no NUL character, which no address or search needs and which
PostgreSQL's text refuses (a search holding one was a 500 there); and one for every id in a URL (RowId).
Forms check their own fields (app/admin/forms.py): read here, a form would be parsed before a view could
raise its body limit."""
from datetime import timedelta

from flask import abort, request
from werkzeug.routing import IntegerConverter

from app.database import LARGEST_INTEGER
from app.transports import looks_deployed

# Styles are inline in the page templates, scripts only the app's own files (the admin pages' live
# progress); nothing else is allowed to load or run. A broadcast's preview (an iframe with `srcdoc`,
# sandboxed) shows its images from anywhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
                           "img-src 'self' data: https:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    'Content-Security-Policy': CONTENT_SECURITY_POLICY,
    'X-Frame-Options': 'DENY',
    'X-Content-Type-Options': 'nosniff',
    # Confirmation, unsubscribe and sign-in links carry their token: no other site is told the page's
    # address. The app's own pages are, and must be: over https, Flask-WTF refuses a form whose Referer is
    # not this site (WTF_CSRF_SSL_STRICT), so no-referrer failed every form over https.
    'Referrer-Policy': 'same-origin',
}
# Keys no deployment may sign with: the empty one, and those that examples and tutorials print.
KNOWN_KEYS = {'', 'change-me', 'changeme', 'secret', 'dev', 'development', 'you-will-never-guess', 'test'}
SHORTEST_KEY = 16
# A request body is refused above MAX_CONTENT_LENGTH before anything reads it, but at these endpoints above
# the setting named: a broadcast's HTML may be long, and so may SendGrid's batch of events.
LARGER_BODIES = {'admin.new_broadcast': 'BROADCAST_MAX_BYTES', 'webhooks.sendgrid_events': 'WEBHOOK_MAX_BYTES'}


class RowId(IntegerConverter):
    """What `<int:...>` means in this app's URLs, all of them ids: ASCII digits (Werkzeug's own takes any
    Unicode digit, and '١' was id 1), at most what an integer column holds (past it the database refused
    the query: a 500). Anything else matches no page: a 404."""
    regex = r'[0-9]+'

    def __init__(self, map, *args, **kwargs):
        super().__init__(map, *args, **{'max': LARGEST_INTEGER, **kwargs})


def init_app(app):
    """Before the blueprints are registered: their routes take RowId."""
    config = app.config
    check_secret_key(config)
    app.url_map.converters['int'] = RowId
    https = config['BASE_URL'].startswith('https://')
    config.update(SESSION_COOKIE_SECURE=https, SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE='Lax',
                  REMEMBER_COOKIE_SECURE=https, REMEMBER_COOKIE_HTTPONLY=True, REMEMBER_COOKIE_SAMESITE='Lax',
                  PERMANENT_SESSION_LIFETIME=timedelta(hours=config['ADMIN_SESSION_HOURS']))
    headers = dict(HEADERS)
    if https:
        headers['Strict-Transport-Security'] = 'max-age=31536000; includeSubDomains'

    # Registered before CSRFProtect's check, which is the first to read a form.
    @app.before_request
    def _body_limit():
        if setting := LARGER_BODIES.get(request.endpoint):
            request.max_content_length = config[setting]

    @app.before_request
    def _no_nul():
        if any('\x00' in value for _, value in request.args.items(multi=True)):
            abort(400, 'A NUL character is not accepted.')

    @app.after_request
    def _security_headers(response):
        for name, value in headers.items():
            response.headers.setdefault(name, value)
        return response


def check_secret_key(config):
    """:raise ValueError: a deployment without a SECRET_KEY of its own, or keeping a known one among its
    SECRET_KEY_FALLBACKS (where rotating away from it puts it): every fallback still verifies links and
    sessions, so a known one would let anyone forge a confirmation or a block."""
    if not (deployment := looks_deployed(config)):
        return
    if _guessable(config.get('SECRET_KEY') or ''):
        raise ValueError(f'SECRET_KEY: {deployment}, so set a secret key of its own, at least {SHORTEST_KEY} '
                         'characters (e.g. python -c "import secrets; print(secrets.token_hex(32))"), the same '
                         'for every process')
    if any(_guessable(key or '') for key in config.get('SECRET_KEY_FALLBACKS', [])):
        raise ValueError(f'SECRET_KEY_FALLBACKS: {deployment}, so every key there must be a secret of its own, at '
                         f'least {SHORTEST_KEY} characters: a known or short one lets anyone forge links. Drop it '
                         '(the links signed with it stop working)')


def _guessable(key):
    return key.strip().lower() in KNOWN_KEYS or len(key) < SHORTEST_KEY


def signing_keys(config):
    """For itsdangerous: the fallbacks, then SECRET_KEY (the last signs; all verify)."""
    return [*config.get('SECRET_KEY_FALLBACKS', []), config['SECRET_KEY']]
