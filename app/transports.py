"""The three ways out (SMTP, the SendGrid Web API, .eml files in a folder) behind one `send(email)`, each
raising the failures of app/failures.py by the same rule: nothing can have arrived until the message's
end has left us (the final dot, the whole API request, the file's rename); from then on, a missing
answer is OutcomeUnknown, never a failure to retry.

Which way out is used is decided once, by mail_transport(), and a deployment cannot fall into the folder
by accident: once the settings look like a deployment, the folder must be chosen by name."""
import base64
import functools
import http.client
import logging
import os
import re
import smtplib
import ssl
import tempfile
import threading
import urllib.error
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import parseaddr
from pathlib import Path
from urllib.parse import urlsplit

from flask import current_app
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Attachment as SendGridAttachment
from sendgrid.helpers.mail import Disposition, FileContent, FileName, FileType, From, Mail
from sendgrid.helpers.mail import Header as SendGridHeader

from app.database import utcnow
from app.failures import DeliveryFailure, OutcomeUnknown, PermanentFailure, TemporaryFailure, TransportFailure
from app.ratelimit import rate_limiter

log = logging.getLogger(__name__)

TRANSPORTS = ('smtp', 'sendgrid', 'folder')



def init_app(app):
    """Say no at start-up, not at the first send: a way out chosen badly, or none for a deployment (see
    mail_transport); and say loudly, at every start, that TLS is not being verified."""
    app.config['MAIL_FOLDER'] = app.config.get('MAIL_FOLDER') or str(Path(app.instance_path) / 'mail')
    if mail_transport(app.config) == 'smtp' and not app.config['MAIL_TLS_VERIFY']:
        app.logger.warning('MAIL_TLS_VERIFY is off: the certificate of %s is not checked, so anyone on the way '
                           'to it can read MAIL_PASSWORD and every email', app.config['MAIL_SERVER'])

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
    if host not in ('localhost', '127.0.0.1', '::1'):
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
    """Seconds to wait before attempt number `attempt + 1`: MAIL_RETRY_BACKOFF, doubling each time."""
    delay = current_app.config['MAIL_RETRY_BACKOFF'] * 2 ** (attempt - 1)
    return min(delay, cap) if cap else delay


class Sender:
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


