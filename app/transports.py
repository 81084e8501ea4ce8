"""The three ways out (SMTP in app/smtp.py, the SendGrid Web API, .eml files in a folder) behind one
`send(email)` (app/sender.py), each raising the failures of app/failures.py by the same rule: nothing can
have arrived until the message's end has left us (the final dot, the whole API request, the file's
rename); from then on, a missing answer is OutcomeUnknown, never a failure to retry.

Which way out is used is decided once, by mail_transport(), and a deployment cannot fall into the folder
by accident: once the settings look like a deployment, the folder must be chosen by name."""
import base64
import contextlib
import http.client
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future
from email.utils import parseaddr
from pathlib import Path
from urllib.parse import urlsplit

import python_http_client
from flask import current_app
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Attachment as SendGridAttachment
from sendgrid.helpers.mail import Disposition, FileContent, FileName, FileType, From, Mail
from sendgrid.helpers.mail import Header as SendGridHeader

from app.database import utcnow
from app.failures import OutcomeUnknown, PermanentFailure, TransportFailure
from app.ratelimit import rate_limiter
from app.sender import Sender
from app.smtp import SmtpSender

log = logging.getLogger(__name__)

TRANSPORTS = ('smtp', 'sendgrid', 'folder')
LOOPBACK = ('localhost', '127.0.0.1', '::1')


def init_app(app):
    """Say no at start-up, not at the first send: a way out chosen badly, or none for a deployment (see
    mail_transport), or a SendGrid API that would get the API key in clear; and say loudly, at every start,
    that TLS is not being verified."""
    app.config['MAIL_FOLDER'] = app.config.get('MAIL_FOLDER') or str(Path(app.instance_path) / 'mail')
    transport, api = mail_transport(app.config), urlsplit(app.config['SENDGRID_API_URL'])
    if transport == 'sendgrid' and api.scheme != 'https' and api.hostname not in LOOPBACK:
        raise ValueError(f'SENDGRID_API_URL must be https:// (every request carries the API key), not '
                         f'{app.config["SENDGRID_API_URL"]!r}')
    if transport == 'smtp':
        _check_smtp(app.config)
    if transport == 'smtp' and not app.config['MAIL_TLS_VERIFY']:
        app.logger.warning('MAIL_TLS_VERIFY is off: the certificate of %s is not checked, so anyone on the way '
                           'to it can read MAIL_PASSWORD and every email', app.config['MAIL_SERVER'])


def _check_smtp(config):
    """:raise ValueError: for SMTP settings that cannot work: a user name without its password (or the other
    way round), with which the app would send without signing in, and a relay that wants it refuse every
    recipient for good; or a CA file it cannot read, which would stop every run."""
    for name, other in (('MAIL_USERNAME', 'MAIL_PASSWORD'), ('MAIL_PASSWORD', 'MAIL_USERNAME')):
        if config[name] and not config[other]:
            raise ValueError(f'{name} needs {other}: with one and not the other, the app does not sign in to '
                             f'{config["MAIL_SERVER"]}')
    if ca_file := config['MAIL_TLS_CA_FILE']:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f'MAIL_TLS_CA_FILE: cannot read {ca_file!r} as certificates: {exc}') from None


def mail_transport(config):
    """'smtp', 'sendgrid' or 'folder': MAIL_TRANSPORT if set, else SendGrid when SENDGRID_API_KEY is set,
    SMTP when MAIL_SERVER is, and the folder only on a machine that does not look like a deployment.
    :raise ValueError: with what to set."""
    chosen = (config.get('MAIL_TRANSPORT') or '').strip().lower()
    if chosen and chosen not in TRANSPORTS:
        raise ValueError(f'MAIL_TRANSPORT must be one of {", ".join(TRANSPORTS)}, not {chosen!r}')
    if chosen == 'smtp' and not config['MAIL_SERVER']:
        raise ValueError('MAIL_TRANSPORT=smtp needs MAIL_SERVER')
    if chosen == 'sendgrid' and not config['SENDGRID_API_KEY']:
        raise ValueError('MAIL_TRANSPORT=sendgrid needs SENDGRID_API_KEY')
    if chosen:
        return chosen
    if config['SENDGRID_API_KEY']:
        return 'sendgrid'
    if config['MAIL_SERVER']:
        return 'smtp'
    if deployment := looks_deployed(config):
        # A process started without the mail settings (cron, with another environment than the web
        # service) would otherwise write every mailing into the folder, mark it sent, and exit 0.
        raise ValueError(
            f'no mail settings, and {deployment}: set MAIL_SERVER (SMTP) or SENDGRID_API_KEY, or MAIL_TRANSPORT=folder '
            f'to write every email into {config.get("MAIL_FOLDER") or "the instance folder"} on purpose')
    return 'folder'


