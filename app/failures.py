"""What can go wrong with one message, in the four kinds every way out (SMTP, the SendGrid API, the
folder) maps its errors to, so that every caller acts on them by the same rule. The line between them
is whether the message's end has left us: before it, nothing can have arrived; after it, only an
answer tells, and without one the message may have arrived."""
from app.database import nul_shown


class DeliveryFailure(Exception):
    """Its text quotes what the way out said (a relay's reply, an HTTP status line) and becomes the
    delivery's or the run's outcome, its NUL shown (nul_shown): else the outcome could not be written, and
    the run stopped for everyone after it."""

    def __init__(self, text):
        super().__init__(nul_shown(text))


class TemporaryFailure(DeliveryFailure):
    """Refused for now (SMTP 4xx): nothing arrived; try again later."""


class TransportFailure(TemporaryFailure):
    """The way out itself is down (refused or dropped connection before the message's end, rejected
    credentials, an untrusted certificate, an API address that is not the API's, an API that turns every
    request away (HTTP 429, 503), the rate limiter's Redis gone): nothing arrived, and nothing else will
    get through either until it is back."""


class PermanentFailure(DeliveryFailure):
    """This message will never be accepted (SMTP 5xx, HTTP 400 or 413), or cannot even be built."""


class OutcomeUnknown(DeliveryFailure):
    """The message's end went out and no answer came (the connection dropped or went silent after the
    final dot, the API request went out and its answer did not come back): it may have arrived, so it
    must not be sent again unless an admin asks."""
