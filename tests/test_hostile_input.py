"""Hostile input, generated (hypothesis): hundreds of inputs for each public form and endpoint, the admin's
broadcast form and the webhook. Whatever comes in: never a 500, nothing written for invalid input, and
no line break in any header of any email queued."""
import base64
import io
import json
import time

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.extensions import db
from app.models import Broadcast, Client, Job, Suppression
from tests.support.forms import csrf_token

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Addresses that look nearly right, and anything at all.
ADDRESSES = st.one_of(
    st.text(max_size=300),
    st.builds(lambda local, glue, domain: f'{local}{glue}{domain}', st.text(min_size=1, max_size=40),
              st.sampled_from(['@', '@@', '@\r\n', '\n@', ' @ ']),
              st.text(alphabet='abcdefghijklmnopqrstuvwxyz.-_\r\n\x00é', min_size=1, max_size=40)))
TOKENS = st.text(alphabet=st.characters(blacklist_categories=['Cs'], blacklist_characters='/?#%'),
                 min_size=1, max_size=200)


def counts(app):
    with app.app_context():
        return tuple(db.session.scalar(sa.select(sa.func.count()).select_from(model))
                     for model in (Client, Job, Broadcast, Suppression))


def assert_no_header_injection(app):
    with app.app_context():
        for job in db.session.scalars(sa.select(Job).where(Job.queue == 'mail')):
            fields = [job.payload.get('recipient', ''), job.payload.get('subject', ''),
                      *job.payload.get('headers', {}).values()]
            assert not any('\r' in field or '\n' in field for field in fields), job.payload


@pytest.fixture
def form_client(app):
    """A browser on the sign-up page, with its CSRF token."""
    client = app.test_client()
    return client, csrf_token(client, '/')


@EXAMPLES
@given(email=ADDRESSES)
def test_the_sign_up_form_takes_anything_and_stores_only_clean_addresses(app, form_client, email):
    client, token = form_client
    before = counts(app)

    response = client.post('/', data={'email': email, 'csrf_token': token})

    assert response.status_code in (200, 400), response.status_code
    if response.status_code == 400:
        assert counts(app) == before, 'an invalid address writes nothing'
    with app.app_context():
        stored = db.session.scalars(sa.select(Client.email)).all()
    assert all(address.isascii() and '\r' not in address and '\n' not in address and ' ' not in address
               for address in stored)
    assert_no_header_injection(app)


@pytest.mark.parametrize('url', ['/', '/admin/login'])
def test_an_address_posted_as_a_file_gets_a_form_error_and_writes_nothing(app, url):
    """A multipart body may carry a file under the field's name: the form read it as the address, and
    email-validator's TypeError on it was a 500."""
    client = app.test_client()
    before = counts(app)

    response = client.post(url, data={'email': (io.BytesIO(b'jane@example.com'), 'address.txt'),
                                      'csrf_token': csrf_token(client, url)}, content_type='multipart/form-data')

    assert response.status_code == 400 and 'role="alert"' in response.get_data(as_text=True)
    assert counts(app) == before


@EXAMPLES
@given(token=TOKENS, method=st.sampled_from(['GET', 'POST']), path=st.sampled_from(['confirm', 'unsubscribe', 'block']))
def test_a_forged_link_of_any_shape_is_refused_and_changes_nothing(app, subscribers, token, method, path):
    if not counts(app)[0]:
        subscribers(2)
    before = counts(app)
    with app.app_context():
        active = db.session.scalars(sa.select(Client.active)).all()

    response = app.test_client().open(f'/{path}/{token}', method=method if path != 'confirm' else 'GET',
                                      data={'List-Unsubscribe': 'One-Click'})

    assert response.status_code in (400, 404, 405), response.status_code
    assert counts(app) == before
    with app.app_context():
        assert db.session.scalars(sa.select(Client.active)).all() == active


@pytest.fixture
def broadcast_form(admin):
    return admin, csrf_token(admin, '/admin/broadcasts/new')


@EXAMPLES
@given(subject=st.text(max_size=300), text=st.text(max_size=300), html=st.text(max_size=300),
       send_at=st.one_of(st.text(max_size=30), st.just('2031-01-01T09:00')),
       zone=st.one_of(st.text(max_size=40), st.sampled_from(['UTC', 'Europe/Paris'])),
       button=st.sampled_from(['preview', 'schedule']))
@example(subject='Sale\x00', text='Hello\x00', html='<p>\x00</p>', send_at='2031-01-01T09:00', zone='UTC',
         button='schedule')  # a NUL, which PostgreSQL's text refuses
def test_the_broadcast_form_takes_anything_and_stores_only_what_can_be_sent(app, broadcast_form, subject, text, html,
                                                                             send_at, zone, button):
    admin, token = broadcast_form
    before = counts(app)

    response = admin.post('/admin/broadcasts/new', data={'subject': subject, 'text': text, 'html': html,
                                                         'send_at': send_at, 'timezone': zone, button: button,
                                                         'csrf_token': token})

    assert response.status_code in (200, 302, 400), response.status_code
    if response.status_code != 302:
        assert counts(app)[2] == before[2], 'nothing stored unless it was scheduled'
    with app.app_context():
        subjects = db.session.scalars(sa.select(Broadcast.subject)).all()
    assert not any('\r' in stored or '\n' in stored for stored in subjects)