def looks_deployed(config):
    """:return: what makes the settings look like a deployment rather than a first try, or ''."""
    host = urlsplit(config['BASE_URL']).hostname or ''
    if host not in LOOPBACK:
        return f'BASE_URL is {config["BASE_URL"]}'
    if not config['SQLALCHEMY_DATABASE_URI'].startswith('sqlite'):
        return 'DATABASE_URL is a database server'
    return ''


def open_sender():
    """The configured way out, as a context manager that closes its connection when done."""
    config = current_app.config
    return {'smtp': SmtpSender, 'sendgrid': SendGridSender, 'folder': FolderSender}[mail_transport(config)](config)


def describe_transport():
    """Where mail goes, in words for a run's summary."""
    config = current_app.config
    return {'smtp': lambda: f'SMTP {config["MAIL_SERVER"]}:{config["MAIL_PORT"]}',
            'sendgrid': lambda: f'SendGrid API {config["SENDGRID_API_URL"]}',
            'folder': lambda: f'folder {config["MAIL_FOLDER"]}'}[mail_transport(config)]()


def retry_delay(attempt, cap=None):
    """Seconds to wait before attempt number `attempt + 1`: MAIL_RETRY_BACKOFF, doubling each time. The
    doubling stops at 2**64, far past any cap: from 2**1024 on, a float cannot hold it, and a delivery
    sent again after giving up (its attempts kept) can have had a thousand answers."""
    delay = current_app.config['MAIL_RETRY_BACKOFF'] * 2 ** min(attempt - 1, 64)
    return min(delay, cap) if cap else delay


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # the 3xx is raised as an HTTPError, as any other answer that is not a success


class _MailSendEndpoint(python_http_client.Client):
    """POST /v3/mail/send as the `sendgrid` package makes it, through an opener that follows no redirect:
    urllib's would repeat the request as a GET carrying every header, the API key's Authorization
    included, to whatever host the Location names."""

    def __init__(self, api):
        super().__init__(host=api.client.host, request_headers=api.client.request_headers, version=3,
                         url_path=['mail', 'send'])

    def _make_request(self, opener, request, timeout=None):
        return super()._make_request(urllib.request.build_opener(_NoRedirect), request, timeout)


