"""Settings, read from the environment (and `.env`) so one code base serves laptop, CI and production."""
import os
from pathlib import Path

from dotenv import load_dotenv

basedir = Path(__file__).resolve().parent
# Tests and their subprocesses set FLASK_SKIP_DOTENV so a developer's .env cannot leak into them.
if not os.environ.get('FLASK_SKIP_DOTENV'):
    load_dotenv(basedir / '.env')


BOOLEANS = {'1': True, 'true': True, 'yes': True, 'on': True, '0': False, 'false': False, 'no': False, 'off': False}


def env_bool(name, default=False):
    """:raise ValueError: for a value that is none of BOOLEANS: read as false, RATELIMIT_ENABLED=enabled
    would turn the abuse limits off, and MAIL_USE_TLS=y send the password in the clear."""
    value = (os.environ.get(name) or '').strip()
    if not value:
        return default
    if value.lower() not in BOOLEANS:
        raise ValueError(f'{name} must be 1, true, yes or on, or 0, false, no or off (any case), not {value!r}')
    return BOOLEANS[value.lower()]


def env_int(name, default):
    return _number(name, default, int, 'a whole number')


def env_float(name, default):
    return _number(name, default, float, 'a number')


def _number(name, default, kind, what):
    """:raise ValueError: naming the setting, where int()'s own words name neither it nor the file."""
    value = os.environ.get(name) or default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f'{name} must be {what}, not {value!r}') from None


def env_list(name):
    return [item.strip() for item in (os.environ.get(name) or '').split(',') if item.strip()]


# Settings counting what the app does some at a time, where fewer than one would stop mail without a word:
# SEND_BATCH_SIZE=0 sends to nobody and exits 0, MAIL_CONCURRENCY=0 waits for a connection for ever,
# JOB_MAX_ATTEMPTS=0 fails every job before it is tried.
COUNTS = ('SEND_BATCH_SIZE', 'SEND_RECORD_EVERY', 'MAIL_CONCURRENCY', 'JOB_MAIL_BATCH', 'JOB_MAX_ATTEMPTS')
# Durations with no "off" at 0, where no time at all breaks what they time: WEBHOOK_MAX_AGE=0 refuses every
# signed batch (SendGrid then drops its bounces), CONFIRM_MAX_AGE=0 expires each link as it goes out,
# SCHEDULE_MAX_LATE=0 skips every due time, a time-out of 0 fails every connection.
DURATIONS = ('MAIL_TIMEOUT', 'MAIL_DATA_TIMEOUT', 'REDIS_TIMEOUT', 'DATABASE_CONNECT_TIMEOUT', 'LEASE_SECONDS',
             'JOB_POLL_SECONDS', 'WEBHOOK_MAX_AGE', 'CONFIRM_MAX_AGE', 'EMAIL_DNS_TIMEOUT', 'ADMIN_SESSION_HOURS', 'RQ_JOB_TIMEOUT',
             'SCHEDULE_MAX_LATE')

# The largest bodies a request may send: at 0, WEBHOOK_MAX_BYTES refuses every batch of SendGrid's events,
# which it drops after a while, bounces and complaints included.
SIZES = ('BROADCAST_MAX_BYTES', 'IMPORT_MAX_BYTES', 'WEBHOOK_MAX_BYTES')
# Settings whose 0 means something ("no retries", "no limit", "never") and a negative nothing:
# MAIL_RETRY_BACKOFF=-1 stops every run at its first greylisted subscriber, PROXY_COUNT=-1 takes the client's address from the part
# of X-Forwarded-For the client writes, SUPPRESS_AFTER_FAILURES=-1 suppresses an address at its first refusal.
NON_NEGATIVE = ('MAIL_RETRIES', 'MAIL_RETRY_BACKOFF', 'MAIL_GIVE_UP_AFTER', 'MAIL_RATE_LIMIT', 'MAIL_MAX_EMAILS',
                'PROXY_COUNT', 'SUPPRESS_AFTER_FAILURES', 'CONFIRM_RESEND_SECONDS', 'JOB_RETRY_BACKOFF',
                'JOB_MAX_BACKOFF', 'JOB_RETENTION_DAYS', 'EXPORT_KEEP_HOURS', 'EXPORT_COMPRESS_ABOVE')


