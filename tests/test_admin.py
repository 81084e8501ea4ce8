"""The admin pages: sign-in by emailed link, the jobs an admin can watch, broadcasts, "send now"."""
import csv
import html
import io
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from app import broadcasts
from app.database import utcnow
from app.extensions import db
from app.jobs import run_due
from app.ledger import ledger, mailing_named
from app.models import AdminSession, Broadcast, Client, Delivery, Job, SendRun, Suppression
from app.main.email import queue_new_subscriber_notice
from app.subscribers import erase
from app.suppression import suppress
from tests.support.forms import confirm, csrf_token, sign_in, sign_in_link, sign_up
from tests.support.smtp import MailSink
from tests.support.jobs import make_jobs_due_now, queue_emails, run_due_jobs


def test_the_admin_pages_need_a_signed_in_admin(client):
    for url in ('/admin/', '/admin/broadcasts/new', '/admin/broadcasts/1'):
        response = client.get(url)
        assert response.status_code == 302 and response.location.startswith('/admin/login')


def test_an_admin_signs_in_with_the_link_emailed_to_them(app, client, smtp):
    response = sign_in(app, client, smtp)

    assert smtp.recipients() == ['admin@example.com']
    assert response.status_code == 302 and response.location == '/admin/'
    page = client.get('/admin/').get_data(as_text=True)
    assert 'Background jobs' in page and 'admin@example.com' in page


def test_an_admin_is_known_whatever_the_case_their_address_is_typed_in(app, client, smtp):
    app.config['ADMINS'] = ['Admin@Example.com']

    response = sign_in(app, client, smtp, address='admin@example.COM')

    assert smtp.recipients() == ['Admin@Example.com'], 'the link goes to the address as ADMINS spells it'
    assert response.status_code == 302 and client.get('/admin/').status_code == 200


@pytest.mark.parametrize('typed', ['admin@example.com\u00a0', '\u200badmin@example.com', ' admin@example.com '])
def test_an_admin_address_pasted_with_spaces_around_it_gets_the_link(app, client, smtp, typed):
    """Spaces around an address, visible or not, are trimmed at every door: the sign-up form and an import
    took it, and the sign-in form refused it as 'Invalid email address.', its reader seeing nothing wrong."""
    response = sign_in(app, client, smtp, address=typed)

    assert smtp.recipients() == ['admin@example.com']
    assert response.status_code == 302 and client.get('/admin/').status_code == 200

@pytest.mark.parametrize('typed', ['ops@bücher.de', 'Ops@XN--BCHER-KVA.DE'])
def test_an_admin_whose_domain_is_international_gets_the_link_and_signs_in(settings, request, smtp, typed):
    """ADMINS as an operator writes it, the domain in its own letters: the link went to that address, which
    needs SMTPUTF8 (which the app does not speak), so it failed for good and its admin was locked out."""
    settings['ADMINS'] = ['ops@bücher.de']
    app = request.getfixturevalue('app')
    client = app.test_client()

    response = sign_in(app, client, smtp, address=typed)

    assert smtp.recipients() == ['ops@xn--bcher-kva.de'], 'the domain in the form SMTP takes'
    assert response.status_code == 302 and client.get('/admin/').status_code == 200


def test_opening_a_sign_in_link_neither_signs_in_nor_uses_it_up_until_its_button_is_pressed(app, client, smtp):
    """Mail scanners (Safe Links, Mimecast) open every link of a message before its reader does: opening
    it signed them in, and the admin's own click then found the link used."""
    link = sign_in_link(app, client, smtp)
    scanner = app.test_client()

    scanned = scanner.get(link)
    assert scanner.post(link).status_code == 400, 'no CSRF token'
    assert scanner.get('/admin/').status_code == 302, 'the scanner holds no session'
    assert scanned.status_code == 200 and '<button type="submit">Sign in</button>' in scanned.get_data(as_text=True)

    opened = client.get(link)
    pressed = client.post(link, data={'csrf_token': csrf_token(client, link)})

    assert opened.status_code == 200 and 'admin@example.com' in opened.get_data(as_text=True)
    assert pressed.status_code == 302 and pressed.location == '/admin/'
    assert client.get('/admin/').status_code == 200


def test_a_stranger_gets_the_same_answer_and_no_email(app, client, smtp):
    page = client.post('/admin/login', data={'email': 'mallory@example.com',
                                             'csrf_token': csrf_token(client, '/admin/login')})
    run_due_jobs(app)

    assert 'If mallory@example.com is an admin address' in page.get_data(as_text=True)
    assert smtp.messages == []


def test_a_forged_or_expired_sign_in_link_is_refused(app, client, monkeypatch):
    forged = URLSafeTimedSerializer('not-our-key', salt='admin-sign-in').dumps('admin@example.com')
    with monkeypatch.context() as an_hour_ago:
        an_hour_ago.setattr(TimestampSigner, 'get_timestamp', lambda self: int(time.time()) - 3600)
        expired = URLSafeTimedSerializer(app.config['SECRET_KEY'], salt='admin-sign-in').dumps('admin@example.com')

    token = csrf_token(client, '/admin/login')
    for method in ('GET', 'POST'):
        assert 'not valid' in client.open(f'/admin/sign-in/{forged}', method=method,
                                          data={'csrf_token': token}).get_data(as_text=True)
        assert 'expired' in client.open(f'/admin/sign-in/{expired}', method=method,
                                        data={'csrf_token': token}).get_data(as_text=True)
    assert client.get('/admin/').status_code == 302


def test_an_address_taken_out_of_admins_is_locked_out_at_its_next_request(app, admin):
    assert admin.get('/admin/').status_code == 200
    app.config['ADMINS'] = ['someone.else@example.com']
    assert admin.get('/admin/').status_code == 302


