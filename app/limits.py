"""Abuse limits on the public forms (Flask-Limiter): sign-up and admin sign-in, per client address and
per email address, so that nobody can make the app mail a stranger over and over, or flood it. Counted
in memory per process, or shared by every process through REDIS_URL; if that Redis is gone the limits
fall back to memory rather than failing the sign-ups. Behind a reverse proxy, PROXY_COUNT says how many
to trust for the client's address, or every client would share the proxy's.

Sign-up also sends at most one confirmation per address every CONFIRM_RESEND_SECONDS, whatever the
limits allow (app/main/routes.py)."""
from flask import current_app, request
from limits import parse_many
from werkzeug.middleware.proxy_fix import ProxyFix

from app.addresses import mailbox
from app.extensions import limiter


def init_app(app):
    config = app.config
    config.setdefault('RATELIMIT_STORAGE_URI', _storage_uri(config['REDIS_URL']) or 'memory://')
    config.setdefault('RATELIMIT_STORAGE_OPTIONS', {'socket_timeout': config['REDIS_TIMEOUT'],
                                                    'socket_connect_timeout': config['REDIS_TIMEOUT']}
                      if config['REDIS_URL'] else {})
    config.update(RATELIMIT_HEADERS_ENABLED=True, RATELIMIT_SWALLOW_ERRORS=True,
                  RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True)
    for name in LIMITS:
        _check(name, config[name])
    if proxies := config['PROXY_COUNT']:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)
    limiter.init_app(app)


LIMITS = ('SIGNUP_LIMIT_PER_CLIENT', 'SIGNUP_LIMIT_PER_ADDRESS', 'SIGN_IN_LIMIT_PER_CLIENT', 'SIGN_IN_LIMIT_PER_ADDRESS')


def _check(name, value):
    """:raise ValueError: for a limit Flask-Limiter cannot read: it reads them at each request, and lets through
    the requests of one it cannot (logging an error), so a typo would turn that limit off without a word."""
    try:
        parse_many(value)
    except ValueError:
        raise ValueError(f'{name}: {value!r} is not a limit Flask-Limiter reads, such as "10/minute;50/hour"') from None


def _storage_uri(redis_url):
    """REDIS_URL as the limits' storage names it: a unix socket (unix://, which Redis's client takes) is
    redis+unix:// there, and unknown to it as it is."""
    if redis_url and redis_url.startswith('unix://'):
        return 'redis+' + redis_url
    return redis_url


def submitted_address():
    """The key of a limit per email address: the inbox the form was posted with, however spelled, and
    without a plus tag (jane+1@ and jane+2@ reach jane@'s inbox at most providers, RFC 5233), so that
    numbering them does not multiply what one inbox can be sent."""
    local, at, domain = mailbox(request.form.get('email') or '').rpartition('@')
    return f'address:{local.split("+", 1)[0] or local}{at}{domain}'


def per_client(setting):
    """A limit on POSTs from one client address, read from `setting` at each request."""
    return limiter.limit(lambda: current_app.config[setting], methods=['POST'])


def per_address(setting):
    """A limit on POSTs naming one email address, whoever sends them."""
    return limiter.limit(lambda: current_app.config[setting], key_func=submitted_address, methods=['POST'])
