"""Background jobs: the one mechanism for everything the app does outside a request or a cron command
(confirmation mail, scheduled drip stages, broadcasts, an admin's "send now").

A task is a function defined once with @define_task, registered with the app by the factory (a name
that two tasks claim is an error at start-up), and applied from anywhere with keyword arguments:
`send_email.apply(recipient=...)` adds a row to `jobs` in the caller's transaction, so the job exists
exactly when the change that asked for it is committed. The row is also the job's public record:
state (JobStatus has every move), progress, result or error, and timings, for admins to see.

Workers claim due jobs under a lease (app/leases.py), so a job runs in one worker at a time however
many run, on PostgreSQL or SQLite; quick mail is claimed JOB_MAIL_BATCH jobs at a time (_run_claimed).
While a job runs, a heartbeat thread renews its lease and writes its progress; if the worker dies the
lease runs out and another worker takes the job over. A job that raises is retried with back-off
(JOB_RETRY_BACKOFF, doubling) up to its max_attempts, then kept as failed with its error; one that raises
GiveUp fails at once. The runner knows nothing of what tasks do. A job's own database writes are
committed together with its 'done' state, or not at all.

Workers are threads inside the web process (JOB_WORKER=thread: nothing else to run; started as a gunicorn
worker starts, by app/serving.py, else at the first request), or `flask worker`; each also ticks the app's
clock (its in-app schedules) every few seconds. With JOB_BACKEND=rq, a worker hands each job it claims to
RQ instead of running it, and `flask rq-worker` runs it; the claim passes to the RQ worker only if it is
still the one handed over, so a job that reached RQ twice (re-handed after its lease ran out) still runs
once. A task may keep what it opens (send_email's SMTP connection) for the next jobs its worker runs
(kept_open)."""
import atexit
import contextlib
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import rq
import sqlalchemy as sa
from flask import current_app, has_app_context
from flask_sqlalchemy.session import Session

from app.database import alone, built_once, insert_ignoring_conflicts, nul_shown, utcnow
from app.extensions import db
from app.leases import Claim, Heartbeat, db_later, new_owner, renew
from app.models import Job, JobStatus
from app.ratelimit import redis_client

log = logging.getLogger(__name__)

QUEUES = ('mail', 'bulk')  # quick transactional mail never waits behind an hour-long broadcast
EXIT_WAIT_SECONDS = 5  # for each job thread, as a web process exits: well within gunicorn's 30 s graceful timeout
_JOBS = Job.__table__  # the runner's statements are on the table, not the ORM's class: see built_once


class GiveUp(Exception):
    """Raised by a task that trying again cannot help (a refusal for good, a send that would only lose
    more answers): the job fails at once, for an admin to look at."""


class Interrupted(Exception):
    """Raised by a task that stopped early because its worker is shutting down: the job goes back to
    the queue at once, without counting as a failed attempt."""


class Reschedule(Exception):
    """Raised by a task that has done what it can for now and must come back at `at` (naive UTC): a
    broadcast waiting on deferred deliveries. Not a failure: it uses up no attempt, and `result` is
    kept as the job's result meanwhile."""

    def __init__(self, at, result=None):
        super().__init__(f'comes back at {at:%Y-%m-%d %H:%M:%S} UTC')
        self.at, self.result = at, result


