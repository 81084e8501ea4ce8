"""Leaving: the personal link in every email, the one-button page, and RFC 8058 one-click."""
import pytest
import sqlalchemy as sa
from itsdangerous import URLSafeSerializer

from app.extensions import db
from app.links import unsubscribe_token
from app.models import Client
from tests.support.forms import csrf_token


@pytest.fixture
def reader(app, subscribers):
    subscribers(1)
    with app.app_context():
        client = db.session.scalar(sa.select(Client))
        return client.id, f'/unsubscribe/{unsubscribe_token(client.id, client.email)}'


def active(app):
    with app.app_context():
        return db.session.scalar(sa.select(Client.active))


def test_the_link_shows_a_one_button_page_and_changes_nothing(app, client, reader):
    _, url = reader
    page = client.get(url)

    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert 'reader0@example.com' in text and 'name="csrf_token"' in text and 'value="Unsubscribe"' in text
    assert active(app) is True


def test_pressing_the_button_unsubscribes(app, client, reader):
    _, url = reader
    response = client.post(url, data={'csrf_token': csrf_token(client, url)})

    assert response.status_code == 200 and 'will receive no more emails' in response.get_data(as_text=True)
    assert active(app) is False
    with app.app_context():
        assert db.session.scalar(sa.select(Client.unsubscribed_at)) is not None


def test_a_post_from_another_site_without_csrf_token_changes_nothing(app, client, reader):
    _, url = reader
    response = client.post(url, data={})

    assert response.status_code == 400
    assert active(app) is True


def test_one_click_post_from_a_mail_provider_unsubscribes(app, reader):
    _, url = reader
    provider = app.test_client()  # a fresh client: no cookies, no session, no CSRF token

    response = provider.post(url, data={'List-Unsubscribe': 'One-Click'},
                             content_type='application/x-www-form-urlencoded')

    assert response.status_code == 200
    assert active(app) is False


def test_unsubscribing_twice_is_harmless(app, client, reader):
    _, url = reader
    for _ in range(2):
        assert client.post(url, data={'List-Unsubscribe': 'One-Click'}).status_code == 200
    assert active(app) is False


@pytest.mark.parametrize('method', ['GET', 'POST'])
@pytest.mark.parametrize('forge', [
    lambda token: token[:-1] + ('A' if token[-1] != 'A' else 'B'),  # tampered signature
    lambda token: '2' + token[1:],  # someone else's id with this signature
    lambda token: token.split('.')[0],  # signature stripped
])
def test_a_forged_link_is_refused_and_changes_nothing(app, reader, method, forge):
    _, url = reader
    prefix, token = url.rsplit('/', 1)

    response = app.test_client().open(f'{prefix}/{forge(token)}', method=method,
                                      data={'List-Unsubscribe': 'One-Click'})

    assert response.status_code == 400 and 'not valid' in response.get_data(as_text=True)
    assert active(app) is True


def test_a_link_signed_with_another_key_is_refused(app, reader):
    client_id, _ = reader
    other = app.test_client()
    with app.app_context():
        app.config['SECRET_KEY'], real = 'someone-elses-key', app.config['SECRET_KEY']
        forged = unsubscribe_token(client_id, 'reader0@example.com')
        app.config['SECRET_KEY'] = real

    assert other.post(f'/unsubscribe/{forged}', data={'List-Unsubscribe': 'One-Click'}).status_code == 400
    assert active(app) is True


def test_a_link_for_a_deleted_subscriber_is_404(app, reader):
    _, url = reader
    with app.app_context():
        db.session.execute(sa.delete(Client))
        db.session.commit()
    assert app.test_client().get(url).status_code == 404


def test_a_link_made_for_another_address_on_the_same_row_is_refused(app, reader):
    client_id, _ = reader
    with app.app_context():
        for_someone_before = unsubscribe_token(client_id, 'someone.before@example.com')

    response = app.test_client().post(f'/unsubscribe/{for_someone_before}', data={'List-Unsubscribe': 'One-Click'})

    assert response.status_code == 404 and active(app) is True


def test_a_link_sent_before_links_named_their_address_still_unsubscribes(app, reader):
    client_id, _ = reader
    with app.app_context():
        legacy = URLSafeSerializer(app.config['SECRET_KEY'], salt='unsubscribe').dumps(client_id)

    response = app.test_client().post(f'/unsubscribe/{legacy}', data={'List-Unsubscribe': 'One-Click'})

    assert response.status_code == 200 and active(app) is False

