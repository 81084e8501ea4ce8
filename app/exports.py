"""Every subscriber as a CSV, for an admin. A background job (its progress on the page) streams them, a
batch at a time by id, into a file in the instance folder, gzipped above EXPORT_COMPRESS_ABOVE bytes;
emails it to the admin who asked, attached (or says why it was not, or may not have been); and keeps it
for download for EXPORT_KEEP_HOURS, after which the hourly clean-up deletes it (app/retention.py). Cells
a spreadsheet would run as formulas are escaped (app/csvfiles.py)."""
import gzip
import secrets
import shutil
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from flask import current_app

from app.csvfiles import csv_lines
from app.database import utcnow
from app.email import Attachment, Email, make_message_id
from app.extensions import db
from app.failures import OutcomeUnknown, PermanentFailure
from app.jobs import define_task, report_progress
from app.models import Client, Job
from app.subscribers import state_of, with_states
from app.transports import open_sender

BATCH = 1000
HEADER = ('id', 'email', 'state', 'stage', 'signed_up_at', 'confirmed_at', 'unsubscribed_at')


def folder():
    path = Path(current_app.instance_path) / 'exports'
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def rows():
    """Every subscriber, a batch at a time by id, as HEADER says; suppressed ones say so."""
    after = 0
    while True:
        batch = db.session.execute(
            with_states(sa.select(Client)).where(Client.id > after).order_by(Client.id).limit(BATCH)).all()
        if not batch:
            return
        for client, suppressed in batch:
            yield (client.id, client.email, state_of(client, suppressed), client.num_newsletter, client.created_at,
                   client.email_confirmed_at, client.unsubscribed_at)
        after = batch[-1][0].id
        db.session.expunge_all()  # memory stays one batch, whatever the list's length


@define_task(queue='bulk')
def export_subscribers(admin):
    """:return: the file's name, its rows and size, for the page's download link; and why it was not emailed,
    when the relay refused it for good (trying again would be refused again), or why it may not have been,
    when its answer was lost once it went out (trying again would email it twice)."""
    config, total = current_app.config, db.session.scalar(sa.select(sa.func.count(Client.id)))
    path = folder() / f'subscribers-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(8)}.csv'
    written = 0
    with path.open('w', newline='', encoding='utf-8') as file:
        for line in csv_lines(HEADER, rows()):
            file.write(line)
            written += 1
            if written % BATCH == 0:
                report_progress(written - 1, total)
    if path.stat().st_size > config['EXPORT_COMPRESS_ABOVE']:
        with path.open('rb') as plain, gzip.open(f'{path}.gz', 'wb') as packed:
            shutil.copyfileobj(plain, packed)
        path.unlink()
        path = Path(f'{path}.gz')
    path.chmod(0o600)
    report_progress(written - 1, total)
    # The reading is over, and it wrote nothing: with no transaction left open, the job's outcome is written
    # as a mail job's is, on a connection of its own and tried again while the database is away a moment
    # (app/jobs.py, _record_alone). Written on the session's, a dropped connection left the job running, to
    # be exported and emailed again once its lease ran out.
    db.session.rollback()
    result = {'file': path.name, 'rows': written - 1, 'bytes': path.stat().st_size}
    try:
        _email(admin, path, written - 1)
    except PermanentFailure as refused:
        # Too large for the relay, say: exported again it would be refused again, and a failed job's file
        # is never offered for download, so the export would be lost to the admin altogether.
        result['not emailed'] = str(refused)
    except OutcomeUnknown as lost:  # tried again, it would go out once more (app/email.py, deliver)
        result['emailed perhaps'] = str(lost)
    except BaseException:
        path.unlink()  # the next attempt writes the list anew; this copy would be no export's, never withdrawn
        raise
    return result


def _email(admin, path, count):
    keep = current_app.config['EXPORT_KEEP_HOURS']
    text = (f'The export of {count} subscriber(s) is attached ({path.name}). It can also be downloaded from the '
            f'admin pages for {keep:g} hours.\n')
    email = Email(admin, f'Subscriber export: {count} subscriber(s)', text, f'<p>{text}</p>',
                  make_message_id('export', path.stem), attachments=(Attachment(
                      path.name, 'application/gzip' if path.suffix == '.gz' else 'text/csv', path.read_bytes()),))
    with open_sender() as sender:
        sender.send(email)


def download(job):
    """The export's file while it is kept, or None."""
    if not (job.result or {}).get('file') or job.finished_at is None or withdrawn(job):
        return None
    path = folder() / job.result['file']
    expired = job.finished_at < utcnow() - timedelta(hours=current_app.config['EXPORT_KEEP_HOURS'])
    return None if expired or not path.exists() else path


def withdrawn(job):
    """Why the export is no longer served before its time, or None."""
    return (job.result or {}).get('withdrawn')


def withdraw(since):
    """Delete the kept exports finished at `since` or later: a subscriber who came then has been erased, and
    an export holds everyone there was when it ran. No file is read. Their jobs say why, on the exports
    page. (The copy emailed to the admin is out of the app's reach.)  :return: how many."""
    kept = [(job, path) for job in db.session.scalars(sa.select(Job).where(
        Job.task == export_subscribers.name, Job.finished_at >= since)) if (path := download(job)) is not None]
    for job, path in kept:
        job.result = {**job.result, 'withdrawn': 'a subscriber in it was erased'}
    db.session.commit()
    for _, path in kept:
        path.unlink(missing_ok=True)
    return len(kept)


def delete_expired():
    """:return: how many export files older than EXPORT_KEEP_HOURS were deleted."""
    cutoff = time.time() - current_app.config['EXPORT_KEEP_HOURS'] * 3600
    old = [path for path in folder().glob('subscribers-*') if path.stat().st_mtime < cutoff]
    for path in old:
        path.unlink()
    return len(old)