class Task:
    def __init__(self, fn, queue, max_attempts, forget=()):
        self.fn, self.name, self.queue, self.max_attempts = fn, fn.__name__, queue, max_attempts
        self.forget = frozenset(forget)  # payload keys dropped once the job is over

    def __call__(self, **payload):
        return self.fn(**payload)

    def __repr__(self):
        return f'<Task {self.name} ({self.fn.__module__})>'

    def apply(self, run_after=None, unique_key=None, **payload):
        """Queue a run with `payload` as part of the caller's transaction.  :return: the job's id.

        One INSERT, built once, rather than a Job added to the session: flushed by the ORM's unit of
        work, the row of a sign-up's confirmation email cost more CPU than storing the sign-up itself
        (bench/signup_profile.py)."""
        job_id = db.session.scalar(built_once('jobs: apply', lambda: sa.insert(_JOBS).returning(_JOBS.c.id)),
                                   {**self._row(payload, run_after), 'unique_key': unique_key})
        _note_queued(self.queue)
        return job_id

    def apply_once(self, unique_key, run_after=None, status=JobStatus.QUEUED, error=None, **payload):
        """Queue a run unless a job with `unique_key` already exists, and commit.  :return: True if
        this call queued it. Safe to call from any number of processes at once."""
        inserted = db.session.execute(
            insert_ignoring_conflicts(Job, ['unique_key'])
            .values(**self._row(payload, run_after), unique_key=unique_key, status=status, error=error,
                    attempts=0, created_at=utcnow())
            .returning(Job.id)).first() is not None
        if inserted:
            _note_queued(self.queue)
        db.session.commit()
        return inserted

    def _row(self, payload, run_after):
        if current_app.extensions['tasks'].get(self.name) is not self:
            raise LookupError(f'{self!r} is not registered with this app (see app.create_app)')
        json.dumps(payload)  # an argument that cannot be stored fails here, at the caller, not in a worker
        return dict(task=self.name, queue=self.queue, payload=payload, run_after=run_after or utcnow(),
                    max_attempts=self.max_attempts or current_app.config['JOB_MAX_ATTEMPTS'])


def _note_queued(queue):
    """Remember, until the commit, which queues got a job: only their threads are woken (_wake_worker)."""
    db.session.info.setdefault('jobs_queued', set()).add(queue)


def define_task(queue='mail', max_attempts=None, forget=()):
    """Make a function a task: `@define_task(queue='bulk')`. Its keyword arguments must be JSON; those
    named in `forget` are dropped from the job's row once it is done or has failed for good (what must
    not stay readable in the database, such as a sign-in link)."""
    if queue not in QUEUES:
        raise ValueError(f'queue must be one of {QUEUES}')
    return lambda fn: Task(fn, queue, max_attempts, forget)


class TaskRegistry:
    """The tasks an app runs, by name: a job row names its task, and a worker finds it here."""

    def __init__(self, tasks=()):
        self.tasks = {}
        self.add(*tasks)

    def add(self, *tasks):
        """:raise ValueError: for a name already taken by another task, which would otherwise run in its place."""
        for task in tasks:
            if self.tasks.setdefault(task.name, task) is not task:
                raise ValueError(f'two tasks are named {task.name!r}: {self.tasks[task.name]!r} and {task!r}')

    def get(self, name):
        return self.tasks.get(name)


@dataclass
class _Running:
    """What the heartbeat and the task share while a job runs."""
    job_id: int
    owner: str
    worker_stopping: threading.Event
    waiting: list = field(default_factory=list)  # ids of its batch's jobs claimed behind it, not started yet
    done: int | None = None
    total: int | None = None
    lost: bool = False


_local = threading.local()


def upcoming():
    """The payload of the job this thread runs next, if it has claimed it already: a hint for a task that
    can start on it early (an email: the next one's envelope goes out with this one's end). Only a hint:
    that job may yet be given back (see _run_claimed)."""
    row = getattr(_local, 'upcoming', None)
    return row.payload if row is not None else None


def report_progress(done, total=None):
    """Called by a running task; the heartbeat stores it. Does nothing outside a job."""
    if running := getattr(_local, 'running', None):
        running.done, running.total = done, total


def stopping():
    """True when the running task should stop at its next safe point: its worker is shutting down, or
    its lease was lost to another worker."""
    running = getattr(_local, 'running', None)
    return bool(running and (running.lost or running.worker_stopping.is_set()))


class _Kept(dict):
    """What the jobs a thread runs keep open with kept_open(): {key: (context manager, what it gave)}."""

    def close(self):
        while self:
            manager, _ = self.popitem()[1]
            with contextlib.suppress(Exception):  # closing a connection that is gone already
                manager.__exit__(None, None, None)


