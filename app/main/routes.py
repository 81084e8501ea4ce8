from datetime import timedelta

import sqlalchemy as sa
from flask import abort, current_app, render_template, request
from sqlalchemy.exc import IntegrityError

from app.database import built_once, upsert, utcnow
from app.extensions import csrf, db
from app.limits import per_address, per_client
from app.links import ExpiredLink, InvalidLink, load_block_token, load_confirm_token, load_unsubscribe_token
from app.mailing import address_digest
from app.main.blueprint import bp
from app.main.email import queue_confirmation_email, queue_new_subscriber_notice
from app.main.forms import SubscribeForm, UnsubscribeForm
from app.models import Client, Suppression, SuppressionReason
from app.suppression import is_suppressed, suppress


@bp.route('/', methods=['GET', 'POST'])
@per_client('SIGNUP_LIMIT_PER_CLIENT')
@per_address('SIGNUP_LIMIT_PER_ADDRESS')
def index():
    """The sign-up form. Whatever the address's history, a valid one gets the same answer, so the page
    never tells a stranger who is subscribed; nor does it tell a bot that filled the hidden field
    meant for bots that it was caught."""
    form = SubscribeForm()
    if form.validate_on_submit():
        if not form.website.data:
            subscribe(form.email.data)
        return render_template('message.html', title='Check your inbox',
                               message=f'We have sent a confirmation link to {form.email.data}. '
                                       'Open it and press Confirm to start receiving the newsletter.')
    return render_template('index.html', form=form), 400 if form.errors else 200


def subscribe(address):
    """New and unconfirmed addresses get a (fresh) confirmation email; so does someone who left and
    wants back in, but at most one every CONFIRM_RESEND_SECONDS. An active subscriber gets nothing: no
    mail for a stranger to trigger at will."""
    if (client_id := _insert_if_new(address)) is not None:  # most sign-ups: one statement, no ORM
        queue_confirmation_email(Client(id=client_id, email=address))  # what the email needs of the row
        db.session.commit()
        return
    client = db.session.scalar(sa.select(Client).where(sa.func.lower(Client.email) == address.lower()))
    if client is None and is_suppressed(address):
        return  # its owner asked never to hear from us, or it bounced: no confirmation to a stranger
    if client is None:
        client = Client(email=address, confirmation_sent_at=utcnow())
        db.session.add(client)
        try:
            db.session.flush()
        except IntegrityError:
            # The same address signed up in a concurrent request a moment ago; theirs stands.
            db.session.rollback()
            return
    elif client.active and client.email_confirmed_at is not None:
        return
    elif is_suppressed(address) or not _may_send_confirmation(client):
        return
    queue_confirmation_email(client)
    db.session.commit()


def _insert_if_new(address):
    """Store `address` as a new subscriber, unless it is known or suppressed.  :return: its id, or None
    (then nothing was written). One statement, built once: looking the address up, then on the suppression
    list, then inserting it through the ORM took more than a quarter of a sign-up request's CPU
    (bench/signup_profile.py). Anything else (a known address, a suppressed one) goes the long way.

    PostgreSQL's ON CONFLICT looks only at the index it names: a twin request (a double click) that got
    past that look just before this one's row was in it meets the row on the exact-address constraint
    instead. That is a known address too; any other refusal stays an error."""
    try:
        return db.session.scalar(built_once('sign-up: new address', _new_address), {
            'address': address, 'lowered': address.lower(), 'now': utcnow()})
    except IntegrityError:
        db.session.rollback()
        if db.session.scalar(sa.select(Client.id).where(sa.func.lower(Client.email) == address.lower())) is None:
            raise
        return None


def _new_address():
    clients, suppressions = Client.__table__, Suppression.__table__
    now = sa.bindparam('now', type_=sa.DateTime)
    unknown = sa.select(sa.bindparam('address', type_=sa.String), sa.true(), sa.literal(0), now, now).where(
        ~sa.exists().where(suppressions.c.email == sa.bindparam('lowered', type_=sa.String)))
    columns = ['email', 'active', 'num_newsletter', 'created_at', 'confirmation_sent_at']
    return (upsert(clients).from_select(columns, unknown)
            .on_conflict_do_nothing(index_elements=[sa.func.lower(clients.c.email)])  # known, in any letters' case
            .returning(clients.c.id))


def _may_send_confirmation(client):
    """Take this address's turn for a confirmation email, if it has come: one conditional UPDATE, so
    that of many requests at once only one wins."""
    now = utcnow()
    since = now - timedelta(seconds=current_app.config['CONFIRM_RESEND_SECONDS'])
    return bool(db.session.execute(
        sa.update(Client).where(Client.id == client.id, sa.or_(Client.confirmation_sent_at.is_(None),
                                                               Client.confirmation_sent_at <= since))
        .values(confirmation_sent_at=now).execution_options(synchronize_session=False)).rowcount)