class SendGridSender(Sender):
    """The SendGrid v3 Web API: one HTTPS request per message, through the `sendgrid` package. urllib
    wraps in URLError only what fails while the request is being sent; a failure after that, while
    waiting for the answer, leaves the message possibly sent."""

    def __init__(self, config):
        super().__init__(config)
        self.endpoint = _MailSendEndpoint(SendGridAPIClient(api_key=config['SENDGRID_API_KEY'],
                                                            host=config['SENDGRID_API_URL']))

    def describe(self):
        return f'SendGrid API {self.config["SENDGRID_API_URL"]}'

    def send(self, email, meanwhile=None, then=None):
        email.refuse_unsendable()
        name, address = parseaddr(self.config['MAIL_DEFAULT_SENDER'])
        # An empty part (a stage written in HTML alone) is left out: SendGrid refuses one with a 400.
        message = Mail(from_email=From(address, name or None), to_emails=email.recipient, subject=email.subject,
                       plain_text_content=email.text or None, html_content=email.html or None)
        for key, value in {**email.headers, 'Message-ID': email.message_id}.items():
            message.add_header(SendGridHeader(key, value))
        for attachment in email.attachments:
            message.add_attachment(SendGridAttachment(FileContent(base64.b64encode(attachment.data).decode()),
                                                      FileName(attachment.filename), FileType(attachment.mimetype),
                                                      Disposition('attachment')))
        try:
            answer = self.endpoint.post(request_body=message.get(), timeout=self.config['MAIL_TIMEOUT'])
        except HTTPError as exc:
            text = f'{exc.status_code} {exc.body!r}'
            if exc.status_code in (401, 403):
                raise TransportFailure(f'{self.describe()} refused the API key: {text}') from exc
            if exc.status_code in (429, 503):
                # Turned away before any work, whoever the message is for: too many requests from this
                # account, or SendGrid down. Deferred one by one, the rest of the list would each wait out
                # MAIL_RETRIES back-offs for the same answer.
                raise TransportFailure(f'{self.describe()} turned the request away: {text}') from exc
            if exc.status_code >= 500:  # "an error occurred while SendGrid processed it": maybe after sending
                raise OutcomeUnknown(f'{self.describe()} answered {text} while processing it') from exc
            if exc.status_code == 413 or exc.status_code == 400 and _refuses_the_recipient(exc.body):
                raise PermanentFailure(f'{email.recipient}: {text}') from exc  # this message: its address, or its size
            if exc.status_code == 400:
                # The sender, the subject, a header: what every subscriber's copy holds, so each would be
                # refused in turn, and failing each for good would fail the whole list.
                raise TransportFailure(f'{self.describe()} refused the message itself: {text}') from exc
            # Not found, method not allowed, moved (a redirect is not followed): an answer about where we
            # post, which no message gets past until the setting changes; failing each subscriber for good
            # would fail the whole list.
            raise TransportFailure(f'{self.describe()} answered {text}: SENDGRID_API_URL must be SendGrid\'s '
                                   'API, such as https://api.sendgrid.com, without a path') from exc
        except urllib.error.URLError as exc:
            raise TransportFailure(f'{self.describe()}: {exc.reason}') from exc
        except (OSError, http.client.HTTPException) as exc:
            raise OutcomeUnknown(f'{self.describe()}: no answer to the request: {exc or type(exc).__name__}') from exc
        if answer.status_code != 202:
            # SendGrid takes a message with 202 Accepted alone. Any other success came from something else,
            # a server at a wrong SENDGRID_API_URL: whether that sends it, nobody here can tell.
            raise OutcomeUnknown(f'{self.describe()} answered {answer.status_code}, not SendGrid\'s 202 Accepted: '
                                 'is SENDGRID_API_URL SendGrid\'s API?')


def _refuses_the_recipient(body):
    """:return: whether a 400's errors are all about the recipient's address (their `field`, as SendGrid
    names it, personalizations.0.to.0.email), rather than about what the message holds."""
    try:
        errors = json.loads(body)['errors']
        return bool(errors) and all(re.match(r'personalizations\.\d+\.to\b', error.get('field') or '')
                                    for error in errors)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False


class FolderSender(Sender):
    """The embedded default: each message becomes an .eml file, so a new install shows exactly what it
    would have sent without an SMTP server or an API key. Written under a temporary name and renamed, so
    a file either is there whole or not at all."""

    def describe(self):
        return f'folder {self.config["MAIL_FOLDER"]}'

    def send(self, email, meanwhile=None, then=None):
        payload = email.mime
        folder = Path(self.config['MAIL_FOLDER'])
        name = re.sub(r'[^A-Za-z0-9.@-]+', '_', email.message_id.strip('<>'))
        path = folder / f'{utcnow():%Y%m%dT%H%M%S.%f}-{name}.eml'
        writing = None
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix='.writing-', delete=False) as file:
                writing = file.name
                file.write(payload)
            os.replace(writing, path)
        except OSError as exc:
            if writing is not None:  # part-written on a full disk, it would keep the space it took
                with contextlib.suppress(OSError):
                    os.unlink(writing)
            raise TransportFailure(f'cannot write {path}: {exc}') from exc
        log.info('mail to %s written to %s', email.recipient, path)


