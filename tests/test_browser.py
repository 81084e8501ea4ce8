"""End to end in a real headless Chromium, driven by Selenium: a reader's whole journey through the public
pages, the admin's pages at a phone's width and a desktop's, and the Content-Security-Policy as a browser
enforces it (the admin pages' live-progress script runs under it; nothing is refused on any page).

The app runs as a real HTTPS server on a free port (werkzeug, a thread per request), its BASE_URL that
server's address so that the links in the emails the MailSink receives lead the browser back to it. Like
every database test, each runs on SQLite and on PostgreSQL. Chromium and chromedriver are Debian's
(`chromium`, `chromium-driver`): the `chromium` fixture installs them with apt when they are missing and
the suite runs as root, and fails saying what to install otherwise.

Every page a test's browser shows is kept as a full-page screenshot in
test-artifacts/browser/<test>/ at the repository's root (ignored by git), numbered in the order seen and
replaced at the test's next run."""
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from selenium.webdriver.support.ui import WebDriverWait

from app.database import utcnow
from app.extensions import db
from app.models import Broadcast, Client, Job
from tests.support.browser import (PACKAGES, Browser, artifacts_folder, can_install, find_chromium, install_chromium,
                                   serving, start_chromium)
from tests.support.jobs import run_due_jobs
from tests.support.smtp import free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN = 'admin@example.com'
# Within the limits (64 characters before the @, 63 a label), and no space anywhere for a line to break at.
LONG_ADDRESS = ('the.subscriber.with.a.remarkably.long.address.that.runs.on@'
                'a.very.long.subdomain.of.an-organisation-with-a-rather-long-name.example.com')
PHONE, DESKTOP = 375, 1280


@pytest.fixture(scope='session')
def chromium():
    """The paths of Chromium and its chromedriver, from PATH; installed with apt (`apt-get update`, then
    `apt-get install -y chromium chromium-driver`) when either is missing and we are root with apt-get, as
    the suite starts the PostgreSQL or Redis it needs. When there is still none, every browser test fails
    (never skips) saying what to install."""
    found, why = find_chromium(), ''
    if None in found and can_install():
        why = install_chromium()
        found = find_chromium()
    if None in found:
        missing = ' and '.join(name for name, path in zip(('chromium', 'chromedriver'), found) if path is None)
        how = (f'Installing them failed: {why}' if why else
               'The suite installs them itself only as root on a machine with apt-get.')
        verb = 'is' if found.count(None) == 1 else 'are'
        pytest.fail(f'The browser tests need Chromium and its chromedriver, and {missing} {verb} not on PATH. {how}\n'
                    f'Install them (Debian/Ubuntu: apt-get install {" ".join(PACKAGES)}; elsewhere a Chromium '
                    'and the chromedriver of the same version, both on PATH).', pytrace=False)
    return found


@pytest.fixture
def settings(settings):
    """The suite's settings, with BASE_URL the live server's address (a free port): the links in the
    emails lead the browser to it."""
    settings['BASE_URL'] = f'https://127.0.0.1:{free_port()}'
    return settings


@pytest.fixture
def app(stage_templates, app):
    """The suite's app, made once `stage_templates` has given the test a stage folder of its own."""
    return app


@pytest.fixture
def live_server(app):
    """The app on a real HTTP server at its BASE_URL, for as long as the test."""
    with serving(app, urlsplit(app.config['BASE_URL']).port) as url:
        yield url


@pytest.fixture
def browser(chromium, live_server, request):
    """A headless Chromium on the live server, keeping a screenshot of every page it shows."""
    artifacts = artifacts_folder(ROOT, request.node.name)
    driver = start_chromium(*chromium)
    try:
        yield Browser(driver, live_server, artifacts)
    finally:
        driver.quit()
        print(f'Screenshots of the pages this test saw: {artifacts}')


