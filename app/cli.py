"""Commands for cron and admins. Attached with cli_group=None, so `flask <command>` runs them inside
the app context with the app's own configuration, exactly as cron needs."""
import contextlib
import signal
import sys
import threading

import click
import jinja2
import redis
import rq
import sqlalchemy as sa
from flask import Blueprint, current_app, has_app_context
from flask.cli import ScriptInfo

from app import broadcasts
from app.database import LARGEST_INTEGER
from app.drip import DripStage, NoStages, available_stages, latest_first, queue_retry
from app.email import TemplateError
from app.extensions import db
from app.imports import ImportFileError, Outcome, check, import_file
from app.jobs import QUEUES, Worker, rq_queue, rq_worker_stopping, run_due
from app.ledger import STATES, ledger, mailing_named, members
from app.models import Broadcast, DeliveryStatus
from app.scaleout import enqueue_stage
from app.sending import check_templates, send
from app.sendlog import count_due, iter_due, requeue
from app.timing import TimingError
from app.transports import describe_transport

bp = Blueprint('cli', __name__, cli_group=None)
# An id no row can have is a usage error here, not the database's refusal as a traceback.
BROADCAST_ID = click.IntRange(1, LARGEST_INTEGER)


class StageName(click.Choice):
    """One of the drip's stages, as there are templates for them in the app's STAGES_FOLDER: looked up
    when the command line is read (for --help too), not when this module is imported."""

    def __init__(self):
        super().__init__(())

    def look_up(self, ctx):
        app = current_app if has_app_context() else ctx.ensure_object(ScriptInfo).load_app()
        self.choices = tuple(available_stages(app))

    def get_metavar(self, param, ctx):
        self.look_up(ctx)
        return super().get_metavar(param, ctx)

    def convert(self, value, param, ctx):
        self.look_up(ctx)
        return super().convert(value, param, ctx)


@bp.cli.command('send-newsletter-email')
@click.argument('stage', type=StageName(), required=False)
@click.option('--due', is_flag=True,
              help='Send every stage, to each subscriber as it is due (its Delay: after the step before), the '
                   'latest stages first: one cron line for the whole drip.')
@click.option('--dry-run', is_flag=True, help='List who would get STAGE now; send nothing.')
@click.option('--retry-failed', is_flag=True,
              help='Send again to subscribers whose STAGE failed for good (once you fixed the cause).')
@click.option('--resend-unknown', is_flag=True,
              help='Send again to subscribers whose STAGE may or may not have arrived (unknown): only once you '
                   'know it did not.')
@click.option('--queue', 'jobs', type=click.IntRange(min=1), default=None, metavar='JOBS',
              help='Hand the send to RQ workers (`flask rq-worker`) as JOBS jobs instead; needs REDIS_URL.')
def send_newsletter_email(stage, due, dry_run, retry_failed, resend_unknown, jobs):
    """Send drip STAGE to every active, confirmed subscriber who has received the stage before it (and
    waited the stage's delay since, if it declares one); or, with --due, every stage that is due.

    Safe to run twice, by hand beside cron, or again after a crash: nobody gets a stage twice. Prints
    a summary, and exits with status 1 when anyone failed or may not have got it (unknown), the run
    stopped on an error, or a stage cannot be sent as written (after the other stages, with --due), so
    cron's MAILTO reports it. Deferred subscribers are tried again by a job.
    Outside SEND_WINDOW, it sends nothing and says so.
    """
    if due == bool(stage):
        raise click.UsageError('name a STAGE, or give --due for every stage')
    if due and (retry_failed or resend_unknown or jobs is not None):
        raise click.UsageError('--due sends what is due; --retry-failed, --resend-unknown and --queue take a STAGE')
    try:
        stages = [stage] if stage else latest_first()
    except NoStages as exc:
        raise click.ClickException(str(exc)) from exc
    healthy = [_send_stage(key, dry_run, retry_failed, resend_unknown, jobs) for key in stages]
    if not all(healthy):
        sys.exit(1)


