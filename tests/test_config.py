"""Settings come from the environment, with fallbacks a fresh install can run on."""
import pytest

import config
from app import create_app
from app.links import InvalidLink, load_unsubscribe_token, unsubscribe_token


@pytest.mark.parametrize('value, expected', [
    ('1', True), ('true', True), ('Yes', True), ('on', True), (' ON ', True),
    ('0', False), ('false', False), ('No', False), (' off', False), ('', False)])
def test_booleans_read_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv('MAIL_USE_TLS', value)
    assert config.env_bool('MAIL_USE_TLS') is expected


@pytest.mark.parametrize('value', [None, '', '  '])
def test_a_boolean_left_empty_or_unset_takes_its_default(monkeypatch, value):
    if value is None:
        monkeypatch.delenv('RATELIMIT_ENABLED', raising=False)
    else:
        monkeypatch.setenv('RATELIMIT_ENABLED', value)
    assert config.env_bool('RATELIMIT_ENABLED', True) is True


@pytest.mark.parametrize('value', ['y', 't', 'enabled', 'True1', 'of'])
def test_a_boolean_it_cannot_read_is_refused_rather_than_read_as_false(monkeypatch, value):
    """It was read as false: RATELIMIT_ENABLED=enabled turned the abuse limits off, MAIL_USE_TLS=y sent the
    SMTP password without STARTTLS, and nothing said so."""
    monkeypatch.setenv('RATELIMIT_ENABLED', value)
    with pytest.raises(ValueError, match=f"^RATELIMIT_ENABLED must be 1, true, yes or on, or 0, false, no or off "
                                         f"\\(any case\\), not '{value}'$"):
        config.env_bool('RATELIMIT_ENABLED', True)


@pytest.mark.parametrize('read, value, what', [(config.env_int, '25 or 587', 'a whole number'),
                                               (config.env_int, '2.5', 'a whole number'),
                                               (config.env_float, 'fast', 'a number')])
def test_a_number_it_cannot_read_is_refused_naming_the_setting(monkeypatch, read, value, what):
    """int()'s own words ("invalid literal for int() with base 10") named neither the setting nor the file."""
    monkeypatch.setenv('MAIL_PORT', value)
    with pytest.raises(ValueError, match=f"^MAIL_PORT must be {what}, not '{value}'$"):
        read('MAIL_PORT', 25)


def test_admins_is_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv('ADMINS', ' a@example.com, ,b@example.com ')
    assert config.env_list('ADMINS') == ['a@example.com', 'b@example.com']


def test_heroku_style_postgres_urls_are_accepted(monkeypatch):
    monkeypatch.setenv('DATABASE_URL', 'postgres://u:p@db.example.com/news')
    assert config.database_url() == 'postgresql://u:p@db.example.com/news'


def test_the_default_database_is_a_sqlite_file_in_the_instance_folder(monkeypatch):
    monkeypatch.delenv('DATABASE_URL', raising=False)
    assert config.database_url() == 'sqlite:///newsletter.db'


def test_without_a_secret_key_one_is_generated_once_and_kept_private(tmp_path):
    class Settings(config.Config):
        INSTANCE_PATH = str(tmp_path)
        SECRET_KEY = None
        SQLALCHEMY_DATABASE_URI = f'sqlite:///{tmp_path}/x.db'

    keys = {create_app(Settings).config['SECRET_KEY'] for _ in range(2)}

    assert len(keys) == 1 and len(keys.pop()) == 64
    assert (tmp_path / 'secret_key').stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize('url', ['mysql://u:p@db.example.com/news', 'oracle://db.example.com/news', 'not a url'])
def test_a_database_the_app_does_not_speak_stops_it_at_start_up(tmp_path, url):
    class Settings(config.Config):
        INSTANCE_PATH = str(tmp_path)
        SQLALCHEMY_DATABASE_URI = url

    with pytest.raises(ValueError, match='DATABASE_URL: .*(not supported; use PostgreSQL|not a database URL)'):
        create_app(Settings)


@pytest.mark.parametrize('name', ['SEND_BATCH_SIZE', 'SEND_RECORD_EVERY', 'MAIL_CONCURRENCY', 'JOB_MAIL_BATCH',
                                  'JOB_MAX_ATTEMPTS'])
