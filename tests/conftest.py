"""Fixtures: every database test runs on SQLite and on PostgreSQL; mail goes to a real SMTP server; a test
that needs Redis gets one that answers (`redis_url`)."""
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

os.environ['FLASK_SKIP_DOTENV'] = '1'  # before config is imported: a developer's .env must not leak in

import pytest  # noqa: E402
import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from app import create_app  # noqa: E402
from app.database import utcnow
from app.extensions import db
from app.ledger import ledger, mailing_named  # noqa: E402
from app.models import Client, Delivery  # noqa: E402
from config import Config  # noqa: E402
from tests.support.forms import sign_in  # noqa: E402
from tests.support.proxy import CuttableProxy  # noqa: E402
from tests.support.sendgrid import SendGridStandIn  # noqa: E402
from tests.support.silent import SilentServer  # noqa: E402
from tests.support.smtp import MailSink, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POSTGRESQL_URL = os.environ.get('TEST_POSTGRESQL_URL', 'postgresql://postgres@127.0.0.1:5432/test')


def _reachable(engine):
    try:
        with engine.connect():
            return None
    except sa.exc.OperationalError as exc:
        return exc


def _start_local_postgresql():
    """The machine's own cluster, if it has one that is merely stopped (Debian's pg_ctlcluster)."""
    clusters = Path('/etc/postgresql')
    if shutil.which('pg_ctlcluster') and clusters.is_dir():
        for version in sorted(p.name for p in clusters.iterdir()):
            subprocess.run(['pg_ctlcluster', '--skip-systemctl-redirect', version, 'main', 'start'],
                           capture_output=True, timeout=60)


@pytest.fixture(scope='session')
def postgresql_server():
    engine = sa.create_engine(POSTGRESQL_URL)
    if _reachable(engine) is not None:
        _start_local_postgresql()
        if (error := _reachable(engine)) is not None:
            pytest.fail(f'PostgreSQL is not reachable at {POSTGRESQL_URL}, and starting a local cluster did not '
                        f'help: {error}\nStart PostgreSQL or point TEST_POSTGRESQL_URL at one.', pytrace=False)
    yield engine
    engine.dispose()


@pytest.fixture
def postgresql_url(postgresql_server):
    """A fresh schema in the test database for each test, dropped afterwards."""
    schema = f'test_{uuid.uuid4().hex[:12]}'
    with postgresql_server.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA {schema}'))
    yield f'{POSTGRESQL_URL}?options=-csearch_path%3D{schema}'
    with postgresql_server.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA {schema} CASCADE'))


def _redis_error(url):
    """Why the Redis at `url` does not answer a PING, or None when it does."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return exc
    finally:
        client.close()
    return None


def _start_own_redis(folder):
    """A redis-server of this session's own on a free port, keeping nothing but its log (in `folder`).
    :return: the process and its URL, once it answers (or has had ten seconds to)."""
    port = free_port()
    process = subprocess.Popen(['redis-server', '--bind', '127.0.0.1', '--port', str(port), '--save', '',
                                '--appendonly', 'no', '--dir', str(folder), '--logfile', str(folder / 'redis.log')],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'redis://127.0.0.1:{port}/0'
    deadline = time.monotonic() + 10
    while _redis_error(url) is not None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process, url


@pytest.fixture(scope='session')
def redis_url(tmp_path_factory):
    """The URL of a Redis that answers, for every test that needs one: TEST_REDIS_URL when it is set;
    else the machine's at 127.0.0.1:6379, or, if none answers there, a redis-server this session starts
    on a free port and stops at its end. When there is none, the test fails saying what to do."""
    url = os.environ.get('TEST_REDIS_URL', 'redis://127.0.0.1:6379/0')
    if (error := _redis_error(url)) is None:
        yield url
        return
    if 'TEST_REDIS_URL' in os.environ:
        pytest.fail(f'Redis is not reachable at TEST_REDIS_URL={url}: {error}\nStart it, or point '
                    'TEST_REDIS_URL at a Redis that runs (unset, the tests use 127.0.0.1:6379 or start their own).',
                    pytrace=False)
    if not shutil.which('redis-server'):
        pytest.fail(f'Redis is not reachable at {url}, and there is no redis-server to start one: {error}\n'
                    'Start Redis, install it (Debian: apt-get install redis-server), or point TEST_REDIS_URL at '
                    'one.', pytrace=False)
    folder = tmp_path_factory.mktemp('redis')
    process, own_url = _start_own_redis(folder)
    try:
        if (own_error := _redis_error(own_url)) is not None:
            log = (folder / 'redis.log').read_text() if (folder / 'redis.log').exists() else ''
            pytest.fail(f'Redis is not reachable at {url} ({error}), and the redis-server started at {own_url} '
                        f'did not answer either: {own_error}\n{log}Start Redis or point TEST_REDIS_URL at one.',
                        pytrace=False)
        yield own_url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url):
    """A client of the tests' Redis (`redis_url`), for a test to look at what a run left there."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(params=['sqlite', 'postgresql'])
