"""Abuse limits on the public forms (app/limits.py): nobody can make the app mail a stranger over and
over, or flood the sign-up and admin sign-in forms; a bot that fills the hidden field is dropped."""
import re
import subprocess
import time

import pytest
import redis
import sqlalchemy as sa

from app import create_app
from app.extensions import db, limiter
from app.jobs import run_due
from app.models import Client, Job
from config import Config
from tests.support.forms import csrf_token


@pytest.fixture
def limited(settings, request):
    """The app with its abuse limits on (the suite's other tests run without them), counted afresh."""
    settings.update(RATELIMIT_ENABLED=True, CONFIRM_RESEND_SECONDS=600, SIGNUP_LIMIT_PER_CLIENT='5/minute',
                    SIGNUP_LIMIT_PER_ADDRESS='3/hour', SIGN_IN_LIMIT_PER_CLIENT='4/minute',
                    SIGN_IN_LIMIT_PER_ADDRESS='2/hour')
    app = request.getfixturevalue('app')
    with app.app_context():
        limiter.reset()
    return app


def post(client, url, email, address='10.0.0.1', **fields):
    return client.post(url, data={'email': email, 'csrf_token': csrf_token(client, url), **fields},
                       environ_base={'REMOTE_ADDR': address})


def confirmation_emails(app):
    with app.app_context():
        return [job.payload['recipient'] for job in db.session.scalars(sa.select(Job).where(Job.task == 'send_confirmation'))]


def test_one_address_gets_at_most_one_confirmation_in_the_interval_whatever_the_requests(limited):
    client = limited.test_client()
    answers = [post(client, '/', 'stranger@example.com', address=f'10.0.0.{n}') for n in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 200], 'the same answer every time'
    assert confirmation_emails(limited) == ['stranger@example.com']


# One mailbox, spelled as the form would store it differently (a local part in other letters' case) or the
# same (a domain with a full-width letter, or an ideographic full stop, which the form normalises).
SPELLINGS = ['stranger@example.com', 'Stranger@\uff45xample.com', 'sTranger@e\uff58ample.com',
             'stRanger@ex\uff41mple.com', 'STRANGER@EXAMPLE\u3002COM']


def test_one_mailbox_gets_at_most_one_confirmation_in_the_interval_however_its_address_is_spelled(limited):
    limited.config['SIGNUP_LIMIT_PER_ADDRESS'] = '100/hour'  # the interval alone
    client = limited.test_client()
    answers = [post(client, '/', spelling, address=f'10.0.2.{n}') for n, spelling in enumerate(SPELLINGS)]

    assert [answer.status_code for answer in answers] == [200] * len(SPELLINGS)
    assert confirmation_emails(limited) == ['stranger@example.com']
    with limited.app_context():
        assert db.session.scalars(sa.select(Client.email)).all() == ['stranger@example.com'], 'one subscriber'


def test_the_limit_per_address_counts_every_spelling_of_it(limited):
    client = limited.test_client()
    answers = [post(client, '/', spelling, address=f'10.0.3.{n}').status_code for n, spelling in enumerate(SPELLINGS)]
    assert answers == [200, 200, 200, 429, 429]


def test_the_limit_per_address_counts_its_plus_tags_as_the_one_mailbox_they_reach(limited):
    # jane+1@, jane+2@, ... are separate sign-ups, each with a confirmation of its own, but one inbox
    # (RFC 5233 subaddresses, as Gmail, Outlook and Fastmail deliver them): counted apart, a stranger's
    # inbox got as many confirmations as anyone cared to number.
    client = limited.test_client()
    answers = [post(client, '/', f'stranger+{n}@example.com', address=f'10.0.4.{n}').status_code for n in range(5)]

    assert answers == [200, 200, 200, 429, 429]
    assert post(client, '/', 'other+1@example.com', address='10.0.4.99').status_code == 200, 'other inboxes are not'


def test_naming_one_address_too_often_is_refused_whoever_asks(limited):
    client = limited.test_client()
    for n in range(3):
        assert post(client, '/', 'stranger@example.com', address=f'10.0.1.{n}').status_code == 200

    refused = post(client, '/', 'Stranger@example.com ', address='10.0.1.99')

    assert refused.status_code == 429 and 'Too many attempts' in refused.get_data(as_text=True)
    assert 'Retry-After' in refused.headers


def test_one_client_signing_up_many_addresses_is_slowed_down(limited):
    client = limited.test_client()
    codes = [post(client, '/', f'reader{n}@example.com').status_code for n in range(6)]

    assert codes == [200] * 5 + [429]
    assert post(client, '/', 'other@example.com', address='10.9.9.9').status_code == 200, 'others are not'
    with limited.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Client.id))) == 6