@contextlib.contextmanager
def kept_between_jobs():
    """Inside the block, what the jobs this thread runs keep open with kept_open() stays open from one
    job to the next, until `close()` on what the block gets, or the block's end."""
    kept = _local.kept = _Kept()
    try:
        yield kept
    finally:
        _local.kept = None
        kept.close()


@contextlib.contextmanager
def kept_open(key, opener):
    """For a task: the context manager `opener()` returns (a way out for mail), entered by the first job
    that asks and kept for the next ones (see kept_between_jobs: a worker keeps it while jobs keep coming,
    and closes it after JOB_POLL_SECONDS without any), or entered and left here outside a worker. An SMTP
    connection opened and closed for each sign-up's confirmation email cost the app and the server more
    CPU than the rest of the email (bench/signups.py). A job that raises drops it, so that the next one
    starts on a fresh one."""
    kept = getattr(_local, 'kept', None)
    if kept is None:
        with opener() as resource:
            yield resource
        return
    if key not in kept:
        manager = opener()
        kept[key] = manager, manager.__enter__()
    try:
        yield kept[key][1]
    except BaseException:
        with contextlib.suppress(Exception):
            kept.pop(key)[0].__exit__(None, None, None)
        raise


def run_next(queue, worker_stopping=None, abandoned=True):
    """Claim the next due jobs of `queue` and run them here, or hand one to RQ.  :return: how many ran or
    were handed over, 0 if none was due. `abandoned`: look first for running ones whose worker died (their
    lease run out), then queued ones."""
    owner, config = new_owner(), current_app.config
    here = config['JOB_BACKEND'] != 'rq'
    limit = config['JOB_MAIL_BATCH'] if here and queue == 'mail' else 1
    claimed_at = time.monotonic()  # before the claim: the leases it takes start a little later
    claim = dict(owner=owner, seconds=config['LEASE_SECONDS'], job_queue=queue, due_by=utcnow(),
                 **({'started': utcnow()} if here else {}))
    rows = _claim(JobStatus.RUNNING, here, limit, claim) if abandoned else []
    rows = rows or _claim(JobStatus.QUEUED, here, limit, claim)
    if rows and not here:
        rq_queue().enqueue_call(run_handed_over, args=(rows[0].id, owner), timeout=config['RQ_JOB_TIMEOUT'])
        return 1
    return _run_claimed(rows, owner, worker_stopping or threading.Event(), claimed_at)


def _run_claimed(rows, owner, worker_stopping, claimed_at):
    """Run the jobs claimed together, one after another.  :return: how many ran.

    A confirmation email's claim was a third of what the job runner spent on it, and on PostgreSQL four
    round trips of its seven (bench/signups.py): mail jobs are short, so they are claimed in batches.
    Each job of a batch had its attempt counted and its lease taken with the claim, and only the running
    one has a heartbeat. So, before any lease behind it can run out, the rest of the batch goes back to
    the queue, uncounted, for any worker to take:
    - when a job runs long enough for its heartbeat to beat (a slow server: the others need not wait on it);
    - when a job's turn comes once a third of the lease has gone (many short jobs);
    - when the worker is told to stop (`flask worker` on SIGTERM; a web process as it exits).
    A worker killed mid-batch, or stopped by a database error, leaves the rest to run out their leases:
    another worker takes them over then, and each has used up an attempt."""
    lease, rows = current_app.config['LEASE_SECONDS'], sorted(rows, key=lambda row: row.run_after)
    for ran, row in enumerate(rows):
        waiting = [left.id for left in rows[ran + 1:]]
        if ran and (worker_stopping.is_set() or time.monotonic() - claimed_at > lease / 3):
            _give_back(owner, [row.id, *waiting])
            return ran
        _local.upcoming = rows[ran + 1] if waiting else None
        try:
            _run(row.id, row.task, row.payload, row.attempts, row.max_attempts, owner=owner,
                 worker_stopping=worker_stopping, waiting=waiting)
        finally:
            _local.upcoming = None
        if ran + 1 < len(rows) and not waiting:
            return ran + 1  # its heartbeat gave the rest back
    return len(rows)


