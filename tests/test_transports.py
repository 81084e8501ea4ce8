"""The ways out beyond the drip's own tests: the SendGrid Web API (against a local stand-in), the .eml
folder, and the SMTP exchange and MIME encoding details."""
import base64
import contextlib
import os
import re
import resource
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.email import Attachment, Email
from app.extensions import db
from app.failures import TransportFailure
from app.models import Client, Delivery
from app.transports import open_sender


class TestSendGrid:
    @pytest.fixture
    def settings(self, settings, sendgrid_api):
        settings.update(SENDGRID_API_KEY='SG.test-key', SENDGRID_API_URL=sendgrid_api.url)
        return settings

    def test_the_newsletter_goes_through_the_api_with_its_headers(self, app, runner, sendgrid_api, smtp, subscribers):
        subscribers(1, email='jane.doe@example.com')

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 0, result.output
        assert 'sending through SendGrid API' in result.output
        assert smtp.messages == [], 'SendGrid is used instead of SMTP'
        [request] = sendgrid_api.requests
        assert request['path'] == '/v3/mail/send'
        assert request['headers']['Authorization'] == 'Bearer SG.test-key'
        body = request['body']
        assert body['from'] == {'email': 'news@example.com', 'name': 'The Newsletter'}
        assert body['personalizations'][0]['to'] == [{'email': 'jane.doe@example.com'}]
        assert body['subject'] == 'Welcome aboard, Jane Doe: week 1'
        assert [c['type'] for c in body['content']] == ['text/plain', 'text/html']
        assert 'Hello Jane Doe,' in body['content'][0]['value']
        headers = body['headers']
        assert headers['List-Unsubscribe'].startswith('<http://newsletter.test/unsubscribe/')
        assert headers['List-Unsubscribe-Post'] == 'List-Unsubscribe=One-Click'
        assert headers['Message-ID'].startswith('<newsletter.week1.')

    def test_a_stage_written_in_html_alone_goes_through_the_api_without_an_empty_text_part(
            self, stage_templates, app, runner, sendgrid_api, subscribers):
        # SendGrid refuses a part with no content (400): every subscriber failed for good.
        stage_templates('week1', 'Subject: Welcome\n', '<p>Welcome, {{ greeting_name }}.</p>')
        subscribers(2)

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 0, result.output
        assert [r['body']['content'] for r in sendgrid_api.requests] == [
            [{'type': 'text/html', 'value': '<p>Welcome, Reader.</p>'}]] * 2

    def test_an_attachment_goes_through_the_api_base64_encoded(self, app, sendgrid_api):
        with app.app_context(), open_sender() as sender:
            sender.send(Email('admin@example.com', 'Export', 'text', '<p>html</p>', '<export.1@example.com>',
                              attachments=(Attachment('subscribers.csv.gz', 'application/gzip', b'\x1f\x8b binary'),)))

        [request] = sendgrid_api.requests
        assert request['body']['attachments'] == [{'content': base64.b64encode(b'\x1f\x8b binary').decode(),
                                                   'filename': 'subscribers.csv.gz', 'type': 'application/gzip',
                                                   'disposition': 'attachment'}]

    def test_a_refused_address_fails_alone_and_a_request_turned_away_is_retried(self, app, runner, sendgrid_api,
                                                                                subscribers):
        subscribers(3)
        sendgrid_api.answers = {'reader0@example.com': [400], 'reader1@example.com': [429, 503]}

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1
        assert 'sent 2, skipped 0, failed 1' in result.output and 'reader0@example.com: 400' in result.output
        delivered = [r['body']['personalizations'][0]['to'][0]['email'] for r in sendgrid_api.requests]
        assert delivered == ['reader0@example.com'] + ['reader1@example.com'] * 3 + ['reader2@example.com']

    @pytest.mark.parametrize('field', ['from.email', 'subject', 'content.0.value', 'headers', None])
    def test_a_400_about_the_message_rather_than_its_recipient_stops_the_run_and_fails_nobody(
            self, app, runner, sendgrid_api, subscribers, field):
        # A sender address SendGrid will not take, a subject or header it refuses: the same message goes
        # to every subscriber, so each would be refused for the same reason, and failing each one for good
        # failed the whole list (a broadcast has no --retry-failed).
        emails = subscribers(3)
        sendgrid_api.answers = {email: [(400, field)] * 10 for email in emails}

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1 and 'refused the message itself' in result.output
        tried = {r['body']['personalizations'][0]['to'][0]['email'] for r in sendgrid_api.requests}
        assert tried == {'reader0@example.com'}, 'the run stopped at the first subscriber'
        with app.app_context():
            assert db.session.scalars(sa.select(Delivery)).all() == [], 'nobody failed for what the message holds'
            assert set(db.session.scalars(sa.select(Client.num_newsletter))) == {0}

    @pytest.mark.parametrize('answer', [500, 'hang up', 'slow', 200, 'garbled'])
    def test_a_request_that_went_out_without_a_clear_answer_is_unknown_and_not_sent_again(
            self, app, runner, sendgrid_api, subscribers, answer):
        # 500: "an error occurred while SendGrid processed it"; or the whole request went out and the
        # connection closed, or the answer took longer than MAIL_TIMEOUT, or was no HTTP (its line, NUL
        # and all, is the outcome's text): any of them may have sent it.
        # SendGrid accepts a message with 202 alone: a 200 came from something else, which may or may not
        # send it.
        app.config['MAIL_TIMEOUT'] = 1
        subscribers(3)
        sendgrid_api.answers = {'reader1@example.com': [answer]}

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1
        assert 'sent 2, skipped 0, failed 0, unknown 1' in result.output and 'unknown: reader1@example.com' in result.output
        delivered = [r['body']['personalizations'][0]['to'][0]['email'] for r in sendgrid_api.requests]
        assert delivered.count('reader1@example.com') == 1, 'not retried'
        with app.app_context():
            assert db.session.scalar(sa.select(Delivery.status).join(Client)
                                     .where(Client.email == 'reader1@example.com')) == 'unknown'

    def test_an_api_that_cannot_be_reached_stops_the_run_and_loses_nothing(self, app, runner, sendgrid_api,
                                                                          subscribers):
        subscribers(3)
        sendgrid_api.stop()

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1 and 'Connection refused' in result.output
        with app.app_context():
            assert db.session.scalars(sa.select(Delivery)).all() == []

    @pytest.mark.parametrize('answer', [429, 503])
    def test_an_api_that_stays_busy_or_down_stops_the_run_with_everyone_left_due(self, app, runner, sendgrid_api,
                                                                                subscribers, answer):
        # Too many requests from this account, or SendGrid unavailable: whoever the message is for, as an
        # SMTP relay that refuses connections. Deferring each subscriber in turn took MAIL_RETRIES requests
        # and their back-off for each one of the list, and the run ended with status 0.
        emails = subscribers(3)
        sendgrid_api.answers = {email: [answer] * 10 for email in emails}

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1 and f'{answer} ' in result.output
        tried = [r['body']['personalizations'][0]['to'][0]['email'] for r in sendgrid_api.requests]
        assert tried == ['reader0@example.com'] * 4, 'tried again MAIL_RETRIES times, then the run stopped'
        with app.app_context():
            assert db.session.scalars(sa.select(Delivery)).all() == [], 'nobody deferred, all left due'

    @pytest.mark.parametrize('answer', [404, 405, 308])
    def test_an_api_address_that_is_not_the_mail_send_endpoint_stops_the_run_and_loses_nothing(
            self, app, runner, sendgrid_api, subscribers, answer):
        # SENDGRID_API_URL with a path (https://api.sendgrid.com/v3, as SendGrid's docs write the
        # endpoint) posts to /v3/v3/mail/send: 404. Another host answers 405, or moves us on (http to https).
        emails = subscribers(3)
        sendgrid_api.answers = {email: [answer] * 10 for email in emails}

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1 and f'answered {answer}' in result.output and 'SENDGRID_API_URL' in result.output
        tried = {r['body']['personalizations'][0]['to'][0]['email'] for r in sendgrid_api.requests}
        assert tried == {'reader0@example.com'}, 'the run stopped at the first subscriber'
        with app.app_context():
            assert db.session.scalars(sa.select(Delivery)).all() == [], 'nobody failed for the address being wrong'
            assert set(db.session.scalars(sa.select(Client.num_newsletter))) == {0}

    @pytest.mark.parametrize('status', [301, 302, 303])
    def test_a_redirect_is_not_followed_so_the_api_key_goes_nowhere_else_and_the_run_stops(
            self, app, runner, sendgrid_api, subscribers, status):
        # urllib follows a 301, 302 or 303 with a GET that carries every header of the POST but its body's,
        # the API key's Authorization included, to whatever host the Location names; and the page it found
        # there left the message's fate unknown.
        emails = subscribers(3)
        sendgrid_api.moved_status = status
        sendgrid_api.moved_to = f'{sendgrid_api.url.replace("127.0.0.1", "localhost")}/elsewhere'  # another origin
        sendgrid_api.answers = {email: ['moved'] * 10 for email in emails}

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert sendgrid_api.gets == [], 'nothing went where the redirect pointed'
        assert result.exit_code == 1 and f'answered {status}' in result.output and 'SENDGRID_API_URL' in result.output
        with app.app_context():
            assert db.session.scalars(sa.select(Delivery)).all() == [], 'nothing sent, nobody failed: all left due'
            assert set(db.session.scalars(sa.select(Client.num_newsletter))) == {0}

    def test_an_api_key_read_from_a_file_with_its_last_line_break_is_taken_without_it(
            self, app, sendgrid_api, subscribers, flask_command):
        # A key kept in a file (a Kubernetes or Docker secret) comes with the file's last line break, which
        # no HTTP header may hold: every request failed before it went, saying the key in the error.
        subscribers(1)

        command = flask_command('send-newsletter-email', 'week1', SENDGRID_API_KEY='SG.test-key\n',
                                SENDGRID_API_URL=sendgrid_api.url)
        out, err = command.communicate(timeout=60)

        assert command.returncode == 0, out + err
        [request] = sendgrid_api.requests
        assert request['headers']['Authorization'] == 'Bearer SG.test-key'

    def test_a_rejected_api_key_stops_the_run_and_loses_nothing(self, app, runner, sendgrid_api, subscribers):
        emails = subscribers(3)
        sendgrid_api.answers = {email: [401] * 10 for email in emails}  # a rejected key refuses every request

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 1 and 'refused the API key' in result.output
        with app.app_context():
            assert db.session.scalars(sa.select(Delivery)).all() == []
            assert set(db.session.scalars(sa.select(Client.num_newsletter))) == {0}


