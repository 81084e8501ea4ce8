from email_validator import EmailNotValidError, EmailSyntaxError, validate_email
from flask import current_app
from flask_wtf import FlaskForm
from wtforms import StringField, SubmitField
from wtforms.validators import DataRequired, ValidationError

MAX_EMAIL_LENGTH = 254  # RFC 5321's limit on a path, and our column's size


def _strip(value):
    return value.strip(' \t') if isinstance(value, str) else value


def single_line(form, field):
    """Checked on the raw value, before any trimming: a line break in an address is a header-injection
    attempt, not a typo to tidy away."""
    if any('\r' in raw or '\n' in raw for raw in field.raw_data or []):
        raise ValidationError('An email address cannot contain line breaks.')


def normal_address(value, check_deliverability=None):
    """The sign-up's rules for an address, for the form and for a file of them (app/imports.py): one line,
    at most MAX_EMAIL_LENGTH characters, and what email-validator accepts, including (outside tests, or
    unless `check_deliverability` is False) a domain that can receive mail.  :return: the normal form we
    store: trimmed, domain lower-cased, and in ASCII (an international domain in its xn-- form), which
    every SMTP server and mail header takes as it is.  :raise EmailNotValidError: (a ValueError) saying
    what is wrong; EmailUndeliverableError when it is the domain."""
    if '\r' in value or '\n' in value:
        raise EmailSyntaxError('An email address cannot contain line breaks.')
    if len(value) > MAX_EMAIL_LENGTH:
        raise EmailSyntaxError(f'An email address has at most {MAX_EMAIL_LENGTH} characters.')
    if check_deliverability is None:
        check_deliverability = current_app.config['EMAIL_CHECK_DELIVERABILITY']
    return validate_email(value, allow_smtputf8=False, timeout=current_app.config['EMAIL_DNS_TIMEOUT'],
                          check_deliverability=check_deliverability).ascii_email


def deliverable_address(form, field):
    try:
        field.data = normal_address(field.data)
    except EmailNotValidError as exc:
        raise ValidationError(str(exc)) from exc


class SubscribeForm(FlaskForm):
    email = StringField('Email address', filters=[_strip], validators=[
        DataRequired(message='Please enter your email address.'),
        deliverable_address,
    ])
    # Hidden from people (and from screen readers); bots fill in every field they find.
    website = StringField('Leave this empty')
    submit = SubmitField('Subscribe')


class UnsubscribeForm(FlaskForm):
    """One button, still with a CSRF token: another site must not be able to unsubscribe our readers."""
    submit = SubmitField('Unsubscribe')