def _give_back(owner, job_ids):
    """Jobs `owner` claimed and has not started go back to the queue, their attempt not counted."""
    db.session.execute(built_once('jobs: give back', _giving_back), {'holder': owner, 'job_ids': job_ids})
    db.session.commit()


def _giving_back():
    c = _JOBS.c
    return (sa.update(_JOBS)
            .where(c.id.in_(sa.bindparam('job_ids', expanding=True)), c.claimed_by == sa.bindparam('holder'))
            .values(status=JobStatus.QUEUED, attempts=c.attempts - 1, claimed_by=None, lease_until=None,
                    started_at=None))


def _claim(status, starting, limit, params):
    return built_once(('jobs: claim', status, starting, limit),
                      functools.partial(_claiming, status, starting, limit))(**params)


def _claiming(status, starting, limit):
    """The claim of a due job in `status`: queued, or running with its lease run out (its worker died).
    One status at a time, in the order of the index on (queue, status, run_after), so that the database
    stops at the first free row: with both statuses at once, SQLite sorted every waiting job for each
    claim, 4.6 ms a claim with 20,000 waiting (a burst of sign-ups, an import's confirmation emails).

    `starting`: the claiming thread runs the job, so the claim starts it too (see _start), in the same
    statement and commit: one of the three a confirmation email cost the database (bench/signups.py)."""
    c = _JOBS.c
    start = dict(values=_started(), returning=(*_RUN_COLUMNS, c.run_after)) if starting else {}
    return Claim(Job, c.queue == sa.bindparam('job_queue'), c.status == status,
                 c.run_after <= sa.bindparam('due_by', type_=sa.DateTime), order_by=c.run_after, limit=limit, **start)


_RUN_COLUMNS = (_JOBS.c.task, _JOBS.c.payload, _JOBS.c.attempts, _JOBS.c.max_attempts)


def _started():
    """A job starting: running, its attempt counted (a worker that dies mid-job has used it up)."""
    c = _JOBS.c
    return dict(status=JobStatus.RUNNING, attempts=c.attempts + 1,
                started_at=sa.bindparam('started', type_=sa.DateTime), finished_at=None, progress_done=None,
                progress_total=None)


def _start():
    """The claim passes to `new_owner` and the job starts; its row comes back with it."""
    c = _JOBS.c
    return (sa.update(_JOBS).where(c.id == sa.bindparam('job_id'), c.claimed_by == sa.bindparam('holder'))
            .values(claimed_by=sa.bindparam('new_owner'), lease_until=db_later(sa.bindparam('lease', type_=sa.Float)),
                    **_started())
            .returning(*_RUN_COLUMNS))


def rq_queue():
    return rq.Queue(current_app.config['RQ_QUEUE'], connection=redis_client())


# Set as `flask rq-worker` is told to stop (SIGTERM, Ctrl+C): RQ itself lets the job running finish, however
# long, and a send would go on until the SIGKILL that follows a stop that takes too long.
rq_worker_stopping = threading.Event()


def run_handed_over(job_id, owner):
    """The RQ job: runs inside `flask rq-worker`, until its next safe point once that worker is told to stop."""
    try:
        execute(job_id, owner, rq_worker_stopping)
    finally:
        db.session.remove()


def execute(job_id, claimed_by, worker_stopping):
    """Start job `job_id`, which `claimed_by` holds, and run it in this thread (see _run)."""
    owner = new_owner()
    job = db.session.execute(built_once('jobs: start', _start), {
        'job_id': job_id, 'holder': claimed_by, 'new_owner': owner,
        'lease': float(current_app.config['LEASE_SECONDS']), 'started': utcnow()}).first()
    db.session.commit()
    if job is None:
        return  # handed to RQ, then re-handed after its lease ran out: the newer hand-over runs it
    _run(job_id, *job, owner=owner, worker_stopping=worker_stopping)