@pytest.fixture
def admin_browser(browser, app, smtp):
    """The browser signed in as an admin, through the link emailed to the MailSink, on the dashboard."""
    browser.open('/admin/login')
    browser.find('#email').send_keys(ADMIN)
    browser.submit('input[type=submit]', 'asked for a sign-in link')
    assert browser.heading() == 'Check your inbox'
    run_due_jobs(app)
    browser.open(emailed_link(smtp.received_by(ADMIN)[-1], browser.base_url, '/admin/sign-in/'), 'sign-in link')
    browser.submit('button[type=submit]', 'signed in')
    assert browser.path() == '/admin/' and browser.heading() == 'Newsletter admin'
    return browser


@pytest.fixture
def long_subscriber(app):
    """A confirmed, active subscriber whose address is very long.  :return: their id."""
    with app.app_context():
        reader = Client(email=LONG_ADDRESS, active=True, num_newsletter=0, created_at=utcnow(), email_confirmed_at=utcnow())
        db.session.add(reader)
        db.session.commit()
        return reader.id


@pytest.fixture
def admin_pages(admin_browser, long_subscriber, app, runner, subscribers, stage_templates, tmp_path):
    """Something on every admin page: the subscriber with a very long address among a few others, week1
    sent to them all, a stage whose Delay: line cannot be read (its rows on the dashboard and the Mailings
    page give the reason), an export done, a CSV file uploaded (its report), and a broadcast stored before
    today's checks, which cannot be rendered (its page says why).  :return: [(path, its heading)] of the
    pages but the stage preview's (test_a_stage_preview_fits_the_window)."""
    subscribers(3)
    with app.app_context():
        db.session.add(Broadcast(subject='Sale\nof the year', text='Hello', html='<p>Hello</p>', timezone='UTC',
                                 send_at=utcnow() + timedelta(days=2), created_by=LONG_ADDRESS))
        db.session.commit()
    stage_templates('week3', 'Subject: Week 3\nDelay: when the moon is full\nWeek three.\n', '<p>Week three.</p>')
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    browser = admin_browser
    browser.open('/admin/exports')
    browser.submit('form[action="/admin/exports"] button', 'export started')
    run_due_jobs(app)
    upload = tmp_path / 'subscribers.csv'
    upload.write_text(f'email\n{LONG_ADDRESS}\nnew.reader@example.com\n{"not-an-address-" * 8}\n')
    browser.open('/admin/imports/new')
    browser.find('input[type=file]').send_keys(str(upload))
    browser.submit('input[type=submit]', 'file uploaded')
    assert browser.heading() == 'Import of subscribers.csv', browser.text()
    return [('/admin/', 'Newsletter admin'), ('/admin/subscribers', 'Subscribers'),
            (f'/admin/subscribers/{long_subscriber}', LONG_ADDRESS), ('/admin/mailings', 'Mailings'),
            ('/admin/mailings/week1?state=sent', 'week1'), ('/admin/exports', 'Exports'),
            ('/admin/imports/new', 'Import subscribers'), ('/admin/broadcasts/1', 'Broadcast 1: Sale of the year'),
            (browser.path(), 'Import of subscribers.csv')]  # the report last: the operator's round starts there


def emailed_link(message, base_url, path):
    """The link to `path` in an email's text, as the reader would follow it."""
    text = message.get_body(('plain',)).get_content()
    found = re.search(rf'{re.escape(base_url)}{re.escape(path)}\S+', text)
    assert found, f'no {base_url}{path}… link in:\n{text}'
    return found.group()


def too_wide(browser):
    """How the page shown sticks out sideways past the window (see OVERFLOW_SCRIPT), or None if it does not."""
    layout = browser.overflow()
    fits = layout['scrollWidth'] <= min(layout['clientWidth'], layout['innerWidth'], browser.width or 10 ** 6)
    return None if fits else layout


def subscriber(app, address):
    """The subscriber's row as it is in the database now."""
    with app.app_context():
        return db.session.scalar(sa.select(Client).where(Client.email == address))