class TestMailFolder:
    @pytest.fixture
    def settings(self, settings):
        settings.update(MAIL_SERVER=None, MAIL_TRANSPORT='folder')
        return settings

    def test_without_mail_settings_each_message_is_an_eml_file(self, app, runner, smtp, subscribers):
        emails = subscribers(3)

        result = runner.invoke(args=['send-newsletter-email', 'week1'])

        assert result.exit_code == 0, result.output
        assert smtp.messages == []
        files = sorted(Path(app.config['MAIL_FOLDER']).glob('*.eml'))
        messages = [message_from_bytes(f.read_bytes(), policy=policy.default) for f in files]
        assert sorted(m['To'] for m in messages) == emails
        assert all(m['List-Unsubscribe-Post'] == 'List-Unsubscribe=One-Click' for m in messages)

    @pytest.fixture
    def disk_full_above(self):
        """Writes past `size` bytes in a file fail, as on a full disk (RLIMIT_FSIZE: Python ignores the
        signal, so the write raises), until the block's end."""
        @contextlib.contextmanager
        def limit(size):
            before = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, before[1]))
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, before)
        return limit

    def test_a_message_that_cannot_be_written_whole_leaves_nothing_in_the_folder(self, app, disk_full_above):
        # A part-written temporary file kept the space it took: on the disk that also holds the SQLite
        # database (the instance folder), the app's own leftovers kept it full.
        email = Email('jane@example.com', 'Large', 'word ' * 100_000, '<p>html</p>', '<large.1@example.com>')
        with app.app_context(), open_sender() as sender:
            email.mime  # built before the disk fills up
            Path(app.config['MAIL_FOLDER']).mkdir(parents=True)
            with disk_full_above(100_000), pytest.raises(TransportFailure, match='cannot write'):
                sender.send(email)

        assert os.listdir(app.config['MAIL_FOLDER']) == []


