"""The CSV import: a file uploaded by an admin is read whatever its encoding, delimiter and header, checked
row by row as the sign-up checks an address, reported in a dry run, then imported by a job, all or nothing,
with a confirmation email for each newcomer or their consent recorded; a file that is no list of addresses,
or too large, is refused and writes nothing."""
import io
import os
import re
import stat
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import dns.resolver
import pytest
import sqlalchemy as sa
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from app.database import utcnow
from app.extensions import db
from app.models import Client, Job
from app.suppression import suppress
from tests.support.forms import csrf_token
from tests.support.jobs import run_due_jobs

NAMES = ['Zoë Müller', 'José Ñúñez', 'Åsa Öberg']


def upload(client, content, consented=False, filename='list.csv', with_token=True):
    """Post `content` (bytes) through the upload form, as a browser does.  :return: the response."""
    fields = {'file': FileStorage(io.BytesIO(content), filename)}
    if with_token:
        fields['csrf_token'] = csrf_token(client, '/admin/imports/new')
    if consented:
        fields['consented'] = 'y'
    # Encoded here, in memory: the test client spools a body over 500 KB to a file that it never closes.
    boundary, body = encode_multipart(fields)
    return client.post('/admin/imports/new', data=body, content_type=f'multipart/form-data; boundary={boundary}')


def report_of(client, content, **options):
    """Upload `content` and follow to its dry run's report.  :return: (the report's URL, its page)."""
    response = upload(client, content, **options)
    assert response.status_code == 302, response.get_data(as_text=True)
    return response.location, client.get(response.location).get_data(as_text=True)


def start_import(app, client, report_url):
    """Press "Import these N people" on the report, and let workers run what is due, and what that queues."""
    client.post(f'{report_url}/start', data={'csrf_token': csrf_token(client, report_url)})
    while run_due_jobs(app):
        pass


def counts(page):
    """The report's counts: {'accepted': n, 'duplicate': n, 'rejected': n}."""
    return {kind: int(n) for kind, n in re.findall(r'<strong id="(\w+)">(\d+)</strong>', page)}


def text(page):
    """The page's words, as a reader sees them."""
    return ' '.join(re.sub(r'<[^>]+>', ' ', page).split())


def listed(page, kind):
    """The rows of the report's table of `kind` (rejected, duplicate): [(line, address, reason)]."""
    table = re.search(rf'<table id="{kind}">(.*?)</table>', page, re.S)
    return [] if table is None else re.findall(r'<tr><td>(\d+)</td><td>(.*?)</td><td>(.*?)</td></tr>', table.group(1),
                                               re.S)


def clients(app):
    with app.app_context():
        return {client.email: client for client in db.session.scalars(sa.select(Client))}


def jobs_of(app, task):
    with app.app_context():
        return db.session.scalars(sa.select(Job).where(Job.task == task).order_by(Job.id)).all()


def kept_files(app):
    folder = Path(app.instance_path) / 'imports'
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize('encoding, content, read_as', [
    ('utf-8', 'email,name\njane@example.com,Zoë Müller\njose@example.com,José Ñúñez\nasa@example.com,Åsa Öberg\n',
     'UTF-8, comma-separated, with a header row; addresses in column 1, names in column 2'),
    ('utf-8-sig',
     'Name;E-mail\r\nZoë Müller;jane@example.com\r\nJosé Ñúñez;jose@example.com\r\nÅsa Öberg;asa@example.com\r\n',
     'UTF-8 with a BOM, semicolon-separated, with a header row; addresses in column 2, names in column 1'),
    ('cp1252', 'jane@example.com;Zoë Müller\njose@example.com;José Ñúñez\nasa@example.com;Åsa Öberg',
     'Latin-1, semicolon-separated, no header row; addresses in column 1, names in column 2'),
    ('latin-1', '"Zoë Müller",jane@example.com\r\n"José Ñúñez",jose@example.com\r\n"Åsa Öberg",asa@example.com\r\n',
     'Latin-1, comma-separated, no header row; addresses in column 2, names in column 1'),
])
def test_a_file_is_read_whatever_its_encoding_delimiter_and_header(app, admin, encoding, content, read_as):
    report_url, page = report_of(admin, content.encode(encoding))
    start_import(app, admin, report_url)

    assert f'Read as {read_as}.' in text(page)
    assert counts(page) == {'accepted': 3, 'duplicate': 0, 'rejected': 0}
    assert {email: client.name for email, client in clients(app).items()} == dict(zip(
        ['jane@example.com', 'jose@example.com', 'asa@example.com'], NAMES))


