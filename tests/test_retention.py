"""What the app keeps, and for how long (app/retention.py), and who may read its files."""
import io
import os
import re
import stat
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from app import imports
from app.database import utcnow
from app.extensions import db
from app.jobs import run_due
from app.models import AdminSession, Client, Delivery, Job
from tests.support.forms import confirm, csrf_token, sign_up
from tests.support.jobs import run_due_jobs


def test_the_clock_queues_one_clean_up_an_hour_that_deletes_old_finished_jobs_and_expired_sign_ups(app, subscribers):
    app.config.update(CLEAN_UP=True, JOB_RETENTION_DAYS=30, CONFIRM_MAX_AGE=7 * 86400)
    long_ago = utcnow() - timedelta(days=40)
    subscribers(1, start=0, email_confirmed_at=None, created_at=long_ago)  # its link expired: goes
    subscribers(1, start=1, email_confirmed_at=None)  # its link still works: stays
    subscribers(1, start=2, created_at=long_ago)  # confirmed: stays
    with app.app_context():
        db.session.add_all([
            Job(task='send_email', queue='mail', payload={}, max_attempts=3, status='done', finished_at=long_ago),
            Job(task='send_email', queue='mail', payload={}, max_attempts=3, status='failed', finished_at=utcnow()),
            Job(task='send_email', queue='mail', payload={}, max_attempts=3, status='queued',
                run_after=utcnow() + timedelta(days=1)),
            Job(task='send_stage', queue='bulk', payload={}, max_attempts=3, status='done', finished_at=long_ago,
                unique_key='schedule:week1:2026-01-01T09:00Z')])
        db.session.commit()

    for _ in range(3):  # several ticks in one hour
        run_due_jobs(app)

    with app.app_context():
        clients = db.session.scalars(sa.select(Client.email).order_by(Client.id)).all()
        jobs = db.session.execute(sa.select(Job.task, Job.status, Job.unique_key).order_by(Job.id)).all()
    assert clients == ['reader1@example.com', 'reader2@example.com']
    cleanups = [job for job in jobs if job.task == 'clean_up']
    assert len(cleanups) == 1 and cleanups[0].status == 'done', 'one an hour'
    assert [(task, status) for task, status, _ in jobs if task != 'clean_up'] == [
        ('send_email', 'failed'), ('send_email', 'queued'), ('send_stage', 'done')], "old finished jobs gone; a schedule's firing kept"


def test_an_unconfirmed_sign_up_is_kept_while_its_latest_confirmation_link_works(app, subscribers):
    """Someone whose first confirmation went to the spam folder signed up again on day 7 and got a new
    link: the clean-up counts the seven days from that one, not from the first sign-up."""
    app.config.update(CLEAN_UP=True, CONFIRM_MAX_AGE=7 * 86400)
    eight_days_ago = utcnow() - timedelta(days=8)
    [email] = subscribers(1, email_confirmed_at=None, created_at=eight_days_ago,
                          confirmation_sent_at=utcnow() - timedelta(days=1))

    run_due_jobs(app)

    with app.app_context():
        assert db.session.scalar(sa.select(Client.email)) == email, 'kept while its latest link works'
    [stale] = subscribers(1, start=1, email_confirmed_at=None, created_at=eight_days_ago,
                          confirmation_sent_at=eight_days_ago)
    with app.app_context():
        db.session.execute(sa.delete(Job))  # today's clean-up again
        db.session.commit()
    run_due_jobs(app)
    with app.app_context():
        assert db.session.scalars(sa.select(Client.email)).all() == [email], f'{stale} asked only long ago: gone'


def test_a_confirmation_an_admin_sends_again_keeps_the_sign_up_while_its_link_works(app, admin, smtp, subscribers):
    app.config['CONFIRM_MAX_AGE'] = 7 * 86400
    eight_days_ago = utcnow() - timedelta(days=8)
    subscribers(1, email_confirmed_at=None, created_at=eight_days_ago, confirmation_sent_at=eight_days_ago)
    with app.app_context():
        client_id = db.session.scalar(sa.select(Client.id))
    admin.post(f'/admin/subscribers/{client_id}/reactivate',
               data={'csrf_token': csrf_token(admin, f'/admin/subscribers/{client_id}')})
    run_due_jobs(app)
    link = re.search(r'http://newsletter.test(/confirm/\S+)', smtp.messages[-1].get_body(('plain',)).get_content())

    app.config['CLEAN_UP'] = True
    run_due_jobs(app)

    answer = confirm(admin, link.group(1))
    assert answer.status_code == 200 and 'You are subscribed' in answer.get_data(as_text=True)


