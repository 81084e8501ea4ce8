"""Commands for cron and admins. Attached with cli_group=None, so `flask <command>` runs them inside
the app context with the app's own configuration, exactly as cron needs."""
import gc
import signal
import sys
import threading

import click
import jinja2
import rq
import sqlalchemy as sa
from flask import Blueprint, current_app

from app import broadcasts, db
from app.email import TemplateError
from app.jobs import QUEUES, Worker, rq_queue, run_due
from app.models import Broadcast
from app.newsletter import (
    DripStage,
    MailingSend,
    available_stages,
    check_templates,
    count_due,
    forget_failures,
    iter_due,
)
from app.tasks import enqueue_stage
from app.transports import SenderPool

bp = Blueprint('cli', __name__, cli_group=None)


@bp.cli.command('send-newsletter-email')
@click.argument('stage', type=click.Choice(available_stages()))
@click.option('--dry-run', is_flag=True, help='List who would get STAGE now; send nothing.')
@click.option('--retry-failed', is_flag=True,
              help='Make subscribers whose STAGE failed permanently (e.g. a 5xx) due again first.')
@click.option('--queue', 'jobs', type=int, default=None, metavar='JOBS',
              help='Hand the send to RQ workers (`flask rq-worker`) as JOBS jobs instead; needs REDIS_URL.')
def send_newsletter_email(stage, dry_run, retry_failed, jobs):
    """Send drip STAGE to every active, confirmed subscriber who has received the stage before it.

    Safe to run twice, by hand beside cron, or again after a crash: nobody gets a stage twice.
    Prints a summary and exits with status 1 if any send failed, so cron's MAILTO reports it.
    """
    mailing = DripStage(stage)
    if dry_run:
        count = 0
        for recipient in iter_due(mailing):
            click.echo(recipient.email)
            count += 1
        click.echo(f'{stage}: {count} subscriber(s) would be sent this stage (dry run, nothing sent)', err=True)
        return
    try:
        check_templates(mailing)
    except (TemplateError, jinja2.TemplateError) as exc:
        raise click.ClickException(f'the {stage} templates cannot be rendered, nothing was sent: {exc}') from exc
    if retry_failed:
        forget_failures(mailing)
    if jobs is not None:
        _enqueue(stage, jobs)
        return
    # This process mostly waits on sockets: let a thread whose reply has arrived take the GIL back
    # within 0.5 ms instead of the default 5 ms, or composing the next messages starves the senders.
    sys.setswitchinterval(0.0005)
    # What is loaded by now (Flask, SQLAlchemy, the templates) lives as long as the process. Frozen, it
    # is left out of the collector's full passes, which otherwise scan all of it every few thousand
    # messages while the connection waits: 29 us a message, 9 once frozen (gc.callbacks, timed over a
    # send to 10,000).
    gc.freeze()

    with SenderPool(current_app.config['MAIL_CONCURRENCY']) as pool:
        click.echo(f'{stage}: sending through {pool.describe()}', err=True)
        if sys.stdout.isatty():
            report = _send_with_progress_bar(mailing, pool)
        else:
            report = MailingSend(mailing, pool, on_batch=_log_progress, on_wait=_log_wait()).run()

    click.echo(report.summary())
    for email, reason in report.failed:
        click.echo(f'  failed: {email}: {reason}')
    if report.aborted:
        click.echo(f'  {report.aborted}')
    if not report.ok:
        sys.exit(1)


def _enqueue(stage, jobs):
    if not current_app.config['REDIS_URL']:
        raise click.UsageError('--queue needs REDIS_URL (the Redis that the RQ workers use)')
    queued = enqueue_stage(stage, jobs)
    click.echo(f'{stage}: {len(queued)} job(s) queued; `flask rq-worker` on any machine sends them')


def _send_with_progress_bar(mailing, pool):
    run = MailingSend(mailing, pool, on_wait=_log_wait())
    with click.progressbar(length=count_due(mailing), label=mailing.key) as bar:
        def advance(report):
            bar.update(report.sent + report.skipped + len(report.failed) - bar.pos)

        run.on_batch = advance
        return run.run()


def _log_progress(report):
    # Cron has no terminal: one plain line per batch goes to the log instead of a progress bar.
    click.echo(f'{report.summary()} (of {report.due} due at start)')


def _log_wait():
    said = set()

    def say(claimed, lease_until):
        if (claimed, lease_until) not in said:
            said.add((claimed, lease_until))
            click.echo(f'waiting for {claimed} subscriber(s) claimed by another run: it sends them, or its '
                       f'claim runs out at {lease_until:%H:%M:%S} UTC and this run sends them', err=True)
    return say