def test_a_name_holding_the_other_delimiter_does_not_split_the_rows_wrongly(app, admin):
    _, page = report_of(admin, 'Doe, Jane;jane@example.com\nRoe, Richard;richard@example.com\n'.encode())

    assert 'semicolon-separated, no header row; addresses in column 2, names in column 1' in text(page)
    assert counts(page) == {'accepted': 2, 'duplicate': 0, 'rejected': 0}


def test_a_quoted_name_holding_the_delimiter_is_one_cell(app, admin):
    _, page = report_of(admin, b'name,email\n"Doe, Jane",jane@example.com\n"Roe, ""Dick""",dick@example.com\n')

    assert counts(page) == {'accepted': 2, 'duplicate': 0, 'rejected': 0}


def test_a_quoted_cell_after_a_space_is_one_cell_too(app, admin):
    """A file written by hand puts a space after each comma: the quotes then still enclose the cell."""
    report_url, page = report_of(admin, b'name, email\n"Doe, Jane", "jane@example.com"\nRichard Roe, roe@example.com\n')
    start_import(app, admin, report_url)

    assert counts(page) == {'accepted': 2, 'duplicate': 0, 'rejected': 0}
    assert {email: client.name for email, client in clients(app).items()} == {
        'jane@example.com': 'Doe, Jane', 'roe@example.com': 'Richard Roe'}


def test_the_dry_run_lists_duplicates_and_rejected_rows_with_their_line_and_reason_and_writes_nothing(
        app, admin, subscribers):
    existing, other = subscribers(2)
    content = '\n'.join([
        'email,name',
        'new.one@example.com,New One',  # line 2
        f'{existing},Already Here',  # 3
        'not-an-address,Nobody',  # 4
        'new.one@example.com,New One Again',  # 5
        ',Nameless',  # 6
        'x' * 300 + '@example.com,Long',  # 7
        'new.three@example.com,' + 'N' * 101,  # 8
        'New.Four@EXAMPLE.com,Four',  # 9
        'NEW.FOUR@example.com,Four Again',  # 10: the same mailbox, in other letters' case
        f'{existing.upper()},Here Again',  # 11
        f'{other.upper()},Other',  # 12: a subscriber already, in other letters' case
    ]).encode()
    with app.app_context():
        jobs_before = db.session.scalar(sa.select(sa.func.count(Job.id)))

    report_url, page = report_of(admin, content)

    assert counts(page) == {'accepted': 2, 'duplicate': 5, 'rejected': 4}
    assert listed(page, 'duplicate') == [('3', existing, 'already a subscriber'),
                                         ('5', 'new.one@example.com', 'the same address as line 2'),
                                         ('10', 'NEW.FOUR@example.com', 'the same address as line 9'),
                                         ('11', existing.upper().replace('EXAMPLE.COM', 'example.com'),
                                          'the same address as line 3'),
                                         ('12', other.upper().replace('EXAMPLE.COM', 'example.com'),
                                          'already a subscriber')]
    assert listed(page, 'rejected') == [
        ('4', 'not-an-address', 'An email address must have an @-sign.'),
        ('6', '', 'There is no address in this row.'),
        ('7', 'x' * 300, 'An email address has at most 254 characters.'),  # the page shows 300 characters of it
        ('8', 'new.three@example.com', 'A name has at most 100 characters.'),
    ]
    assert 'Import these 2 people' in page and 'Each new subscriber gets a confirmation email' in page
    assert set(clients(app)) == {existing, other}, 'a dry run writes nothing'
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Job.id))) == jobs_before