@pytest.mark.parametrize('value', [0, -1])
def test_a_count_below_one_stops_the_app_at_start_up(tmp_path, name, value):
    """0 is what an operator may write for "no limit"; read as a count, each of these stopped mail without a
    word (config.COUNTS says how), so it must stop the app instead, where the operator sees it."""
    settings = type('Settings', (config.Config,), {
        'INSTANCE_PATH': str(tmp_path), 'SQLALCHEMY_DATABASE_URI': f'sqlite:///{tmp_path}/x.db', name: value})

    with pytest.raises(ValueError, match=f'^{name} must be at least 1, not {value}$'):
        create_app(settings)


@pytest.mark.parametrize('name', ['MAIL_TIMEOUT', 'MAIL_DATA_TIMEOUT', 'REDIS_TIMEOUT', 'LEASE_SECONDS',
                                  'JOB_POLL_SECONDS', 'WEBHOOK_MAX_AGE', 'CONFIRM_MAX_AGE', 'EMAIL_DNS_TIMEOUT',
                                  'ADMIN_SESSION_HOURS', 'RQ_JOB_TIMEOUT', 'SCHEDULE_MAX_LATE'])
@pytest.mark.parametrize('value', [0, -1])
def test_a_duration_of_no_time_stops_the_app_at_start_up(tmp_path, name, value):
    """None of these has an "off" at 0: WEBHOOK_MAX_AGE=0 refused every signed batch, so SendGrid dropped
    its bounces; CONFIRM_MAX_AGE=0 made every confirmation link expired as it went out; SCHEDULE_MAX_LATE=0
    skipped every due time."""
    settings = type('Settings', (config.Config,), {
        'INSTANCE_PATH': str(tmp_path), 'SQLALCHEMY_DATABASE_URI': f'sqlite:///{tmp_path}/x.db', name: value})

    with pytest.raises(ValueError, match=f'^{name} must be more than 0, not {value}$'):
        create_app(settings)


@pytest.mark.parametrize('name', ['MAIL_RETRIES', 'MAIL_RETRY_BACKOFF', 'MAIL_GIVE_UP_AFTER', 'MAIL_RATE_LIMIT',
                                  'MAIL_MAX_EMAILS', 'PROXY_COUNT', 'SUPPRESS_AFTER_FAILURES', 'CONFIRM_RESEND_SECONDS',
                                  'JOB_RETRY_BACKOFF', 'JOB_MAX_BACKOFF', 'JOB_RETENTION_DAYS', 'EXPORT_KEEP_HOURS',
                                  'EXPORT_COMPRESS_ABOVE'])
def test_a_negative_setting_that_has_no_meaning_stops_the_app_at_start_up(tmp_path, name):
    """Each was taken: MAIL_RETRY_BACKOFF=-1 stopped every run at its first greylisted subscriber with 'an
    unexpected error' (time.sleep's ValueError), PROXY_COUNT=-1 took the client's address from the part of
    X-Forwarded-For the client writes (any sign-up limit dodged), SUPPRESS_AFTER_FAILURES=-1 (for "never")
    suppressed an address at its first refusal."""
    settings = type('Settings', (config.Config,), {
        'INSTANCE_PATH': str(tmp_path), 'SQLALCHEMY_DATABASE_URI': f'sqlite:///{tmp_path}/x.db', name: -1})

    with pytest.raises(ValueError, match=f'^{name} must be 0 or more, not -1$'):
        create_app(settings)


@pytest.mark.parametrize('name', ['BROADCAST_MAX_BYTES', 'IMPORT_MAX_BYTES', 'WEBHOOK_MAX_BYTES'])
@pytest.mark.parametrize('value', [0, -1])
def test_a_largest_body_of_no_bytes_stops_the_app_at_start_up(tmp_path, name, value):
    """WEBHOOK_MAX_BYTES=0 refused every batch of SendGrid's events (413), which drops them, bounces and
    complaints included, after retrying for a while; the broadcast form and the import took nothing."""
    settings = type('Settings', (config.Config,), {
        'INSTANCE_PATH': str(tmp_path), 'SQLALCHEMY_DATABASE_URI': f'sqlite:///{tmp_path}/x.db', name: value})

    with pytest.raises(ValueError, match=f'^{name} must be at least 1, not {value}$'):
        create_app(settings)


