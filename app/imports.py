"""Subscribers imported from a CSV file: an admin uploads it and reads its dry run (app/admin/imports.py),
then a background job imports it; or an operator runs `flask import-subscribers FILE`. In the order the
code keeps its promises:

- **A stream, never the whole file.** A first pass over its bytes decides its encoding (UTF-8, with or
  without a BOM; else Latin-1, read as Windows-1252, the superset of it that spreadsheets write) and
  counts its lines; then it is read a line at a time, its delimiter (`,` or `;`) and whether its first row
  is a header guessed from its first lines. An address column is needed; a name column is optional.
- **A file that is no list of addresses says so, and writes nothing.** Empty, binary (NUL or other control
  bytes, UTF-16, bytes neither encoding reads, or not UTF-8 after a UTF-8 BOM), absurd (a line over
  MAX_LINE characters, a row of more than MAX_COLUMNS columns, a quote that runs on past its line) or
  without an address column: ImportFileError with the reason, found before anything is written, or
  half-way, when the import's transaction is rolled back.
- **Every row as the sign-up checks an address** (normal_address, app/addresses.py), each domain's DNS
  asked once per file; a name, of at most MAX_NAME characters, and printable. A row is accepted, a
  duplicate (of a line above it, or of a subscriber, who is never changed), or rejected, with the reason;
  an address on the suppression list is rejected, as the sign-up stores none: its owner asked never to
  hear from us, or it bounced, and no admin's word of consent outweighs that.
  The dry run (check) stops there.
- **All or nothing.** The import inserts the accepted rows a chunk at a time, with each newcomer's
  confirmation email queued as the sign-up queues it, in one transaction for the whole file, committed
  at its end; a failure anywhere rolls everything back. Its memory is a chunk's: a duplicate of a line
  in an earlier chunk is found in the database, where the transaction has already put that line.
- **Consent, recorded.** Imported as having consented already, people are confirmed at once, get no
  email, and keep who said so (the admin) and when. Otherwise they are unconfirmed and get the
  confirmation email, exactly as if they had signed up.
- **The uploaded file** is kept in the instance folder (owner-only) for the job to read, with its dry
  run's report beside it, and deleted when the import is over; uploads never imported go after a day.
  The job's row holds the file's path and the consent, never the addresses."""
import codecs
import csv
import enum
import functools
import itertools
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from email_validator import EmailNotValidError, EmailUndeliverableError
from flask import current_app

from app.addresses import mailbox, normal_address, trimmed
from app.database import among, insert_ignoring_conflicts, utcnow
from app.extensions import db
from app.jobs import GiveUp, Interrupted, define_task, report_progress, stopping
from app.main.email import queue_confirmation_email
from app.models import Client, Job, JobStatus
from app.suppression import reasons_among

MAX_LINE = 10_000  # characters
MAX_COLUMNS = 100
MAX_NAME = 100  # characters: the column's size
CHUNK_ROWS = 1000  # rows checked against the database, and inserted, at a time
SHOWN = 100  # duplicate and rejected rows the report lists (it counts them all)
MAX_SHOWN = 300  # characters of such a row's address
SAMPLE_LINES = 20  # the first lines, where the delimiter and the header are guessed
READ_BYTES = 64 * 1024
KEPT_FOR = timedelta(days=1)  # an upload never imported, or the report of an import over
ADDRESS_HEADERS = {'email', 'emailaddress', 'mail', 'mailaddress', 'address'}  # lower case, no spaces, - or _
NAME_HEADERS = {'name', 'fullname', 'displayname', 'firstname'}
# Bytes no CSV holds, the same in UTF-8, Latin-1 and Windows-1252: NUL and the other control characters
# but tab, line feed and carriage return.
CONTROL_BYTES = re.compile(rb'[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')
NOT_WINDOWS_1252 = re.compile(rb'[\x81\x8d\x8f\x90\x9d]')
# Encodings as an admin knows them, and the codecs that read them: Latin-1 as Windows-1252, which spreadsheets
# write under that name (its quotes, dashes and euro sign are Latin-1's control characters).
CODECS = {'UTF-8': 'utf-8-sig', 'UTF-8 with a BOM': 'utf-8-sig', 'Latin-1': 'cp1252'}
NOT_TEXT = 'This is not a CSV file: it holds bytes that no text file holds (a spreadsheet? Save it as CSV first).'