def test_newcomers_are_unconfirmed_and_each_gets_a_confirmation_email_and_subscribers_stay_as_they_were(
        app, admin, smtp, subscribers):
    [left] = subscribers(1, active=False, unsubscribed_at=utcnow())
    content = f'email,name\nann@example.com,Ann\n{left},Back Again\nbob@example.com,\n'.encode()
    report_url, page = report_of(admin, content)

    start_import(app, admin, report_url)

    people = clients(app)
    assert set(people) == {left, 'ann@example.com', 'bob@example.com'}
    assert people[left].active is False and people[left].name is None, 'an existing subscriber is never changed'
    for email in ('ann@example.com', 'bob@example.com'):
        assert people[email].email_confirmed_at is None and people[email].confirmation_sent_at is not None
        assert people[email].consent_recorded_by is None and people[email].consent_recorded_at is None
    assert (people['ann@example.com'].name, people['bob@example.com'].name) == ('Ann', None)
    confirmations = [m for m in smtp.messages if m['Subject'] == 'Please confirm your subscription']
    assert sorted(m['To'] for m in confirmations) == ['ann@example.com', 'bob@example.com']
    [job] = jobs_of(app, 'import_subscribers')
    assert job.status == 'done' and job.result == {'imported': 2, 'duplicate': 1, 'rejected': 0}
    assert set(job.payload) == {'path', 'consented_by'} and job.payload['consented_by'] is None, 'no address in it'
    assert kept_files(app) == [f'{report_url.rsplit("/", 1)[1]}.json'], 'the file is deleted once imported'


def test_people_who_consented_are_subscribed_at_once_with_who_said_so_and_when_and_get_no_email(
        app, admin, smtp, subscribers):
    [existing] = subscribers(1, email_confirmed_at=None)
    report_url, page = report_of(admin, f'ann@example.com\nbob@example.com\n{existing}\n'.encode(), consented=True)
    assert 'You said these people already consented' in page
    before = utcnow()

    start_import(app, admin, report_url)

    people = clients(app)
    for email in ('ann@example.com', 'bob@example.com'):
        person = people[email]
        assert person.consent_recorded_by == 'admin@example.com' and person.active
        assert before <= person.consent_recorded_at == person.email_confirmed_at <= utcnow()
        assert person.confirmation_sent_at is None
    assert people[existing].email_confirmed_at is None and people[existing].consent_recorded_at is None
    assert [m['To'] for m in smtp.messages] == ['admin@example.com'], 'only the sign-in link: no confirmation'
    [job] = jobs_of(app, 'import_subscribers')
    assert job.payload['consented_by'] == 'admin@example.com'
    with app.app_context():
        ann = db.session.scalar(sa.select(Client.id).where(Client.email == 'ann@example.com'))
    page = text(admin.get(f'/admin/subscribers/{ann}').get_data(as_text=True))
    assert 'Imported as having consented already: admin@example.com said so on' in page
    assert 'confirmed: consent recorded by admin@example.com' in page


def test_an_address_on_the_suppression_list_is_not_imported_even_as_having_consented(app, admin, smtp):
    """Its owner asked never to hear from us, or it bounced: the sign-up stores no subscriber for it, and an
    admin's word that they consented cannot outweigh theirs."""
    with app.app_context():
        suppress('gone@example.com', 'bounced', 'SendGrid bounce: 550 no such user')
        suppress('blocked@example.com', 'blocked')
        db.session.commit()
    content = b'ann@example.com\nGone@example.com\nblocked@example.com\n'

    checked = {consented: report_of(admin, content, consented=consented) for consented in (False, True)}
    for report_url, _ in checked.values():
        start_import(app, admin, report_url)

    for _, page in checked.values():
        assert counts(page) == {'accepted': 1, 'duplicate': 0, 'rejected': 2}
        assert listed(page, 'rejected') == [('2', 'Gone@example.com', 'on the suppression list (bounced)'),
                                            ('3', 'blocked@example.com', 'on the suppression list (blocked)')]
    assert set(clients(app)) == {'ann@example.com'}


def test_pressing_import_twice_imports_once(app, admin):
    report_url, page = report_of(admin, b'ann@example.com\n')
    assert f'action="{report_url}/start"' in page

    for _ in range(2):
        admin.post(f'{report_url}/start', data={'csrf_token': csrf_token(admin, report_url)})
    run_due_jobs(app)

    assert len(jobs_of(app, 'import_subscribers')) == 1
    assert f'action="{report_url}/start"' not in admin.get(report_url).get_data(as_text=True), \
        'the button is gone once started'