def database_url(request, tmp_path):
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path / "newsletter.db"}'
    return request.getfixturevalue('postgresql_url')


@pytest.fixture
def smtp():
    sink = MailSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def silent_server():
    server = SilentServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgresql_proxy(postgresql_server):
    """A proxy in front of the tests' PostgreSQL, for a test to cut (tests/support/proxy.py)."""
    url = postgresql_server.url
    proxy = CuttableProxy(url.host, url.port or 5432).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def sendgrid_api():
    stand_in = SendGridStandIn().start()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def settings(database_url, smtp, tmp_path):
    """The app's settings for one test; a test may change them before it asks for `app`."""
    return {
        'TESTING': True,
        'INSTANCE_PATH': str(tmp_path / 'instance'),
        'SECRET_KEY': 'test-secret-key-of-the-suite',
        'SQLALCHEMY_DATABASE_URI': database_url,
        'BASE_URL': 'http://newsletter.test',
        'MAIL_SERVER': '127.0.0.1',
        'MAIL_PORT': smtp.port,
        'MAIL_DEFAULT_SENDER': 'The Newsletter <news@example.com>',
        'MAIL_FOLDER': str(tmp_path / 'mail'),
        'MAIL_RETRY_BACKOFF': 0.01,
        'MAIL_TIMEOUT': 5,
        'SENDGRID_API_KEY': None,
        'UNSUBSCRIBE_MAILTO': 'unsubscribe@example.com',
        'ADMINS': ['admin@example.com'],
        'JOB_WORKER': 'off',
        'EMAIL_CHECK_DELIVERABILITY': False,
        'SEND_BATCH_SIZE': 10,
        'LEASE_SECONDS': 30,
        # The abuse limits have tests of their own (test_limits.py); elsewhere a test signs up as it likes.
        'RATELIMIT_ENABLED': False,
        'CONFIRM_RESEND_SECONDS': 0,
        # The hourly clean-up job has tests of its own (test_retention.py); elsewhere it would be one more job.
        'CLEAN_UP': False,
    }


@pytest.fixture
def app(settings):
    app = create_app(type('TestConfig', (Config,), settings))
    with app.app_context():
        db.create_all()
    yield app
    if app.extensions['jobs']:
        app.extensions['jobs'].stop()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def subscribers(app):
    """Make `count` confirmed, active subscribers (or as told) and return their addresses."""
    def make(count, start=0, **fields):
        fields.setdefault('email_confirmed_at', utcnow())
        rows = [{'email': f'reader{n}@example.com', 'active': True, 'num_newsletter': 0, 'created_at': utcnow(),
                 **fields} for n in range(start, start + count)]
        with app.app_context():
            db.session.execute(sa.insert(Client), rows)
            db.session.commit()
        return [row['email'] for row in rows]
    return make