def _run(job_id, name, payload, attempt, max_attempts, owner, worker_stopping, waiting=None):
    """Run job `job_id`, started under `owner`'s lease, in this thread, and record what became of it.
    `waiting`: its batch's jobs claimed behind it (see _run_claimed); emptied if its heartbeat gives them back."""
    lease = current_app.config['LEASE_SECONDS']
    running = _Running(job_id, owner, worker_stopping, [] if waiting is None else waiting)
    task = current_app.extensions['tasks'].get(name)
    if attempt > max_attempts:
        return _record(running, status=JobStatus.FAILED, finished_at=utcnow(), **_forgetting(task, payload),
                       error=f'gave up: the worker running it stopped {attempt - 1} time(s) mid-job (killed, or '
                             'out of memory)')
    if task is None:
        return _record(running, status=JobStatus.FAILED, finished_at=utcnow(),
                       error=f'no task named {name!r} in this app')

    log.info('job %d: %s started (attempt %d of %d)', job_id, name, attempt, max_attempts)
    started = utcnow()  # the claim's time was written, and a batch's later jobs start after it
    heartbeat = Heartbeat(functools.partial(_keep_lease, running, lease),
                          every=min(lease / 3, current_app.config['JOB_PROGRESS_SECONDS']), name=f'job-{job_id}-heartbeat')
    _local.running = running
    try:
        with heartbeat:
            result = task.fn(**payload)
    except Interrupted:
        db.session.rollback()
        log.info('job %d: %s interrupted; queued again', job_id, name)
        outcome = dict(status=JobStatus.QUEUED, give_back_attempt=True)
    except Reschedule as later:
        db.session.rollback()
        log.info('job %d: %s comes back at %s UTC', job_id, name, later.at)
        outcome = dict(status=JobStatus.QUEUED, give_back_attempt=True, run_after=later.at,
                       result=_jsonable(later.result), error=None)
    except Exception as exc:
        db.session.rollback()
        error = nul_shown(str(exc) if isinstance(exc, GiveUp) else f'{type(exc).__name__}: {exc}')
        if isinstance(exc, GiveUp) or attempt >= max_attempts:
            log.exception('job %d: %s failed for good', job_id, name)
            outcome = dict(status=JobStatus.FAILED, finished_at=utcnow(), error=error)
        else:
            config = current_app.config
            delay = min(config['JOB_RETRY_BACKOFF'] * 2 ** (attempt - 1), config['JOB_MAX_BACKOFF'])
            log.warning('job %d: %s failed (%s); retrying in %.0fs', job_id, name, error, delay)
            outcome = dict(status=JobStatus.QUEUED, error=error, run_after=utcnow() + timedelta(seconds=delay))
    else:
        outcome = dict(status=JobStatus.DONE, finished_at=utcnow(), result=_jsonable(result), error=None)
    finally:
        _local.running = None
    if outcome['status'] in (JobStatus.DONE, JobStatus.FAILED):
        outcome.update(_forgetting(task, payload))
    _record(running, started_at=started, **outcome)


def _forgetting(task, payload):
    """The payload to keep once the job is over, without what its task forgets, as a value to record."""
    if task is None or not task.forget:
        return {}
    return {'payload': {key: value for key, value in payload.items() if key not in task.forget}}


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _record(running, give_back_attempt=False, **values):
    """Write the job's outcome (with the task's own writes, if it left any uncommitted), unless
    another worker has taken the job over: then both are dropped, since that worker runs it now.
    `give_back_attempt`: this attempt does not count (the worker stopping, a task coming back later)."""
    names = tuple(sorted(values))
    statement = built_once(('jobs: record', names, give_back_attempt),
                           lambda: _record_outcome(names, give_back_attempt))
    params = {'job_id': running.job_id, 'holder': running.owner, 'done': running.done, 'total': running.total,
              **{f'new_{name}': values[name] for name in names}}
    if db.session().in_transaction():
        held = db.session.execute(statement, params).rowcount
        if held:
            db.session.commit()
        else:
            db.session.rollback()
    else:  # the task left nothing to commit with it (sending an email writes nothing)
        held = _record_alone(running, statement, params)
    if not held:
        log.warning('job %d: its lease ran out and another worker took it over; this outcome is dropped',
                    running.job_id)


