"""Commands for cron and admins. Attached with cli_group=None, so `flask <command>` runs them inside
the app context with the app's own configuration, exactly as cron needs."""
import signal
import sys
import threading

import click
import jinja2
import rq
from flask import Blueprint, current_app

from app.email import TemplateError
from app.newsletter import (
    StageSend,
    available_stages,
    check_templates,
    count_due,
    forget_failures,
    iter_due,
    stage_number,
)
from app.outbox import deliver_due, run_worker
from app.tasks import enqueue_stage, queue
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
    number = stage_number(stage)
    if dry_run:
        count = 0
        for recipient in iter_due(number):
            click.echo(recipient.email)
            count += 1
        click.echo(f'{stage}: {count} subscriber(s) would be sent this stage (dry run, nothing sent)', err=True)
        return
    try:
        check_templates(stage)
    except (TemplateError, jinja2.TemplateError) as exc:
        raise click.ClickException(f'the {stage} templates cannot be rendered, nothing was sent: {exc}') from exc
    if retry_failed:
        forget_failures(number)
    if jobs is not None:
        _enqueue(stage, jobs)
        return
    # This process mostly waits on sockets: let a thread whose reply has arrived take the GIL back
    # within 0.5 ms instead of the default 5 ms, or composing the next messages starves the senders.
    sys.setswitchinterval(0.0005)

    with SenderPool(current_app.config['MAIL_CONCURRENCY']) as pool:
        click.echo(f'{stage}: sending through {pool.describe()}', err=True)
        if sys.stdout.isatty():
            report = _send_with_progress_bar(stage, pool)
        else:
            report = StageSend(stage, pool, on_batch=_log_progress, on_wait=_log_wait()).run()

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


def _send_with_progress_bar(stage, pool):
    run = StageSend(stage, pool, on_wait=_log_wait())
    with click.progressbar(length=count_due(run.stage), label=stage) as bar:
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
    """Send drip jobs queued by `send-newsletter-email --queue` (RQ on REDIS_URL).

    Start one per sending process you want, on as many machines as share the database.
    """
    if not current_app.config['REDIS_URL']:
        raise click.UsageError('rq-worker needs REDIS_URL')
    work_queue = queue()
    # SimpleWorker runs each job in this process, inside the app context `flask` gave it.
    rq.SimpleWorker([work_queue], connection=work_queue.connection).work(burst=burst)


@bp.cli.command('worker')
@click.option('--once', is_flag=True, help='Deliver what is due now, then exit.')
def worker(once):
    """Deliver queued emails (confirmations, admin notices) as a process of its own.

    For deployments with several web processes: set OUTBOX_WORKER=off for them and run this.
    """
    if once:
        total = 0
        while delivered := deliver_due():
            total += delivered
        click.echo(f'outbox: delivered {total}')
        return
    stop = threading.Event()

    def _stop(signum, frame):
        stop.set()
        current_app.extensions['outbox'].wake.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    click.echo('outbox worker: running (Ctrl+C to stop)', err=True)
    run_worker(current_app._get_current_object(), stop)