@bp.cli.command('rq-worker')
@click.option('--burst', is_flag=True, help='Exit once the queue is empty.')
def rq_worker(burst):
    """Run the RQ jobs: drip sends queued by `send-newsletter-email --queue`, and app jobs when
    JOB_BACKEND=rq (REDIS_URL).

    Start one per sending process you want, on as many machines as share the database.
    """
    if not current_app.config['REDIS_URL']:
        raise click.UsageError('rq-worker needs REDIS_URL')
    work_queue = rq_queue()
    # SimpleWorker runs each job in this process, inside the app context `flask` gave it.
    rq.SimpleWorker([work_queue], connection=work_queue.connection).work(burst=burst)


@bp.cli.command('worker')
@click.option('--queue', 'queues', multiple=True, type=click.Choice(QUEUES),
              help='Serve only this queue (repeatable; default: all). "mail" is confirmations and notices, '
                   '"bulk" is schedules and broadcasts.')
@click.option('--once', is_flag=True, help='Fire due schedules and run every job due now, then exit.')
def worker(queues, once):
    """Run background jobs (emails, schedules, broadcasts) as a process of its own.

    For deployments with several web processes: set JOB_WORKER=off for them and run this, once or
    many times, on any machine that shares the database. Stops cleanly on SIGTERM: a broadcast or
    drip send in progress stops after its batch and another worker carries on.
    """
    queues = queues or QUEUES
    if once:
        click.echo(f'jobs: ran {run_due(queues)}')
        return
    running = Worker(current_app._get_current_object(), queues)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    current_app.extensions['jobs'] = running.start()
    click.echo(f'jobs worker: serving {", ".join(queues)} (Ctrl+C to stop)', err=True)
    stop.wait()
    click.echo('jobs worker: stopping after the jobs in progress reach a safe point', err=True)
    running.stop()


@bp.cli.group('broadcast')
def broadcast_group():
    """Write, schedule and control one-off broadcasts."""


@broadcast_group.command('create')
@click.option('--subject', required=True, help='May use {{ greeting_name }}.')
@click.option('--text', 'text_file', type=click.File(encoding='utf-8'), required=True,
              help='File with the plain-text version.')
@click.option('--html', 'html_file', type=click.File(encoding='utf-8'), required=True,
              help='File with the HTML version (the body; the unsubscribe footer is added).')
@click.option('--at', 'send_at', required=True, help='When to send, e.g. "2026-12-01 09:00".')
@click.option('--timezone', 'zone', default='UTC', show_default=True, help='The time zone of --at.')
@click.option('--preview', is_flag=True, help='Print the email as a subscriber would get it; store nothing.')
def broadcast_create(subject, text_file, html_file, send_at, zone, preview):
    """Schedule a broadcast to every active, confirmed subscriber."""
    text, html = text_file.read(), html_file.read()
    try:
        when = broadcasts.parse_local_time(send_at)
        if preview:
            email = broadcasts.preview(Broadcast(id=0, subject=subject, text=text, html=html))
            click.echo(f'Subject: {email.subject}\n\n{email.text}')
            return
        created = broadcasts.schedule_broadcast(subject, text, html, when, zone, created_by='flask broadcast')
    except broadcasts.BroadcastError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f'broadcast {created.id}: scheduled for {when:%Y-%m-%d %H:%M} {zone} '
               f'({created.send_at:%Y-%m-%d %H:%M} UTC); a job worker sends it')


@broadcast_group.command('list')
def broadcast_list():
    """Every broadcast, newest first, with its progress."""
    for item in db.session.scalars(sa.select(Broadcast).order_by(Broadcast.id.desc())):
        counts = broadcasts.delivery_counts(item)
        when = broadcasts.utc_to_local(item.send_at, item.timezone)
        click.echo(f'{item.id}\t{item.status}\t{when:%Y-%m-%d %H:%M} {item.timezone}\tsent {counts.get("sent", 0)}'
                   f', failed {counts.get("failed", 0)}\t{item.subject}')


def _broadcast_action(name, action):
    @broadcast_group.command(name, help=f'{name.capitalize()} broadcast ID. {action.__doc__}')
    @click.argument('broadcast_id', type=int)
    def command(broadcast_id):
        try:
            action(broadcast_id)
        except broadcasts.BroadcastError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f'broadcast {broadcast_id}: {name}')


for _name, _action in (('cancel', broadcasts.cancel), ('pause', broadcasts.pause), ('resume', broadcasts.resume)):
    _broadcast_action(_name, _action)