def test_a_message_is_well_formed_mime_with_crlf_lines_and_survives_a_round_trip(app):
    from app.email import Email
    from app.email import mime_message

    text = 'Grüße, Zoë!\nA line with = and trailing space \n' + 'long ' * 100 + '\r\n.\nend'
    html = '<p>Ünïcode & <b>bold</b></p>' + '<span>x</span>' * 200
    email = Email('jane@example.com', 'Été: a long subject with ünïcode, ' + 'word ' * 30, text, html,
                  '<m.1@example.com>', {'List-Unsubscribe': '<https://news.example.com/unsubscribe/' + 'T' * 90
                                        + '>, <mailto:u@example.com?subject=unsubscribe>'})
    with app.app_context():
        raw = mime_message(email)

    lines = raw.split(b'\r\n')
    assert b'\n' not in b''.join(lines) and b'\r' not in b''.join(lines), 'every line ends in CRLF'
    assert max(map(len, lines)) <= 998
    message = message_from_bytes(raw, policy=policy.default)
    assert message.defects == [] and all(part.defects == [] for part in message.walk())
    assert message['Subject'] == email.subject
    assert message['List-Unsubscribe'] == email.headers['List-Unsubscribe']
    assert message.get_body(('plain',)).get_content().replace('\r\n', '\n') == text.replace('\r\n', '\n')
    assert message.get_body(('html',)).get_content() == html


