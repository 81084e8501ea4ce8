"""What the app keeps, and for how long: finished jobs (their rows hold recipients and errors) are deleted
JOB_RETENTION_DAYS after they ended, sign-ups never confirmed once their latest link has expired (the
address's owner may never have asked; one who asked again near the end has a new link), exports once
EXPORT_KEEP_HOURS have passed, admin sessions once over (logged out or expired) and their sign-in link
dead, and uploads never imported (and reports of imports over) once a day old:
lists of addresses, which must not wait for an upload to come and sweep them. A `clean_up` job does it,
queued by the workers' clock once an hour (one job per hour however many workers tick). The instance
folder's files (the SQLite database, the generated key, the `.eml` mail) are readable by their owner only:
app/database.py, app/links.py and app/transports.py create them so."""
import logging
from datetime import timedelta

import sqlalchemy as sa
from flask import current_app

from app import exports, imports
from app.admin.auth import LINK_MAX_AGE
from app.database import utcnow
from app.extensions import db
from app.jobs import define_task
from app.models import AdminSession, Client, Delivery, Job, JobStatus

log = logging.getLogger(__name__)
OVER = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SKIPPED)


def queue_clean_up():
    """On the clock: this hour's clean-up, once (unless CLEAN_UP is off)."""
    if current_app.config['CLEAN_UP']:
        clean_up.apply_once(f'clean-up:{utcnow():%Y-%m-%dT%H}')


@define_task(queue='bulk')
def clean_up():
    """:return: how many jobs, unconfirmed sign-ups, admin sessions, export files and import files were
    deleted. An admin session's row outlives its use by its link's quarter of an hour: until then it is
    what tells a used sign-in link from a fresh one (app/admin/auth.py)."""
    config, now = current_app.config, utcnow()
    jobs = db.session.execute(sa.delete(Job).where(
        Job.status.in_(OVER), Job.finished_at < now - timedelta(days=config['JOB_RETENTION_DAYS']),
        Job.unique_key.is_(None) | ~Job.unique_key.startswith('schedule:'))  # a schedule's firing is its memory
        .execution_options(synchronize_session=False)).rowcount
    expired = db.session.execute(sa.delete(Client).where(
        Client.email_confirmed_at.is_(None),
        sa.func.coalesce(Client.confirmation_sent_at, Client.created_at)
        < now - timedelta(seconds=config['CONFIRM_MAX_AGE']),
        ~sa.exists(sa.select(Delivery.id).where(Delivery.client_id == Client.id)))
        .execution_options(synchronize_session=False)).rowcount
    sessions = db.session.execute(sa.delete(AdminSession).where(
        AdminSession.ended_at.is_not(None) | (AdminSession.expires_at <= now),
        AdminSession.created_at < now - timedelta(seconds=LINK_MAX_AGE))
        .execution_options(synchronize_session=False)).rowcount
    files, uploads = exports.delete_expired(), imports.sweep()
    log.info('clean-up: %d finished job(s), %d expired sign-up(s), %d admin session(s), %d export file(s) and %d '
             'import file(s) deleted', jobs, expired, sessions, files, uploads)
    return {'jobs': jobs, 'unconfirmed sign-ups': expired, 'admin sessions': sessions, 'export files': files,
            'import files': uploads}