def test_an_admin_previews_schedules_and_cancels_a_broadcast(app, admin):
    form = {'subject': 'Winter sale', 'text': 'Hello {{ greeting_name }}', 'html': '<p>Hello <b>you</b></p>',
            'send_at': (datetime.now() + timedelta(days=2)).strftime('%Y-%m-%dT%H:%M'), 'timezone': 'Europe/Paris',
            'csrf_token': csrf_token(admin, '/admin/broadcasts/new')}

    preview = admin.post('/admin/broadcasts/new', data={**form, 'preview': 'Preview'}).get_data(as_text=True)
    assert 'Hello Preview' in preview and 'srcdoc=' in preview
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Broadcast.id))) == 0, 'a preview stores nothing'

    created = admin.post('/admin/broadcasts/new', data={**form, 'schedule': 'Schedule'})
    assert created.status_code == 302 and created.location == '/admin/broadcasts/1'
    page = admin.get('/admin/broadcasts/1').get_data(as_text=True)
    assert '<strong id="status">scheduled</strong>' in page and 'Europe/Paris' in page
    assert re.search(r'<tr id="job-(\d+)"[^>]*>\s*<td>\1</td>\s*<td>send_broadcast <small>1</small>', page), 'its send job'

    admin.post('/admin/broadcasts/1/cancel', data={'csrf_token': form['csrf_token']})
    with app.app_context():
        assert db.session.get(Broadcast, 1).status == 'cancelled'
        assert db.session.scalar(sa.select(Job.status).where(Job.task == 'send_broadcast')) == 'cancelled'


def test_a_stored_broadcast_that_cannot_be_rendered_shows_why_and_can_still_be_cancelled(app, admin):
    # Stored before its checks were what they are now (a subject of two lines), or written so that it renders
    # only some of the time (Jinja's random filter): its page was a 500, and Cancel is on that page alone.
    with app.app_context():
        db.session.add(Broadcast(subject='Sale\nBcc: everyone@example.com', text='Hello', html='<p>Hello</p>',
                                 send_at=utcnow() + timedelta(days=2), timezone='UTC', created_by='admin@example.com'))
        db.session.commit()

    page = admin.get('/admin/broadcasts/1')
    cancelled = admin.post('/admin/broadcasts/1/cancel', data={'csrf_token': csrf_token(admin, '/admin/broadcasts/1')})

    assert page.status_code == 200
    assert 'It cannot be shown: the subject must be one line of text' in page.get_data(as_text=True)
    assert '>Cancel</button>' in page.get_data(as_text=True) and cancelled.status_code == 302
    with app.app_context():
        assert db.session.get(Broadcast, 1).status == 'cancelled'


def test_a_broadcast_written_badly_is_shown_back_with_the_reason(admin):
    form = {'subject': 'Sale', 'text': 'Hello {{ greeting_name', 'html': '<p>Hi</p>', 'send_at': '2031-01-01T09:00',
            'timezone': 'UTC', 'schedule': 'Schedule', 'csrf_token': csrf_token(admin, '/admin/broadcasts/new')}

    response = admin.post('/admin/broadcasts/new', data=form)

    assert response.status_code == 400 and 'cannot be rendered' in response.get_data(as_text=True)
    assert 'Hello {{ greeting_name' in response.get_data(as_text=True), 'what the admin wrote is kept'


@pytest.mark.parametrize('changes, reason', [
    pytest.param({'html': '<p>{{ 1 / 0 }}</p>'}, 'division by zero', id='division by zero'),
    pytest.param({'text': 'Hello {{ "%s and %s" | format(greeting_name) }}'}, 'not enough arguments for format string',
                 id='too few values to format'),
])
@pytest.mark.parametrize('button', ['preview', 'schedule'])
def test_a_broadcast_whose_template_fails_as_it_renders_is_shown_back_with_the_reason(app, admin, changes, reason,
                                                                                      button):
    """Only Jinja's own errors were caught: anything else the admin's template raised was a 500."""
    form = {'subject': 'Sale', 'text': 'Hello', 'html': '<p>Hi</p>', 'send_at': '2031-01-01T09:00', 'timezone': 'UTC',
            **changes, button: button.capitalize(), 'csrf_token': csrf_token(admin, '/admin/broadcasts/new')}

    response = admin.post('/admin/broadcasts/new', data=form)

    assert response.status_code == 400
    assert f'the broadcast cannot be rendered: {reason}' in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Broadcast.id))) == 0


def test_a_send_time_that_utc_cannot_hold_is_shown_back_with_the_reason(app, admin):
    """23:00 on 9999-12-31 in Los Angeles is in the year 10000 in UTC: converting it was an OverflowError, a 500."""
    form = {'subject': 'Sale', 'text': 'Hello', 'html': '<p>Hi</p>', 'send_at': '9999-12-31T23:00',
            'timezone': 'America/Los_Angeles', 'schedule': 'Schedule',
            'csrf_token': csrf_token(admin, '/admin/broadcasts/new')}

    response = admin.post('/admin/broadcasts/new', data=form)

    assert response.status_code == 400
    assert ('9999-12-31 23:00 in America/Los_Angeles falls outside the years 1 to 9999 in UTC'
            in response.get_data(as_text=True))
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Broadcast.id))) == 0


def test_a_button_without_its_csrf_token_changes_nothing(app, admin):
    assert admin.post('/admin/stages/week1/send').status_code == 400
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Job.id)).where(Job.task == 'send_stage')) == 0


def test_send_now_queues_the_stage_and_the_dashboard_shows_each_jobs_state(app, admin, subscribers):
    subscribers(3)
    with app.app_context():
        db.session.add(Job(task='send_email', queue='mail', payload={'recipient': 'x@example.com'}, max_attempts=15,
                           status='failed', attempts=15, error='SMTP 550: no such user', finished_at=utcnow()))
        db.session.commit()

    admin.post('/admin/stages/week1/send', data={'csrf_token': csrf_token(admin, '/admin/')})
    page = admin.get('/admin/').get_data(as_text=True)

    assert 'week1 is queued as job' in page
    assert re.search(r'send_stage <small>week1</small></td>\s*<td><span class="status">queued</span>', page)
    assert 'SMTP 550: no such user' in page
    run_due_jobs(app)
    page = admin.get('/admin/').get_data(as_text=True)
    assert re.search(r'send_stage <small>week1</small></td>\s*<td><span class="status">done</span></td>\s*'
                     r'<td class="progress">3 / 3 \(100 %\)</td>', page)