def test_a_reader_signs_up_confirms_gets_week1_and_unsubscribes_on_a_phone(browser, app, smtp, runner):
    address = 'jane.doe@example.com'
    browser.at_width(PHONE).open('/')
    assert browser.heading() == 'Subscribe to the newsletter'
    browser.find('#email').send_keys(address)
    browser.submit('input[type=submit]', 'signed up')
    assert browser.heading() == 'Check your inbox'
    assert f'We have sent a confirmation link to {address}.' in browser.text()
    assert too_wide(browser) is None

    run_due_jobs(app)
    [confirmation] = smtp.received_by(address)
    browser.open(emailed_link(confirmation, browser.base_url, '/confirm/'), 'confirmation link')
    assert browser.heading() == 'Confirm your subscription' and f'Send the newsletter to {address}?' in browser.text()
    assert not subscriber(app, address).email_confirmed_at, 'opening the link asks; it changes nothing'
    assert too_wide(browser) is None
    browser.submit('button[type=submit]', 'confirmed')
    assert browser.heading() == 'You are subscribed'
    assert f'Thank you: {address} will receive the newsletter.' in browser.text()

    result = runner.invoke(args=['send-newsletter-email', 'week1'])
    assert result.exit_code == 0, result.output
    [week1] = [message for message in smtp.received_by(address) if message['Message-ID'].startswith('<newsletter.week1.')]
    assert week1['Subject'] == 'Welcome aboard, Jane Doe: week 1'
    browser.open(emailed_link(week1, browser.base_url, '/unsubscribe/'), 'unsubscribe link')
    assert browser.heading() == 'Unsubscribe' and f'Stop all emails to {address}?' in browser.text()
    assert subscriber(app, address).active, 'opening the link asks; it changes nothing'
    assert too_wide(browser) is None

    browser.submit('input[type=submit][value=Unsubscribe]', 'unsubscribed')
    assert browser.heading() == 'Unsubscribed'
    assert f'{address} will receive no more emails from us.' in browser.text()
    reader = subscriber(app, address)
    assert not reader.active and reader.unsubscribed_at is not None
    assert browser.csp_violations() == [] and browser.script_errors() == []


@pytest.mark.parametrize('width', [PHONE, DESKTOP])
def test_no_admin_page_scrolls_sideways_even_with_a_very_long_address(admin_pages, admin_browser, width):
    """Wide tables scroll inside their own box at a phone's width (app/templates/base.html); the page
    itself never does, and a long address breaks rather than pushes it wider."""
    browser, wide = admin_browser.at_width(width), {}
    for path, heading in admin_pages:
        browser.open(path)
        assert browser.heading() == heading, f'{path}: {browser.text()[:500]}'
        if layout := too_wide(browser):
            wide[path] = layout

    assert wide == {}, f'pages wider than a {width} px window (screenshots in {browser.artifacts})'


@pytest.mark.parametrize('width', [PHONE, DESKTOP])
def test_the_dashboard_charts_labels_stay_readable(admin_pages, admin_browser, width):
    """A chart shrunk to a phone's width shrank its labels with it, to about 6 px: on a phone a chart keeps
    a readable size and scrolls inside its own box, as wide tables do."""
    browser = admin_browser.at_width(width)
    browser.open('/admin/')
    heights = browser.driver.execute_script(
        "return Array.from(document.querySelectorAll('figure svg text'), t => t.getBoundingClientRect().height)")

    assert heights and min(heights) >= 9, f'label heights in px at {width} px: {sorted(heights)[:5]}'
    assert too_wide(browser) is None, f'wider than a {width} px window (screenshot in {browser.artifacts})'


@pytest.mark.parametrize('width', [PHONE, DESKTOP])
def test_a_stage_preview_fits_the_window(admin_browser, long_subscriber, width):
    browser = admin_browser.at_width(width)
    browser.open(f'/admin/stages/week1/preview?subscriber={long_subscriber}')

    assert browser.heading() == 'week1' and f'To {LONG_ADDRESS}.' in browser.text()
    assert too_wide(browser) is None, f'wider than a {width} px window (screenshot in {browser.artifacts})'


