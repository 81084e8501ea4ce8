"""Admins are the addresses in ADMINS, and sign in with a link emailed to them: no password to store
or leak, and taking an address out of ADMINS locks that admin out at their next request."""
import secrets

from flask import current_app, redirect, render_template, url_for
from flask_login import UserMixin, login_user, logout_user
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.admin.blueprint import bp
from app.admin.forms import LoginForm
from app.email import make_message_id, queue_email, render_email
from app.extensions import db, login
from app.links import public_url

LINK_MAX_AGE = 15 * 60


class Admin(UserMixin):
    def __init__(self, email):
        self.id = self.email = email


@login.user_loader
def load_admin(email):
    return Admin(email) if email in current_app.config['ADMINS'] else None


def _serializer():
    return URLSafeTimedSerializer(current_app.config['SECRET_KEY'], salt='admin-sign-in')


@bp.route('/login', methods=['GET', 'POST'])
def login_page():
    """Every address gets the same answer, so the page never tells a stranger who is an admin."""
    form = LoginForm()
    if form.validate_on_submit():
        address = form.email.data
        if address in current_app.config['ADMINS']:
            link = public_url('admin.sign_in', token=_serializer().dumps(address))
            queue_email(render_email('emails/admin_sign_in', address, make_message_id('sign-in', secrets.token_hex(8)),
                                     link=link, minutes=LINK_MAX_AGE // 60))
            db.session.commit()
        return render_template('message.html', title='Check your inbox',
                               message=f'If {address} is an admin address, a sign-in link is on its way. '
                                       f'It works for {LINK_MAX_AGE // 60} minutes.')
    return render_template('admin/login.html', form=form), 400 if form.errors else 200


@bp.route('/sign-in/<token>')
def sign_in(token):
    try:
        address = _serializer().loads(token, max_age=LINK_MAX_AGE)
    except SignatureExpired:
        return render_template('message.html', title='Link expired',
                               message='This sign-in link has expired. Ask for a new one.'), 400
    except BadSignature:
        return render_template('message.html', title='Invalid link', message='This sign-in link is not valid.'), 400
    admin = load_admin(address)
    if admin is None:
        return render_template('message.html', title='Not an admin',
                               message=f'{address} is no longer an admin address.'), 403
    login_user(admin)
    return redirect(url_for('admin.dashboard'))


@bp.route('/logout', methods=['POST'])
def logout():
    logout_user()
    return redirect(url_for('admin.login_page'))