class ImportFileError(ValueError):
    """The file as a whole cannot be imported, in words for the admin: nothing is written."""


class Outcome(enum.StrEnum):
    """What becomes of one row of a file."""
    ACCEPTED = 'accepted'  # a new subscriber
    DUPLICATE = 'duplicate'  # of a line above it, or of a subscriber: nothing changes
    REJECTED = 'rejected'  # not an address the sign-up would take


@dataclass(frozen=True)
class FileFormat:
    """How a file is read, as guessed from its bytes and its first lines."""
    encoding: str  # one of CODECS
    delimiter: str
    header: bool
    address_column: int
    name_column: int | None
    lines: int

    @property
    def codec(self):
        return CODECS[self.encoding]

    def describe(self):
        columns = f'addresses in column {self.address_column + 1}' + (
            f', names in column {self.name_column + 1}' if self.name_column is not None else ', no names')
        return (f'{self.encoding}, {"comma" if self.delimiter == "," else "semicolon"}-separated, '
                f'{"with a header row" if self.header else "no header row"}; {columns}')


@dataclass
class Row:
    line: int  # where it starts in the file
    address: str  # as the file has it; once accepted, as we store it
    name: str | None
    outcome: Outcome = Outcome.ACCEPTED
    reason: str = ''


@dataclass
class Report:
    """What a file holds, or what its import did: how many rows of each outcome, the first SHOWN
    duplicate and rejected rows (line, address, reason), and how the file was read."""
    read_as: str = ''
    counts: dict = field(default_factory=lambda: {outcome.value: 0 for outcome in Outcome})
    shown: dict = field(default_factory=lambda: {Outcome.DUPLICATE.value: [], Outcome.REJECTED.value: []})

    def add(self, row):
        self.counts[row.outcome] += 1
        if row.outcome != Outcome.ACCEPTED and len(self.shown[row.outcome]) < SHOWN:
            self.shown[row.outcome].append((row.line, row.address[:MAX_SHOWN], row.reason))

    def result(self):
        """As the job keeps it."""
        return {'imported': self.counts[Outcome.ACCEPTED], 'duplicate': self.counts[Outcome.DUPLICATE],
                'rejected': self.counts[Outcome.REJECTED]}

    def summary(self, accepted_as='accepted'):
        return ', '.join(f'{accepted_as if outcome == Outcome.ACCEPTED else outcome} {self.counts[outcome]}'
                         for outcome in Outcome)


def read_format(path):
    """:return: the FileFormat of the file at `path`.  :raise ImportFileError: for an empty or binary file,
    a line too long, or no address column."""
    encoding, lines = _scan(path)
    sample = list(itertools.islice(_lines(path, CODECS[encoding]), SAMPLE_LINES))
    delimiter = _delimiter(sample)
    try:
        first = next((row for row in _reader(sample, delimiter) if any(cell.strip() for cell in row)),
                     None)
    except csv.Error as exc:
        raise ImportFileError(f'The first lines cannot be read as CSV: {exc}.') from exc
    if first is None:
        raise ImportFileError('The file is empty: it has no rows.')
    header, address, name = _columns([cell.strip(' \t') for cell in first])
    return FileFormat(encoding, delimiter, header, address, name, lines)