class SenderPool:
    """`size` connections of the configured way out. `submit(fn, item, successor)` runs `fn(sender, item,
    successor)` on one of them and returns its Future, where `successor` is the item that connection
    will run next, if that is known by then: its sender may start on it early (Sender's `then`).

    With one connection the pool is `inline`: `submit` runs on the caller's thread, and `successor` is the
    caller's own, the item it will submit next. A lone sending thread gains nothing from overlapping
    with the caller and loses to it on the GIL (bench/README.md).

    With more, each connection is owned by a thread with a queue of its own (a lane); `submit` gives the
    item to the lane with the least to do, and the successor is the next item in that lane's queue.
    `capacity` is how many items the caller should keep submitted: one per connection; three once the
    connections pipeline (one on the wire, one whose envelope rides behind its dot, and the next to
    announce). Not more otherwise: an item waiting in a queue is one more that a kill leaves unknown."""

    PIPELINED_DEPTH = 3

    def __init__(self, size):
        app = current_app._get_current_object()
        self.size, self.inline = size, size == 1
        self.local, self.senders, self.lock = threading.local(), [], threading.Lock()
        self.limiter = rate_limiter()
        self.lanes = [] if self.inline else [_Lane(self, app, number) for number in range(size)]

    @property
    def capacity(self):
        if self.inline or not any(sender.pipelining for sender in self.senders):
            return self.size
        return self.size * self.PIPELINED_DEPTH

    def submit(self, fn, item, successor=None):
        future = Future()
        if not self.inline:
            min(self.lanes, key=lambda lane: lane.load).put(future, fn, item)
            return future
        future.set_running_or_notify_cancel()
        self.run(future, fn, item, successor)
        return future

    def run(self, future, fn, item, successor):
        """`fn` on this thread's sender, its result or exception handed over through `future`: whatever
        is raised, or the caller would wait for it for ever."""
        try:
            future.set_result(fn(self._sender(), item, successor))
        except BaseException as exc:
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _sender(self):
        sender = getattr(self.local, 'sender', None)
        if sender is None:
            sender = self.local.sender = open_sender() if self.limiter is None else _Paced(open_sender(), self.limiter)
            with self.lock:
                self.senders.append(sender)
        return sender

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for lane in self.lanes:
            lane.close()
        for lane in self.lanes:
            lane.join()
        for sender in self.senders:
            sender.close()


class _Lane(threading.Thread):
    """One connection's thread, running the items of its own queue in order, in an app context for its
    lifetime (senders read the app's settings). On close, the items not started are cancelled."""

    def __init__(self, pool, app, number):
        super().__init__(name=f'sender-{number}', daemon=True)
        self.pool, self.app = pool, app
        self.queue, self.ready = deque(), threading.Condition()
        self.load, self.closing = 0, False  # items queued or running
        self.start()

    def put(self, future, fn, item):
        with self.ready:
            self.queue.append((future, fn, item))
            self.load += 1
            self.ready.notify()

    def run(self):
        with self.app.app_context():
            while (task := self._next()) is not None:
                future, fn, item, successor = task
                try:
                    if future.set_running_or_notify_cancel():
                        self.pool.run(future, fn, item, successor)
                finally:
                    with self.ready:
                        self.load -= 1

    def _next(self):
        """:return: (future, fn, item, the item after it or None), or None once closed and empty."""
        with self.ready:
            while not self.queue and not self.closing:
                self.ready.wait()
            if not self.queue:
                return None
            future, fn, item = self.queue.popleft()
            return future, fn, item, self.queue[0][2] if self.queue else None

    def close(self):
        with self.ready:
            for future, _, _ in self.queue:
                future.cancel()
            self.closing = True
            self.ready.notify()


class _Paced:
    """A sender that waits for its slot under MAIL_RATE_LIMIT before each attempt (retries count too:
    the provider sees every one)."""

    def __init__(self, sender, limiter):
        self.sender, self.limiter = sender, limiter

    @property
    def pipelining(self):
        return self.sender.pipelining

    def send(self, email, meanwhile=None, then=None):
        try:
            self.limiter.acquire()
        except Exception as exc:  # its Redis down or silent: the infrastructure, not this subscriber
            raise TransportFailure(f'the rate limiter is unavailable: {exc!r}') from exc
        # No envelope announced ahead: it would hold the server in DATA mode for this wait, long enough for
        # some servers to hang up silently, and the message would go out into a closed connection (unknown).
        return self.sender.send(email, meanwhile)

    def close(self):
        self.sender.close()