def test_a_new_broadcast_starts_at_the_current_time_in_the_zone_the_form_shows(admin, monkeypatch):
    monkeypatch.setenv('TZ', 'Pacific/Auckland')  # the server's own zone is not the form's
    time.tzset()
    try:
        page = admin.get('/admin/broadcasts/new').get_data(as_text=True)
    finally:
        monkeypatch.undo()
        time.tzset()

    shown = datetime.strptime(re.search(r'name="send_at"[^>]*value="([^"]+)"', page).group(1), '%Y-%m-%dT%H:%M')
    assert re.search(r'<option selected value="UTC">UTC</option>', page)
    assert abs(shown - datetime.now(timezone.utc).replace(tzinfo=None)) < timedelta(minutes=2)


def test_the_dashboard_shows_each_stages_delay_and_who_is_due_it_now_or_waiting(stage_templates, app, admin,
                                                                                 subscribers):
    stage_templates('week2', 'Subject: Week 2\nDelay: 7 days\nWeek two.\n', '<p>Week two.</p>')
    subscribers(3)  # due week1
    waiting = subscribers(2, start=10, num_newsletter=1)  # got week1 just now
    subscribers(1, start=20, num_newsletter=1)  # got week1 before the send log: has waited
    with app.app_context():
        for client in db.session.scalars(sa.select(Client).where(Client.email.in_(waiting))):
            db.session.add(Delivery(client_id=client.id, mailing='week1', status='sent', sent_at=utcnow()))
        db.session.commit()

    page = admin.get('/admin/').get_data(as_text=True)

    rows = {stage: [re.search(rf'<td class="{cell}">([^<]*)</td>', row).group(1) for cell in ('delay', 'due', 'waiting')]
            for stage, row in re.findall(r'<tr id="stage-(week\d)">(.*?)</tr>', page, re.S)}
    assert rows == {'week1': ['none', '3', '0'], 'week2': ['7 days', '1', '2']}
    assert 'Sending window: none (any time)' in page


def test_a_stage_whose_delay_cannot_be_read_is_shown_with_the_reason_and_every_other_mailing_still_is(
        stage_templates, app, admin, subscribers):
    """The dashboard said a stage's Delay: line could not be read, but the Mailings page (every mailing's
    ledger), that stage's ledger, its CSV, preview and test were all a 500."""
    stage_templates('week2', 'Subject: Week 2\nDelay: soon\nWeek two.\n', '<p>Week two.</p>')
    subscribers(3)
    with app.app_context():
        broadcasts.schedule_broadcast('Sale', 'Hello', '<p>Hello</p>', datetime(2031, 1, 1, 9, 0), 'UTC',
                                      'admin@example.com')
    app.config['PROPAGATE_EXCEPTIONS'] = False  # as deployed: a 500 is a page, not an exception in the test
    reason = 'cannot be read: week2.txt: Delay: \'soon\' is not a duration such as "7 days", "36 hours" or "1 week 2 days"'

    dashboard = html.unescape(admin.get('/admin/').get_data(as_text=True))
    overview = html.unescape(admin.get('/admin/mailings').get_data(as_text=True))
    stage_pages = [admin.get('/admin/mailings/week2'), admin.get('/admin/mailings/week2/not-received.csv'),
                   admin.get('/admin/stages/week2/preview'),
                   admin.post('/admin/stages/week2/test', data={'csrf_token': csrf_token(admin, '/admin/')}),
                   admin.post('/admin/subscribers/1/resend/week2', data={'csrf_token': csrf_token(admin, '/admin/')})]

    assert f'<td class="delay">{reason}</td>' in dashboard
    rows = dict(re.findall(r'<tr id="mailing-(\w+)">(.*?)</tr>', overview, re.S))
    assert list(rows) == ['week1', 'week2', 'broadcast1']
    assert re.findall(r'<td>([^<]*)</td>', rows['week1']) == ['3', '0', '0', '0', '0', '3', 'yes']
    assert re.findall(r'<td>([^<]*)</td>', rows['broadcast1']) == ['3', '0', '0', '0', '0', '3', 'yes']
    assert reason in rows['week2']
    assert [page.status_code for page in stage_pages] == [409] * 5
    assert all(f'week2 {reason}' in html.unescape(page.get_data(as_text=True)) for page in stage_pages)
    assert all('<a href="/admin/">Back to the dashboard</a>' in page.get_data(as_text=True) for page in stage_pages)


@pytest.mark.parametrize('text, html_part, reason', [
    ('Week two, with no subject line.\n', '<p>Week two.</p>', 'stages/week2.txt must start with a "Subject: ..." line'),
    ('Subject: Week 2\nWeek two.\n', '<p>{% if %}Week two.</p>', 'Expected an expression')])
def test_a_stage_whose_template_cannot_be_composed_shows_why_on_its_preview_and_test(stage_templates, app, admin,
                                                                                   text, html_part, reason):
    """The stage being written, as an admin previews it: a 500 said nothing of what to fix, and its test
    was a 500 too."""
    stage_templates('week2', text, html_part)
    app.config['PROPAGATE_EXCEPTIONS'] = False  # as deployed: a 500 is a page, not an exception in the test

    pages = [admin.get('/admin/stages/week2/preview'),
             admin.post('/admin/stages/week2/test', data={'csrf_token': csrf_token(admin, '/admin/')})]

    assert [page.status_code for page in pages] == [409] * 2
    assert all(f'week2 cannot be composed: {reason}' in html.unescape(page.get_data(as_text=True)) for page in pages)
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Job.id)).where(Job.task == 'send_email')) == 1, \
            'no test queued: only the sign-in link'


def test_a_sign_in_link_works_once(app, client, smtp):
    link = sign_in_link(app, client, smtp)
    assert client.post(link, data={'csrf_token': csrf_token(client, link)}).status_code == 302
    other = app.test_client()

    opened = other.get(link)
    pressed = other.post(link, data={'csrf_token': csrf_token(other, '/admin/login')})

    for again in (opened, pressed):
        assert again.status_code == 400 and 'used already' in again.get_data(as_text=True)


