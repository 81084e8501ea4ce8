"""One way to build an email: every message is rendered from a `.txt` and an `.html` template and
becomes an `Email`, which each transport (app/transports.py) knows how to deliver."""
import functools
from dataclasses import dataclass, field
from email.utils import parseaddr

from flask import current_app

from app.transports import mime_message


class TemplateError(Exception):
    """An email template is unusable (e.g. its .txt lacks the Subject: line)."""


@dataclass(frozen=True)
class Email:
    recipient: str
    subject: str
    text: str
    html: str
    message_id: str
    headers: dict = field(default_factory=dict)

    @functools.cached_property
    def mime(self):
        """The message as SMTP and .eml files carry it, built once: a send prepares it ahead of time
        (app/newsletter.py, Outgoing) and a retry reuses it."""
        return mime_message(self)


def render_email(template, recipient, message_id, headers=None, **context):
    """Render `template`.txt and .html. The .txt starts with a `Subject: ...` line, so the subject is
    written (and translated, and personalised) beside the body it belongs to."""
    env = current_app.jinja_env
    first_line, _, text = env.get_template(f'{template}.txt').render(**context).partition('\n')
    if not first_line.startswith('Subject:'):
        raise TemplateError(f'{template}.txt must start with a "Subject: ..." line')
    subject = first_line[len('Subject:'):].strip()
    html = env.get_template(f'{template}.html').render(subject=subject, **context)
    return Email(recipient, subject, text.lstrip('\n'), html, message_id, dict(headers or {}))


def make_message_id(*parts):
    """A Message-ID made from what the message *is* (e.g. stage and subscriber), not from the moment it
    was built: if a crash makes us send it again, the receiver sees the same message and can drop it."""
    return '<{}@{}>'.format('.'.join(str(p) for p in parts), _sender_domain(current_app.config['MAIL_DEFAULT_SENDER']))


@functools.lru_cache(maxsize=8)
def _sender_domain(sender):
    """Cached: parsing the sender's address took a tenth of composing a drip message."""
    return parseaddr(sender)[1].rpartition('@')[2] or 'localhost'
