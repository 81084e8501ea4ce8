"""The app's background tasks (run by the job workers of app/jobs.py), and the RQ side of sending.

RQ carries two kinds of work. `send-newsletter-email --queue N` puts N drip sends on it directly:
each RQ job is an ordinary MailingSend, so any number of workers behave like that many overlapping
cron runs and divide the subscribers through their claims in the database, which stays the one source
of truth for who has received what. And with JOB_BACKEND=rq, app jobs go through it too (see
app/jobs.py)."""
from flask import current_app

from app import db
from app.email import Email
from app.jobs import Interrupted, define_task, report_progress, rq_queue, stopping
from app.newsletter import DripStage, MailingSend, spread_starts
from app.transports import SenderPool, TemporaryFailure, open_sender


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
def send_stage(stage):
    """A drip stage sent by a schedule or an admin: the same send as `flask send-newsletter-email`."""
    return send_mailing(DripStage(stage))


def send_mailing(mailing, should_stop=stopping):
    """Run a MailingSend as a job: progress for the admin page, a stop at the next batch when the
    worker shuts down, and a retry with back-off when the way out is down (nothing sent twice)."""
    with SenderPool(current_app.config['MAIL_CONCURRENCY']) as pool:
        report = MailingSend(mailing, pool, should_stop=should_stop,
                             on_batch=lambda r: report_progress(r.sent + r.skipped + len(r.failed), r.due)).run()
    if report.aborted:
        raise TemporaryFailure(report.aborted)
    if report.stopped and stopping():
        raise Interrupted
    return report.as_dict()


def enqueue_stage(stage_name, jobs):
    """:return: the RQ jobs, one MailingSend each, each starting at another point of the list."""
    starts, work_queue = spread_starts(DripStage(stage_name), jobs), rq_queue()
    return [work_queue.enqueue_call(rq_send_stage, args=(stage_name, start),
                                    timeout=current_app.config['RQ_JOB_TIMEOUT'])
            for start in starts]


def rq_send_stage(stage_name, start_after=0):
    """Runs inside `flask rq-worker`, in the app context that command provides."""
    try:
        with SenderPool(current_app.config['MAIL_CONCURRENCY']) as pool:
            return MailingSend(DripStage(stage_name), pool, start_after=start_after).run().as_dict()
    finally:
        db.session.remove()
