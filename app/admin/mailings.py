"""Each mailing's ledger for admins: its audience and where everyone stands (sent, failed, unknown,
deferred, pending), whether it balances, the list behind each number, and a CSV of those who did not
get it (app/ledger.py does the counting, the same as `flask mailing status`)."""
import itertools

import sqlalchemy as sa
from flask import Response, abort, render_template, request, stream_with_context

from app.admin.blueprint import bp
from app.admin.routes import stage_or_abort, stage_or_reason
from app.csvfiles import csv_lines
from app.drip import STAGE_NAME, available_stages
from app.extensions import db
from app.ledger import PENDING, STATES, ledger, mailing_named, members
from app.models import Broadcast, DeliveryStatus

SHOWN = 200  # of a list on the page; the CSV has them all
NOT_RECEIVED = (DeliveryStatus.FAILED, DeliveryStatus.UNKNOWN, DeliveryStatus.DEFERRED, PENDING)


def mailing_or_abort(key):
    """A broadcast, or a drip stage there are templates for.  :raise 404: neither.  :raise 409: a stage that
    cannot be read."""
    if STAGE_NAME.fullmatch(key):
        return stage_or_abort(key)
    mailing = mailing_named(key)
    if mailing is None:
        abort(404, f'There is no mailing {key}.')
    return mailing


@bp.route('/mailings')
def mailing_list():
    """Every mailing's ledger, the drip's stages first. A stage that cannot be read is listed with the
    reason in place of its counts, rather than taking every other mailing's ledger down with it."""
    stages = [(key, *stage_or_reason(key)) for key in available_stages()]
    sent = [(f'broadcast{id_}', mailing_named(f'broadcast{id_}'), None)
            for id_ in db.session.scalars(sa.select(Broadcast.id).order_by(Broadcast.id.desc()))]
    return render_template('admin/mailings.html', title='Mailings', states=STATES,
                           rows=[(key, ledger(found) if found else None, unreadable)
                                 for key, found, unreadable in stages + sent])


@bp.route('/mailings/<key>')
def mailing(key):
    """:raise 400: for a state that is not one."""
    state = request.args.get('state', DeliveryStatus.FAILED)
    if state not in STATES:
        abort(400, f'state is one of {", ".join(STATES)}')
    found = mailing_or_abort(key)
    return render_template('admin/mailing.html', title=key, account=ledger(found), states=STATES, state=state,
                           shown=list(itertools.islice(members(found, state), SHOWN)), limit=SHOWN)


@bp.route('/mailings/<key>/not-received.csv')
def not_received_csv(key):
    """Everyone in the audience who has not got it, and why, streamed."""
    found = mailing_or_abort(key)
    rows = ((email, state, detail) for state in NOT_RECEIVED for email, detail in members(found, state))
    return Response(stream_with_context(csv_lines(('email', 'state', 'detail'), rows)), mimetype='text/csv',
                    headers={'Content-Disposition': f'attachment; filename="{key}-not-received.csv"'})
