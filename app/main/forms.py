import wtforms
from email_validator import EmailNotValidError
from flask_wtf import FlaskForm
from wtforms import StringField, SubmitField
from wtforms.validators import DataRequired, ValidationError

from app.addresses import normal_address


def _strip(value):
    return value.strip(' \t') if isinstance(value, str) else value


class _TextOnly:
    """A field that takes text alone: a multipart body may carry a file under the field's name, which the
    form took as the value (a TypeError in its validators, email-validator's or Length's, was a 500). Such a
    value counts as none."""

    def process_formdata(self, valuelist):
        super().process_formdata([value for value in valuelist if isinstance(value, str)])


class TextField(_TextOnly, StringField):
    pass


class TextAreaField(_TextOnly, wtforms.TextAreaField):
    pass


def single_line(form, field):
    """Checked on the raw value, before any trimming: a line break in an address is a header-injection
    attempt, not a typo to tidy away."""
    if any('\r' in raw or '\n' in raw for raw in field.raw_data or []):
        raise ValidationError('An email address cannot contain line breaks.')


def deliverable_address(form, field):
    try:
        field.data = normal_address(field.data)
    except EmailNotValidError as exc:
        raise ValidationError(str(exc)) from exc


class SubscribeForm(FlaskForm):
    email = TextField('Email address', filters=[_strip], validators=[
        DataRequired(message='Please enter your email address.'),
        deliverable_address,
    ])
    # Hidden from people (and from screen readers); bots fill in every field they find.
    website = StringField('Leave this empty')
    submit = SubmitField('Subscribe')


class UnsubscribeForm(FlaskForm):
    """One button, still with a CSRF token: another site must not be able to unsubscribe our readers."""
    submit = SubmitField('Unsubscribe')