def test_admin_sign_in_links_are_limited_per_address_and_per_client(limited, smtp):
    client = limited.test_client()
    by_address = [post(client, '/admin/login', 'admin@example.com', address=f'10.0.2.{n}').status_code
                  for n in range(3)]
    by_client = [post(client, '/admin/login', f'nobody{n}@example.com', address='10.0.3.1').status_code
                 for n in range(5)]

    assert by_address == [200, 200, 429] and by_client == [200] * 4 + [429]
    with limited.app_context():
        run_due()
    assert smtp.recipients() == ['admin@example.com'] * 2


def test_a_bot_filling_the_hidden_field_gets_the_usual_answer_and_nothing_is_written(limited):
    answer = post(limited.test_client(), '/', 'bot@example.com', website='https://spam.example')

    assert answer.status_code == 200 and 'Check your inbox' in answer.get_data(as_text=True)
    with limited.app_context():
        assert db.session.scalars(sa.select(Client)).all() == []
    assert confirmation_emails(limited) == []


def test_people_do_not_see_the_hidden_field(client):
    page = client.get('/').get_data(as_text=True)
    assert re.search(r'<div class="trap" aria-hidden="true">.*name="website".*tabindex="-1"', page)
    assert '.trap { position: absolute; left: -10000px' in page


@pytest.mark.parametrize('name', ['SIGNUP_LIMIT_PER_CLIENT', 'SIGNUP_LIMIT_PER_ADDRESS', 'SIGN_IN_LIMIT_PER_CLIENT',
                                  'SIGN_IN_LIMIT_PER_ADDRESS'])
@pytest.mark.parametrize('value', ['2 per minut', '5/minute;'])
def test_a_limit_flask_limiter_cannot_read_stops_the_app_at_start_up(settings, name, value):
    """Flask-Limiter reads a limit at each request, logs the one it cannot read, and lets the request through:
    a typo turned that limit off, every sign-up got a 200 and nothing at start-up said so."""
    settings.update(RATELIMIT_ENABLED=True, **{name: value})
    with pytest.raises(ValueError, match=f"^{name}: {re.escape(repr(value))} is not a limit Flask-Limiter reads"):
        create_app(type('TestConfig', (Config,), settings))


def test_the_limits_can_be_turned_off(settings, request):
    settings.update(RATELIMIT_ENABLED=False, SIGNUP_LIMIT_PER_CLIENT='1/minute')
    client = request.getfixturevalue('app').test_client()

    assert [post(client, '/', f'reader{n}@example.com').status_code for n in range(3)] == [200] * 3


def test_behind_a_proxy_the_limit_counts_the_forwarded_client_not_the_proxy(settings, request):
    settings.update(PROXY_COUNT=1, RATELIMIT_ENABLED=True, SIGNUP_LIMIT_PER_CLIENT='2/minute',
                    SIGNUP_LIMIT_PER_ADDRESS='100/minute')
    app = request.getfixturevalue('app')
    with app.app_context():
        limiter.reset()
    client = app.test_client()

    def through_proxy(n, forwarded_for):
        url = '/'
        return client.post(url, data={'email': f'reader{n}@example.com', 'csrf_token': csrf_token(client, url)},
                           environ_base={'REMOTE_ADDR': '127.0.0.1'}, headers={'X-Forwarded-For': forwarded_for})

    assert [through_proxy(n, '203.0.113.7').status_code for n in range(3)] == [200, 200, 429]
    assert through_proxy(9, '198.51.100.4').status_code == 200


@pytest.fixture
def redis_socket(tmp_path):
    """A redis-server of this test's own that listens on a unix socket alone.  :return: the socket's path."""
    path = tmp_path / 'redis.sock'
    process = subprocess.Popen(['redis-server', '--port', '0', '--unixsocket', str(path), '--save', '',
                                '--appendonly', 'no', '--dir', str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield path
    process.terminate()
    process.wait(timeout=10)


def test_a_redis_reached_by_its_unix_socket_keeps_the_limits(settings, request, redis_socket):
    """REDIS_URL=unix://... is a URL that Redis's client, and so the rate limit of the send and RQ, take: the
    abuse limits' storage did not know the scheme, and the app did not start."""
    settings.update(REDIS_URL=f'unix://{redis_socket}', RATELIMIT_ENABLED=True, SIGNUP_LIMIT_PER_CLIENT='2/minute',
                    SIGNUP_LIMIT_PER_ADDRESS='100/minute')
    client = request.getfixturevalue('app').test_client()

    assert [post(client, '/', f'reader{n}@example.com').status_code for n in range(3)] == [200, 200, 429]
    with redis.Redis(unix_socket_path=str(redis_socket)) as counts:
        assert counts.keys('LIMITS*'), 'counted in that Redis'