def test_a_sign_in_link_opened_before_its_address_left_admins_signs_nobody_in(app, client, smtp):
    link = sign_in_link(app, client, smtp)
    token = csrf_token(client, link)
    app.config['ADMINS'] = ['someone.else@example.com']

    pressed = client.post(link, data={'csrf_token': token})

    assert pressed.status_code == 403 and 'no longer an admin' in pressed.get_data(as_text=True)
    assert client.get('/admin/').status_code == 302


def test_logging_out_ends_the_session_for_every_copy_of_its_cookie(app, admin):
    stolen = app.test_client()
    stolen.set_cookie('session', admin.get_cookie('session').value, domain='localhost')
    assert stolen.get('/admin/').status_code == 200, 'a copy of the cookie signs in while the session lasts'

    admin.post('/admin/logout', data={'csrf_token': csrf_token(admin, '/admin/')})

    assert stolen.get('/admin/').status_code == 302
    assert admin.get('/admin/').status_code == 302


def test_an_admin_session_ends_after_its_hours(app, admin):
    assert admin.get('/admin/').status_code == 200
    with app.app_context():
        db.session.execute(sa.update(AdminSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()

    assert admin.get('/admin/').status_code == 302


def test_the_session_cookie_is_http_only_same_site_and_lasts_the_admin_session(app, client, smtp):
    app.config['ADMIN_SESSION_HOURS'] = 8

    signed_in = sign_in(app, client, smtp)

    cookie = signed_in.headers['Set-Cookie']
    assert 'HttpOnly' in cookie and 'SameSite=Lax' in cookie and 'Secure' not in cookie, 'BASE_URL is http here'
    expires = datetime.strptime(re.search(r'Expires=([^;]+)', cookie).group(1), '%a, %d %b %Y %H:%M:%S GMT')
    assert abs(expires - utcnow() - timedelta(hours=8)) < timedelta(minutes=1)


def test_with_an_https_base_url_cookies_are_secure_and_hsts_is_sent(settings, request):
    settings.update(BASE_URL='https://news.example.com')
    app = request.getfixturevalue('app')

    response = app.test_client().get('/admin/login')

    assert app.config['SESSION_COOKIE_SECURE'] is True
    assert response.headers['Strict-Transport-Security'].startswith('max-age=')


@pytest.mark.parametrize('url', ['/', '/admin/login', '/unsubscribe/forged'])
def test_every_page_forbids_scripts_framing_sniffing_and_referrers(client, url):
    headers = client.get(url).headers

    policy = headers['Content-Security-Policy']
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and 'unsafe-inline' not in policy.split(
        'style-src')[0], "scripts only from the app's own files, never inline"
    assert "frame-ancestors 'none'" in policy and headers['X-Frame-Options'] == 'DENY'
    assert headers['X-Content-Type-Options'] == 'nosniff' and headers['Referrer-Policy'] == 'same-origin'
    assert 'Strict-Transport-Security' not in headers, 'not over plain http'


def test_a_sign_in_link_is_not_left_readable_in_the_jobs_table_once_sent(app, client, smtp):
    sign_in(app, client, smtp)

    with app.app_context():
        [job] = db.session.scalars(sa.select(Job).where(Job.task == 'send_email')).all()
    assert job.status == 'done' and '/admin/sign-in/' not in str(job.payload)
    assert job.payload['recipient'] == 'admin@example.com' and job.payload['subject']


def test_subscribers_are_found_by_address_state_and_stage_a_page_at_a_time(app, admin, subscribers):
    subscribers(60)  # active, stage 0
    subscribers(3, start=100, num_newsletter=2)
    subscribers(2, start=200, email_confirmed_at=None)  # unconfirmed
    subscribers(1, start=300, active=False)  # unsubscribed

    def listed(**query):
        page = admin.get(url_for_test('/admin/subscribers', **query)).get_data(as_text=True)
        return re.findall(r'>(reader\d+@example\.com)</a>', page), re.search(r'href="([^"]*after=\d+[^"]*)"', page)

    first, more = listed()
    second, last = listed(after=re.search(r'after=(\d+)', more.group(1)).group(1))
    assert len(first) == 50 and len(second) == 16 and last is None, 'keyset pages of 50, by id'
    assert set(first).isdisjoint(second)
    assert listed(state='unconfirmed')[0] == ['reader200@example.com', 'reader201@example.com']
    assert listed(state='unsubscribed')[0] == ['reader300@example.com']
    with app.app_context():
        suppress('reader301@example.com', 'bounced')
        suppress('reader1@example.com', 'complained')
        db.session.commit()
    assert listed(state='suppressed')[0] == ['reader1@example.com']
    assert 'reader1@example.com' not in listed(state='active')[0]
    assert listed(stage=2)[0] == ['reader100@example.com', 'reader101@example.com', 'reader102@example.com']
    assert listed(q='READER10')[0] == ['reader10@example.com', 'reader100@example.com', 'reader101@example.com',
                                        'reader102@example.com']
    assert listed(q='%')[0] == [], 'a wildcard is searched for as it is'
    assert admin.get('/admin/subscribers?state=asleep').status_code == 400


def url_for_test(path, **query):
    return path + ('?' + '&'.join(f'{key}={value}' for key, value in query.items()) if query else '')


def test_a_subscribers_timeline_shows_every_message_with_its_outcome(app, admin, smtp, subscribers, runner):
    [email] = subscribers(1, created_at=utcnow() - timedelta(days=1))
    smtp.after_dot[email] = MailSink.DROP
    runner.invoke(args=['send-newsletter-email', 'week1'])
    with app.app_context():
        client = db.session.scalar(sa.select(Client))

    page = admin.get(f'/admin/subscribers/{client.id}').get_data(as_text=True)

    rows = re.findall(r'<tr>\s*<td>[^<]*</td>\s*<td>([^<]+)</td>\s*<td>([^<]*)</td>', page)
    assert [what for what, _ in rows] == ['signed up', 'confirmed', 'week1']
    assert rows[-1][1] == 'unknown' and '&lt;newsletter.week1.' in page and 'no answer after the end of the data' in page
    assert 'Send again (it did not arrive)' in page


def test_a_message_that_did_not_arrive_is_not_sent_again_to_a_subscriber_suppressed_since(app, admin, smtp, subscribers,
                                                                                         runner):
    # The button showed, and the page said the stage went again 'by a job now'; the job's send found them due
    # nothing, sent nothing, and deleted their row: the ledger forgot the unknown copy.
    [email] = subscribers(1)
    smtp.after_dot[email] = MailSink.DROP
    runner.invoke(args=['send-newsletter-email', 'week1'])
    smtp.after_dot.clear()
    with app.app_context():
        client_id = db.session.scalar(sa.select(Client.id))
        suppress(email, 'complained')
        db.session.commit()

    answer = admin.post(f'/admin/subscribers/{client_id}/resend/week1',
                        data={'csrf_token': csrf_token(admin, f'/admin/subscribers/{client_id}')})
    with app.app_context():
        run_due()

    assert 'is no longer due it' in admin.get(answer.location).get_data(as_text=True)
    assert [to for to in smtp.recipients() if to == email] == [email], 'only the copy that was lost'
    with app.app_context():
        assert db.session.scalar(sa.select(Delivery.status)) == 'unknown', 'still in the ledger'


def test_an_admin_resends_a_message_that_did_not_arrive_and_it_goes_once(app, admin, smtp, subscribers, runner):
    [email] = subscribers(1)
    smtp.after_dot[email] = MailSink.DROP
    runner.invoke(args=['send-newsletter-email', 'week1'])
    smtp.after_dot.clear()
    with app.app_context():
        client = db.session.scalar(sa.select(Client))
    form = {'csrf_token': csrf_token(admin, f'/admin/subscribers/{client.id}')}

    admin.post(f'/admin/subscribers/{client.id}/resend/week1', data=form)
    with app.app_context():
        run_due()
    again = admin.post(f'/admin/subscribers/{client.id}/resend/week1', data=form)

    assert [to for to in smtp.recipients() if to == email] == [email, email], 'the lost one, then the resend'
    assert 'has no week1 whose outcome is unknown' in admin.get(again.location).get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(sa.select(Delivery.status)) == 'sent'
        assert db.session.get(Client, client.id).num_newsletter == 1


def test_a_cancelled_broadcasts_unknown_copy_is_not_sent_again_and_the_admin_is_told_why(app, admin, smtp, subscribers,
                                                                                         runner):
    """Its copy was moved to deferred and the page said it went again 'by a job now'; the job found the
    broadcast cancelled and sent nothing, and its ledger said deferred for ever."""
    [email] = subscribers(1)
    smtp.after_dot[email] = MailSink.DROP
    with app.app_context():
        broadcast_id = broadcasts.schedule_broadcast('Sale', 'Hi', '<p>Hi</p>', utcnow() + timedelta(minutes=5), 'UTC',
                                                     'admin@example.com').id
    make_jobs_due_now(app)
    run_due_jobs(app)
    smtp.after_dot.clear()
    with app.app_context():  # paused after that batch, then cancelled, as an admin's buttons leave it
        db.session.execute(sa.update(Broadcast).values(status='cancelled'))
        db.session.commit()
        client_id = db.session.scalar(sa.select(Client.id))

    answer = admin.post(f'/admin/subscribers/{client_id}/resend/broadcast{broadcast_id}',
                        data={'csrf_token': csrf_token(admin, f'/admin/subscribers/{client_id}')})
    command = runner.invoke(args=['broadcast', 'resend-unknown', str(broadcast_id)])
    run_due_jobs(app)

    told = html.unescape(admin.get(answer.location).get_data(as_text=True))
    assert f'broadcast {broadcast_id} is cancelled' in told and 'again, by a job now' not in told, told
    assert command.exit_code == 1 and f'broadcast {broadcast_id} is cancelled' in command.output, command.output
    assert len(smtp.received_by(email)) == 1, 'the copy whose answer was lost, and no other'
    with app.app_context():
        assert db.session.scalar(sa.select(Delivery.status)) == 'unknown'


def test_deactivating_stops_the_mail_and_reactivating_asks_the_subscriber_to_confirm(app, admin, smtp, subscribers):
    subscribers(1)
    with app.app_context():
        client_id = db.session.scalar(sa.select(Client.id))
    form = {'csrf_token': csrf_token(admin, f'/admin/subscribers/{client_id}')}

    admin.post(f'/admin/subscribers/{client_id}/deactivate', data=form)
    with app.app_context():
        assert db.session.get(Client, client_id).active is False
    admin.post(f'/admin/subscribers/{client_id}/reactivate', data=form)
    with app.app_context():
        run_due()
        assert db.session.get(Client, client_id).active is False, 'not silently'
    assert [m['Subject'] for m in smtp.messages if m['To'] == 'reader0@example.com'] == [
        'Please confirm your subscription']


def test_a_suppressed_subscriber_cannot_be_reactivated_and_the_admin_is_told_why(app, admin, smtp, subscribers):
    """Their confirmation email would not go out (the address gets nothing from us): the page must not say
    that it has."""
    [email] = subscribers(1)
    with app.app_context():
        suppress(email, 'complained', 'SendGrid spamreport')
        db.session.commit()
        client_id = db.session.scalar(sa.select(Client.id))
    page = admin.get(f'/admin/subscribers/{client_id}').get_data(as_text=True)

    answer = admin.post(f'/admin/subscribers/{client_id}/reactivate',
                        data={'csrf_token': csrf_token(admin, f'/admin/subscribers/{client_id}')})
    run_due_jobs(app)

    assert 'Reactivate' not in page
    told = html.unescape(admin.get(answer.location).get_data(as_text=True))
    assert f'{email} is on the suppression list' in told and 'is sent a fresh confirmation email' not in told
    assert smtp.received_by(email) == []
    with app.app_context():
        assert db.session.scalars(sa.select(Job.task).where(Job.task == 'send_confirmation')).all() == []


def test_a_mailings_ledger_lists_who_is_where_and_a_csv_of_who_did_not_get_it(app, admin, smtp, subscribers, runner):
    emails = subscribers(4)
    smtp.after_dot[emails[1]] = MailSink.DROP
    smtp.refuse_for_good[emails[2]] = '550 no such user'
    subscribers(1, start=50, email_confirmed_at=None)
    runner.invoke(args=['send-newsletter-email', 'week1'])
    subscribers(1, start=60)  # due, not yet sent

    overview = admin.get('/admin/mailings').get_data(as_text=True)
    failed = admin.get('/admin/mailings/week1?state=failed').get_data(as_text=True)
    csv_file = admin.get('/admin/mailings/week1/not-received.csv')

    row = re.search(r'<tr id="mailing-week1">(.*?)</tr>', overview, re.S).group(1)
    assert re.findall(r'<td>([^<]*)</td>', row) == ['5', '2', '1', '1', '0', '1', 'yes']
    assert emails[2] in failed and '550 no such user' in failed and emails[0] not in failed
    assert csv_file.mimetype == 'text/csv' and list(csv.reader(io.StringIO(csv_file.get_data(as_text=True)))) == [
        ['email', 'state', 'detail'], [emails[2], 'failed', f'{emails[2]}: 550 no such user'],
        [emails[1], 'unknown', csv_detail(app, emails[1])], ['reader60@example.com', 'pending', 'due']]
    assert admin.get('/admin/mailings/week9').status_code == 404


def csv_detail(app, email):
    with app.app_context():
        return db.session.scalar(sa.select(Delivery.error).join(Client).where(Client.email == email))


def admin_urls(app, number='1'):
    """Every admin URL and method, read from the app's url_map so that a page added later is among them,
    with `number` for its ids (and for any other part of it).  :return: [(rule, method, url)]"""
    return [(rule, method, re.sub(r'<(?:int:)?(\w+)>', number, re.sub(r'<any\(([^,)]+)[^>]*>', r'\1', rule.rule)))
            for rule in app.url_map.iter_rules() if rule.endpoint.startswith('admin.')
            for method in sorted(rule.methods - {'HEAD', 'OPTIONS'})]


def test_every_admin_url_refuses_anonymous_visitors(app):
    anonymous = app.test_client()
    open_to_all = {'admin.login_page', 'admin.sign_in'}
    checked = 0
    for rule, method, url in admin_urls(app):
        if rule.endpoint in open_to_all:
            continue
        response = anonymous.open(url, method=method)
        assert response.status_code in (302, 400) and (response.status_code == 400 or
                                                    response.location.startswith('/admin/login')), (method, url)
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize('number', [str(2 ** 31), '9' * 20, '\u0661'], ids=['past PostgreSQL', 'past SQLite', 'not ASCII'])
def test_an_id_no_row_can_have_is_a_404_at_every_admin_url_that_takes_one(app, admin, number):
    """Past PostgreSQL's integer (our ids' type) the database refused the query, and the page was a 500;
    and Werkzeug's own converter took any Unicode digit ('١' was id 1)."""
    token = csrf_token(admin, '/admin/')
    app.config['PROPAGATE_EXCEPTIONS'] = False  # as deployed: a 500 is a page, not an exception in the test

    answers = {(method, url): admin.open(url, method=method, data={'csrf_token': token}).status_code
               for rule, method, url in admin_urls(app, number) if '<int:' in rule.rule}

    assert set(answers.values()) == {404}, answers
    assert len(answers) >= 8


@pytest.mark.parametrize('number', ['\u00b2', str(2 ** 31), '9' * 20])
def test_a_number_in_a_filter_or_a_mailings_name_that_no_row_can_have_is_refused_not_a_500(app, admin, number):
    app.config['PROPAGATE_EXCEPTIONS'] = False

    answers = {url: admin.get(url).status_code for url in (
        f'/admin/subscribers?after={number}', f'/admin/subscribers?stage={number}',
        f'/admin/mailings/broadcast{number}', f'/admin/mailings/broadcast{number}/not-received.csv')}

    assert answers == {f'/admin/subscribers?after={number}': 400, f'/admin/subscribers?stage={number}': 400,
                       f'/admin/mailings/broadcast{number}': 404,
                       f'/admin/mailings/broadcast{number}/not-received.csv': 404}


def test_the_dashboard_counts_subscribers_by_state_charts_them_and_lists_the_send_runs(app, admin, subscribers,
                                                                                       runner):
    subscribers(3, created_at=utcnow() - timedelta(days=2))
    subscribers(2, start=10, num_newsletter=1)
    subscribers(1, start=20, email_confirmed_at=None)
    subscribers(1, start=30, active=False)
    runner.invoke(args=['send-newsletter-email', 'week1'])

    page = admin.get('/admin/').get_data(as_text=True)

    assert re.sub(r'<[^>]+>', '', re.search(r'<p id="totals">(.*?)</p>', page).group(1)) == \
        'active 5, unconfirmed 1, unsubscribed 1, suppressed 0.'
    funnel = re.search(r'<figure id="funnel">(.*?)</figure>', page, re.S).group(1)
    assert re.findall(r'<text x="0" y="\d+">([^<]+)</text>', funnel) == ['stage 1']
    assert '<text x="' in funnel and '>5</text>' in funnel, 'everyone active has week1 now'
    growth = re.search(r'<figure id="growth">(.*?)</figure>', page, re.S).group(1)
    today, two_days_ago = utcnow().date(), (utcnow() - timedelta(days=2)).date()
    assert f'<title>{today}: 4 sign-ups</title>' in growth and f'<title>{two_days_ago}: 3 sign-ups</title>' in growth
    assert f'<title>{today}: 6 confirmations</title>' in growth
    assert re.search(r'<tr><td><a href="/admin/mailings/week1">week1</a></td><td>cli</td>.*?<td>3</td>', page, re.S)


def test_a_stage_is_previewed_as_any_subscriber_would_get_it_and_sent_to_the_admin_as_a_test(app, admin, smtp,
                                                                                              subscribers):
    [jane] = subscribers(1)

    sample = admin.get('/admin/stages/week1/preview').get_data(as_text=True)
    as_jane = admin.get(f'/admin/stages/week1/preview?subscriber={jane}').get_data(as_text=True)
    admin.post('/admin/stages/week1/test', data={'csrf_token': csrf_token(admin, '/admin/stages/week1/preview')})
    with app.app_context():
        run_due()

    assert 'To preview@example.com.' in sample and 'Hello Preview' in sample
    assert f'To {jane}.' in as_jane and 'Hello Reader' in as_jane
    [test] = [message for message in smtp.messages if message['To'] == 'admin@example.com' and 'Test' in message['Subject']]
    assert test['Subject'].startswith('[Test] ')
    with app.app_context():
        assert db.session.scalars(sa.select(Delivery)).all() == [], 'not in the ledger'
        assert db.session.scalar(sa.select(Client.num_newsletter)) == 0
    assert admin.get('/admin/stages/week7/preview').status_code == 404
    assert admin.get('/admin/stages/week1/preview?subscriber=nobody@example.com').status_code == 404


@pytest.mark.parametrize('wanted', ['\u00b2', '\u0661', str(2 ** 31), '9' * 20])
def test_a_stage_preview_for_a_subscriber_number_that_is_no_id_is_a_404(app, admin, subscribers, wanted):
    """'²' is a digit to str.isdigit() but not to int(), and '١' is 1 to both; past PostgreSQL's integer
    the database refuses the query: an id is ASCII digits a row can have, or no id at all."""
    subscribers(1)
    app.config['PROPAGATE_EXCEPTIONS'] = False  # as deployed: a 500 is a page, not an exception in the test

    answer = admin.get('/admin/stages/week1/preview', query_string={'subscriber': wanted})

    assert answer.status_code == 404 and f'There is no subscriber {wanted}.' in answer.get_data(as_text=True)


def test_a_stage_preview_finds_a_subscriber_by_their_address_in_any_letters_case(app, admin, subscribers):
    subscribers(1)
    answer = admin.get('/admin/stages/week1/preview', query_string={'subscriber': 'READER0@EXAMPLE.COM'})
    assert answer.status_code == 200 and 'reader0@example.com' in answer.get_data(as_text=True)


@pytest.mark.parametrize('mailing', ['broadcast\u00b2', 'broadcastx', 'broadcast999999999999', 'broadcast7', 'nothing'])
def test_sending_again_a_mailing_that_does_not_exist_is_a_404(app, admin, subscribers, mailing):
    subscribers(1)
    app.config['PROPAGATE_EXCEPTIONS'] = False
    with app.app_context():
        client_id = db.session.scalar(sa.select(Client.id))

    answer = admin.post(f'/admin/subscribers/{client_id}/resend/{mailing}',
                        data={'csrf_token': csrf_token(admin, f'/admin/subscribers/{client_id}')})

    assert answer.status_code == 404 and f'There is no mailing {mailing}.' in answer.get_data(as_text=True)


def test_a_jobs_progress_is_on_the_page_and_in_its_json_for_the_page_to_follow(app, admin, subscribers):
    subscribers(3)
    admin.post('/admin/stages/week1/send', data={'csrf_token': csrf_token(admin, '/admin/')})
    with app.app_context():
        job_id = db.session.scalar(sa.select(Job.id).where(Job.task == 'send_stage'))

    queued = admin.get(f'/admin/jobs/{job_id}.json').get_json()
    with app.app_context():
        run_due()
    done = admin.get(f'/admin/jobs/{job_id}.json').get_json()
    page = admin.get('/admin/').get_data(as_text=True)

    assert (queued['status'], done['status'], done['progress']) == ('queued', 'done', '3 / 3 (100 %)')
    row = re.search(rf'<tr id="job-{job_id}" data-job-progress data-url="/admin/jobs/{job_id}.json">(.*?)</tr>', page, re.S)
    assert '<span class="status">done</span>' in row.group(1) and '3 / 3 (100 %)' in row.group(1)
    assert '<script src="/static/progress.js" defer></script>' in page
    with admin.get('/static/progress.js') as script:
        assert script.status_code == 200 and b'data-job-progress' in script.data
    assert admin.get('/admin/jobs/999.json').status_code == 404



def test_a_long_broadcast_fits_its_form_while_every_other_form_stays_small(app, admin):
    app.config['BROADCAST_MAX_BYTES'] = 1024 * 1024
    form = {'subject': 'Long read', 'text': 'Hello', 'send_at': '2031-01-01T09:00', 'timezone': 'UTC',
            'preview': 'Preview', 'csrf_token': csrf_token(admin, '/admin/broadcasts/new')}

    long_one = admin.post('/admin/broadcasts/new', data={**form, 'html': '<p>' + 'x' * 300_000 + '</p>'})
    too_long = admin.post('/admin/broadcasts/new', data={**form, 'html': '<p>' + 'x' * 1_100_000 + '</p>'})
    sign_in_form = admin.post('/admin/login', data={'email': 'a@example.com', 'padding': 'x' * 100_000})

    assert long_one.status_code == 200 and '<h2>Preview</h2>' in long_one.get_data(as_text=True)
    assert too_long.status_code == 413 and sign_in_form.status_code == 413


def test_erasing_a_subscriber_removes_their_address_everywhere_and_keeps_the_anonymous_counts(app, admin, runner,
                                                                                              subscribers, settings):
    jane, other = subscribers(2)
    runner.invoke(args=['send-newsletter-email', 'week1'])
    queue_emails(app, jane, other)
    mail = Path(settings['MAIL_FOLDER'])
    mail.mkdir(exist_ok=True)
    (mail / 'a.eml').write_bytes(f'From: news@example.com\r\nTo: {jane}\r\nSubject: Hi\r\n\r\nHello\r\n'.encode())
    (mail / 'b.eml').write_bytes(f'From: news@example.com\r\nTo: {other}\r\nSubject: Hi\r\n\r\nto: {jane}\r\n'.encode())
    with app.app_context():
        db.session.add(Job(task='send_stage', queue='bulk', payload={}, max_attempts=3, status='failed',
                           error=f'PermanentFailure: {jane}: 550 no such user'))
        suppress(jane, 'bounced')
        db.session.commit()
        jane_id = db.session.scalar(sa.select(Client.id).where(Client.email == jane))
        runs_before = db.session.execute(sa.select(SendRun.mailing, SendRun.sent)).all()
    form = {'csrf_token': csrf_token(admin, f'/admin/subscribers/{jane_id}')}

    refused = admin.post(f'/admin/subscribers/{jane_id}/erase', data={**form, 'confirm': 'someone else'})
    erased = admin.post(f'/admin/subscribers/{jane_id}/erase', data={**form, 'confirm': jane.upper()})

    assert refused.location.endswith(f'/admin/subscribers/{jane_id}') and erased.location.endswith('/admin/subscribers')
    with app.app_context():
        everything = ' '.join(str(row) for model in (Client, Delivery, Job, Suppression)
                              for row in db.session.execute(sa.select(model.__table__)).all())
        assert jane not in everything and other in everything
        assert db.session.execute(sa.select(SendRun.mailing, SendRun.sent)).all() == runs_before
        assert ledger(mailing_named('week1')).balances
    assert sorted(path.name for path in mail.iterdir()) == ['b.eml'], "only jane's own mail file"


def test_erasing_a_subscriber_removes_their_address_from_errors_and_stopped_runs_in_any_letters_case(app, subscribers):
    # A relay quotes the address as it was given in RCPT, or as it likes (JANE@...), in a job's error and in
    # why a send run stopped; the erase replaced it only in job errors, and only as the row spells it.
    jane, other = subscribers(2)
    with app.app_context():
        db.session.add_all([
            Job(task='send_email', queue='mail', payload={}, max_attempts=3, status='failed',
                error=f'PermanentFailure: {jane.upper()}: 550 no such user; {other}: 550 neither'),
            SendRun(mailing='week1', trigger='cli', via='SMTP', owner='erase-test',
                    stopped=f'the relay hung up after RCPT TO:<{jane.title()}>')])
        db.session.commit()

        erase(db.session.scalar(sa.select(Client).where(Client.email == jane)))

        texts = ' '.join(db.session.scalars(sa.select(Job.error))) + ' '.join(db.session.scalars(sa.select(SendRun.stopped)))
    assert jane not in texts.lower() and other in texts and texts.count('[erased]') == 2


def test_a_stage_holding_a_nul_is_sent_to_nobody_not_even_as_a_test_and_subscribers_can_still_be_erased(
        stage_templates, app, admin, runner, subscribers):
    """No email needs a NUL. Its test email's job kept it (in its subject), and PostgreSQL, asked for any field of
    a mail job's payload (as erasing does), refuses to read a payload holding one: nobody could be erased."""
    stage_templates('week1', 'Subject: Week 1\x00\nHello\n', '<p>Hello</p>')
    [jane] = subscribers(1)
    with app.app_context():
        jane_id = db.session.scalar(sa.select(Client.id).where(Client.email == jane))
    token = csrf_token(admin, f'/admin/subscribers/{jane_id}')  # the stage's own page says what is wrong

    tested = admin.post('/admin/stages/week1/test', data={'csrf_token': token})
    sent = runner.invoke(args=['send-newsletter-email', 'week1'])
    run_due_jobs(app)
    erased = admin.post(f'/admin/subscribers/{jane_id}/erase', data={'csrf_token': token, 'confirm': jane})

    assert tested.status_code == 409 and b'NUL' in tested.data
    assert sent.exit_code == 1 and 'NUL' in sent.output
    assert erased.status_code == 302 and erased.location.endswith('/admin/subscribers')
    with app.app_context():
        assert db.session.scalars(sa.select(Client)).all() == []


def test_erasing_a_subscriber_deletes_the_admins_new_subscriber_notices_naming_them(app, admin, smtp):
    """The notice goes to the admin, and its job keeps its subject, the address, once it is sent."""
    reader = app.test_client()
    for address in ('jane@example.com', 'bob@example.com'):
        sign_up(reader, address)
        run_due_jobs(app)
        body = smtp.messages[-1].get_body(('plain',)).get_content()
        confirm(reader, re.search(r'http://newsletter.test(/confirm/\S+)', body).group(1))
    run_due_jobs(app)
    with app.app_context():
        jane_id = db.session.scalar(sa.select(Client.id).where(Client.email == 'jane@example.com'))

    admin.post(f'/admin/subscribers/{jane_id}/erase', data={
        'csrf_token': csrf_token(admin, f'/admin/subscribers/{jane_id}'), 'confirm': 'jane@example.com'})

    assert sorted(m['Subject'] for m in smtp.messages if m['To'] == 'admin@example.com'
                  and m['Subject'].startswith('New subscriber')) == ['New subscriber: bob@example.com',
                                                                     'New subscriber: jane@example.com']
    with app.app_context():
        subjects = [job.payload.get('subject') for job in db.session.scalars(sa.select(Job))]
        assert not [job for job in db.session.execute(sa.select(Job.__table__)).all() if 'jane@' in str(job)]
    assert 'New subscriber: bob@example.com' in subjects, 'the notices of others stay'


def test_erasing_a_subscriber_deletes_the_admins_notices_of_them_from_the_mail_folder(app, settings, subscribers):
    """Written into the folder, a notice is addressed to the admin, and names the subscriber in its subject
    and text."""
    app.config['MAIL_TRANSPORT'] = 'folder'
    jane, bob = subscribers(2)
    with app.app_context():
        for client in db.session.scalars(sa.select(Client)):
            queue_new_subscriber_notice(client)
        db.session.commit()
    run_due_jobs(app)
    mail = Path(settings['MAIL_FOLDER'])

    with app.app_context():
        erase(db.session.scalar(sa.select(Client).where(Client.email == jane)))

    kept = [path.read_bytes() for path in mail.glob('*.eml')]
    assert not [data for data in kept if jane.encode() in data]
    assert [data for data in kept if f'New subscriber: {bob}'.encode() in data], 'the notices of others stay'
