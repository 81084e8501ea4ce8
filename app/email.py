"""One way to build an email, and one to send a single one: every message is rendered from a `.txt` and
an `.html` template and becomes an `Email`, which each way out (app/transports.py) knows how to deliver,
as MIME bytes or as an API request. A single email (a confirmation, a sign-in link) is queued as a job
in the caller's transaction; mailings to many go through app/sending.py."""
import base64
import functools
import re
import secrets
import time
from binascii import b2a_qp
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr

from flask import current_app

from app.failures import OutcomeUnknown, PermanentFailure
from app.jobs import GiveUp, define_task, kept_open, upcoming
from app.transports import open_sender


class TemplateError(Exception):
    """An email template is unusable (e.g. its .txt lacks the Subject: line)."""


@dataclass(frozen=True)
class Attachment:
    filename: str
    mimetype: str  # 'text/csv', 'application/gzip'
    data: bytes


@dataclass(frozen=True)
class Email:
    recipient: str
    subject: str
    text: str
    html: str
    message_id: str
    headers: dict = field(default_factory=dict)
    attachments: tuple = ()  # of Attachment: an admin's export; the drip and broadcasts have none

    @functools.cached_property
    def mime(self):
        """The message as SMTP and .eml files carry it, built once: a send prepares it ahead of time
        (app/sending.py, Outgoing) and a retry reuses it."""
        return mime_message(self)

    def refuse_unsendable(self):
        """Whichever way the email goes out.  :raise PermanentFailure: for a line break in any header
        value (header injection), or a non-ASCII address: that needs SMTPUTF8 (RFC 6531), which we do
        not speak, and would otherwise break the run at the first such subscriber instead of failing
        that one alone."""
        if not self.recipient.isascii():
            raise PermanentFailure(f'refused: non-ASCII address {self.recipient!r} (SMTPUTF8 is not supported)')
        for name, value in {'To': self.recipient, 'Subject': self.subject, 'Message-ID': self.message_id,
                            **self.headers}.items():
            if '\r' in value or '\n' in value:
                raise PermanentFailure(f'refused: line break in the {name} header of the message to {self.recipient!r}')


def queue_email(email):
    """Accept `email` for delivery, as part of the caller's transaction: it will exist (and go out)
    exactly when the caller commits, and a web request never waits on SMTP."""
    return send_email.apply(recipient=email.recipient, subject=email.subject, text=email.text, html=email.html,
                            message_id=email.message_id, headers=email.headers)


@define_task(queue='mail', forget=('text', 'html', 'headers'))
def send_email(recipient, subject, text, html, message_id, headers):
    """A temporary failure (the server is down, a 4xx) is retried by the job's back-off; a permanent
    one (a 5xx), or a lost answer once it went out (it may have arrived), fails the job at once. Once it
    is over, what the email said (a sign-in link among it) is dropped from the job's row; whom it went to,
    and its subject, stay."""
    deliver(Email(recipient, subject, text, html, message_id, headers))


def deliver(email):
    """Send `email` from a mail job (send_email, or a task that builds its email as it runs). When the
    worker has claimed the next mail job already, its envelope goes out behind this one's end (pipelining):
    every mail job names its recipient `recipient`.  :raise GiveUp: for a permanent refusal, or an outcome
    unknown."""
    following = upcoming() or {}
    try:
        with kept_open('sender', open_sender) as sender:  # one connection for a worker's emails, back to back
            sender.send(email, then=following.get('recipient'))
    except PermanentFailure as refused:
        raise GiveUp(f'PermanentFailure: {refused}') from refused
    except OutcomeUnknown as lost:
        # The way out had all of it: tried again, it would go out once more each attempt the job has left.
        raise GiveUp(f'OutcomeUnknown: it may have arrived, so it is not sent again: {lost}') from lost


