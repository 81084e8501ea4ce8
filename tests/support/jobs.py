"""The jobs table as a test drives it: queue emails as a request does, let their time come, run what is
due as one pass of a worker, and read the jobs back with their outcomes."""
from datetime import timedelta

import sqlalchemy as sa

from app.database import utcnow
from app.email import Email, queue_email
from app.extensions import db
from app.jobs import run_due
from app.models import Job


def queue_emails(app, *recipients):
    """Queue one `send_email` job per recipient and commit them, as a request does."""
    with app.app_context():
        for n, recipient in enumerate(recipients):
            queue_email(Email(recipient, f'Hello {n}', 'text', '<p>html</p>', f'<test.{n}.{recipient}>'))
        db.session.commit()


def make_jobs_due_now(app):
    """Every job becomes due, as if its time (or its back-off) had come."""
    with app.app_context():
        db.session.execute(sa.update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
        db.session.commit()


def run_due_jobs(app):
    """Run every job that is due, in this thread, as `flask worker --once` does.  :return: how many ran."""
    with app.app_context():
        return run_due()


def jobs(app):
    """Every job, oldest first."""
    with app.app_context():
        return db.session.scalars(sa.select(Job).order_by(Job.id)).all()