def _scan(path):
    """One pass over the file's bytes, none of them kept.  :return: its encoding (one of CODECS) and how many
    lines it has.  :raise ImportFileError: for an empty or binary file."""
    decoder, utf8, windows_1252, bom = codecs.getincrementaldecoder('utf-8')(), True, True, False
    size = newlines = returns = 0
    with open(path, 'rb') as file:
        for chunk in iter(functools.partial(file.read, READ_BYTES), b''):
            if not size:
                if chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    raise ImportFileError('This file is UTF-16 ("Unicode text"): save it as "CSV UTF-8", and upload '
                                          'that.')
                bom = chunk.startswith(codecs.BOM_UTF8)
            if CONTROL_BYTES.search(chunk):
                raise ImportFileError(NOT_TEXT)
            utf8 = utf8 and _decodes(decoder, chunk)
            windows_1252 = windows_1252 and not NOT_WINDOWS_1252.search(chunk)
            size += len(chunk)
            newlines += chunk.count(b'\n')
            returns += chunk.count(b'\r')
            ends_a_line = chunk.endswith((b'\n', b'\r'))
    if not size:
        raise ImportFileError('The file is empty.')
    utf8 = utf8 and _decodes(decoder, b'', final=True)
    if not (utf8 or windows_1252):
        raise ImportFileError(NOT_TEXT)
    if bom and not utf8:  # read as Latin-1, its BOM would open the first cell, and every UTF-8 name be garbled
        raise ImportFileError('This file says it is UTF-8 (it starts with a BOM), but it holds bytes that UTF-8 does '
                              'not (a part written by another program?): save it as "CSV UTF-8", and upload that.')
    # A line ends in \n, \r\n or (an old Mac's) \r; the last one may have no end.
    return ('UTF-8 with a BOM' if bom else 'UTF-8') if utf8 else 'Latin-1', max(newlines, returns) + (not ends_a_line)


def _decodes(decoder, data, final=False):
    try:
        decoder.decode(data, final)
    except UnicodeDecodeError:
        return False
    return True


def _lines(path, codec):
    """The file's lines, as text, one at a time.  :raise ImportFileError: for a line longer than MAX_LINE."""
    with open(path, encoding=codec, newline='') as text:
        for number, line in enumerate(iter(functools.partial(text.readline, MAX_LINE + 2), ''), start=1):
            if len(line.rstrip('\r\n')) > MAX_LINE:
                raise ImportFileError(f'Line {number} is longer than {MAX_LINE:,} characters: this is not a list of '
                                      'addresses.')
            yield line


def _reader(lines, delimiter):
    """CSV rows of `lines`. A file written by hand puts a space after each delimiter: skipped, it leaves a
    quote opening the cell, so `jane@example.com, "Doe, Jane"` has a name of its own rather than `"Doe`
    (and a stray `Jane"` cell), and `"jane@example.com"` is read without its quotes."""
    return csv.reader(lines, delimiter=delimiter, skipinitialspace=True)


def _delimiter(sample):
    """',' or ';': the one that leaves the cells holding an address free of spaces and of the other, on the
    most lines; then the one that splits more lines into columns; ',' when they tie."""
    def score(delimiter):
        try:
            rows = list(_reader(sample, delimiter))
        except csv.Error:
            return -1, -1
        clean = sum(all(not re.search(r'[\s,;]', cell.strip()) for cell in row if '@' in cell) for row in rows)
        return clean, sum(len(row) > 1 for row in rows)
    return max((',', ';'), key=score)


def _columns(first):
    """Whether the first row is a header, and which columns hold addresses and names.  :raise ImportFileError:
    when neither an address nor a header naming the address column is there."""
    with_at = [i for i, cell in enumerate(first) if '@' in cell]
    if with_at:  # data: the first column with an address; names when there is exactly one other column
        return False, with_at[0], (1 - with_at[0] if len(first) == 2 else None)
    keys = [re.sub(r'[\s_-]', '', cell.lower()) for cell in first]
    address = next((i for i, key in enumerate(keys) if key in ADDRESS_HEADERS), None)
    if address is None:
        raise ImportFileError('No address column: the first row holds no address, and none of its columns is '
                              f'called "email" (it reads: {", ".join(first)[:200]}).')
    return True, address, next((i for i, key in enumerate(keys) if key in NAME_HEADERS), None)


