"""The three ways out (SMTP through Flask-Mail, the SendGrid Web API, .eml files in a folder) behind one
`send(email)`, and what their failures mean. Every caller retries by the same rule:

- TemporaryFailure: try again later (SMTP 4xx, HTTP 429/5xx);
- TransportFailure, a TemporaryFailure: the way out itself is down (refused or dropped connection,
  rejected credentials), so nothing else will get through either until it is back;
- PermanentFailure: this message will never be accepted (SMTP 5xx for the address, HTTP 4xx)."""
import functools
import logging
import re
import secrets
import smtplib
import socket
import threading
import time
import urllib.error
from binascii import b2a_qp
from concurrent.futures import Future, ThreadPoolExecutor
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr
from pathlib import Path

import flask_mail
from flask import current_app
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import From, Mail
from sendgrid.helpers.mail import Header as SendGridHeader

from app.models import utcnow
from app.ratelimit import rate_limiter

log = logging.getLogger(__name__)


class DeliveryFailure(Exception):
    pass


class TemporaryFailure(DeliveryFailure):
    pass


class TransportFailure(TemporaryFailure):
    pass


class PermanentFailure(DeliveryFailure):
    pass


def open_sender():
    """The configured way out, as a context manager that closes its connection when done."""
    config = current_app.config
    if config['SENDGRID_API_KEY']:
        return SendGridSender(config)
    if config['MAIL_SERVER']:
        return SmtpSender(config)
    return FolderSender(config)


def retry_delay(attempt, cap=None):
    """Seconds to wait before attempt number `attempt + 1`: MAIL_RETRY_BACKOFF, doubling each time."""
    delay = current_app.config['MAIL_RETRY_BACKOFF'] * 2 ** (attempt - 1)
    return min(delay, cap) if cap else delay


def mime_message(email):
    """The message as MIME bytes: multipart/alternative, text and HTML in quoted-printable UTF-8.

    Assembled here from the stdlib's encoders (Header for encoded-words, formataddr, b2a_qp) rather
    than by EmailMessage.as_bytes(), which costs about 1.2 ms a message: more than the SMTP transaction
    itself, and the largest single cost in the drip's profile (see bench/drip.py).
    List-Unsubscribe and the other extra headers keep their URLs verbatim, folded only between their
    <...> items: mail clients do not decode encoded-words there (RFC 2369). Every line ends in CRLF:
    smtplib passes bytes through as they are, and a bare LF is what SMTP smuggling is made of.
    :raise PermanentFailure: see refuse_unsendable."""
    refuse_unsendable(email)
    headers = {'From': _sender_header(current_app.config['MAIL_DEFAULT_SENDER']), 'To': email.recipient,
               'Subject': _subject_header(email.subject), 'Date': _date_header(int(time.time())),
               'Message-ID': email.message_id, **email.headers}
    for name in email.headers:
        headers[name] = headers[name].replace('>, <', '>,\r\n <')
    boundary = f'=_{secrets.token_hex(16)}'
    lines = [f'{name}: {value}' for name, value in headers.items()]
    lines += ['MIME-Version: 1.0', f'Content-Type: multipart/alternative; boundary="{boundary}"', '']
    parts = b''.join(
        b'\r\n--%s\r\nContent-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable'
        b'\r\n\r\n%s' % (boundary.encode(), subtype, b2a_qp(body.encode('utf-8')).replace(b'\n', b'\r\n'))
        for subtype, body in ((b'plain', email.text), (b'html', email.html)))
    return '\r\n'.join(lines).encode('ascii') + parts + b'\r\n--%s--\r\n' % boundary.encode()


def refuse_unsendable(email):
    """Whichever way the email goes out.  :raise PermanentFailure: for a line break in any header value
    (header injection), or a non-ASCII address: that needs SMTPUTF8 (RFC 6531), which we do not speak,
    and would otherwise break the run at the first such subscriber instead of failing that one alone."""
    if not email.recipient.isascii():
        raise PermanentFailure(f'refused: non-ASCII address {email.recipient!r} (SMTPUTF8 is not supported)')
    for name, value in {'To': email.recipient, 'Subject': email.subject, 'Message-ID': email.message_id,
                        **email.headers}.items():
        if '\r' in value or '\n' in value:
            raise PermanentFailure(f'refused: line break in the {name} header of the message to {email.recipient!r}')


_SUBJECT_FITS = 78 - len('Subject: ')  # RFC 5322 2.1.1: lines of at most 78 characters