@bp.route('/confirm/<token>', methods=['GET', 'POST'])
@csrf.exempt  # the signed link is the proof; a session's token failed readers who keep no cookie, or wait an hour
def confirm(token):
    """Opening the link shows a button; only pressing it (a POST) subscribes: mail scanners (Safe Links,
    Mimecast) open every link of a message before its reader does, and a GET that subscribed let them
    confirm an address a stranger had signed up, without its owner's word. Both check the link first, so
    a dead one says why at once. Of two presses at once (a double click), one confirms and notifies the
    admins: a conditional UPDATE, as _may_send_confirmation takes a turn.
    :raise 400: for a forged, tampered or expired link, or one whose address has left or is suppressed
    since (the page says which)."""
    try:
        client_id, address, made = load_confirm_token(token)
    except ExpiredLink as exc:
        return render_template('message.html', title='Link expired',
                               message=f'{exc} Sign up again to get a new one.', show_form_link=True), 400
    except InvalidLink as exc:
        return render_template('message.html', title='Invalid link', message=str(exc)), 400
    client = db.session.get(Client, client_id)
    if client is None or client.email != address:
        return render_template('message.html', title='Invalid link',
                               message='This confirmation link does not match any sign-up.'), 400
    if is_suppressed(client.email):  # blocked from this very email, say: its leaving may be older than the link
        return render_template('message.html', title='Link no longer valid',
                               message=f'{client.email} is on our list of addresses never to be mailed (blocked, '
                                       'or refused by its mail server), so this link does not subscribe it.'), 400
    if client.unsubscribed_at and made < client.unsubscribed_at.replace(microsecond=0):  # links count in seconds
        return render_template('message.html', title='Link no longer valid', show_form_link=True,
                               message=f'{client.email} unsubscribed after this link was sent, so it does not '
                                       'subscribe it again. Sign up again to get a new link.'), 400
    if client.email_confirmed_at is None or not client.active:
        if request.method == 'GET':
            return render_template('confirm.html', email=client.email, token=token)
        # Someone coming back is confirmed as of now, not as of their first time: a broadcast's audience is
        # those confirmed by the time it started (app/broadcasts.py), and they had left by then.
        if db.session.execute(sa.update(Client).where(
                Client.id == client.id, sa.or_(Client.email_confirmed_at.is_(None), Client.active.is_(False)))
                .values(email_confirmed_at=utcnow(), active=True, unsubscribed_at=None)
                .execution_options(synchronize_session=False)).rowcount:
            db.session.refresh(client)  # the notice tells when they confirmed
            queue_new_subscriber_notice(client)
        db.session.commit()
    return render_template('message.html', title='You are subscribed',
                           message=f'Thank you: {client.email} will receive the newsletter.')


@bp.route('/unsubscribe/<token>', methods=['GET', 'POST'])
@csrf.exempt  # RFC 8058 one-click POSTs come from mail providers: no session, no CSRF token
def unsubscribe(token):
    """GET asks for confirmation (link scanners follow GETs); POST unsubscribes, either from our form
    (CSRF-checked by the form itself) or as an RFC 8058 one-click request.
    :raise 400: for a forged or tampered link.  :raise 404: when the subscriber no longer exists."""
    try:
        client_id, digest = load_unsubscribe_token(token)
    except InvalidLink as exc:
        return render_template('message.html', title='Invalid link', message=str(exc)), 400
    client = db.session.get(Client, client_id)
    if client is None or digest not in (None, address_digest(client.email)):
        abort(404)  # that subscriber is gone (the row may since hold another address)
    one_click = request.method == 'POST' and request.form.get('List-Unsubscribe') == 'One-Click'
    form = UnsubscribeForm()
    if one_click or form.validate_on_submit():
        if client.active:
            client.active, client.unsubscribed_at = False, utcnow()
            db.session.commit()
        return render_template('message.html', title='Unsubscribed',
                               message=f'{client.email} will receive no more emails from us.')
    status = 400 if request.method == 'POST' else 200
    return render_template('unsubscribe.html', form=form, email=client.email), status


@bp.route('/block/<token>', methods=['GET', 'POST'])
@csrf.exempt  # the signed link is the proof, as for confirm: no cookie or session needed to be left alone
def block(token):
    """The confirmation email's block link: GET asks (link scanners follow GETs), POST puts the address on
    the suppression list, for good.  :raise 400: for a forged or tampered link."""
    try:
        address = load_block_token(token)
    except InvalidLink as exc:
        return render_template('message.html', title='Invalid link', message=str(exc)), 400
    if request.method == 'POST':
        suppress(address, SuppressionReason.BLOCKED, 'the block link in a confirmation email')
        db.session.commit()
        return render_template('message.html', title='Blocked',
                               message=f'{address} will receive nothing from us, whoever signs it up.')
    return render_template('block.html', email=address)