def _rows(path, file_format):
    """(line, cells) of every row past the header that is not blank.  :raise ImportFileError: for a row
    that is too wide, that CSV cannot read, or that spans lines. No address or name holds a line break,
    and a stray quote (a name typed as `"Bobby`) would swallow every line up to the next quote, or to the
    end of the file, into one cell, with the people on those lines."""
    reader = _reader(_lines(path, file_format.codec), file_format.delimiter)
    header, line = file_format.header, 0
    try:
        for cells in reader:
            first_line, line = line + 1, reader.line_num
            if line > first_line:
                end = 'the end of the file' if line >= file_format.lines else f'line {line}'
                raise ImportFileError(f'Line {first_line} opens a quote that does not close on that line: the row '
                                      f'runs on to {end}. A row is one line: correct the quotes (a stray " in a '
                                      'name?) and upload the file again.')
            if len(cells) > MAX_COLUMNS:
                raise ImportFileError(f'Line {first_line} has {len(cells):,} columns; a list of addresses has at most '
                                      f'{MAX_COLUMNS}.')
            cells = [cell.strip(' \t') for cell in cells]
            if not any(cells):
                continue
            if header:
                header = False
                continue
            yield first_line, cells
    except csv.Error as exc:
        raise ImportFileError(f'Line {line + 1} cannot be read as CSV: {exc}.') from exc


def _checked(line, cells, file_format, domains):
    """The row at `line`, accepted or rejected as the sign-up would. `domains` ({domain: why it takes no
    mail, or None}) remembers each domain's DNS answer for the whole file."""
    def cell(column):
        return cells[column] if column is not None and column < len(cells) else ''

    address, name = cell(file_format.address_column), ' '.join(cell(file_format.name_column).split()) or None
    row = Row(line, address, name)
    domain = address.rpartition('@')[2].lower()
    try:
        if not address:
            raise EmailNotValidError('There is no address in this row.')
        if domains.get(domain):
            raise EmailUndeliverableError(domains[domain])
        row.address = normal_address(address, check_deliverability=False if domain in domains else None)
        domains.setdefault(domain, None)
    except EmailUndeliverableError as exc:
        domains[domain] = str(exc)
        row.outcome, row.reason = Outcome.REJECTED, str(exc)
    except EmailNotValidError as exc:
        row.outcome, row.reason = Outcome.REJECTED, str(exc)
    else:
        if name and len(name) > MAX_NAME:
            row.outcome, row.reason = Outcome.REJECTED, f'A name has at most {MAX_NAME} characters.'
        elif name and not name.isprintable():
            row.outcome, row.reason = Outcome.REJECTED, 'A name cannot hold control characters.'
    return row


def _sorted_chunks(path, report, seen=None):
    """The file's rows CHUNK_ROWS at a time, each sorted; duplicates and rejected rows go into `report`.
    `seen` ({address: line}), when given, finds the duplicates of lines in earlier chunks; the import
    finds them in the database instead, where it has put them.
    :return: an iterator of (the chunk's accepted rows, the line it ended on, the file's lines)."""
    file_format = read_format(path)
    report.read_as = file_format.describe()
    domains, rows = {}, _rows(path, file_format)
    chunks = iter(lambda: [_checked(line, cells, file_format, domains)
                           for line, cells in itertools.islice(rows, CHUNK_ROWS)], [])
    first = next(chunks, None)
    if first is None:
        raise ImportFileError('The file has a header row, and no rows under it.')
    for chunk in itertools.chain([first], chunks):
        earlier = {} if seen is None else seen
        for row in chunk:  # one subscriber a mailbox, whatever the case of its letters (app/models.py)
            if row.outcome != Outcome.ACCEPTED:
                continue
            if row.address.lower() in earlier:
                row.outcome, row.reason = Outcome.DUPLICATE, f'the same address as line {earlier[row.address.lower()]}'
            else:
                earlier[row.address.lower()] = row.line
        candidates = [row.address.lower() for row in chunk if row.outcome == Outcome.ACCEPTED]
        lowered = sa.func.lower(Client.email, type_=sa.String)
        existing = set(db.session.scalars(sa.select(lowered).where(among(lowered, 'addresses')),
                                          {'addresses': candidates})) if candidates else set()
        suppressed = reasons_among(candidates)
        for row in chunk:
            if row.outcome == Outcome.ACCEPTED and row.address.lower() in existing:
                row.outcome, row.reason = Outcome.DUPLICATE, 'already a subscriber'
            elif row.outcome == Outcome.ACCEPTED and row.address.lower() in suppressed:
                row.outcome, row.reason = (Outcome.REJECTED,
                                           f'on the suppression list ({suppressed[row.address.lower()]})')
            if row.outcome != Outcome.ACCEPTED:
                report.add(row)
        yield [row for row in chunk if row.outcome == Outcome.ACCEPTED], chunk[-1].line, file_format.lines


