"""What the app asks of its database beyond the ORM, kept in one place: which databases it speaks
(PostgreSQL and SQLite, and no other: their SQL differs where it matters), how each is set up, and the
few statements written differently for each."""
import json
import math
import os
import re
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url

from app.extensions import db

DIALECTS = ('postgresql', 'sqlite')
LARGEST_INTEGER = 2 ** 31 - 1  # PostgreSQL's integer, the type of every id and count column (SQLite's holds more)
_DIGITS = re.compile(r'[0-9]{1,10}')  # not str.isdigit(): '²' is a digit to it, and int() refuses it


def as_integer(text):
    """:return: the number `text` spells in ASCII digits, if an integer column can hold it, else None: a
    number from a URL handed on past that range was a 500, the database refusing it."""
    return int(text) if _DIGITS.fullmatch(text) and int(text) <= LARGEST_INTEGER else None


def init_app(app):
    """Say no at start-up to a database the app does not speak, instead of sending it SQLite's SQL at
    the first claim; and give PostgreSQL's connections a time-out (DATABASE_CONNECT_TIMEOUT)."""
    url = app.config['SQLALCHEMY_DATABASE_URI']
    try:
        dialect = make_url(url).get_backend_name()
    except sa.exc.ArgumentError as exc:
        raise ValueError(f'DATABASE_URL: {url!r} is not a database URL') from exc
    if dialect not in DIALECTS:
        raise ValueError(f'DATABASE_URL: {dialect!r} is not supported; use PostgreSQL (postgresql://...) '
                         'or SQLite (sqlite:///...)')
    if dialect == 'postgresql' and 'connect_timeout' not in make_url(url).query:
        options = app.config['SQLALCHEMY_ENGINE_OPTIONS']
        app.config['SQLALCHEMY_ENGINE_OPTIONS'] = {**options, 'connect_args': {
            **options.get('connect_args', {}), 'connect_timeout': math.ceil(app.config['DATABASE_CONNECT_TIMEOUT'])}}


def is_postgresql():
    return db.engine.dialect.name == 'postgresql'


@event.listens_for(Engine, 'connect')
def _sqlite_concurrency(dbapi_connection, connection_record):
    """Cron, the web process and workers share one SQLite file: WAL lets readers run beside the writer,
    and the busy timeout makes a writer wait for the lock instead of failing at once. In WAL mode,
    synchronous=NORMAL keeps every commit through a killed process (only a power cut can lose the last
    few), and spares the send log's frequent small commits a wait on the disk each."""
    if type(dbapi_connection).__module__ != 'sqlite3':
        return
    cursor = dbapi_connection.cursor()
    cursor.execute('PRAGMA journal_mode=WAL')
    cursor.execute('PRAGMA synchronous=NORMAL')
    cursor.execute('PRAGMA busy_timeout=30000')
    cursor.execute('PRAGMA foreign_keys=ON')
    for _, name, path in cursor.execute('PRAGMA database_list').fetchall():
        if name == 'main' and path:
            os.chmod(path, 0o600)  # the subscribers' addresses: readable by the app's user only
    cursor.close()


_built = {}


def built_once(name, build):
    """The statement `build()` makes for this app's database, built at its first use and kept under
    `name`, with bind parameters for what changes from one run to the next. Statements run for every
    sign-up and every job cost SQLAlchemy more CPU to build and cache-key anew each time, and more again
    through the ORM, than the database took to run them (bench/signups.py)."""
    key = (db.engine.dialect.name, name)
    if (statement := _built.get(key)) is None:
        statement = _built[key] = build()
    return statement


def alone():
    """A connection of the pool's in autocommit, for one statement outside any transaction: one round trip
    to PostgreSQL, where the session's BEGIN, statement and COMMIT are three. For a job's own reads and
    its outcome, which nothing else needs to be atomic with (app/jobs.py)."""
    return db.engine.connect().execution_options(isolation_level='AUTOCOMMIT')


def nul_shown(text):
    """`text` as a text column of either database takes it: PostgreSQL's refuses a NUL, which a server's
    reply or a file's line quoted in an error may hold, so it is shown as \\x00."""
    return text.replace('\x00', '\\x00')


def utcnow():
    """Naive UTC everywhere: SQLite keeps no time zone, and mixing aware and naive values breaks comparisons."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def insert_ignoring_conflicts(model, unique_columns):
    """INSERT that leaves out rows colliding on `unique_columns` (columns, or the expressions of a unique
    index): how the database, not the code, decides which of two racing processes claims something first.
    Never on any conflict at all: a clash on another index is an error to see, not a row to drop.
    An INSERT ... SELECT needs a WHERE in its SELECT (`.where(sa.true())` will do), or SQLite reads the ON
    CONFLICT as the SELECT's; and the model's table rather than the model, or session.execute() takes the
    statement's parameters for rows of an ORM bulk insert."""
    return upsert(model).on_conflict_do_nothing(index_elements=unique_columns)


def upsert(table):
    """INSERT with this database's ON CONFLICT clause (`on_conflict_do_nothing`, ...)."""
    return (postgresql if is_postgresql() else sqlite).insert(table)


class RowsParameter:
    """Rows (tuples) as a table with `columns` (name=type) in a statement that is built once and run many
    times, each time with `params(rows)`: one parameter per column on PostgreSQL (arrays, unnest), one
    in all on SQLite (a JSON array, json_each), however many rows. A drip batch claims 100 subscribers
    in one INSERT ... SELECT from it; as 100 VALUES rows the claim had 800 placeholders, and psycopg
    parses placeholders in Python: that cost more than the insert itself. And built anew for each run,
    a statement costs SQLAlchemy more than the database takes to run it (bench/README.md)."""

    def __init__(self, name, **columns):
        self.name, self.columns = name, columns
        # An array is of one type: psycopg refuses [120, 0.5] for a float column.
        self.python_types = [sa.types.to_instance(type_).python_type for type_ in columns.values()]
        if is_postgresql():
            self.arrays = {column: sa.bindparam(f'{name}_{column}', type_=postgresql.ARRAY(type_))
                           for column, type_ in columns.items()}
            table = sa.func.unnest(*self.arrays.values()).table_valued(*columns).render_derived()
            self.table = sa.select(*table.c).subquery()
        else:
            table = sa.func.json_each(sa.bindparam(f'{name}_json')).table_valued('value')
            self.table = sa.select(*(sa.type_coerce(sa.func.json_extract(table.c.value, f'$[{i}]'), type_).label(column)
                                     for i, (column, type_) in enumerate(columns.items()))).subquery()
        self.c = self.table.c

    def holds(self, key, column):
        """`key IN` this table's `column`: on PostgreSQL as `= ANY` of its array, which the planner can use
        to fetch those rows by index however wrong its statistics, where a join may scan them all."""
        if is_postgresql():
            return key == sa.any_(self.arrays[column])
        return key.in_(sa.select(self.c[column]))

    def params(self, rows):
        if is_postgresql():
            return {f'{self.name}_{column}': [None if row[i] is None else python_type(row[i]) for row in rows]
                    for i, (column, python_type) in enumerate(zip(self.columns, self.python_types, strict=True))}
        return {f'{self.name}_json': json.dumps(rows)}


def among(column, name):
    """`column IN :name`, its values given when the statement runs: one array parameter on PostgreSQL,
    for the reason RowsParameter gives."""
    if is_postgresql():
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(sa.bindparam(name, expanding=True))
