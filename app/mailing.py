"""What the send (app/sending.py) needs of a mailing, whatever it is: a drip stage (app/drip.py) or a
broadcast (app/broadcasts.py). A mailing is a frozen value: the send reads it from several threads at
once, so nothing about it may change, or be loaded lazily from the database, while it goes out."""
import hashlib
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from app.email import Email


@dataclass(frozen=True)
class Recipient:
    client_id: int
    email: str


PREVIEW_RECIPIENT = Recipient(0, 'preview@example.com')


class Mailing(Protocol):
    key: str
    """Its name in the send log (`deliveries.mailing`): 'week1', 'broadcast7'."""

    def conditions(self, after=0) -> tuple[sa.ColumnElement[bool], ...]:
        """Conditions on Client for whom it is due (the send log then leaves out those who have a row).
        `after`: only subscribers after this id are asked about; a condition on another table repeats
        it, so that PostgreSQL starts its walk of that table there too rather than at the beginning."""

    def message_id(self, recipient: Recipient) -> str:
        """Made from mailing and subscriber, never from the moment: a repeat is recognisably the same."""

    def compose(self, recipient: Recipient) -> Email:
        """One subscriber's copy, with their unsubscribe link and headers."""

    def not_now(self) -> str | None:
        """Why it must not go out at this moment (outside the drip's sending window), or None."""

    def advance(self, client_ids) -> sa.Update | None:
        """What sending it to `client_ids` (an SQL expression: a parameter, or a subquery) changes besides
        the send log: a drip stage moves them on."""


def address_digest(email):
    """Part of a Message-ID: ties it to the address, so a subscriber row reused for another address
    never repeats an ID."""
    return hashlib.sha256(email.encode()).hexdigest()[:10]
