"""An admin's CSV export of every subscriber (app/exports.py): a job that streams them to a file, emails it
attached (gzipped when large), and keeps it for download for a while; formula cells escaped."""
import csv
import gzip
import io
import os
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import Client, Job
from app.suppression import suppress
from tests.support.forms import csrf_token
from tests.support.jobs import make_jobs_due_now, run_due_jobs
from tests.support.smtp import MailSink


def export(app, admin):
    admin.post('/admin/exports', data={'csrf_token': csrf_token(admin, '/admin/exports')})
    run_due_jobs(app)
    with app.app_context():
        return db.session.scalar(sa.select(Job).where(Job.task == 'export_subscribers').order_by(Job.id.desc()))


def attachment_of(smtp):
    [message] = [m for m in smtp.messages if m['Subject'].startswith('Subscriber export')]
    [part] = [part for part in message.walk() if part.get_filename()]
    return part.get_filename(), part.get_content_type(), part.get_payload(decode=True)


def test_every_subscriber_is_exported_with_state_stage_and_dates_emailed_and_downloadable(app, admin, smtp, subscribers):
    subscribers(3)
    subscribers(1, start=10, email_confirmed_at=None)
    subscribers(1, start=20, active=False, num_newsletter=2)
    with app.app_context():
        db.session.add(Client(email='=HYPERLINK("http://evil")@example.com', active=True))
        suppress('reader1@example.com', 'bounced')
        db.session.commit()

    job = export(app, admin)
    name, mimetype, data = attachment_of(smtp)
    downloaded = admin.get(f'/admin/exports/{job.id}/download')

    assert job.status == 'done' and job.result['rows'] == 6 and (job.progress_done, job.progress_total) == (6, 6)
    assert name.endswith('.csv') and mimetype == 'text/csv' and downloaded.data == data
    rows = list(csv.reader(io.StringIO(data.decode())))
    assert rows[0] == ['id', 'email', 'state', 'stage', 'signed_up_at', 'confirmed_at', 'unsubscribed_at']
    assert [(row[1], row[2], row[3]) for row in rows[1:]] == [
        ('reader0@example.com', 'active', '0'), ('reader1@example.com', 'suppressed', '0'),
        ('reader2@example.com', 'active', '0'), ('reader10@example.com', 'unconfirmed', '0'),
        ('reader20@example.com', 'unsubscribed', '2'), ("'=HYPERLINK(\"http://evil\")@example.com", 'unconfirmed', '0')]
    assert f'{job.result["file"]}</a> (6 subscribers' in admin.get('/admin/exports').get_data(as_text=True)
    downloaded.close()


def test_a_large_export_is_gzipped_and_a_kept_file_expires(app, admin, smtp, subscribers):
    app.config.update(EXPORT_COMPRESS_ABOVE=200, EXPORT_KEEP_HOURS=1, CLEAN_UP=True)
    subscribers(30)

    job = export(app, admin)
    name, mimetype, data = attachment_of(smtp)

    assert name.endswith('.csv.gz') and mimetype == 'application/gzip'
    assert len(gzip.decompress(data).decode().splitlines()) == 31
    path = os.path.join(app.instance_path, 'exports', job.result['file'])
    assert oct(os.stat(path).st_mode & 0o777) == '0o600'
    with app.app_context():
        db.session.execute(sa.update(Job).where(Job.id == job.id).values(finished_at=job.finished_at - timedelta(hours=2)))
        db.session.commit()
    assert admin.get(f'/admin/exports/{job.id}/download').status_code == 410
    two_hours_ago = time.time() - 7200
    os.utime(path, (two_hours_ago, two_hours_ago))
    with app.app_context():
        db.session.execute(sa.delete(Job).where(Job.task == 'clean_up'))
        db.session.commit()
    run_due_jobs(app)
    assert not os.path.exists(path), 'the hourly clean-up deletes it'


def test_erasing_a_subscriber_withdraws_the_kept_exports_that_hold_them(app, admin, smtp, subscribers):
    subscribers(1)
    before_jane = export(app, admin)
    [jane] = subscribers(1, start=1)
    holding_jane = export(app, admin)
    with app.app_context():
        jane_id = db.session.scalar(sa.select(Client.id).where(Client.email == jane))

    admin.post(f'/admin/subscribers/{jane_id}/erase', data={
        'csrf_token': csrf_token(admin, f'/admin/subscribers/{jane_id}'), 'confirm': jane})
    with admin.get(f'/admin/exports/{holding_jane.id}/download') as withdrawn, \
            admin.get(f'/admin/exports/{before_jane.id}/download') as kept:
        assert withdrawn.status_code == 410
        assert 'withdrawn: a subscriber in it was erased' in withdrawn.get_data(as_text=True)
        assert kept.status_code == 200 and jane.encode() not in kept.data, 'an export from before they signed up stays'
    assert not os.path.exists(os.path.join(app.instance_path, 'exports', holding_jane.result['file']))
    assert 'withdrawn: a subscriber in it was erased' in admin.get('/admin/exports').get_data(as_text=True)