def _record_alone(running, statement, params):
    """Run the outcome's `statement` on a connection of its own, tried again while the job's lease may still
    hold: an outcome that could not be written leaves the job to be taken over, and run again, once the lease
    runs out, and a database that was back within seconds (restarted, failed over), or a pool whose every
    connection was busy for a moment, would have an email that went out sent twice.  :return: how many rows
    it changed (0: the job was taken over)."""
    deadline = time.monotonic() + current_app.config['LEASE_SECONDS']
    while True:
        try:
            with alone() as connection:
                return connection.execute(statement, params).rowcount
        # The way to the database, not what is written: an outcome it refuses would be refused again.
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning('job %d: could not record its outcome (%s); trying again', running.job_id,
                        getattr(exc, 'orig', exc))
            time.sleep(0.5)


def _record_outcome(names, give_back_attempt):
    """The UPDATE that records an outcome setting the columns `names` (bind parameters `new_<name>`)."""
    c = _JOBS.c
    given_back = {'attempts': c.attempts - 1} if give_back_attempt else {}
    return (sa.update(_JOBS).where(c.id == sa.bindparam('job_id'), c.claimed_by == sa.bindparam('holder'))
            .values(claimed_by=None, lease_until=None, progress_done=sa.bindparam('done'),
                    progress_total=sa.bindparam('total'), **given_back,
                    **{name: sa.bindparam(f'new_{name}', type_=c[name].type) for name in names}))


def _keep_lease(running, lease):
    """The heartbeat's beat: renew the lease and store progress; a lease lost means stop. A job that
    lasts until a beat is a slow one: the jobs of its batch waiting behind it go back to the queue."""
    if not renew(Job, Job.id == running.job_id, owner=running.owner, seconds=lease,
                 progress_done=running.done, progress_total=running.total):
        running.lost = True
        log.warning('job %d: lost its lease to another worker; stopping it', running.job_id)
        return False
    if running.waiting:
        _give_back(running.owner, running.waiting)
        running.waiting.clear()
    return True


class Worker:
    """Runs the jobs of `queues` in this process, a thread per queue, and ticks the app's clock from a
    thread of its own. Any number of workers, in any processes, may run."""

    def __init__(self, app, queues=QUEUES):
        self.app, self.queues = app, tuple(queues)
        self.stopping = threading.Event()
        self.wakes = [threading.Event() for _ in self.queues]
        self.clock_wake = threading.Event()  # only for stop(): the clock runs on time, not on demand
        self.threads = []

    def start(self):
        for queue, wake in zip(self.queues, self.wakes, strict=True):
            self._spawn(f'jobs-{queue}', self._serve, queue, wake)
        self._spawn('jobs-clock', self._clock)
        return self

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def wake(self, queues=None):
        """Wake the threads of `queues` (all by default). Only those: a thread woken for nothing still
        claims, and every sign-up's commit cost the bulk queue's thread a claim that found nothing."""
        for queue, wake in zip(self.queues, self.wakes, strict=True):
            if queues is None or queue in queues:
                wake.set()

    def stop(self, timeout=None):
        """Stop taking jobs; a running task is asked to stop at its next safe point (stopping())."""
        self.stopping.set()
        self.wake()
        self.clock_wake.set()
        for thread in self.threads:
            thread.join(timeout)

    def _serve(self, queue, wake):
        looked = float('-inf')

        def abandoned():
            """Abandoned jobs are looked for once a poll (they wait out a lease anyway), not at every claim:
            woken by each sign-up's commit, the thread otherwise paid a second claim, empty, for each."""
            nonlocal looked
            if time.monotonic() - looked < self.app.config['JOB_POLL_SECONDS']:
                return False
            looked = time.monotonic()
            return True

        self._loop(wake, lambda: run_next(queue, self.stopping, abandoned()))

    def _clock(self):
        self._loop(self.clock_wake, tick, repeat=False)

    def _loop(self, wake, step, repeat=True):
        """Call `step` until it returns falsy, then wait for a wake-up or JOB_POLL_SECONDS. What jobs keep
        open (kept_open) stays open while wake-ups keep coming, and is closed after a quiet poll."""
        with kept_between_jobs() as kept:
            while not self.stopping.is_set():
                with self.app.app_context():
                    try:
                        while step() and repeat and not self.stopping.is_set():
                            pass
                    except Exception:  # a database outage must not kill the worker: log it and try again later
                        db.session.rollback()
                        log.exception('%s: failed; trying again in %ss', threading.current_thread().name,
                                      self.app.config['JOB_POLL_SECONDS'])
                if not wake.wait(self.app.config['JOB_POLL_SECONDS']):
                    kept.close()
                wake.clear()


