"""The app's background tasks (run by the job workers of app/jobs.py), the RQ side of sending, and the
adapters that turn a send's Report into what each of those runners understands.

RQ carries two kinds of work. `send-newsletter-email --queue N` puts N drip sends on it directly:
each RQ job is an ordinary send, so any number of workers behave like that many overlapping cron runs
and divide the subscribers through their claims in the database, which stays the one source of truth
for who has received what. And with JOB_BACKEND=rq, app jobs go through it too (see app/jobs.py)."""
from flask import current_app
from rq import Retry

from app import db
from app.drip import DripStage
from app.email import Email
from app.failures import PermanentFailure, TemporaryFailure
from app.jobs import Interrupted, Reschedule, define_task, report_progress, rq_queue, stopping
from app.sendlog import spread_starts
from app.sending import send
from app.transports import open_sender


class SendAborted(Exception):
    """An RQ drip job whose send stopped on an error: raised so that RQ records the job as failed
    (and retries it), where a returned value would have recorded a success."""


def queue_email(email):
    """Accept `email` for delivery, as part of the caller's transaction: it will exist (and go out)
    exactly when the caller commits, and a web request never waits on SMTP."""
    return send_email.apply(recipient=email.recipient, subject=email.subject, text=email.text, html=email.html,
                            message_id=email.message_id, headers=email.headers)


@define_task(queue='mail')
def send_email(recipient, subject, text, html, message_id, headers):
    """A temporary failure (the server is down, a 4xx) is retried by the job's back-off; a permanent
    one (a 5xx) fails the job at once."""
    with open_sender() as sender:
        sender.send(Email(recipient, subject, text, html, message_id, headers))


@define_task(queue='bulk')
def send_stage(stage, trigger='admin', deferred_only=False):
    """A drip stage sent by a schedule or an admin (the same send as `flask send-newsletter-email`), or
    its deferred deliveries tried again. Deferred ones come back as a job of their own, so that the stage
    itself never goes out again at an hour nobody chose."""
    report = send_as_job(DripStage(stage), trigger, deferred_only=deferred_only)
    if report.retry_at and not report.stopped:
        if deferred_only:
            raise Reschedule(report.retry_at, report.as_dict())
        queue_retry(stage, report.retry_at)
    return report.as_dict()


def send_as_job(mailing, trigger, should_stop=stopping, **options):
    """send(), as a job: progress for the admin page; a retry with back-off when the send stopped on an
    error (the next attempt carries on: nothing is sent twice), and a failure, for an admin to look at,
    when retrying could only make more unknowns; back to the queue at once when its worker shuts down.
    :return: the Report."""
    report = send(mailing, trigger, should_stop=should_stop, on_batch=lambda r: report_progress(r.done, r.due),
                  **options)
    if report.aborted:
        raise (TemporaryFailure if report.retry_safe else PermanentFailure)(report.aborted)
    if report.stopped and stopping():
        raise Interrupted
    return report


def queue_retry(stage, at):
    """Outside a job (cron, RQ), the drip stage's deferred deliveries come back as a job at `at`, so that
    a greylisted subscriber gets this week's stage in minutes rather than at next week's run.
    :return: True if this call queued it (one job per stage and time)."""
    return send_stage.apply_once(f'retry:{stage}:{at:%Y-%m-%dT%H:%M:%S}', run_after=at, stage=stage, trigger='retry',
                                 deferred_only=True)


def enqueue_stage(stage_name, jobs):
    """:return: the RQ jobs, one send each, each starting at another point of the list."""
    starts, work_queue = spread_starts(DripStage(stage_name), jobs), rq_queue()
    return [work_queue.enqueue_call(rq_send_stage, args=(stage_name, start),
                                    timeout=current_app.config['RQ_JOB_TIMEOUT'], retry=Retry(max=3, interval=60))
            for start in starts]


def rq_send_stage(stage_name, start_after=0):
    """Runs inside `flask rq-worker`, in the app context that command provides."""
    try:
        report = send(DripStage(stage_name), 'rq', start_after=start_after)
        if report.retry_at:
            queue_retry(stage_name, report.retry_at)
        if report.aborted:
            raise SendAborted(f'{report.summary()}: {report.aborted}')
        return report.as_dict()
    finally:
        db.session.remove()