def check_ranges(config):
    """:raise ValueError: for the first of COUNTS or SIZES below 1, of DURATIONS at 0 or below, or of
    NON_NEGATIVE below 0, so that the app stops at start-up, whatever settings class it is given, instead
    of failing quietly later."""
    for name in (*COUNTS, *SIZES):
        if config[name] < 1:
            raise ValueError(f'{name} must be at least 1, not {config[name]}')
    for name in NON_NEGATIVE:
        if (config[name] or 0) < 0:
            raise ValueError(f'{name} must be 0 or more, not {config[name]}')
    for name in DURATIONS:
        if config[name] <= 0:
            raise ValueError(f'{name} must be more than 0, not {config[name]}')


def database_url():
    """SQLAlchemy wants `postgresql://`; many hosts still hand out `postgres://`."""
    url = os.environ.get('DATABASE_URL') or 'sqlite:///newsletter.db'
    if url.startswith('postgres://'):
        url = 'postgresql://' + url[len('postgres://'):]
    return url


class Config:
    # The folder for the SQLite file, the generated secret key and the .eml mail (default: ./instance).
    INSTANCE_PATH = os.path.abspath(os.environ['INSTANCE_PATH']) if os.environ.get('INSTANCE_PATH') else None
    # Left empty, the app keeps a generated key in the instance folder: see app.create_app.
    SECRET_KEY = os.environ.get('SECRET_KEY')
    # A relative SQLite path lives in the instance folder (Flask-SQLAlchemy's rule).
    SQLALCHEMY_DATABASE_URI = database_url()
    # A pooled connection is tried before use: after the server restarted or failed over, or a proxy closed
    # idle connections, a dead one is replaced instead of failing the first statement on it. That first
    # statement may be a job's outcome, the email already taken by the relay: failed, it left the job to be
    # taken over and the email sent again.
    SQLALCHEMY_ENGINE_OPTIONS = {'pool_pre_ping': True}
    # Seconds to wait for PostgreSQL to take a new connection (libpq's connect_timeout, unless DATABASE_URL
    # sets it): without one, a server that accepts and never answers holds every run and worker for ever.
    DATABASE_CONNECT_TIMEOUT = env_float('DATABASE_CONNECT_TIMEOUT', 10)
    BASE_URL = (os.environ.get('BASE_URL') or 'http://localhost:5000').rstrip('/')
    MAX_CONTENT_LENGTH = 64 * 1024  # a request body, at most; the broadcast form takes BROADCAST_MAX_BYTES
    BROADCAST_MAX_BYTES = env_int('BROADCAST_MAX_BYTES', 2 * 1024 * 1024)
    # And a CSV file of subscribers to import (the admin's upload page), in bytes. Its dry run runs in the
    # upload's request, at 15,000 to 30,000 rows a second (bench/import_csv.py): 10 MB, about 250,000
    # addresses, stays within gunicorn's default 30 s timeout.
    IMPORT_MAX_BYTES = env_int('IMPORT_MAX_BYTES', 10 * 1024 * 1024)

    # Mail: SendGrid when SENDGRID_API_KEY is set, SMTP when MAIL_SERVER is set, else .eml files; or named
    # here (smtp, sendgrid, folder). Once BASE_URL or DATABASE_URL look like a deployment, the folder must
    # be named: a process missing the mail settings must not write a mailing into it and call it sent.
    MAIL_TRANSPORT = os.environ.get('MAIL_TRANSPORT')
    MAIL_SERVER = os.environ.get('MAIL_SERVER')
    MAIL_PORT = env_int('MAIL_PORT', 25)
    MAIL_USE_TLS = env_bool('MAIL_USE_TLS')
    MAIL_USE_SSL = env_bool('MAIL_USE_SSL')
    MAIL_USERNAME = os.environ.get('MAIL_USERNAME')
    MAIL_PASSWORD = os.environ.get('MAIL_PASSWORD')
    MAIL_DEFAULT_SENDER = os.environ.get('MAIL_DEFAULT_SENDER') or 'Newsletter <newsletter@localhost>'
    MAIL_MAX_EMAILS = env_int('MAIL_MAX_EMAILS', 0) or None
    # Seconds for each SMTP command (and each API request); the reply to the end of a message's data is
    # awaited longer, as RFC 5321 4.5.3.2.6 says: without it, the message may have arrived ("unknown").
    MAIL_TIMEOUT = env_float('MAIL_TIMEOUT', 30)
    MAIL_DATA_TIMEOUT = env_float('MAIL_DATA_TIMEOUT', 600)
    # TLS to MAIL_SERVER is verified against the system's CA store, or this file for a private CA.
    MAIL_TLS_CA_FILE = os.environ.get('MAIL_TLS_CA_FILE')
    # Off only by this explicit setting, and then logged loudly at every start.
    MAIL_TLS_VERIFY = env_bool('MAIL_TLS_VERIFY', True)
    # Parallel connections the drip sends over (each with its own thread).
    MAIL_CONCURRENCY = env_int('MAIL_CONCURRENCY', 1)
    # Messages per second at most (0: no limit); with REDIS_URL, in total over all sending processes.
    MAIL_RATE_LIMIT = env_float('MAIL_RATE_LIMIT', 0)
    # Redis, for the shared rate limit and for sending through RQ workers (`--queue`).
    REDIS_URL = os.environ.get('REDIS_URL')
    REDIS_TIMEOUT = env_float('REDIS_TIMEOUT', 5)  # seconds to connect, and for each answer
    RQ_QUEUE = os.environ.get('RQ_QUEUE') or 'newsletter'
    RQ_JOB_TIMEOUT = env_int('RQ_JOB_TIMEOUT', 24 * 3600)
    MAIL_FOLDER = os.environ.get('MAIL_FOLDER')  # default: <instance>/mail
    # Without the line break a key file (a Kubernetes or Docker secret) ends in: no HTTP header may hold one.
    SENDGRID_API_KEY = (os.environ.get('SENDGRID_API_KEY') or '').strip() or None
    SENDGRID_API_URL = os.environ.get('SENDGRID_API_URL') or 'https://api.sendgrid.com'
    UNSUBSCRIBE_MAILTO = os.environ.get('UNSUBSCRIBE_MAILTO')
    # SendGrid's Event Webhook verification key (Mail Settings, Signed Event Webhook): bounces and
    # complaints reported there suppress the address. Unset, /webhooks/sendgrid refuses every request.
    SENDGRID_WEBHOOK_PUBLIC_KEY = os.environ.get('SENDGRID_WEBHOOK_PUBLIC_KEY')
    WEBHOOK_MAX_AGE = env_int('WEBHOOK_MAX_AGE', 600)  # seconds a signed request stays good
    # SendGrid posts its events in batches of up to 768 KB (its Event Webhook's documentation): refused, a
    # batch is retried for a while and then dropped, with the bounces in it.
    WEBHOOK_MAX_BYTES = env_int('WEBHOOK_MAX_BYTES', 2 * 1024 * 1024)
    # An address our relay refuses for good as a bad address (5xx, status 5.1.1, 5.1.2, 5.1.3, 5.1.6 or 5.1.10)
    # in this many mailings is suppressed (0: never).
    SUPPRESS_AFTER_FAILURES = env_int('SUPPRESS_AFTER_FAILURES', 3)
    ADMINS = env_list('ADMINS')
    ADMIN_SESSION_HOURS = env_float('ADMIN_SESSION_HOURS', 8)  # an admin signs in again after this
    # Earlier keys, comma-separated: links and sessions they signed still work while SECRET_KEY is rotated.
    SECRET_KEY_FALLBACKS = env_list('SECRET_KEY_FALLBACKS')

    # Temporary failures are retried after MAIL_RETRY_BACKOFF seconds, doubling each time; one that
    # outlasts a run's MAIL_RETRIES is deferred, and tried again later (the back-off going on doubling,
    # to an hour) until it has been deferred for MAIL_GIVE_UP_AFTER seconds, like an MTA's queue lifetime.
    MAIL_RETRIES = env_int('MAIL_RETRIES', 3)
    MAIL_RETRY_BACKOFF = env_float('MAIL_RETRY_BACKOFF', 2)
    MAIL_GIVE_UP_AFTER = env_float('MAIL_GIVE_UP_AFTER', 5 * 24 * 3600)

    # Subscribers are claimed this many at a time.
    SEND_BATCH_SIZE = env_int('SEND_BATCH_SIZE', 100)
    # Messages are marked as going out, and their outcomes recorded, this many to a commit: a run killed at
    # any moment leaves at most this many (plus one per connection) "unknown", and repeats none.
    SEND_RECORD_EVERY = env_int('SEND_RECORD_EVERY', 10)
    # How long a claim on work (a drip batch, a background job) holds before another process may take it over.
    LEASE_SECONDS = env_float('LEASE_SECONDS', 120)

    # Background jobs (confirmation mail, schedules, broadcasts): run by threads inside the web process
    # ('thread'), or 'off' when `flask worker` processes run them.
    JOB_WORKER = (os.environ.get('JOB_WORKER') or 'thread').strip().lower()
    # 'database': workers run jobs themselves; 'rq': they hand them to `flask rq-worker` (needs REDIS_URL).
    JOB_BACKEND = os.environ.get('JOB_BACKEND') or 'database'
    JOB_POLL_SECONDS = env_float('JOB_POLL_SECONDS', 5)
    # Quick mail (confirmations, sign-in links) is claimed this many jobs at a time.
    JOB_MAIL_BATCH = env_int('JOB_MAIL_BATCH', 10)
    # A failing job is retried after JOB_RETRY_BACKOFF seconds, doubling up to JOB_MAX_BACKOFF.
    JOB_MAX_ATTEMPTS = env_int('JOB_MAX_ATTEMPTS', 15)
    JOB_RETRY_BACKOFF = env_float('JOB_RETRY_BACKOFF', 2)
    JOB_MAX_BACKOFF = env_float('JOB_MAX_BACKOFF', 3600)
    JOB_PROGRESS_SECONDS = env_float('JOB_PROGRESS_SECONDS', 2)
    # Finished jobs (their rows name recipients and errors) are deleted this many days after they ended.
    JOB_RETENTION_DAYS = env_float('JOB_RETENTION_DAYS', 30)
    CLEAN_UP = env_bool('CLEAN_UP', True)
    # An admin's CSV export is gzipped above this size (bytes), and kept for download this many hours.
    EXPORT_COMPRESS_ABOVE = env_int('EXPORT_COMPRESS_ABOVE', 1024 * 1024)
    EXPORT_KEEP_HOURS = env_float('EXPORT_KEEP_HOURS', 24)  # the hourly clean-up of app/retention.py (off: keep everything)

    # In-app schedules, an alternative to crontab.example: "week1=0 9 * * mon; week2=0 9 * * tue".
    SCHEDULES = os.environ.get('SCHEDULES') or ''
    SCHEDULE_TIMEZONE = os.environ.get('SCHEDULE_TIMEZONE') or 'UTC'
    # A due time missed by more than this (the app was down) is skipped and logged, not sent late.
    SCHEDULE_MAX_LATE = env_float('SCHEDULE_MAX_LATE', 3600)

    # Drip stages go out only between these hours, in SCHEDULE_TIMEZONE ("08:00-20:00"; empty: any time).
    SEND_WINDOW = os.environ.get('SEND_WINDOW') or ''
    # The drip's stage templates (weekN.txt and weekN.html); by default the app's own.
    STAGES_FOLDER = os.environ.get('STAGES_FOLDER') or str(basedir / 'app' / 'templates' / 'emails' / 'newsletter')

    # Abuse limits (Flask-Limiter syntax; shared through REDIS_URL when set). RATELIMIT_ENABLED=0 turns
    # them off, e.g. for a load test whose clients all come from one address.
    RATELIMIT_ENABLED = env_bool('RATELIMIT_ENABLED', True)
    SIGNUP_LIMIT_PER_CLIENT = os.environ.get('SIGNUP_LIMIT_PER_CLIENT') or '10/minute;50/hour'
    SIGNUP_LIMIT_PER_ADDRESS = os.environ.get('SIGNUP_LIMIT_PER_ADDRESS') or '3/hour;10/day'
    SIGN_IN_LIMIT_PER_CLIENT = os.environ.get('SIGN_IN_LIMIT_PER_CLIENT') or '5/minute;20/hour'
    SIGN_IN_LIMIT_PER_ADDRESS = os.environ.get('SIGN_IN_LIMIT_PER_ADDRESS') or '3/10 minutes;10/day'
    # At most one confirmation email per address in this many seconds, whatever the requests.
    CONFIRM_RESEND_SECONDS = env_int('CONFIRM_RESEND_SECONDS', 600)
    # Reverse proxies in front of the app whose X-Forwarded-For/-Proto to trust (0: none; 1 behind nginx).
    PROXY_COUNT = env_int('PROXY_COUNT', 0)
    # Seconds for the DNS look-up of EMAIL_CHECK_DELIVERABILITY: a slow resolver must not tie up the web workers.
    EMAIL_DNS_TIMEOUT = env_int('EMAIL_DNS_TIMEOUT', 3)

    CONFIRM_MAX_AGE = env_int('CONFIRM_MAX_AGE', 7 * 24 * 3600)
    # A DNS look-up that the domain takes mail catches typos (gmial.com); pointless while mail only goes
    # to the local folder, so by default it is on exactly when real mail is configured.
    EMAIL_CHECK_DELIVERABILITY = env_bool('EMAIL_CHECK_DELIVERABILITY', bool(MAIL_SERVER or SENDGRID_API_KEY))
