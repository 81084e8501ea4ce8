"""What admins see and do: the state of every background job, the drip's stages (previews, tests, "send
now") and schedules, and broadcasts."""
import dataclasses
import secrets

import sqlalchemy as sa
from flask import abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user

from app import broadcasts, charts, exports
from app import subscribers as people
from app.admin.blueprint import bp
from app.admin.forms import BroadcastForm
from app.database import as_integer, utcnow
from app.drip import UNSENDABLE, DripStage, available_stages, send_stage, waiting
from app.email import make_message_id, queue_email
from app.extensions import db, login
from app.mailing import PREVIEW_RECIPIENT, Recipient
from app.models import BROADCAST_MOVES, Broadcast, Client, Job
from app.sendlog import count_due
from app.timing import TimingError, describe_delay


@bp.before_request
def _admins_only():
    """Every admin page but the two that sign in needs a signed-in admin."""
    if request.endpoint not in ('admin.login_page', 'admin.sign_in') and not current_user.is_authenticated:
        return login.unauthorized()


@bp.route('/')
def dashboard():
    subscribers = db.session.execute(sa.select(
        sa.func.count(Client.id),
        sa.func.count(Client.id).filter(Client.active, Client.email_confirmed_at.is_not(None)))).one()
    jobs = db.session.scalars(sa.select(Job).order_by(Job.id.desc()).limit(50)).all()
    schedules, zone = current_app.extensions['schedules']
    now = utcnow()
    last_due = [(schedule, broadcasts.utc_to_local(schedule.latest_due(now, zone), zone.key)) for schedule in schedules]
    funnel = charts.bars([(f'stage {stage}', count) for stage, count in people.per_stage()],
                         'Active subscribers by the last drip stage they received')
    growth = charts.daily(people.per_day(), ('sign-ups', 'confirmations'),
                          'Sign-ups and confirmations per day, last eight weeks')
    return render_template('admin/dashboard.html', title='Admin', subscribers=subscribers, jobs=jobs,
                           totals=people.totals(), funnel=funnel, growth=growth, runs=people.recent_runs(),
                           schedules=last_due, zone=zone.key, stages=[_stage_row(key) for key in available_stages()],
                           window=current_app.extensions['sending_window'],
                           broadcasts=db.session.scalars(sa.select(Broadcast).order_by(Broadcast.id.desc())).all())


def _stage_row(key):
    """A drip stage as the dashboard shows it: its delay, and how many are due it now or waiting for it."""
    stage, unreadable = stage_or_reason(key)
    if unreadable:
        return {'key': key, 'delay': unreadable, 'due': '?', 'waiting': '?'}
    return {'key': key, 'delay': describe_delay(stage.delay) if stage.delay else 'none',
            'due': count_due(stage), 'waiting': waiting(stage)}


@bp.route('/stages/<stage>/send', methods=['POST'])
def send_stage_now(stage):
    if stage not in available_stages():
        abort(404)
    job_id = send_stage.apply(stage=stage)
    db.session.commit()
    flash(f'{stage} is queued as job {job_id}: everyone due it gets it, nobody twice.')
    return redirect(url_for('admin.dashboard'))


@bp.route('/broadcasts/new', methods=['GET', 'POST'])
def new_broadcast():
    """A broadcast's HTML may be long: this form takes BROADCAST_MAX_BYTES (app/security.py)."""
    form, preview, error = BroadcastForm(), None, None
    if form.validate_on_submit():
        try:
            if form.schedule.data:
                created = broadcasts.schedule_broadcast(form.subject.data, form.text.data, form.html.data,
                                                        form.send_at.data, form.timezone.data, current_user.email)
                flash(f'Broadcast {created.id} is scheduled.')
                return redirect(url_for('admin.broadcast', broadcast_id=created.id))
            preview = broadcasts.preview(Broadcast(id=0, subject=form.subject.data, text=form.text.data,
                                                   html=form.html.data))
        except broadcasts.BroadcastError as exc:
            error = str(exc)
    elif not form.is_submitted():
        # In the zone the form starts in, not the server's.
        now = broadcasts.utc_to_local(utcnow(), form.timezone.data)
        form.send_at.data = now.replace(second=0, microsecond=0, tzinfo=None)
    status = 400 if error or form.errors else 200
    return render_template('admin/new_broadcast.html', title='New broadcast', form=form, preview=preview,
                           error=error), status


@bp.route('/broadcasts/<int:broadcast_id>')
def broadcast(broadcast_id):
    item = db.get_or_404(Broadcast, broadcast_id)
    jobs = db.session.scalars(
        sa.select(Job).where(Job.task == 'send_broadcast', Job.payload['broadcast_id'].as_integer() == item.id)
        .order_by(Job.id.desc())).all()
    try:
        preview, unshown = broadcasts.preview(item), None
    except broadcasts.BroadcastError as exc:  # stored before today's checks, or rendering only some of the time
        preview, unshown = None, str(exc)
    return render_template('admin/broadcast.html', title=f'Broadcast {item.id}', broadcast=item,
                           counts=broadcasts.delivery_counts(item), preview=preview, unshown=unshown,
                           send_at=broadcasts.utc_to_local(item.send_at, item.timezone),
                           jobs=jobs, moves=BROADCAST_MOVES)