def test_erasing_a_subscriber_withdraws_the_uploads_and_reports_that_name_them(app, admin, subscribers):
    [jane] = subscribers(1)
    waiting, _ = report_of(admin, f'new.one@example.com\n{jane}\n'.encode())
    imported, _ = report_of(admin, f'new.two@example.com\n{jane.upper()}\n'.encode())  # a duplicate on its report
    start_import(app, admin, imported)
    unrelated, _ = report_of(admin, f'new.three@example.com\nmy.{jane}\n'.encode())
    with app.app_context():
        jane_id = db.session.scalar(sa.select(Client.id).where(Client.email == jane))

    admin.post(f'/admin/subscribers/{jane_id}/erase', data={
        'csrf_token': csrf_token(admin, f'/admin/subscribers/{jane_id}'), 'confirm': jane})

    gone = admin.get(waiting)
    assert gone.status_code == 404 and 'a subscriber it names was erased' in gone.get_data(as_text=True)
    assert admin.get(imported).status_code == 404 and admin.get(unrelated).status_code == 200
    assert {name.split('.')[0] for name in kept_files(app)} == {unrelated.rsplit('/', 1)[1]}


@pytest.mark.parametrize('written', ['jane@bücher.de', 'Jane@BÜCHER.DE', 'jane@ｂücher.de',
                                     '\u200bjane@bücher.de', '\u00a0jane@xn--bcher-kva.de'])  # pasted with them
def test_an_upload_naming_an_erased_mailbox_in_another_spelling_is_withdrawn_too(app, admin, written):
    """The import stores an address in its normal form (the domain in ASCII, xn--..., without the invisible
    spaces around it): an upload that spells the same mailbox otherwise, past the first duplicates its report
    lists, would subscribe them again."""
    stored = 'jane@xn--bcher-kva.de'
    with app.app_context():
        db.session.add(jane := Client(email=stored, active=True, created_at=utcnow(), email_confirmed_at=utcnow()))
        db.session.commit()
        jane_id = jane.id
    waiting, _ = report_of(admin, ('dup@example.com\n' * 101 + f'{written}\n').encode())

    admin.post(f'/admin/subscribers/{jane_id}/erase', data={
        'csrf_token': csrf_token(admin, f'/admin/subscribers/{jane_id}'), 'confirm': stored})

    assert admin.get(waiting).status_code == 404