def test_an_export_the_relay_refuses_to_email_stays_downloadable_and_says_why(app, admin, smtp, subscribers):
    """A relay takes messages up to a size: a large list's attachment may be refused for good."""
    subscribers(3)
    smtp.refuse_for_good['admin@example.com'] = '552 5.3.4 Message size exceeds fixed maximum message size'

    job = export(app, admin)

    assert job.status == 'done' and job.attempts == 1 and job.result['rows'] == 3
    assert 'Message size exceeds' in job.result['not emailed']
    with admin.get(f'/admin/exports/{job.id}/download') as downloaded:
        assert downloaded.status_code == 200 and len(downloaded.data.decode().splitlines()) == 4
    assert 'Message size exceeds' in admin.get('/admin/exports').get_data(as_text=True)
    assert os.listdir(os.path.join(app.instance_path, 'exports')) == [job.result['file']]


def test_an_export_whose_email_is_tried_again_leaves_no_copy_of_the_list_behind(app, admin, smtp, subscribers):
    """Each attempt writes the list anew: the file of one that failed is no export's, so no page offers it and
    no erasure withdraws it."""
    subscribers(3)
    smtp.refuse_for_now['admin@example.com'] = 1

    first = export(app, admin)
    make_jobs_due_now(app)
    run_due_jobs(app)

    with app.app_context():
        job = db.session.get(Job, first.id)
    assert (first.status, job.status, job.attempts) == ('queued', 'done', 2)
    assert os.listdir(os.path.join(app.instance_path, 'exports')) == [job.result['file']]


def test_an_export_whose_email_got_no_answer_once_it_went_out_is_not_exported_and_emailed_again(app, admin, smtp,
                                                                                                subscribers):
    subscribers(3)
    smtp.after_dot['admin@example.com'] = MailSink.DROP  # takes it, then hangs up before answering

    job = export(app, admin)
    make_jobs_due_now(app)
    run_due_jobs(app)

    assert len([m for m in smtp.messages if m['Subject'].startswith('Subscriber export')]) == 1
    assert job.status == 'done' and 'no answer after the end of the data' in job.result['emailed perhaps']
    with admin.get(f'/admin/exports/{job.id}/download') as downloaded:
        assert downloaded.status_code == 200
    assert 'no answer after the end of the data' in admin.get('/admin/exports').get_data(as_text=True)


@pytest.mark.parametrize('database_url', ['postgresql'], indirect=True)  # a server that can drop connections
def test_an_export_the_relay_took_is_not_exported_and_emailed_again_when_the_database_dropped_the_workers_connections(
        app, admin, smtp, subscribers, settings, postgresql_server, flask_command):
    """PostgreSQL restarted, failed over, or a proxy closed idle connections as the relay took the export's
    email: it is emailed once, and one file is kept. Its outcome was written on the session's dead connection:
    the job, left running, was taken over once its lease ran out, exported and emailed again, and the first
    file was left behind, no export's."""
    subscribers(3)
    admin.post('/admin/exports', data={'csrf_token': csrf_token(admin, '/admin/exports')})
    already = len(smtp.messages)  # the sign-in link
    smtp.delay = 1.0  # the relay answers the final dot a second after the data
    name = f'worker-{time.time_ns()}'
    worker = flask_command('worker', '--queue', 'bulk', LEASE_SECONDS='6', JOB_POLL_SECONDS='0.2',
                           DATABASE_URL=f"{settings['SQLALCHEMY_DATABASE_URI']}&application_name={name}")
    try:
        assert smtp.wait_for(already + 1) == already + 1
        with postgresql_server.begin() as connection:
            dropped = connection.execute(sa.text('SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                                                 'WHERE application_name = :name'), {'name': name}).scalars().all()
        assert dropped and all(dropped)
        time.sleep(16)  # past its 6 s lease, and what a take-over would do
    finally:
        worker.terminate()
        worker.communicate(timeout=30)

    exports = [m for m in smtp.messages if m['Subject'].startswith('Subscriber export')]
    with app.app_context():
        job = db.session.scalar(sa.select(Job).where(Job.task == 'export_subscribers'))
    files = os.listdir(os.path.join(app.instance_path, 'exports'))
    assert (len(exports), job.status, job.attempts, len(files)) == (1, 'done', 1, 1), files