def render_email(template, recipient, message_id, headers=None, **context):
    """Render `template`.txt and .html. The .txt starts with a `Subject: ...` line, so the subject is
    written (and translated, and personalised) beside the body it belongs to; a drip stage's `Delay: ...`
    line may follow it (app/timing.py), and is not part of the text."""
    env = current_app.jinja_env
    first_line, _, text = env.get_template(f'{template}.txt').render(**context).partition('\n')
    if not first_line.startswith('Subject:'):
        raise TemplateError(f'{template}.txt must start with a "Subject: ..." line')
    if text.startswith('Delay:'):
        text = text.partition('\n')[2]
    subject = first_line[len('Subject:'):].strip()
    html = env.get_template(f'{template}.html').render(subject=subject, **context)
    # No email needs a NUL, and a queued one keeps its subject and text in its job's JSON payload, where
    # PostgreSQL then refuses to read any field of it (erasing a subscriber reads every mail job's).
    if '\x00' in subject + text + html:
        raise TemplateError(f'{template} holds a NUL character, which no email needs')
    return Email(recipient, subject, text.lstrip('\n'), html, message_id, dict(headers or {}))


def greeting_name(email):
    """'jane.doe+news@example.com' -> 'Jane Doe', 'john.smith1990@' -> 'John Smith'; an address with no
    letters before the @ gets 'there'."""
    local = email.split('@', 1)[0].split('+', 1)[0]
    words = [word for word in re.split(r'[\W\d_]+', local) if word]
    return ' '.join(word.capitalize() for word in words) or 'there'


def make_message_id(*parts):
    """A Message-ID made from what the message *is* (e.g. stage and subscriber), not from the moment it
    was built: if it is ever sent again, the receiver sees the same message and can drop it."""
    return '<{}@{}>'.format('.'.join(str(p) for p in parts), _sender_domain(current_app.config['MAIL_DEFAULT_SENDER']))


@functools.lru_cache(maxsize=8)
def _sender_domain(sender):
    """Cached: parsing the sender's address took a tenth of composing a drip message."""
    return parseaddr(sender)[1].rpartition('@')[2] or 'localhost'


def mime_message(email):
    """The message as MIME bytes: multipart/alternative, text and HTML in quoted-printable UTF-8.

    Assembled here from the stdlib's encoders (Header for encoded-words, formataddr, b2a_qp) rather
    than by EmailMessage.as_bytes(), which costs more than the SMTP transaction itself: it was the
    largest single cost in the drip's profile (bench/README.md).
    List-Unsubscribe and the other extra headers keep their URLs verbatim, folded only between their
    <...> items: mail clients do not decode encoded-words there (RFC 2369). Every line ends in CRLF:
    smtplib passes bytes through as they are, and a bare LF is what SMTP smuggling is made of.
    :raise PermanentFailure: see Email.refuse_unsendable."""
    email.refuse_unsendable()
    headers = {'From': _sender_header(current_app.config['MAIL_DEFAULT_SENDER']), 'To': email.recipient,
               'Subject': _subject_header(email.subject), 'Date': _date_header(int(time.time())),
               'Message-ID': email.message_id, **email.headers}
    for name in email.headers:
        headers[name] = headers[name].replace('>, <', '>,\r\n <')
    boundary = f'=_{secrets.token_hex(16)}'
    lines = [f'{name}: {value}' for name, value in headers.items()]
    parts = b''.join(
        b'\r\n--%s\r\nContent-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable'
        b'\r\n\r\n%s' % (boundary.encode(), subtype, b2a_qp(body.encode('utf-8')).replace(b'\n', b'\r\n'))
        for subtype, body in ((b'plain', email.text), (b'html', email.html))) + b'\r\n--%s--\r\n' % boundary.encode()
    alternative = f'Content-Type: multipart/alternative; boundary="{boundary}"'
    if not email.attachments:
        return '\r\n'.join([*lines, 'MIME-Version: 1.0', alternative, '']).encode('ascii') + parts
    mixed = f'=_{secrets.token_hex(16)}'
    attached = b''.join(
        b'\r\n--%s\r\nContent-Type: %s\r\nContent-Transfer-Encoding: base64\r\n'
        b'Content-Disposition: attachment; filename="%s"\r\n\r\n%s' % (
            mixed.encode(), attachment.mimetype.encode('ascii'), attachment.filename.encode('ascii'),
            base64.encodebytes(attachment.data).replace(b'\n', b'\r\n'))
        for attachment in email.attachments)
    head = [*lines, 'MIME-Version: 1.0', f'Content-Type: multipart/mixed; boundary="{mixed}"', '',
            f'--{mixed}', alternative, '']
    return '\r\n'.join(head).encode('ascii') + parts + attached + b'\r\n--%s--\r\n' % mixed.encode()


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
