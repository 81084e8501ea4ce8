"""Admins are the addresses in ADMINS, and sign in with a link emailed to them: no password to store
or leak, and taking an address out of ADMINS locks that admin out at their next request."""
import secrets
from datetime import timedelta

import sqlalchemy as sa
from flask import current_app, redirect, render_template, request, session, url_for
from flask_login import UserMixin, current_user, login_user, logout_user
from itsdangerous import BadSignature, SignatureExpired
from sqlalchemy.exc import IntegrityError

from app.admin.blueprint import bp
from app.addresses import mailbox
from app.admin.forms import LoginForm
from app.database import utcnow
from app.email import make_message_id, queue_email, render_email
from app.extensions import db, login
from app.limits import per_address, per_client
from app.links import public_url, serializer
from app.models import AdminSession

LINK_MAX_AGE = 15 * 60


class Admin(UserMixin):
    """A signed-in admin: get_id() is their session's id (AdminSession), never their address."""

    def __init__(self, admin_session):
        self.id, self.email = admin_session.id, admin_session.email


@login.user_loader
def load_admin(session_id):
    """The session, while it lasts: not logged out, not past ADMIN_SESSION_HOURS, its address still in ADMINS."""
    admin_session = db.session.get(AdminSession, session_id)
    if (admin_session is None or admin_session.ended_at or admin_session.expires_at <= utcnow()
            or admin_session.email not in current_app.config['ADMINS']):
        return None
    return Admin(admin_session)


@bp.route('/login', methods=['GET', 'POST'])
@per_client('SIGN_IN_LIMIT_PER_CLIENT')
@per_address('SIGN_IN_LIMIT_PER_ADDRESS')
def login_page():
    """Every address gets the same answer, so the page never tells a stranger who is an admin."""
    form = LoginForm()
    if form.validate_on_submit():
        address = form.email.data
        if admin := _admin_named(address):
            token = serializer('admin-sign-in', timed=True).dumps({'email': admin, 'nonce': secrets.token_hex(16)})
            queue_email(render_email('emails/admin_sign_in', admin, make_message_id('sign-in', secrets.token_hex(8)),
                                     link=public_url('admin.sign_in', token=token), minutes=LINK_MAX_AGE // 60))
            db.session.commit()
        return render_template('message.html', title='Check your inbox',
                               message=f'If {address} is an admin address, a sign-in link is on its way. '
                                       f'It works once, for {LINK_MAX_AGE // 60} minutes.')
    return render_template('admin/login.html', form=form), 400 if form.errors else 200


@bp.route('/sign-in/<token>', methods=['GET', 'POST'])
def sign_in(token):
    """Opening the link shows a button; only pressing it (a POST, CSRF-checked by CSRFProtect) signs in
    and uses the link up: mail scanners (Safe Links, Mimecast) open every link of a message before its
    reader does, and a GET that signed in gave them the session and left the admin a used link. Both
    check the link first, so a dead one says why at once."""
    try:
        link = serializer('admin-sign-in', timed=True).loads(token, max_age=LINK_MAX_AGE)
        address, nonce = link['email'], link['nonce']
    except SignatureExpired:
        return _refused('Link expired', 'This sign-in link has expired. Ask for a new one.')
    except (BadSignature, TypeError, KeyError):
        return _refused('Invalid link', 'This sign-in link is not valid.')
    if address not in current_app.config['ADMINS']:
        return _refused('Not an admin', f'{address} is no longer an admin address.', 403)
    if db.session.scalar(sa.select(AdminSession.id).where(AdminSession.link_nonce == nonce)):
        return _used()
    if request.method == 'GET':
        return render_template('admin/sign_in.html', title='Admin sign-in', email=address, token=token)
    now = utcnow()
    admin_session = AdminSession(id=secrets.token_hex(32), email=address, link_nonce=nonce, created_at=now,
                                 expires_at=now + timedelta(hours=current_app.config['ADMIN_SESSION_HOURS']))
    db.session.add(admin_session)
    try:
        db.session.commit()
    except IntegrityError:  # its nonce was taken since the check above: pressed twice at once
        db.session.rollback()
        return _used()
    session.permanent = True  # the cookie lasts PERMANENT_SESSION_LIFETIME, as the session does
    login_user(Admin(admin_session))
    return redirect(url_for('admin.dashboard'))


def _admin_named(address):
    """:return: the address in ADMINS that `address` names, as ADMINS spells it, however it is typed (the
    case of its letters, its domain in its own letters or its xn-- form); or None."""
    return next((admin for admin in current_app.config['ADMINS'] if mailbox(admin) == mailbox(address)), None)


def _used():
    return _refused('Link used', 'This sign-in link has been used already. Ask for a new one.')


def _refused(title, message, status=400):
    return render_template('message.html', title=title, message=message), status


@bp.route('/logout', methods=['POST'])
def logout():
    """Ends the session on the server: a copy of the cookie kept elsewhere no longer signs anyone in."""
    if current_user.is_authenticated:
        db.session.execute(sa.update(AdminSession).where(AdminSession.id == current_user.id)
                           .values(ended_at=utcnow()))
        db.session.commit()
    logout_user()
    return redirect(url_for('admin.login_page'))