def _subject_header(subject):
    """A short ASCII subject is its own encoding; Header() would take as long as the rest of the message
    to tell us so."""
    if subject.isascii() and len(subject) <= _SUBJECT_FITS:
        return subject
    return Header(subject, 'us-ascii' if subject.isascii() else 'utf-8', header_name='Subject').encode(linesep='\r\n')


@functools.lru_cache(maxsize=1)
def _date_header(second):
    """The Date header, formatted once a second rather than once a message."""
    return formatdate(second, localtime=True)


@functools.lru_cache(maxsize=8)
def _sender_header(sender):
    return formataddr(parseaddr(sender), charset='utf-8')


class _Sender:
    """`send(email, meanwhile=None)` delivers one email or raises a DeliveryFailure. `meanwhile` is
    optional work (preparing the caller's next message) to do while waiting for the way out; a sender
    that has no such wait ignores it, and the work is then done when that message is sent."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        pass


class SmtpSender(_Sender):
    """One SMTP connection, reused for many messages. We drive the MAIL, RCPT and DATA commands through
    smtplib ourselves rather than Flask-Mail's Connection.send: that one reconnects after MAIL_MAX_EMAILS
    *after* a message was accepted, and a failed reconnect there would make an accepted message look failed
    (and be sent again). Flask-Mail also opens its socket without a time-out, so a silent server would
    hang cron forever.

    Rather than smtplib's sendmail, each command is sent and its reply read in two steps, so that the
    caller's `meanwhile()` runs in between: while the server works on the command, the caller prepares
    its next message. That time is otherwise spent idle on both sides (bench/interleaved.py)."""

    def __init__(self, config):
        super().__init__(config)
        self.state = current_app.extensions['mail']
        self.envelope_from = parseaddr(config['MAIL_DEFAULT_SENDER'])[1]
        self.smtp = None
        self.sent_on_connection = 0

    def describe(self):
        return f'SMTP {self.state.server}:{self.state.port}'

    def _connect(self):
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(self.config['MAIL_TIMEOUT'])
        try:
            self.smtp = flask_mail.Connection(self.state).configure_host()
            self.smtp.ehlo_or_helo_if_needed()
        except (OSError, smtplib.SMTPException) as exc:
            raise TransportFailure(f'cannot connect to {self.describe()}: {exc}') from exc
        finally:
            socket.setdefaulttimeout(previous)
        self.sent_on_connection = 0

    def send(self, email, meanwhile=None):
        """:param meanwhile: called while each command waits for its reply; it must not raise."""
        payload = email.mime
        if self.smtp is None:
            self._connect()
        meanwhile = meanwhile or (lambda: None)
        smtp = self.smtp
        try:
            smtp.putcmd('MAIL', f'FROM:<{self.envelope_from}>')
            # RFC 5321 4.5.2: a line that starts with a period gets another; a lone period ends the data.
            # Done while the server answers MAIL, not once it has said 354 and waits for the data.
            data = re.sub(rb'(?m)^\.', b'..', payload) + b'.\r\n'
            code, reply = self._reply(meanwhile)
            if code != 250:
                # Our own sender address refused is a configuration problem, not this subscriber's.
                self.close()
                raise TransportFailure(f'{self.describe()} refused sender: {code} {reply!r}')
            smtp.putcmd('RCPT', f'TO:<{email.recipient}>')
            code, reply = self._reply(meanwhile)
            if code in (250, 251):
                smtp.putcmd('DATA')
                code, reply = self._reply(meanwhile)
            if code != 354:
                smtp.rset()
                raise self._failure(code, reply, email)
            smtp.send(data)
            code, reply = self._reply(meanwhile)
            if code != 250:
                raise self._failure(code, reply, email)
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise TransportFailure(f'{self.describe()}: {exc or type(exc).__name__}') from exc
        self.sent_on_connection += 1
        if self.state.max_emails and self.sent_on_connection >= self.state.max_emails:
            self.close()  # the next send reconnects

    def _reply(self, meanwhile):
        meanwhile()
        return self.smtp.getreply()

    def _failure(self, code, reply, email):
        text = f'{code} {reply.decode(errors="replace") if isinstance(reply, bytes) else reply}'
        if code == 421:  # the server is closing the connection
            self.close()
            return TransportFailure(f'{self.describe()}: {text}')
        if 400 <= code < 500:
            return TemporaryFailure(f'{email.recipient}: {text}')
        return PermanentFailure(f'{email.recipient}: {text}')

    def close(self):
        if self.smtp is not None:
            try:
                self.smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass  # already gone: nothing left to close cleanly
            self.smtp = None


class SendGridSender(_Sender):
    """The SendGrid v3 Web API: one HTTPS request per message, through the `sendgrid` package."""

    def __init__(self, config):
        super().__init__(config)
        self.client = SendGridAPIClient(api_key=config['SENDGRID_API_KEY'], host=config['SENDGRID_API_URL'])

    def describe(self):
        return f'SendGrid API {self.config["SENDGRID_API_URL"]}'

    def send(self, email, meanwhile=None):
        refuse_unsendable(email)
        name, address = parseaddr(self.config['MAIL_DEFAULT_SENDER'])
        message = Mail(from_email=From(address, name or None), to_emails=email.recipient,
                       subject=email.subject, plain_text_content=email.text, html_content=email.html)
        for key, value in {**email.headers, 'Message-ID': email.message_id}.items():
            message.add_header(SendGridHeader(key, value))
        try:
            self.client.client.mail.send.post(request_body=message.get(), timeout=self.config['MAIL_TIMEOUT'])
        except HTTPError as exc:
            text = f'{exc.status_code} {exc.body!r}'
            if exc.status_code in (401, 403):
                raise TransportFailure(f'{self.describe()} refused the API key: {text}') from exc
            if exc.status_code == 429 or exc.status_code >= 500:
                raise TemporaryFailure(f'{email.recipient}: {text}') from exc
            raise PermanentFailure(f'{email.recipient}: {text}') from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TransportFailure(f'{self.describe()}: {exc}') from exc


class FolderSender(_Sender):
    """The embedded default: each message becomes an .eml file, so a new install shows exactly what it
    would have sent without an SMTP server or an API key."""

    def describe(self):
        return f'folder {self.config["MAIL_FOLDER"]}'

    def send(self, email, meanwhile=None):
        payload = email.mime
        folder = Path(self.config['MAIL_FOLDER'])
        name = re.sub(r'[^A-Za-z0-9.@-]+', '_', email.message_id.strip('<>'))
        path = folder / f'{utcnow():%Y%m%dT%H%M%S.%f}-{name}.eml'
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
        except OSError as exc:
            raise TransportFailure(f'cannot write {path}: {exc}') from exc
        log.info('mail to %s written to %s', email.recipient, path)


class SenderPool:
    """`concurrency` connections of the configured way out, each owned by one thread of a fixed pool:
    messages go out in parallel without a thread per message. `submit(fn, *args)` runs
    `fn(sender, *args)` on some connection and returns its Future.

    With one connection the pool is `inline`: `submit` runs on the caller's thread. A lone sending
    thread gains nothing from overlapping with the caller and loses to it on the GIL (bench/drip.py:
    0.62 -> 0.66-0.68 of the transport limit at 10,000, 0.71 -> 0.72 at 100,000 on PostgreSQL). Once the way out is down
    (TransportFailure) an inline pool runs nothing more and hands back cancelled Futures, as the
    threaded one cancels what has not started."""

    def __init__(self, concurrency):
        app = current_app._get_current_object()
        self.local, self.senders, self.lock = threading.local(), [], threading.Lock()
        self.limiter = rate_limiter()
        self.inline, self.down = concurrency == 1, False
        # Each pool thread keeps an app context for its lifetime: senders read the app's settings.
        self.executor = None if self.inline else ThreadPoolExecutor(
            concurrency, thread_name_prefix='sender', initializer=lambda: app.app_context().push())

    def describe(self):
        return open_sender().describe()

    def submit(self, fn, *args):
        if not self.inline:
            return self.executor.submit(self._call, fn, *args)
        future = Future()
        if self.down:
            future.cancel()
            future.set_running_or_notify_cancel()  # what an executor does: wait() counts it done only then
            return future
        try:
            future.set_result(self._call(fn, *args))
        except Exception as exc:  # handed to the caller through the Future, as a pool thread would
            self.down = isinstance(exc, TransportFailure)
            future.set_exception(exc)
        return future

    def _call(self, fn, *args):
        sender = getattr(self.local, 'sender', None)
        if sender is None:
            sender = self.local.sender = open_sender() if self.limiter is None else _Paced(open_sender(), self.limiter)
            with self.lock:
                self.senders.append(sender)
        return fn(sender, *args)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        for sender in self.senders:
            sender.close()


class _Paced:
    """A sender that waits for its slot under MAIL_RATE_LIMIT before each attempt (retries count too:
    the provider sees every one)."""

    def __init__(self, sender, limiter):
        self.sender, self.limiter = sender, limiter

    def send(self, email, meanwhile=None):
        self.limiter.acquire()
        return self.sender.send(email, meanwhile)

    def close(self):
        self.sender.close()
