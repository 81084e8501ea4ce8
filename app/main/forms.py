from email_validator import EmailNotValidError, validate_email
from flask import current_app
from flask_wtf import FlaskForm
from wtforms import StringField, SubmitField
from wtforms.validators import DataRequired, Length, ValidationError

MAX_EMAIL_LENGTH = 254  # RFC 5321's limit on a path, and our column's size


def _strip(value):
    return value.strip(' \t') if isinstance(value, str) else value


def single_line(form, field):
    """Checked on the raw value, before any trimming: a line break in an address is a header-injection
    attempt, not a typo to tidy away."""
    if any('\r' in raw or '\n' in raw for raw in field.raw_data or []):
        raise ValidationError('An email address cannot contain line breaks.')


def deliverable_address(form, field):
    """email-validator checks the syntax (and, outside tests, that the domain can receive mail) and
    gives the normal form we store: trimmed, domain lower-cased, and in ASCII (an international domain
    in its xn-- form), which every SMTP server and mail header takes as it is."""
    try:
        info = validate_email(field.data, allow_smtputf8=False, timeout=current_app.config['EMAIL_DNS_TIMEOUT'],
                              check_deliverability=current_app.config['EMAIL_CHECK_DELIVERABILITY'])
    except EmailNotValidError as exc:
        raise ValidationError(str(exc)) from exc
    field.data = info.ascii_email


class SubscribeForm(FlaskForm):
    email = StringField('Email address', filters=[_strip], validators=[
        single_line,
        DataRequired(message='Please enter your email address.'),
        Length(max=MAX_EMAIL_LENGTH, message=f'An email address has at most {MAX_EMAIL_LENGTH} characters.'),
        deliverable_address,
    ])
    # Hidden from people (and from screen readers); bots fill in every field they find.
    website = StringField('Leave this empty')
    submit = SubmitField('Subscribe')


class UnsubscribeForm(FlaskForm):
    """One button, still with a CSRF token: another site must not be able to unsubscribe our readers."""
    submit = SubmitField('Unsubscribe')