def check(path):
    """The dry run: what importing the file at `path` would do now. Writes nothing.
    :return: a Report.  :raise ImportFileError: see read_format and _rows."""
    report = Report()
    for accepted, _, _ in _sorted_chunks(path, report, seen={}):
        for row in accepted:
            report.add(row)
    return report


def import_file(path, consented_by=None, on_progress=report_progress):
    """Import the file at `path` into the caller's transaction, for the caller to commit, or roll back:
    new subscribers, each with a confirmation email queued; or, `consented_by` an admin's address,
    confirmed, with that address and the time as the record of their consent. `on_progress(line, lines)`
    is told after each chunk.  :return: a Report.  :raise ImportFileError: see read_format and _rows.
    :raise Interrupted: when the job running it is asked to stop."""
    now, report = utcnow(), Report()
    given = dict(active=True, num_newsletter=0, created_at=now, **(
        dict(email_confirmed_at=now, consent_recorded_by=consented_by, consent_recorded_at=now) if consented_by
        else dict(confirmation_sent_at=now)))
    # An address that someone signs up with while the import runs is theirs: left out here, not an error.
    insert = insert_ignoring_conflicts(Client, [sa.func.lower(Client.email)]).returning(Client.id, Client.email)
    for accepted, line, lines in _sorted_chunks(path, report):
        if stopping():
            raise Interrupted('its worker is stopping; the import starts again from the top')
        rows = [dict(email=row.address, name=row.name, **given) for row in accepted]
        added = db.session.execute(insert, rows).all() if rows else []
        taken = {client.email for client in added}
        for row in accepted:
            if row.address not in taken:
                row.outcome, row.reason = Outcome.DUPLICATE, 'signed up while the import ran'
            report.add(row)
        if not consented_by:
            for client in added:
                queue_confirmation_email(client)
        db.session.flush()  # the chunk's emails go now, so that the session holds no more than a chunk
        on_progress(line, lines)
    on_progress(lines, lines)  # past the blank lines at its end, if any
    return report


@define_task(queue='bulk', max_attempts=3)
def import_subscribers(path, consented_by=None):
    """Import an uploaded file (see import_file), then delete it. A file that cannot be imported, or a row
    the database refuses, fails the job at once, with the reason; other failures (the database gone) are
    tried again, from the top.

    It commits the import itself, just before the job records 'done', rather than with it: on SQLite the
    import's transaction holds the database's one write lock, which the job's heartbeat (renewing its
    lease, storing its progress) waits for meanwhile, while the job waits for its heartbeat to stop before
    recording 'done': committed with it, every import held the lock, and every sign-up, until the
    heartbeat gave up (SQLite's busy timeout, 30 s). Cut off between the two commits, the job runs again
    and finds everyone there already, or its file gone."""
    if not Path(path).exists():
        raise GiveUp(f'Nothing to import: its file ({Path(path).name}) is gone; an earlier attempt of this job '
                     'imported it, or someone deleted it.')
    try:
        report = import_file(path, consented_by)
        if stopping():
            raise Interrupted('its worker is stopping; the import starts again from the top')
        db.session.commit()
    except (ImportFileError, sa.exc.IntegrityError, sa.exc.DataError) as exc:
        db.session.rollback()
        Path(path).unlink(missing_ok=True)
        reason = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        raise GiveUp(f'Nothing was imported: {reason}') from exc
    Path(path).unlink(missing_ok=True)
    return report.result()


@dataclass
class Upload:
    """A file an admin uploaded and its dry run's report, kept in the instance folder until it is
    imported, discarded, or a day old."""
    token: str
    filename: str
    uploaded_by: str
    uploaded_at: datetime
    consented: bool  # the admin said these people consented already
    report: Report

    @property
    def path(self):
        return folder() / f'{self.token}.csv'

    def job(self):
        """Its import job, once started (or None)."""
        return db.session.scalar(sa.select(Job).where(Job.unique_key == _job_key(self.token)))