def test_lines_that_start_with_a_period_arrive_intact_over_smtp(app, smtp):
    """A line of just "." would end the message early (RFC 5321 4.5.2): each such line is doubled on
    the wire, and the server takes the doubling off again."""
    from app.email import Email
    from app.smtp import SmtpSender

    text = 'Before\n.\n..two\n.three\nAfter'
    email = Email('jane@example.com', 'Periods', text, '<p>.</p>', '<m.2@example.com>')
    with app.app_context(), SmtpSender(app.config) as sender:
        sender.send(email)

    [message] = smtp.messages
    assert message.get_body(('plain',)).get_content().replace('\r\n', '\n') == text


@pytest.mark.parametrize('subject', ['x' * 69, ('Plain words that go on ' * 5).strip(), 'Schöne Grüße'])
def test_a_subject_short_or_long_plain_or_not_comes_back_as_written_in_lines_of_78(app, subject):
    from app.email import Email

    with app.app_context():
        raw = Email('jane@example.com', subject, 'text', '<p>html</p>', '<m.3@example.com>').mime

    head = raw.split(b'\r\n\r\n', 1)[0].decode('ascii')
    subject_lines = re.search(r'^Subject: .*?\r\n(?! )', head + '\r\n', re.M | re.S).group().splitlines()
    assert max(map(len, subject_lines)) <= 78
    assert message_from_bytes(raw, policy=policy.default)['Subject'] == subject