@functools.lru_cache(maxsize=4)
def tls_context(ca_file, verify):
    """Certificates checked against the system's CA store (or `ca_file`, for a private CA) and the host
    name, as a browser would: smtplib's own default checks nothing, so anyone on the path to the relay
    would read MAIL_PASSWORD and every email, admins' sign-in links included."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class SmtpSender(Sender):
    """One SMTP connection, reused for many messages. It is opened here rather than by Flask-Mail (whose
    settings it uses): with a verified TLS context, and with a time-out of its own, never the
    process-wide socket default that threads opening connections at the same moment would trample.

    Rather than smtplib's sendmail, each command is sent and its reply read in two steps, so that the
    caller's `meanwhile()` runs in between: while the server works on the command, the caller prepares
    its next message. The reply to the final dot is awaited for MAIL_DATA_TIMEOUT (RFC 5321 4.5.3.2.6:
    10 minutes), not the command time-out: a server may scan a message that long before taking it, and
    giving up sooner would only turn a delivery into an unknown."""

    def __init__(self, config):
        super().__init__(config)
        self.state = current_app.extensions['mail']
        self.envelope_from = parseaddr(config['MAIL_DEFAULT_SENDER'])[1]
        self.smtp = None
        self.sent_on_connection = 0

    def describe(self):
        return f'SMTP {self.state.server}:{self.state.port}'

    def _connect(self):
        state, timeout = self.state, self.config['MAIL_TIMEOUT']
        context = tls_context(self.config['MAIL_TLS_CA_FILE'], self.config['MAIL_TLS_VERIFY'])
        try:
            if state.use_ssl:
                smtp = smtplib.SMTP_SSL(state.server, state.port, timeout=timeout, context=context)
            else:
                smtp = smtplib.SMTP(state.server, state.port, timeout=timeout)
                if state.use_tls:
                    smtp.starttls(context=context)
            if state.username and state.password:
                smtp.login(state.username, state.password)
            smtp.ehlo_or_helo_if_needed()
        except (OSError, smtplib.SMTPException) as exc:
            raise TransportFailure(f'cannot connect to {self.describe()}: {exc}') from exc
        self.smtp, self.sent_on_connection = smtp, 0

    def send(self, email, meanwhile=None):
        """:param meanwhile: called while each command waits for its reply; it must not raise."""
        payload = email.mime
        if self.smtp is None:
            self._connect()
        meanwhile = meanwhile or (lambda: None)
        smtp, data_went = self.smtp, False
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
            smtp.send(data)  # sendall: if it raises, the final dot did not (all) go
            data_went = True
            code, reply = self._final_reply(meanwhile)
            if code != 250:
                raise self._failure(code, reply, email)
        except DeliveryFailure:
            raise
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            if data_went:
                raise OutcomeUnknown(f'{self.describe()}: no answer after the end of the data: '
                                     f'{exc or type(exc).__name__}') from exc
            raise TransportFailure(f'{self.describe()}: {exc or type(exc).__name__}') from exc
        except BaseException as exc:
            self.close()  # mid-conversation, in a state nobody can vouch for
            if data_went:
                raise OutcomeUnknown(f'unexpected error after the end of the data went out: {exc!r}') from exc
            raise
        self.sent_on_connection += 1
        if self.state.max_emails and self.sent_on_connection >= self.state.max_emails:
            self.close()  # the next send reconnects

    def _reply(self, meanwhile):
        meanwhile()
        return self.smtp.getreply()

    def _final_reply(self, meanwhile):
        meanwhile()
        self.smtp.sock.settimeout(self.config['MAIL_DATA_TIMEOUT'])
        code, reply = self.smtp.getreply()  # on a time-out or hang-up it closes and raises
        self.smtp.sock.settimeout(self.config['MAIL_TIMEOUT'])
        return code, reply

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


class SendGridSender(Sender):
    """The SendGrid v3 Web API: one HTTPS request per message, through the `sendgrid` package. urllib
    wraps in URLError only what fails while the request is being sent; a failure after that, while
    waiting for the answer, leaves the message possibly sent."""

    def __init__(self, config):
        super().__init__(config)
        self.client = SendGridAPIClient(api_key=config['SENDGRID_API_KEY'], host=config['SENDGRID_API_URL'])

    def describe(self):
        return f'SendGrid API {self.config["SENDGRID_API_URL"]}'

    def send(self, email, meanwhile=None):
        email.refuse_unsendable()
        name, address = parseaddr(self.config['MAIL_DEFAULT_SENDER'])
        message = Mail(from_email=From(address, name or None), to_emails=email.recipient,
                       subject=email.subject, plain_text_content=email.text, html_content=email.html)
        for key, value in {**email.headers, 'Message-ID': email.message_id}.items():
            message.add_header(SendGridHeader(key, value))
        for attachment in email.attachments:
            message.add_attachment(SendGridAttachment(FileContent(base64.b64encode(attachment.data).decode()),
                                                      FileName(attachment.filename), FileType(attachment.mimetype),
                                                      Disposition('attachment')))
        try:
            self.client.client.mail.send.post(request_body=message.get(), timeout=self.config['MAIL_TIMEOUT'])
        except HTTPError as exc:
            text = f'{exc.status_code} {exc.body!r}'
            if exc.status_code in (401, 403):
                raise TransportFailure(f'{self.describe()} refused the API key: {text}') from exc
            if exc.status_code in (429, 503):  # turned away before any work: too many requests, or down
                raise TemporaryFailure(f'{email.recipient}: {text}') from exc
            if exc.status_code >= 500:  # "an error occurred while SendGrid processed it": maybe after sending
                raise OutcomeUnknown(f'{self.describe()} answered {text} while processing it') from exc
            raise PermanentFailure(f'{email.recipient}: {text}') from exc
        except urllib.error.URLError as exc:
            raise TransportFailure(f'{self.describe()}: {exc.reason}') from exc
        except (OSError, http.client.HTTPException) as exc:
            raise OutcomeUnknown(f'{self.describe()}: no answer to the request: {exc or type(exc).__name__}') from exc


class FolderSender(Sender):
    """The embedded default: each message becomes an .eml file, so a new install shows exactly what it
    would have sent without an SMTP server or an API key. Written under a temporary name and renamed, so
    a file either is there whole or not at all."""

    def describe(self):
        return f'folder {self.config["MAIL_FOLDER"]}'

    def send(self, email, meanwhile=None):
        payload = email.mime
        folder = Path(self.config['MAIL_FOLDER'])
        name = re.sub(r'[^A-Za-z0-9.@-]+', '_', email.message_id.strip('<>'))
        path = folder / f'{utcnow():%Y%m%dT%H%M%S.%f}-{name}.eml'
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix='.writing-', delete=False) as file:
                file.write(payload)
            os.replace(file.name, path)
        except OSError as exc:
            raise TransportFailure(f'cannot write {path}: {exc}') from exc
        log.info('mail to %s written to %s', email.recipient, path)


class SenderPool:
    """`size` connections of the configured way out, each owned by one thread of a fixed pool: messages
    go out in parallel without a thread per message. `submit(fn, *args)` runs `fn(sender, *args)` on
    some connection and returns its Future.

    With one connection the pool is `inline`: `submit` runs on the caller's thread. A lone sending
    thread gains nothing from overlapping with the caller and loses to it on the GIL (bench/README.md)."""

    def __init__(self, size):
        app = current_app._get_current_object()
        self.size, self.inline = size, size == 1
        self.local, self.senders, self.lock = threading.local(), [], threading.Lock()
        self.limiter = rate_limiter()
        # Each pool thread keeps an app context for its lifetime: senders read the app's settings.
        self.executor = None if self.inline else ThreadPoolExecutor(
            size, thread_name_prefix='sender', initializer=lambda: app.app_context().push())

    def submit(self, fn, *args):
        if not self.inline:
            return self.executor.submit(self._call, fn, *args)
        future = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(self._call(fn, *args))
        except Exception as exc:  # handed to the caller through the Future, as a pool thread would
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
        try:
            self.limiter.acquire()
        except Exception as exc:  # its Redis down or silent: the infrastructure, not this subscriber
            raise TransportFailure(f'the rate limiter is unavailable: {exc!r}') from exc
        return self.sender.send(email, meanwhile)

    def close(self):
        self.sender.close()
