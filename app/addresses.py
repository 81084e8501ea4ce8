"""The rules for an email address, one place for every door it comes in by: the sign-up form, a file of
them (app/imports.py), the abuse limit that counts one per address (app/limits.py), and ADMINS."""
import re

from email_validator import EmailNotValidError, EmailSyntaxError, validate_email
from flask import current_app

MAX_EMAIL_LENGTH = 254  # RFC 5321's limit on a path, and our column's size
_AROUND = re.compile(r'^[\s\u200b-\u200d\u2060\ufeff]+|[\s\u200b-\u200d\u2060\ufeff]+$')  # any spaces, visible or not


def init_app(app):
    """ADMINS in the form the app sends to: written with an international domain in its own letters, an
    admin's sign-in link and notices needed SMTPUTF8, failed for good, and the admin was locked out. An
    entry email-validator refuses stays as written."""
    app.config['ADMINS'] = [_sendable(admin) for admin in app.config['ADMINS']]


def _sendable(address):
    try:
        return validate_email(address, allow_smtputf8=False, check_deliverability=False).ascii_email
    except EmailNotValidError:
        return address


def normal_address(value, check_deliverability=None):
    """One line, at most MAX_EMAIL_LENGTH characters, and what email-validator accepts, including (outside
    tests, or unless `check_deliverability` is False) a domain that can receive mail.  :return: the normal
    form we store: trimmed (of spaces and zero-width characters too: an address copied from a web page or
    a document often ends in one, which its reader cannot see), domain lower-cased, and in ASCII (an
    international domain in its xn-- form), which every SMTP server and mail header takes as it is.
    :raise EmailNotValidError: (a ValueError) saying what is wrong; EmailUndeliverableError when it is the
    domain."""
    if '\r' in value or '\n' in value:
        raise EmailSyntaxError('An email address cannot contain line breaks.')
    value = trimmed(value)
    if len(value) > MAX_EMAIL_LENGTH:
        raise EmailSyntaxError(f'An email address has at most {MAX_EMAIL_LENGTH} characters.')
    if check_deliverability is None:
        check_deliverability = current_app.config['EMAIL_CHECK_DELIVERABILITY']
    return validate_email(value, allow_smtputf8=False, timeout=current_app.config['EMAIL_DNS_TIMEOUT'],
                          check_deliverability=check_deliverability).ascii_email


def trimmed(value):
    """`value` without the spaces around it, visible or not (a no-break space, a zero-width one)."""
    return _AROUND.sub('', value)


def mailbox(value):
    """The mailbox `value` names, for counting: its normal form in lower case, as the database tells one
    subscriber from another (app/models.py), so that no other spelling of it (Jane@, a full-width letter
    in its domain) counts as another. An address the form will refuse counts as it was given."""
    value = value.strip()
    try:
        value = normal_address(value, check_deliverability=False)
    except EmailNotValidError:
        pass
    return value.lower()