def test_a_sign_up_with_a_delivery_is_never_deleted_as_expired(app, subscribers):
    subscribers(1, email_confirmed_at=None, created_at=utcnow() - timedelta(days=40))
    with app.app_context():
        client = db.session.scalar(sa.select(Client))
        db.session.add(Delivery(client_id=client.id, mailing='broadcast1', status='sent'))
        db.session.commit()
        app.config['CLEAN_UP'] = True
        run_due()
        assert db.session.scalar(sa.select(sa.func.count(Client.id))) == 1


def test_the_hourly_clean_up_deletes_an_upload_never_imported_once_it_is_a_day_old(app):
    """A list of addresses, and its dry run's report: kept a day for the admin to import it, and no longer,
    whether or not anyone uploads another file."""
    app.config['CLEAN_UP'] = True
    with app.app_context():
        upload = imports.receive(io.BytesIO(b'ann@example.com\nbob@example.com\n'), 'list.csv', 'admin@example.com',
                                 consented=False)
        folder = imports.folder()
    a_day_ago = (utcnow() - timedelta(days=1, minutes=1)).timestamp()
    for path in folder.iterdir():
        os.utime(path, (a_day_ago, a_day_ago))

    run_due_jobs(app)

    assert [path.name for path in folder.iterdir()] == [], f'{upload.filename} is kept past its day'


def test_the_instance_folders_files_are_readable_by_their_owner_only(settings, request):
    settings.update(MAIL_SERVER=None, MAIL_TRANSPORT='folder', SECRET_KEY=None, BASE_URL='http://localhost:5000',
                    SQLALCHEMY_DATABASE_URI=f"sqlite:///{settings['INSTANCE_PATH']}/newsletter.db")
    app = request.getfixturevalue('app')
    client = app.test_client()
    sign_up(client, 'jane@example.com')
    run_due_jobs(app)

    instance = Path(app.instance_path)
    files = [instance, instance / 'newsletter.db', instance / 'secret_key', instance.parent / 'mail',
             *(instance.parent / 'mail').glob('*.eml')]
    assert len(files) == 5, 'the folder, the database, the key, the mail folder, the confirmation'
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f'{path} is readable by others'


def test_the_hourly_clean_up_deletes_admin_sessions_once_over_and_their_sign_in_links_dead(app, admin):
    """Each sign-in leaves a row naming the admin; without this they piled up for ever. A row goes only
    once its session can sign nobody in (logged out, or past ADMIN_SESSION_HOURS) and its link is past
    its quarter of an hour: the row is what tells a used link from a fresh one."""
    app.config.update(CLEAN_UP=True)
    now = utcnow()
    with app.app_context():
        [signed_in] = db.session.scalars(sa.select(AdminSession.id)).all()
        db.session.add_all([
            AdminSession(id='logged-out', email='admin@example.com', link_nonce='a', created_at=now - timedelta(hours=2),
                         expires_at=now + timedelta(hours=6), ended_at=now - timedelta(hours=1)),
            AdminSession(id='expired', email='admin@example.com', link_nonce='b', created_at=now - timedelta(hours=9),
                         expires_at=now - timedelta(hours=1)),
            AdminSession(id='link-alive', email='admin@example.com', link_nonce='c', created_at=now - timedelta(minutes=5),
                         expires_at=now - timedelta(minutes=1), ended_at=now - timedelta(minutes=1))])
        db.session.commit()

    run_due_jobs(app)

    with app.app_context():
        kept = set(db.session.scalars(sa.select(AdminSession.id)))
    assert kept == {signed_in, 'link-alive'}
    assert admin.get('/admin/').status_code == 200, 'the session in use goes on'