def folder():
    """instance/imports: owner-only, like every file in it."""
    path = Path(current_app.instance_path) / 'imports'
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _job_key(token):
    return f'import:{token}'


def receive(stream, filename, uploaded_by, consented):
    """Keep an uploaded file (from `stream`) and its dry run's report.  :return: the Upload.
    :raise ImportFileError: for a file that cannot be imported, which is then not kept."""
    sweep()
    token = secrets.token_urlsafe(16)
    path = folder() / f'{token}.csv'
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 'wb') as kept:
        shutil.copyfileobj(stream, kept, READ_BYTES)
    try:
        report = check(path)
    except ImportFileError:
        path.unlink()
        raise
    upload = Upload(token, (filename or 'upload.csv')[:200], uploaded_by, utcnow(), consented, report)
    record = dict(asdict(upload), uploaded_at=upload.uploaded_at.isoformat())
    with open(os.open(folder() / f'{token}.json', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 'w') as kept:
        json.dump(record, kept)
    return upload


def find(token):
    """:return: the Upload kept as `token`, or None (never one, a name that is not a token, or swept)."""
    if not re.fullmatch(r'[A-Za-z0-9_-]{22}', token):  # secrets.token_urlsafe(16): never a path
        return None
    try:
        record = json.loads((folder() / f'{token}.json').read_text())
    except FileNotFoundError:
        return None
    return Upload(**dict(record, uploaded_at=datetime.fromisoformat(record['uploaded_at']),
                         report=Report(**record['report'])))


def start(upload, admin):
    """Queue its import, once however often it is asked for, and commit. With the upload's consent,
    `admin` is recorded as the one who said so.  :return: the job."""
    import_subscribers.apply_once(_job_key(upload.token), path=str(upload.path),
                                  consented_by=admin if upload.consented else None)
    return upload.job()


def discard(upload):
    """Delete an upload that will not be imported.  :return: False when its import has started: the job
    deletes the file when it is over."""
    if upload.job() is not None:
        return False
    for path in (upload.path, upload.path.with_suffix('.json')):
        path.unlink(missing_ok=True)
    return True


def withdraw_naming(address):
    """Delete every upload, and every report of an import over, that names `address`, whose subscriber has
    been erased: a dry run's report lists them as a duplicate, and an upload waiting to be imported would
    bring them back. An import already queued then finds its file gone, and says so. Uploads are kept a day
    at most (sweep), so reading them all costs a few files, of IMPORT_MAX_BYTES at most.  :return: how many."""
    withdrawn = 0
    for report in folder().glob('*.json'):
        upload = find(report.stem)
        if upload is not None and _names(upload, address.casefold()):
            for path in (upload.path, report):
                path.unlink(missing_ok=True)
            withdrawn += 1
    return withdrawn


def _names(upload, address):
    """Whether the upload's report lists `address` (case-folded), or its file holds the same mailbox however
    it spells it (bücher.de for xn--bcher-kva.de, any case, invisible spaces around it): read as the import
    reads it, each address checked as the import would store it, once its part before the @ matches (an
    ASCII one, always)."""
    if any(shown.casefold() == address for rows in upload.report.shown.values() for _, shown, _ in rows):
        return True
    if not upload.path.exists():
        return False
    wanted = mailbox(address)
    local = wanted.rpartition('@')[0]
    file_format = read_format(upload.path)
    column = file_format.address_column
    return any(column < len(cells) and trimmed(cells[column]).rpartition('@')[0].lower() == local
               and mailbox(cells[column]) == wanted for _, cells in _rows(upload.path, file_format))


def sweep():
    """Delete what is older than KEPT_FOR in the folder (uploads never imported, reports of imports long
    over), but the file of an import still queued or running.  :return: how many files."""
    waiting = set(db.session.scalars(sa.select(Job.unique_key).where(
        Job.task == import_subscribers.name, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))))
    old, swept = time.time() - KEPT_FOR.total_seconds(), 0
    for path in folder().iterdir():
        if _job_key(path.stem) not in waiting and path.stat().st_mtime < old:
            path.unlink(missing_ok=True)
            swept += 1
    return swept