def _send_stage(stage, dry_run, retry_failed, resend_unknown, jobs):
    """One stage, as the command sends it.  :return: False when anyone failed or may not have got it, or
    the stage cannot be sent as written: said, and with --due the other stages are still sent."""
    try:
        mailing = DripStage(stage)
    except TimingError as exc:
        return _unsendable(f'{stage} cannot be sent, nothing was: {exc}')
    if dry_run:
        count = 0
        for recipient in iter_due(mailing):
            click.echo(recipient.email)
            count += 1
        click.echo(f'{stage}: {count} subscriber(s) would be sent this stage (dry run, nothing sent)', err=True)
        return True
    try:
        check_templates(mailing)
    except (TemplateError, jinja2.TemplateError) as exc:
        return _unsendable(f'the {stage} templates cannot be rendered, nothing was sent: {exc}')
    again = [status for status, asked in ((DeliveryStatus.FAILED, retry_failed), (DeliveryStatus.UNKNOWN, resend_unknown))
             if asked]
    if again:
        click.echo(f'{stage}: {requeue(mailing, again)} subscriber(s) to send again', err=True)
    if jobs is not None:
        _enqueue(stage, jobs)
        return True

    click.echo(f'{stage}: sending through {describe_transport()}', err=True)
    report = _send_with_display(mailing)
    click.echo(report.summary())
    for label, entries in (('failed', report.failed), ('unknown', report.unknown), ('deferred', report.deferred)):
        for email, reason in entries:
            click.echo(f'  {label}: {email}: {reason}')
    for why in (report.aborted, report.held):
        if why:
            click.echo(f'  {why}')
    if report.unknown:
        click.echo(f'  unknown: it may have arrived, so it is not sent again. Once you know it did not: '
                   f'flask send-newsletter-email {stage} --resend-unknown')
    if report.retry_at:
        queue_retry(stage, report.retry_at)
        click.echo(f'  deferred: tried again from {report.retry_at:%Y-%m-%d %H:%M:%S} UTC by a job worker (the web '
                   'process, or `flask worker`), and by the next run')
    return report.ok


def _unsendable(why):
    """Said as click says an error, but returned rather than raised: with --due the other stages still go."""
    click.echo(f'Error: {why}', err=True)
    return False