@pytest.mark.parametrize('field', ['subject', 'text', 'html'])
def test_a_broadcast_field_posted_as_a_file_gets_a_form_error_and_stores_nothing(app, broadcast_form, field):
    """As with the sign-up's address: a file under a text field's name was taken as its text, and Length's
    TypeError on it was a 500."""
    admin, token = broadcast_form
    before = counts(app)
    data = {'subject': 'Sale', 'text': 'Hello', 'html': '<p>Hello</p>', 'send_at': '2031-01-01T09:00',
            'timezone': 'UTC', 'schedule': 'schedule', 'csrf_token': token,
            field: (io.BytesIO(b'Hello'), 'body.txt')}

    response = admin.post('/admin/broadcasts/new', data=data, content_type='multipart/form-data')

    assert response.status_code == 400 and 'This field is required.' in response.get_data(as_text=True)
    assert counts(app) == before

@pytest.mark.parametrize('path', ['/admin/subscribers?q=a%00b', '/admin/stages/week1/preview?subscriber=%00',
                                  '/admin/mailings/week1?state=failed%00'])
def test_a_nul_in_a_query_is_refused_with_a_clear_error(admin, path):
    response = admin.get(path)

    assert response.status_code == 400 and b'A NUL character is not accepted.' in response.data


def test_a_broadcast_holding_a_nul_is_refused_and_nothing_is_stored(app, broadcast_form):
    admin, token = broadcast_form
    before = counts(app)

    response = admin.post('/admin/broadcasts/new', data={
        'subject': 'Sale', 'text': 'Hello\x00', 'html': '<p>Hello</p>', 'send_at': '2031-01-01T09:00',
        'timezone': 'UTC', 'schedule': 'schedule', 'csrf_token': token})

    assert response.status_code == 400 and b'A NUL character is not accepted.' in response.data
    assert counts(app) == before


@pytest.fixture(scope='module')
def signing_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def signed_webhook(settings, signing_key, request):
    public = signing_key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    settings['SENDGRID_WEBHOOK_PUBLIC_KEY'] = base64.b64encode(public).decode()
    return request.getfixturevalue('app')


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
EVENTS = st.lists(st.fixed_dictionaries({'event': st.sampled_from(['bounce', 'dropped', 'spamreport', 'delivered',
                                                                  'open', '']) | st.text(max_size=10),
                                         'email': st.text(max_size=40) | st.integers(),
                                         'sg_event_id': st.text(min_size=1, max_size=150) | st.integers()},
                                        optional={'type': st.text(max_size=10), 'reason': JSON}), max_size=5)


@EXAMPLES
@given(body=st.one_of(JSON, EVENTS), signed=st.booleans())
# A NUL, which PostgreSQL's text refuses, in each field the app stores (found by hypothesis: a 500).
@example(body=[{'event': 'bounce', 'email': '', 'sg_event_id': '\x00'}], signed=True)
@example(body=[{'event': 'bounce', 'email': 'a\x00@example.com', 'sg_event_id': 'x1'}], signed=True)
@example(body=[{'event': 'spamreport', 'email': 'b@example.com', 'sg_event_id': 'x2', 'reason': '\x00'}], signed=True)
# A lone surrogate (JSON's "\ud800"), which no database can store as UTF-8, in the same fields (a 500: the batch
# refused, and refused again each time SendGrid sent it again).
@example(body=[{'event': 'bounce', 'email': 'a\ud800@example.com', 'sg_event_id': 'x1'}], signed=True)
@example(body=[{'event': 'bounce', 'email': 'a@example.com', 'sg_event_id': 'x\ud800'}], signed=True)
@example(body=[{'event': 'spamreport', 'email': 'b@example.com', 'sg_event_id': 'x2', 'reason': '\ud800'}], signed=True)
def test_the_webhook_takes_any_body_signed_or_not_without_failing(signed_webhook, signing_key, body, signed):
    payload, timestamp = json.dumps(body), str(int(time.time()))
    key = signing_key if signed else ec.generate_private_key(ec.SECP256R1())
    signature = base64.b64encode(key.sign((timestamp + payload).encode(), ec.ECDSA(hashes.SHA256()))).decode()
    before = counts(signed_webhook)

    response = signed_webhook.test_client().post('/webhooks/sendgrid', data=payload, content_type='application/json',
                                                 headers={'X-Twilio-Email-Event-Webhook-Signature': signature,
                                                          'X-Twilio-Email-Event-Webhook-Timestamp': timestamp})

    assert response.status_code == (200 if signed and isinstance(body, list) and all(
        isinstance(event, dict) for event in body) else 400 if signed else 403), response.status_code
    if not signed:
        assert counts(signed_webhook) == before
