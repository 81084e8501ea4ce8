"""A drip stage sent by many RQ workers at once (`flask send-newsletter-email weekN --queue N`, run by
`flask rq-worker` processes on any machines). Each RQ job is an ordinary send, so any number of workers
behave like that many overlapping cron runs and divide the subscribers through their claims in the
database, which stays the one source of truth for who has received what. (App jobs can go through RQ
too, with JOB_BACKEND=rq: see app/jobs.py.)"""
from flask import current_app
from rq import Retry, get_current_job

from app.drip import DripStage, queue_retry
from app.extensions import db
from app.jobs import rq_queue, rq_worker_stopping
from app.sending import send
from app.sendlog import spread_starts


class SendAborted(Exception):
    """An RQ drip job whose send stopped on an error: raised so that RQ records the job as failed
    (and retries it, unless the send says a retry would only lose more answers), where a returned value
    would have recorded a success."""


def enqueue_stage(stage_name, jobs):
    """:return: the RQ jobs, one send each, each starting at another point of the list."""
    starts, work_queue = spread_starts(DripStage(stage_name), jobs), rq_queue()
    return [_enqueue(work_queue, stage_name, start) for start in starts]


def _enqueue(work_queue, stage_name, start_after):
    return work_queue.enqueue_call(rq_send_stage, args=(stage_name, start_after),
                                   timeout=current_app.config['RQ_JOB_TIMEOUT'], retry=Retry(max=3, interval=60))


def rq_send_stage(stage_name, start_after=0):
    """Runs inside `flask rq-worker`, in the app context that command provides. Told to stop, the worker
    stops the send after its batch, and queues the same job again for another worker to carry on from the
    send log, as the app's own jobs go back to the queue (app/jobs.py, Interrupted)."""
    try:
        report = send(DripStage(stage_name), 'rq', start_after=start_after, should_stop=rq_worker_stopping.is_set)
        if report.retry_at:
            queue_retry(stage_name, report.retry_at)
        if report.aborted:
            if not report.retry_safe and (job := get_current_job()) is not None:
                job.retries_left = 0  # as GiveUp does for the app's own jobs (app/sending.py, send_as_job)
            raise SendAborted(f'{report.summary()}: {report.aborted}')
        if report.stopped and not report.held:
            _enqueue(rq_queue(), stage_name, start_after)
        return report.as_dict()
    finally:
        db.session.remove()