@contextlib.contextmanager
def _redis_in_reach():
    """Redis down, or a REDIS_URL naming the wrong place, said in a line (and not the URL, which may hold
    a password) rather than in redis's traceback."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise click.ClickException(f'cannot reach Redis (REDIS_URL): {exc}') from exc


def _enqueue(stage, jobs):
    if not current_app.config['REDIS_URL']:
        raise click.UsageError('--queue needs REDIS_URL (the Redis that the RQ workers use)')
    with _redis_in_reach():
        queued = enqueue_stage(stage, jobs)
    click.echo(f'{stage}: {len(queued)} job(s) queued; `flask rq-worker` on any machine sends them')


def _send_with_display(mailing):
    """A progress bar on a terminal; for cron, which has none, a plain line per batch in its log."""
    said = set()

    def waiting(held, seconds):
        if held not in said:
            said.add(held)
            click.echo(f'waiting for {held} subscriber(s) claimed by another run: it sends them, or its claim runs '
                       f'out within {seconds:.0f} s and this run takes them over', err=True)

    if not sys.stdout.isatty():
        return send(mailing, 'cli', on_wait=waiting,
                    on_batch=lambda report: click.echo(f'{report.counts()} (of {report.due} due at start)'))
    with click.progressbar(length=count_due(mailing, with_retries=True), label=mailing.key) as bar:
        return send(mailing, 'cli', on_wait=waiting, on_batch=lambda report: bar.update(report.done - bar.pos))


@bp.cli.group('mailing')
def mailing_group():
    """The ledger of a drip stage or a broadcast: who got it, who did not, and why."""


@mailing_group.command('status')
@click.argument('key', metavar='MAILING')
@click.option('--list', 'state', type=click.Choice([str(state) for state in STATES]), help='Also list who is in this state, with the reason.')
def mailing_status(key, state):
    """Where everyone stands with MAILING (week1, week2, ..., or broadcast7): audience = sent + failed +
    unknown + deferred + pending, checked against the subscribers' own records.

    Exits with status 1 when it does not balance.
    """
    try:
        mailing = mailing_named(key)
    except TimingError as exc:
        raise click.ClickException(f'{key} cannot be read: {exc}') from exc
    if mailing is None:
        raise click.BadParameter(f'no mailing {key!r} (a drip stage such as week1, or broadcast<id>)', param_hint='MAILING')
    led = ledger(mailing)
    click.echo(f'{led.mailing}: audience {led.audience}')
    for name in STATES:
        extra = f' ({led.pending - led.in_flight} due, {led.in_flight} being sent now)' if name == 'pending' else ''
        click.echo(f'  {name:9s}{getattr(led, name):>8}{extra}')
    terms = ' + '.join(str(getattr(led, name)) for name in STATES)
    if led.balances:
        click.echo(f'  balances: {terms} = {led.audience}')
    else:
        click.echo(f'  DOES NOT BALANCE: {terms} = {led.accounted}, audience {led.audience}')
        for mismatch in led.mismatches:
            click.echo(f'    {mismatch}')
    if state:
        click.echo(f'{state}:')
        for email, detail in members(mailing, state):
            click.echo(f'  {email}\t{detail}')
    if not led.balances:
        sys.exit(1)


class _StoppingWorker(rq.SimpleWorker):
    """Told to stop, it also asks the job it runs to stop at its next safe point (app.jobs.rq_worker_stopping)."""

    def handle_warm_shutdown_request(self):
        rq_worker_stopping.set()
        super().handle_warm_shutdown_request()


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
    # SimpleWorker runs each job in this process, inside the app context `flask` gave it. With RQ's
    # scheduler too: a retry (a send stopped on an error, tried again a minute later) waits among RQ's
    # scheduled jobs until a scheduler puts it back on the queue, and no other process runs one.
    with _redis_in_reach():
        _StoppingWorker([work_queue], connection=work_queue.connection).work(burst=burst, with_scheduler=True)


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
    # Woken now and then: a signal taken by another thread (as a SIGTERM right after a SIGCONT can be) only
    # marks itself for the main thread, which runs the handler when it next wakes, never in an endless wait.
    while not stop.wait(1):
        pass
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
        outcomes = ', '.join(f'{state} {counts.get(state, 0)}' for state in STATES[:-1])
        click.echo(f'{item.id}\t{item.status}\t{when:%Y-%m-%d %H:%M} {item.timezone}\t{outcomes}\t{item.subject}')


def _broadcast_action(name, action):
    @broadcast_group.command(name, help=f'{name.capitalize()} broadcast ID. {action.__doc__ or ""}'.strip())
    @click.argument('broadcast_id', type=BROADCAST_ID)
    def command(broadcast_id):
        try:
            action(broadcast_id)
        except broadcasts.BroadcastError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f'broadcast {broadcast_id}: {name}')


for _name, _action in (('cancel', broadcasts.cancel), ('pause', broadcasts.pause), ('resume', broadcasts.resume)):
    _broadcast_action(_name, _action)


def _send_again(name, again, doc):
    @broadcast_group.command(name, help=doc)
    @click.argument('broadcast_id', type=BROADCAST_ID)
    def command(broadcast_id):
        try:
            count = again(broadcast_id)
        except broadcasts.BroadcastError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f'broadcast {broadcast_id}: {count} to send again; a job worker sends them')


_send_again('resend-unknown', broadcasts.resend_unknown, 'Send broadcast ID again to those whose copy may or may not '
            'have arrived (unknown): only once you know it did not.')
_send_again('retry-failed', broadcasts.retry_failed, 'Send broadcast ID again to those whose copy was refused for good '
            '(failed): once you have fixed the cause.')


@bp.cli.command('import-subscribers')
@click.argument('path', metavar='FILE', type=click.Path(exists=True, dir_okay=False))
@click.option('--consented-by', metavar='EMAIL',
              help='They consented already: subscribe them at once, send no confirmation email, and record EMAIL '
                   '(who says so) and the time on each of them as their consent.')
@click.option('--dry-run', is_flag=True, help='Only say what the import would do; write nothing.')
def import_subscribers(path, consented_by, dry_run):
    """Import subscribers from the CSV file FILE, as an admin's upload does: checked row by row like the
    sign-up, duplicates left out, and all or nothing. Each new subscriber gets a confirmation email unless
    --consented-by is given.

    Prints the counts and the first duplicate and rejected rows with their reasons; exits with status 1
    when the file cannot be imported at all.
    """
    if consented_by is not None and not 0 < len(consented_by.strip()) <= 254:
        raise click.BadParameter('say who recorded the consent, in at most 254 characters',
                                 param_hint='--consented-by')
    try:
        if dry_run:
            report = check(path)
        else:
            report = import_file(path, consented_by and consented_by.strip())
            db.session.commit()
    except (ImportFileError, sa.exc.IntegrityError, sa.exc.DataError) as exc:
        db.session.rollback()
        reason = f'the database refused a row: {exc.orig}' if isinstance(exc, sa.exc.DBAPIError) else exc
        raise click.ClickException(f'{reason} Nothing was imported.') from exc
    click.echo(f'{path}: read as {report.read_as}')
    for outcome in (Outcome.DUPLICATE, Outcome.REJECTED):
        for line, address, reason in report.shown[outcome]:
            click.echo(f'  line {line}: {outcome}: {address}: {reason}')
        if report.counts[outcome] > len(report.shown[outcome]):
            click.echo(f'  ... and {report.counts[outcome] - len(report.shown[outcome])} more {outcome}')
    click.echo(report.summary('would import' if dry_run else 'imported'))
