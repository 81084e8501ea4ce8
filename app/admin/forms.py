from zoneinfo import available_timezones

from flask_wtf import FlaskForm
from wtforms import DateTimeLocalField, SelectField, StringField, SubmitField, TextAreaField
from wtforms.validators import DataRequired, Email, Length

from app.main.forms import single_line


class LoginForm(FlaskForm):
    email = StringField('Admin email address', validators=[DataRequired(), single_line, Email(), Length(max=254)])
    submit = SubmitField('Email me a sign-in link')


class BroadcastForm(FlaskForm):
    subject = StringField('Subject', validators=[DataRequired(), Length(max=255)])
    text = TextAreaField('Text version', validators=[DataRequired()])
    html = TextAreaField('HTML version', validators=[DataRequired()])
    send_at = DateTimeLocalField('Send at', format='%Y-%m-%dT%H:%M', validators=[DataRequired()])
    timezone = SelectField('Time zone', choices=sorted(available_timezones()), default='UTC')
    preview = SubmitField('Preview')
    schedule = SubmitField('Schedule')