@bp.route('/broadcasts/<int:broadcast_id>/<any(cancel, pause, resume):verb>', methods=['POST'])
def broadcast_action(broadcast_id, verb):
    """POSTs are CSRF-checked by CSRFProtect, like every form in the app."""
    try:
        getattr(broadcasts, verb)(broadcast_id)
        flash(f'Broadcast {broadcast_id}: {verb} done.')
    except broadcasts.BroadcastError as exc:
        flash(str(exc), 'error')
    return redirect(url_for('admin.broadcast', broadcast_id=broadcast_id))


@bp.route('/stages/<stage>/preview')
def stage_preview(stage):
    """A drip stage as a made-up subscriber, or the one asked for (`?subscriber=` an id or an address),
    would get it.  :raise 404: no such stage or subscriber.  :raise 409: the stage cannot be read."""
    mailing = stage_or_abort(stage)
    wanted = request.args.get('subscriber', '').strip()
    recipient = PREVIEW_RECIPIENT
    if wanted:
        client_id = as_integer(wanted)
        client = db.session.scalar(sa.select(Client).where(
            Client.id == client_id if client_id is not None else sa.func.lower(Client.email) == wanted.lower()))
        if client is None:
            abort(404, f'There is no subscriber {wanted}.')
        recipient = Recipient(client.id, client.email)
    return render_template('admin/stage.html', title=f'{stage} preview', stage=stage, wanted=wanted,
                           preview=compose_or_abort(mailing, recipient), recipient=recipient)


@bp.route('/stages/<stage>/test', methods=['POST'])
def stage_test(stage):
    """The stage, to the signed-in admin, marked as a test: it goes as a single email, not through the
    send, so no ledger and no subscriber's stage is touched."""
    email = compose_or_abort(stage_or_abort(stage), Recipient(0, current_user.email))
    queue_email(dataclasses.replace(email, subject=f'[Test] {email.subject}',
                                    message_id=make_message_id('test', stage, secrets.token_hex(6))))
    db.session.commit()
    flash(f'A test of {stage} is on its way to {current_user.email}.')
    return redirect(url_for('admin.stage_preview', stage=stage))


def stage_or_reason(key):
    """(the drip stage `key`, None), or (None, why it cannot be read) when its Delay: line is wrong. Such a
    stage cannot be sent, but the pages that list the stages must still show it, with the reason, and
    every other mailing beside it."""
    try:
        return DripStage(key), None
    except TimingError as exc:
        return None, f'cannot be read: {exc}'


def stage_or_abort(key):
    """A stage for its own pages.  :raise 404: no templates for it.  :raise 409: its Delay: line cannot be
    read: the stage is there, but nothing of it can be shown or sent until its file is fixed, and the page
    says why."""
    if key not in available_stages():
        abort(404)
    stage, unreadable = stage_or_reason(key)
    if unreadable:
        abort(409, f'{key} {unreadable}')
    return stage


def compose_or_abort(stage, recipient):
    """The stage's email for `recipient`.  :raise 409: its templates do not compose (no Subject: line, a
    Jinja error): the admin writing a stage previews it to find out, and must be told what is wrong."""
    try:
        return stage.compose(recipient)
    except UNSENDABLE as exc:
        abort(409, f'{stage.key} cannot be composed: {exc}')


@bp.app_template_global('progress')
def job_progress(job):
    """'40 / 100 (40 %)', or '' while a job has reported none."""
    if not job.progress_total:
        return ''
    return f'{job.progress_done or 0} / {job.progress_total} ({100 * (job.progress_done or 0) // job.progress_total} %)'


@bp.app_template_global('job_times')
def job_times(job):
    """'11-30 09:15:02 / 09:15:03 / 09:15:09': created, started, finished, as far as it has come (UTC)."""
    times = [job.created_at.strftime('%m-%d %H:%M:%S')]
    times += [moment.strftime('%H:%M:%S') for moment in (job.started_at, job.finished_at) if moment]
    return ' / '.join(times)


@bp.app_template_global('job_outcome')
def job_outcome(job):
    """Its error, or what its result says in words ('rows: 4, bytes: 528'), leaving out what is empty."""
    if job.error:
        return job.error
    if isinstance(job.result, dict):
        return ', '.join(f'{key.replace("_", " ")}: {value}' for key, value in job.result.items()
                         if value not in (None, False, '', [], {}))
    return '' if job.result is None else str(job.result)


@bp.route('/jobs/<int:job_id>.json')
def job_state(job_id):
    """A job's row as the page shows it, for the pages' live progress (static/progress.js); an export's
    download, once there is one."""
    job = db.get_or_404(Job, job_id)
    download = job.task == 'export_subscribers' and exports.download(job)
    return {'id': job.id, 'task': job.task, 'status': job.status, 'progress': job_progress(job),
            'done': job.progress_done, 'total': job.progress_total, 'error': job.error,
            'attempts': f'{job.attempts} of {job.max_attempts}', 'times': job_times(job), 'outcome': job_outcome(job),
            'download': {'url': url_for('admin.export_download', job_id=job.id), 'file': job.result['file'],
                         'about': f' ({job.result["rows"]} subscribers, {job.result["bytes"]} bytes)'} if download else None}