@pytest.fixture
def flask_command(settings):
    """Run `flask ...` as a real process, configured from the environment as cron would run it (from the
    settings as they are when it starts); with `program` (e.g. gunicorn's command), that instead."""
    def start(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, program=None, **extra_env):
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(('MAIL_', 'SEND', 'DATABASE', 'REDIS', 'RQ_'))}
        passed = ('SECRET_KEY', 'BASE_URL', 'MAIL_SERVER', 'MAIL_PORT', 'MAIL_DEFAULT_SENDER', 'MAIL_RETRY_BACKOFF',
                  'MAIL_TRANSPORT', 'MAIL_FOLDER', 'SEND_BATCH_SIZE', 'LEASE_SECONDS', 'REDIS_URL', 'RQ_QUEUE',
                  'STAGES_FOLDER', 'CLEAN_UP', 'RATELIMIT_ENABLED', 'CONFIRM_RESEND_SECONDS')
        env.update({name: str(settings[name]) for name in passed if settings.get(name) is not None})
        env.update({
            'FLASK_SKIP_DOTENV': '1', 'INSTANCE_PATH': settings['INSTANCE_PATH'],
            'DATABASE_URL': settings['SQLALCHEMY_DATABASE_URI'], 'JOB_WORKER': 'off',
            'EMAIL_CHECK_DELIVERABILITY': 'false', 'MAIL_CONCURRENCY': str(settings.get('MAIL_CONCURRENCY', 1)),
        })
        program = program or [sys.executable, '-m', 'flask', '--app', 'main']
        return subprocess.Popen([*program, *args], cwd=ROOT,
                                env={**env, **extra_env}, stdout=stdout, stderr=stderr, text=True)
    return start


@pytest.fixture
def stage_templates(settings, tmp_path):
    """A stage folder of this test's own (STAGES_FOLDER, for the app and the `flask` processes it starts,
    so ask for it before `app`): the app's stages, and those the test writes, as an operator would."""
    folder = tmp_path / 'stages'
    shutil.copytree(Config.STAGES_FOLDER, folder)
    settings['STAGES_FOLDER'] = str(folder)

    def write(name, text, html):
        (folder / f'{name}.txt').write_text(text)
        (folder / f'{name}.html').write_text(html)
    return write


@pytest.fixture
def admin(app, client, smtp):
    """A browser signed in as an admin, through the emailed link."""
    assert sign_in(app, client, smtp).status_code == 302
    return client


@pytest.fixture
def promise_kept(app, smtp):
    """Check the product's promise for one mailing, whatever happened on the way: every subscriber in
    `emails` received it exactly once, but those recorded unknown (at most once) and failed (never);
    nobody else received it; and its ledger balances. :return: {status: [email]}"""
    def check(mailing_key, emails):
        prefix = (f'<newsletter.{mailing_key}.' if mailing_key.startswith('week')
                  else f'<broadcast.{mailing_key.removeprefix("broadcast")}.')
        with app.app_context():
            statuses = dict(db.session.execute(
                sa.select(Client.email, Delivery.status).join(Client, Client.id == Delivery.client_id)
                .where(Delivery.mailing == mailing_key)).all())
            account = ledger(mailing_named(mailing_key))
        assert not smtp.misdirected, f'data in another message\'s envelope (recipients, To): {smtp.misdirected}'
        with smtp.lock:
            received = Counter(m['To'] for m in smtp.messages if m['Message-ID'].startswith(prefix))
        allowed = {'sent': {1}, 'unknown': {0, 1}, 'failed': {0}}
        wrong = {email: (statuses.get(email), received[email]) for email in emails
                 if received[email] not in allowed.get(statuses.get(email), {0})}
        assert not wrong, f'{mailing_key}: (recorded as, received) that break the promise: {wrong}'
        assert set(received) <= set(emails), f'{mailing_key} went to others: {set(received) - set(emails)}'
        assert account.balances, account
        by_status = {}
        for email in emails:
            by_status.setdefault(statuses.get(email), []).append(email)
        return by_status
    return check
