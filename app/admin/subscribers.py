"""The subscribers' pages: find one, see what happened to them, and act on them (app/subscribers.py)."""
from flask import abort, flash, redirect, render_template, request, url_for

from app import broadcasts, exports, subscribers
from app.admin.blueprint import bp
from app.admin.mailings import mailing_or_abort
from app.database import as_integer
from app.extensions import db
from app.models import Client
from app.subscribers import SubscriberState
from app.suppression import is_suppressed


@bp.route('/subscribers')
def subscriber_list():
    """:raise 400: for a filter that is not one (a state, a stage number, an id to page after)."""
    search, state, stage = request.args.get('q', ''), request.args.get('state') or None, request.args.get('stage')
    stage_number, after = as_integer(stage or '0'), as_integer(request.args.get('after') or '0')
    if state not in (None, *SubscriberState) or stage_number is None or after is None:
        abort(400, f'A filter is not valid: state is one of {", ".join(SubscriberState)}; stage is a number.')
    page = subscribers.find(search, SubscriberState(state) if state else None, stage_number if stage else None, after)
    return render_template('admin/subscribers.html', title='Subscribers', page=page, search=search, state=state,
                           stage=stage, states=list(SubscriberState))


@bp.route('/subscribers/<int:client_id>')
def subscriber(client_id):
    client = db.get_or_404(Client, client_id)
    return render_template('admin/subscriber.html', title=client.email, client=client,
                           state=SubscriberState.of(client), moments=subscribers.timeline(client))


@bp.route('/subscribers/<int:client_id>/<any(deactivate, reactivate):action>', methods=['POST'])
def subscriber_action(client_id, action):
    """A suppressed address is not reactivated: its confirmation email would never go out
    (app/main/email.py), and the admin would be told it had."""
    client = db.get_or_404(Client, client_id)
    if action == 'reactivate' and is_suppressed(client.email):
        flash(f'{client.email} is on the suppression list: it gets nothing from us, not even a confirmation email.',
              'error')
        return redirect(url_for('admin.subscriber', client_id=client_id))
    getattr(subscribers, action)(client)
    flash({'deactivate': f'{client.email} receives nothing more.',
           'reactivate': f'{client.email} is sent a fresh confirmation email: its link, and the Confirm button it opens, subscribe them again.'
           }[action])
    return redirect(url_for('admin.subscriber', client_id=client_id))


@bp.route('/subscribers/<int:client_id>/erase', methods=['POST'])
def subscriber_erase(client_id):
    """Only with the address typed again: erasing cannot be undone. The kept exports that hold the subscriber
    are withdrawn with them (see subscribers.erase)."""
    client = db.get_or_404(Client, client_id)
    if request.form.get('confirm', '').strip().lower() != client.email.lower():
        flash('Type the address to erase it: nothing was erased.', 'error')
        return redirect(url_for('admin.subscriber', client_id=client_id))
    since = client.created_at
    erased = subscribers.erase(client)
    flash(f'Erased {erased}; {exports.withdraw(since)} kept export(s) withdrawn.')
    return redirect(url_for('admin.subscriber_list'))


@bp.route('/subscribers/<int:client_id>/resend/<mailing>', methods=['POST'])
def subscriber_resend(client_id, mailing):
    """:raise 404: no such subscriber, or no such mailing (a stage or a broadcast that exists).  :raise 409:
    a stage that cannot be read."""
    client = db.get_or_404(Client, client_id)
    mailing_or_abort(mailing)
    try:
        if subscribers.resend_unknown(client, mailing):
            flash(f'{mailing} goes to {client.email} again, by a job now.')
        else:
            flash(f'{client.email} has no {mailing} whose outcome is unknown, or is no longer due it '
                  '(unsubscribed or suppressed since).', 'error')
    except broadcasts.BroadcastError as exc:
        flash(f'{exc}.', 'error')
    return redirect(url_for('admin.subscriber', client_id=client_id))
