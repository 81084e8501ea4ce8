"""Drip work for RQ workers (`flask rq-worker`), for sites that spread sending over several machines.

RQ only carries the request "send stage X". Each job is an ordinary StageSend, so any number of
workers behave like that many overlapping cron runs: they divide the subscribers through their
claims in the database, which stays the one source of truth for who has received what. A worker
killed mid-job leaves at most its batch in flight, and another job takes that batch over when its
lease runs out."""
import redis
import rq
from flask import current_app

from app import db
from app.newsletter import StageSend, spread_starts, stage_number
from app.transports import SenderPool


def queue():
    connection = redis.Redis.from_url(current_app.config['REDIS_URL'])
    return rq.Queue(current_app.config['RQ_QUEUE'], connection=connection)


def enqueue_stage(stage_name, jobs):
    """:return: the RQ jobs, one StageSend each, each starting at another point of the list."""
    starts, work_queue = spread_starts(stage_number(stage_name), jobs), queue()
    return [work_queue.enqueue_call(send_stage, args=(stage_name, start), timeout=current_app.config['RQ_JOB_TIMEOUT'])
            for start in starts]


def send_stage(stage_name, start_after=0):
    """Runs inside `flask rq-worker`, in the app context that command provides."""
    try:
        with SenderPool(current_app.config['MAIL_CONCURRENCY']) as pool:
            report = StageSend(stage_name, pool, start_after=start_after).run()
        return {'sent': report.sent, 'skipped': report.skipped, 'failed': report.failed, 'aborted': report.aborted}
    finally:
        db.session.remove()
