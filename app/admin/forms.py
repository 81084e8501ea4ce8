from zoneinfo import available_timezones

from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from wtforms import BooleanField, DateTimeLocalField, SelectField, SubmitField
from wtforms.validators import DataRequired, Email, Length, ValidationError

from app.addresses import trimmed
from app.main.forms import TextAreaField, TextField, single_line


def trim_address(value):
    """The spaces around a pasted address dropped, visible or not (a no-break or zero-width space), as at
    every door (app/addresses.py); single_line has checked the value as typed, line breaks included."""
    return trimmed(value) if isinstance(value, str) else value


class LoginForm(FlaskForm):
    email = TextField('Admin email address', filters=[trim_address],
                      validators=[DataRequired(), single_line, Email(), Length(max=254)])
    submit = SubmitField('Email me a sign-in link')


def no_nul(form, field):
    """No email needs a NUL, and PostgreSQL's text refuses one (it was a 500 there)."""
    if '\x00' in (field.data or ''):
        raise ValidationError('A NUL character is not accepted.')


class BroadcastForm(FlaskForm):
    subject = TextField('Subject', validators=[DataRequired(), no_nul, Length(max=255)])
    text = TextAreaField('Text version', validators=[DataRequired(), no_nul])
    html = TextAreaField('HTML version', validators=[DataRequired(), no_nul])
    send_at = DateTimeLocalField('Send at', format='%Y-%m-%dT%H:%M', validators=[DataRequired()])
    timezone = SelectField('Time zone', choices=sorted(available_timezones()), default='UTC')
    preview = SubmitField('Preview')
    schedule = SubmitField('Schedule')


class ImportForm(FlaskForm):
    file = FileField('CSV file', validators=[FileRequired('Choose a CSV file to import.')])
    consented = BooleanField('These people already consented to receive the newsletter: send them no confirmation '
                             'email. Your address and the time are recorded on each of them as their consent.')
    submit = SubmitField('Check the file (nothing is imported yet)')