@pytest.mark.parametrize('url', ['http://api.sendgrid.com', 'http://sendgrid-proxy.internal:8080'])
def test_a_sendgrid_api_url_that_would_carry_the_api_key_in_clear_stops_at_start_up(tmp_path, url):
    class Settings(config.Config):
        INSTANCE_PATH = str(tmp_path)
        SQLALCHEMY_DATABASE_URI = f'sqlite:///{tmp_path}/x.db'
        SENDGRID_API_KEY = 'SG.a-real-key'
        SENDGRID_API_URL = url

    with pytest.raises(ValueError, match=f"^SENDGRID_API_URL must be https:// .*not '{url}'$"):
        create_app(Settings)


@pytest.mark.parametrize('given, error', [
    ({'MAIL_USERNAME': 'news@example.com'}, 'MAIL_USERNAME needs MAIL_PASSWORD'),
    ({'MAIL_PASSWORD': 'secret'}, 'MAIL_PASSWORD needs MAIL_USERNAME'),
    ({'MAIL_TLS_CA_FILE': '/no/such/ca.pem'}, "MAIL_TLS_CA_FILE: cannot read '/no/such/ca.pem'")])
def test_smtp_settings_that_cannot_work_stop_the_app_at_start_up(tmp_path, given, error):
    """A user name without its password (or the other way round) was skipped without a word, and the app sent
    without signing in: a relay that wants it refused every recipient ('554 5.7.1 Relay access denied'), each
    failed for good. A CA file that is not there stopped every run 'by an unexpected error'."""
    settings = type('Settings', (config.Config,), {
        'INSTANCE_PATH': str(tmp_path), 'SQLALCHEMY_DATABASE_URI': f'sqlite:///{tmp_path}/x.db',
        'MAIL_SERVER': 'smtp.example.com', 'MAIL_USERNAME': None, 'MAIL_PASSWORD': None, **given})

    with pytest.raises(ValueError, match=f'^{error}'):
        create_app(settings)


@pytest.mark.parametrize('key', [None, '', 'change-me', 'dev', 'too-short'])
def test_a_deployment_without_a_secret_key_of_its_own_stops_at_start_up(tmp_path, key):
    class Settings(config.Config):
        INSTANCE_PATH = str(tmp_path)
        SQLALCHEMY_DATABASE_URI = f'sqlite:///{tmp_path}/x.db'
        BASE_URL = 'https://news.example.com'
        MAIL_TRANSPORT = 'folder'
        SECRET_KEY = key

    with pytest.raises(ValueError, match='SECRET_KEY: BASE_URL is https://news.example.com, so set a secret key'):
        create_app(Settings)
    assert not (tmp_path / 'secret_key').exists(), 'no key of its own made up for a deployment'


@pytest.mark.parametrize('fallback', ['change-me', '', 'too-short'])
def test_a_deployment_keeping_a_known_key_among_its_fallbacks_stops_at_start_up(tmp_path, fallback):
    """Where an operator rotating away from a tutorial's key puts it; and every fallback still verifies
    links and sessions, so anyone could forge a confirmation (no double opt-in) or a block (anyone's address
    suppressed)."""
    class Settings(config.Config):
        INSTANCE_PATH = str(tmp_path)
        SQLALCHEMY_DATABASE_URI = f'sqlite:///{tmp_path}/x.db'
        BASE_URL = 'https://news.example.com'
        MAIL_TRANSPORT = 'folder'
        SECRET_KEY = 'a-fresh-strong-secret-key-0123456789'
        SECRET_KEY_FALLBACKS = ['an-older-strong-key-0123456789', fallback]

    with pytest.raises(ValueError, match='SECRET_KEY_FALLBACKS: BASE_URL is https://news.example.com, so every key'):
        create_app(Settings)


def test_a_rotated_key_keeps_the_links_signed_with_the_one_before_working(tmp_path):
    def app_with(key, fallbacks):
        return create_app(type('Settings', (config.Config,), {
            'INSTANCE_PATH': str(tmp_path), 'SQLALCHEMY_DATABASE_URI': f'sqlite:///{tmp_path}/x.db', 'SECRET_KEY': key,
            'SECRET_KEY_FALLBACKS': fallbacks}))

    with app_with('the-old-key-0123456789', []).app_context():
        sent_before = unsubscribe_token(7, 'jane@example.com')
    with app_with('the-new-key-0123456789', ['the-old-key-0123456789']).app_context():
        assert load_unsubscribe_token(sent_before)[0] == 7
        assert unsubscribe_token(7, 'jane@example.com') != sent_before, 'signed with the new key'
    with app_with('the-new-key-0123456789', []).app_context(), pytest.raises(InvalidLink):
        load_unsubscribe_token(sent_before)