def tick():
    """What the app does on the clock (fire its due schedules, queue its clean-up): the callables the
    factory gave init_app, each on its own, so that one failing does not hold up the others."""
    for clock in current_app.extensions['jobs_clock']:
        try:
            clock()
        except Exception:  # a database outage: logged, and the next tick tries again
            db.session.rollback()
            log.exception('the clock: %s failed', getattr(clock, '__qualname__', clock))


def run_due(queues=QUEUES):
    """Tick the clock, then run every job due now, in this thread (`flask worker --once`).
    :return: how many jobs ran."""
    tick()
    ran = 0
    with kept_between_jobs():
        for queue in queues:
            while ran_now := run_next(queue):
                ran += ran_now
    return ran


def init_app(app, tasks, clock=()):
    """Bind the job runner: the app's `tasks` (a name clash is an error here), and `clock`, callables
    called on each worker's clock thread every JOB_POLL_SECONDS."""
    app.extensions['tasks'] = TaskRegistry(tasks)
    app.extensions['jobs_clock'] = tuple(clock)
    if app.config['JOB_BACKEND'] not in ('database', 'rq'):
        raise ValueError(f'JOB_BACKEND must be "database" or "rq", not {app.config["JOB_BACKEND"]!r}')
    if app.config['JOB_WORKER'] not in ('thread', 'off'):  # else no job would run, and nothing would say so
        raise ValueError(f'JOB_WORKER must be "thread" or "off", not {app.config["JOB_WORKER"]!r}')
    if app.config['JOB_BACKEND'] == 'rq' and not app.config['REDIS_URL']:
        raise ValueError('JOB_BACKEND=rq needs REDIS_URL (the Redis that `flask rq-worker` uses)')
    app.extensions['jobs'] = None
    if app.config['JOB_WORKER'] != 'thread':
        return

    # Not started here, so that `flask db upgrade`, cron commands and gunicorn's master process (which
    # only forks, and must not hold threads when it does) never start a worker of their own. Under
    # gunicorn its post_worker_init hook starts them as each worker has loaded the app (app/serving.py);
    # under any other server (`flask run`), the first request does.
    @app.before_request
    def _start_worker_threads():
        start_worker_threads(app)


_starting = threading.Lock()


def start_worker_threads(app):
    """Start this process's job threads and clock for `app` (JOB_WORKER=thread), unless they run already.
    Call it only in the process that serves the app, once that process will not fork again."""
    if app.extensions['jobs'] is not None or app.config['JOB_WORKER'] != 'thread':
        return
    with _starting:
        if app.extensions['jobs'] is None:
            app.extensions['jobs'] = Worker(app).start()
            # As the process exits (gunicorn restarting its workers on a deploy), the jobs it has claimed
            # and not started go back to the queue at once, uncounted, not when their leases run out, and
            # a drip or broadcast stops at its next safe point. An email still on the wire after the wait
            # is cut off, and left to its lease as before.
            atexit.register(app.extensions['jobs'].stop, EXIT_WAIT_SECONDS)


@sa.event.listens_for(Session, 'after_commit')
def _wake_worker(session):
    """A job applied in this process starts at once, not at the next poll."""
    if (queues := session.info.pop('jobs_queued', None)) and has_app_context():
        if worker := current_app.extensions.get('jobs'):
            worker.wake(queues)