def refuse_on_insert(app, email):
    """Make the database refuse to store `email` (a trigger): a constraint that the import's checks cannot
    see, as a real database may have."""
    with app.app_context():
        if db.engine.dialect.name == 'sqlite':
            db.session.execute(sa.text(f"CREATE TRIGGER refuse BEFORE INSERT ON clients WHEN NEW.email = '{email}' "
                                       "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
        else:
            db.session.execute(sa.text(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.email = "
                f"'{email}' THEN RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation'; "
                "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"))
            db.session.execute(sa.text('CREATE TRIGGER refuse BEFORE INSERT ON clients FOR EACH ROW '
                                       'EXECUTE FUNCTION refuse()'))
        db.session.commit()


def test_a_failure_half_way_imports_nobody_and_the_job_says_why(app, admin):
    content = ''.join(f'reader{n}@example.com\n' for n in range(3000)).encode()
    report_url, page = report_of(admin, content)
    assert counts(page)['accepted'] == 3000
    refuse_on_insert(app, 'reader2500@example.com')  # in the third chunk of a thousand

    start_import(app, admin, report_url)

    [job] = jobs_of(app, 'import_subscribers')
    assert job.status == 'failed' and job.attempts == 1, 'a row refused for good is not tried again'
    assert 'Nothing was imported' in job.error and 'refused by the test' in job.error
    assert (job.progress_done, job.progress_total) == (2000, 3000), 'it failed half-way, after two chunks'
    assert clients(app) == {}, 'the two chunks before were rolled back'
    assert jobs_of(app, 'send_confirmation') == [], 'and the confirmation emails queued with them'
    assert [job.payload['recipient'] for job in jobs_of(app, 'send_email')] == ['admin@example.com']
    assert kept_files(app) == [f'{report_url.rsplit("/", 1)[1]}.json'], 'the file is deleted: the import is over'
    page = admin.get(report_url).get_data(as_text=True)
    assert 'refused by the test' in page and '<span class="status">failed</span>' in page


def test_the_jobs_progress_is_on_the_report_and_in_its_json(app, admin):
    content = 'email\n' + ''.join(f'reader{n}@example.com\n' for n in range(2500))
    report_url, _ = report_of(admin, content.encode(), consented=True)

    start_import(app, admin, report_url)

    [job] = jobs_of(app, 'import_subscribers')
    page = admin.get(report_url).get_data(as_text=True)
    row = re.search(rf'<tr id="job-{job.id}" data-job-progress data-url="/admin/jobs/{job.id}.json">(.*?)</tr>', page,
                    re.S)
    assert row and '2501 / 2501 (100 %)' in row.group(1) and '<script src="/static/progress.js"' in page
    assert admin.get(f'/admin/jobs/{job.id}.json').get_json()['progress'] == '2501 / 2501 (100 %)'
    assert len(clients(app)) == 2500


@pytest.mark.parametrize('content, error', [
    (b'', 'The file is empty.'),
    (b'\r\n \n\n', 'The file is empty: it has no rows.'),
    (b'email,name\n\n', 'The file has a header row, and no rows under it.'),
    (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', 'This is not a CSV file'),
    (b'a@example.com\n\x81\x8d@example.com\n', 'This is not a CSV file'),  # neither UTF-8 nor Latin-1
    # Its BOM says UTF-8, and a line appended by another program is not: read as Latin-1, its header was no
    # header, and every name in UTF-8 garbled (Zo\xc3\xab).
    (b'\xef\xbb\xbfemail,name\njane@example.com,Zo\xc3\xab\nbob@example.com,Zo\xeb\n',
     'This file says it is UTF-8 (it starts with a BOM), but it holds bytes that UTF-8 does not'),
    ('email\njane@example.com\n'.encode('utf-16'), 'This file is UTF-16'),
    (b'first name,last name\nJane,Doe\n', 'No address column'),
    (b'a@example.com' + b',x' * 2000 + b'\n', 'Line 1 has 2,001 columns'),
    (b'a@example.com\n' * 1500 + b'b@example.com,' + b'x' * 1_000_000 + b'\n', 'Line 1501 is longer than 10,000'),
    # A stray quote would swallow every line after it into one cell, and the people on them with it.
    (b'name,email\r\nAnn,ann@example.com\r\n"Bobby Tables,bobby@example.com\r\nCid,cid@example.com\r\n'
     b'Dan,dan@example.com\r\n', 'Line 3 opens a quote that does not close on that line: the row runs on to the '
     'end of the file'),
    (b'name,email\nAnn,ann@example.com\n"Bobby,bobby@example.com\nCid,cid@example.com\nDan "D",dan@example.com\n'
     b'Eve,eve@example.com\n', 'Line 3 opens a quote that does not close on that line: the row runs on to line 5'),
    (b'email,name\n"new.two@example.com\nBcc: victim@example.org",Smuggler\nann@example.com,Ann\n',
     'Line 2 opens a quote that does not close on that line: the row runs on to line 3'),
])
def test_a_binary_empty_or_absurd_file_gets_a_clear_error_and_writes_nothing(app, admin, content, error):
    response = upload(admin, content)

    assert response.status_code == 400
    assert error in response.get_data(as_text=True) and 'Nothing was imported.' in response.get_data(as_text=True)
    assert clients(app) == {} and jobs_of(app, 'import_subscribers') == []
    assert kept_files(app) == [], 'the file is not kept'


def test_a_file_over_the_import_limit_is_refused_and_the_limit_holds_for_that_page_only(settings, request):
    settings['IMPORT_MAX_BYTES'] = 100_000
    app, admin = request.getfixturevalue('app'), request.getfixturevalue('admin')
    rows = ''.join(f'reader{n}@example.com\n' for n in range(5000)).encode()  # 120 KB
    assert len(rows) > 100_000 > len(rows[:90_000]) > app.config['MAX_CONTENT_LENGTH']

    too_large = upload(admin, rows)
    allowed = upload(admin, rows[:rows.rindex(b'\n', 0, 90_000) + 1])
    elsewhere = admin.post('/', data={'email': 'a' * 90_000 + '@example.com', 'csrf_token': csrf_token(admin, '/')})

    assert too_large.status_code == 413
    assert 'The file is larger than 0.0953674 MB, the most an import takes' in too_large.get_data(as_text=True)
    assert allowed.status_code == 302, 'above the app-wide 64 KiB, under IMPORT_MAX_BYTES'
    assert elsewhere.status_code == 413, 'every other page keeps MAX_CONTENT_LENGTH'
    assert len(kept_files(app)) == 2, 'only the allowed file, and its report'


def test_the_upload_needs_its_csrf_token(app, admin):
    response = upload(admin, b'ann@example.com\n', with_token=False)

    assert response.status_code == 400 and 'The CSRF token is missing.' in response.get_data(as_text=True)
    assert kept_files(app) == []


def test_the_uploaded_file_is_kept_for_its_owner_only(app, admin):
    report_url, _ = report_of(admin, b'ann@example.com\n')
    folder = Path(app.instance_path) / 'imports'

    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o600}
    assert b'ann@example.com' in (folder / f'{report_url.rsplit("/", 1)[1]}.csv').read_bytes()


def test_a_file_discarded_or_never_imported_is_deleted(app, admin):
    discarded, _ = report_of(admin, b'ann@example.com\n')
    admin.post(f'{discarded}/discard', data={'csrf_token': csrf_token(admin, discarded)})
    assert kept_files(app) == [] and admin.get(discarded).status_code == 404

    forgotten, _ = report_of(admin, b'bob@example.com\n')
    started, _ = report_of(admin, b'cid@example.com\n')
    admin.post(f'{started}/start', data={'csrf_token': csrf_token(admin, started)})  # queued, not run yet
    a_day_ago = (utcnow() - timedelta(days=1, minutes=1)).timestamp()
    for path in (Path(app.instance_path) / 'imports').iterdir():
        os.utime(path, (a_day_ago, a_day_ago))
    report_of(admin, b'dan@example.com\n')  # each upload sweeps what is old

    tokens = {name.split('.')[0] for name in kept_files(app)}
    assert forgotten.rsplit('/', 1)[1] not in tokens and started.rsplit('/', 1)[1] in tokens
    assert admin.get(forgotten).status_code == 404


def test_a_domain_that_takes_no_mail_is_asked_about_once_per_file(settings, request, tmp_path, monkeypatch):
    settings['EMAIL_CHECK_DELIVERABILITY'] = True
    asked = []

    class Resolver:
        lifetime = None

        def resolve(self, domain, kind):
            asked.append((str(domain), kind))
            if str(domain).startswith('nowhere'):
                raise dns.resolver.NXDOMAIN
            return [SimpleNamespace(preference=10, exchange='mx.mail-ok.org.')]

    monkeypatch.setattr(dns.resolver, 'get_default_resolver', Resolver)
    runner = request.getfixturevalue('runner')
    path = tmp_path / 'list.csv'
    path.write_text(''.join(f'reader{n}@nowhere-mail.org\nreader{n}@mail-ok.org\n' for n in range(50)))

    result = runner.invoke(args=['import-subscribers', str(path), '--dry-run'])

    assert 'would import 50, duplicate 0, rejected 50' in result.output
    assert 'line 1: rejected: reader0@nowhere-mail.org: The domain name nowhere-mail.org does not exist.' in \
        result.output
    assert asked == [('nowhere-mail.org', 'MX'), ('mail-ok.org', 'MX')]


def test_the_command_imports_a_file_all_or_nothing(app, runner, subscribers, tmp_path):
    [existing] = subscribers(1)
    path = tmp_path / 'list.csv'
    path.write_text(f'email;name\nann@example.com;Ann\n{existing};Old\nnot-an-address;X\n')
    broken = tmp_path / 'broken.csv'
    broken.write_bytes(b''.join(b'reader%d@example.com\n' % n for n in range(2500)) + b'x' * 20_000 + b'\n')

    dry_run = runner.invoke(args=['import-subscribers', str(path), '--dry-run'])
    assert set(clients(app)) == {existing}
    imported = runner.invoke(args=['import-subscribers', str(path), '--consented-by', 'ops@example.com'])
    refused = runner.invoke(args=['import-subscribers', str(broken)])

    assert dry_run.exit_code == 0 and 'would import 1, duplicate 1, rejected 1' in dry_run.output
    assert 'line 3: duplicate: reader0@example.com: already a subscriber' in dry_run.output
    assert 'line 4: rejected: not-an-address: An email address must have an @-sign.' in dry_run.output
    assert imported.exit_code == 0 and 'imported 1, duplicate 1, rejected 0' not in imported.output
    assert 'imported 1, duplicate 1, rejected 1' in imported.output
    assert clients(app)['ann@example.com'].consent_recorded_by == 'ops@example.com'
    assert refused.exit_code == 1 and 'Line 2501 is longer than 10,000 characters' in refused.output
    assert 'Nothing was imported.' in refused.output
    assert set(clients(app)) == {existing, 'ann@example.com'}, 'the 2,500 lines before it were rolled back'
    assert path.exists(), "the operator's own file stays"