def test_the_content_security_policy_holds_and_the_live_progress_runs_under_it(admin_pages, admin_browser, app,
                                                                              long_subscriber):
    browser = admin_browser
    stage_preview = f'/admin/stages/week1/preview?subscriber={long_subscriber}'
    for path in ('/', '/admin/login', *(path for path, _ in admin_pages), stage_preview):
        browser.open(path)
    assert browser.csp_violations() == [] and browser.script_errors() == []
    assert browser.failed_requests() == []

    browser.open('/admin/exports')
    browser.submit('form[action="/admin/exports"] button', 'another export started')
    with app.app_context():
        job_id = db.session.scalar(sa.select(sa.func.max(Job.id)).where(Job.task == 'export_subscribers'))
    status = browser.find(f'#job-{job_id} .status')
    assert status.text == 'queued'
    browser.driver.execute_script('window.notReloaded = true')
    run_due_jobs(app)
    WebDriverWait(browser.driver, 10).until(lambda _: status.text != 'queued',
                                            'the page did not follow the job by itself: did progress.js run?')
    browser.seen('export done, as the page shows it by itself')
    assert status.text == 'done' and browser.driver.execute_script('return window.notReloaded') is True
    assert browser.find(f'#job-{job_id} .progress').text.endswith('(100 %)')
    assert browser.find(f'#job-{job_id} .attempts').text.startswith('1 of ')
    assert browser.find(f'#job-{job_id} .times').text.count(' / ') == 2, 'created / started / finished'
    assert browser.find(f'#job-{job_id} .outcome').text.startswith('file: subscribers-')
    download = browser.find(f'#downloads a[href="/admin/exports/{job_id}/download"]')
    assert download.text.startswith('subscribers-') and download.text.endswith('.csv'), 'offered without a reload'
    assert browser.csp_violations() == [] and browser.script_errors() == []

    # The watch itself works: a script the policy forbids (inline) is reported.
    browser.driver.execute_script("document.head.appendChild(document.createElement('script')).textContent = '1'")
    assert [message for _, message in browser.csp_violations()], 'an inline script should have been refused'


def test_an_operator_imports_a_list_sends_week1_now_watching_both_reach_100_and_reads_a_timeline(admin_pages,
                                                                                                 admin_browser, app):
    """The operator's round, as the admin side's issue names it: the import's report (uploaded by
    `admin_pages`) started and followed to the end, 'Send week1 now' followed to 100 % on the dashboard,
    then the new subscriber's timeline."""
    browser = admin_browser
    report = admin_pages[-1][0]
    browser.open(report)
    browser.submit(f'form[action^="{report}"] button', 'import started')

    def followed_to_the_end(job_task):
        with app.app_context():
            job_id = db.session.scalar(sa.select(sa.func.max(Job.id)).where(Job.task == job_task))
        status = browser.find(f'#job-{job_id} .status')
        run_due_jobs(app)
        WebDriverWait(browser.driver, 10).until(lambda _: status.text == 'done', f'{job_task} never shown done')
        browser.seen(f'{job_task} done')
        return browser.find(f'#job-{job_id} .progress').text

    assert followed_to_the_end('import_subscribers').endswith('(100 %)')
    with app.app_context():
        db.session.execute(sa.update(Client).where(Client.email == 'new.reader@example.com')
                           .values(email_confirmed_at=utcnow()))  # as if they followed their confirmation link
        db.session.commit()
    browser.open('/admin/')
    browser.submit('form[action="/admin/stages/week1/send"] button', 'week1 send started')
    assert followed_to_the_end('send_stage').endswith('(100 %)')

    newcomer = subscriber(app, 'new.reader@example.com')
    browser.open(f'/admin/subscribers/{newcomer.id}')
    assert browser.heading() == 'new.reader@example.com' and 'week1' in browser.text() and 'sent' in browser.text()
