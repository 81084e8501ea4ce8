"""The send, the heart of the product. Every caller (cron's `flask send-newsletter-email`, a schedule's or
an admin's job, an RQ worker) sends a mailing (a drip stage, a broadcast) through `send()`, which runs
one MailingSend and returns its Report; each caller only turns that report into what it speaks (an exit
code, a job retry, an RQ failure, the admin's progress bar).

How it keeps its promises, in the order the code below does things (and before all of them: nothing
goes out when the mailing must not go out now, a drip stage outside its sending window, app/timing.py;
asked before anyone is claimed and after each batch, the rest left due):

1. At most once per subscriber and mailing. Before anything goes out, the subscriber is claimed in
   the send log (app/sendlog.py): their row for the mailing, unique per subscriber and mailing, is
   inserted and committed. Of two runs racing for a subscriber (cron fired twice, an admin by hand
   while cron runs), one wins the insert and the other skips them.
2. Claims a live run cannot lose. The run's own row is the lease on all its claims (LEASE_SECONDS, on
   the database's clock), renewed by a heartbeat thread every third of a lease whatever the SMTP
   conversation is doing, and every write the run makes is conditional on its row not having been
   taken over. A run that was frozen past its lease, and was taken over, finds out and stops.
3. Never twice, whatever dies. Before a group of messages' data goes out, the run's row says which
   deliveries it is sending, in one commit (for up to SEND_RECORD_EVERY messages) that also records
   the outcomes that came in since the last. A run killed at any moment leaves that behind; once its
   lease has run out, the next run makes the deliveries it was sending 'unknown' (they may have
   arrived) and sends its other claims. So a kill repeats nothing, and leaves at most SEND_RECORD_EVERY
   (or as many as the connections hold, if more: MAIL_CONCURRENCY, three times that once several
   connections pipeline) messages, plus one per connection, unknown; over a slow link, just the ones on
   the wire (GROUP_SECONDS).
4. The answer decides (sort_outcome): sent; failed, for a permanent refusal; deferred, for a temporary
   one that outlasts MAIL_RETRIES, tried again from its next attempt time until MAIL_GIVE_UP_AFTER;
   unknown, when the message's end went out and no answer came: never sent again unless an admin asks.
   Nothing is recorded against a subscriber the way out did not answer about: the way out down, the
   rate limiter's Redis gone, the database gone or a bug stop the run, and what it had not sent is
   left due. So do three unknowns in a row: a way out that loses its answers must not lose a list.
5. Resumable and efficient. Subscribers are claimed a batch (SEND_BATCH_SIZE) at a time, by id, the
   next batch on a thread of its own while one is on the wire, and read with a fixed number of
   statements and parameters per batch. Messages go out over MAIL_CONCURRENCY reused connections; over
   one, each message is composed while the server is still busy with the one before it (Outgoing); and
   where the SMTP server offers PIPELINING, each message's envelope rides behind the dot of the one
   before it on its connection (app/smtp.py), each message keeping its own outcome all the same.
"""
import concurrent.futures
import contextlib
import functools
import gc
import itertools
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from flask import current_app

from app.extensions import db
from app.failures import OutcomeUnknown, PermanentFailure, TemporaryFailure, TransportFailure
from app.jobs import GiveUp, Interrupted, report_progress, stopping
from app.leases import Heartbeat
from app.mailing import PREVIEW_RECIPIENT
from app.models import DeliveryStatus, SendRun
from app.sendlog import (
    Found,
    Outcome,
    SendLog,
    count_due,
    due_subscribers,
    next_retry,
    refresh_planner_statistics,
)
from app.suppression import suppress_refused
from app.transports import SenderPool, describe_transport, mail_transport, retry_delay

UNKNOWN_IN_A_ROW_STOPS = 3
# Messages are declared as going out in groups that take about this long to send, SEND_RECORD_EVERY at
# most: at loopback speed that keeps commits few, and over a slow link each message is declared on its
# own, so a kill leaves only the one on the wire unknown.
GROUP_SECONDS = 0.02
LONGEST_DEFERRAL = 3600  # seconds between two attempts at a deferred message, at most (Postfix: 4000)


@dataclass
class Report:
    mailing: str
    via: str = ''
    due: int = 0
    sent: int = 0
    skipped: int = 0  # claimed by another run first
    failed: list = field(default_factory=list)  # (email, reason)
    unknown: list = field(default_factory=list)
    deferred: list = field(default_factory=list)
    aborted: str | None = None  # why the run stopped early on an error
    retry_safe: bool = True  # whether trying again without a human looking first makes sense
    stopped: bool = False  # asked to stop part-way (paused, or its worker shutting down)
    held: str | None = None  # why it sent nothing more: the mailing may not go out now (the sending window)
    retry_at: datetime | None = None  # the next attempt at this mailing's deferred deliveries, if any

    @property
    def ok(self):
        """Nothing failed, nothing unknown, nothing went wrong; deferred ones are tried again."""
        return not self.failed and not self.unknown and not self.aborted

    @property
    def done(self):
        return self.sent + self.skipped + len(self.failed) + len(self.unknown) + len(self.deferred)

    def counts(self):
        return (f'{self.mailing}: sent {self.sent}, skipped {self.skipped}, failed {len(self.failed)}, '
                f'unknown {len(self.unknown)}, deferred {len(self.deferred)}')

    def summary(self):
        return f'{self.counts()} (through {self.via})'

    def as_dict(self):
        return {'via': self.via, 'sent': self.sent, 'skipped': self.skipped, 'failed': len(self.failed),
                'unknown': len(self.unknown), 'deferred': len(self.deferred), 'aborted': self.aborted,
                'stopped': self.stopped, 'held': self.held, 'retry_at': self.retry_at}


def send(mailing, trigger, **options):
    """Send `mailing` to everyone due it, here and now, and say how it went: the one way any caller
    sends. `trigger` (cli, schedule, admin, job, rq) is kept with the run; `options` go to MailingSend.
    :return: the Report.  :raise TemplateError, jinja2.TemplateError: it cannot be composed at all (nothing
    was claimed)."""
    with _tuned_for_sending(), SenderPool(current_app.config['MAIL_CONCURRENCY']) as pool:
        return MailingSend(mailing, pool, trigger, **options).run()


def send_as_job(mailing, trigger, should_stop=stopping, **options):
    """send(), as a job (app/jobs.py): progress for the admin page; a retry with back-off when the send
    stopped on an error (the next attempt carries on: nothing is sent twice), and a failure, for an admin
    to look at, when retrying could only make more unknowns; back to the queue at once when its worker
    shuts down.  :return: the Report."""
    report = send(mailing, trigger, should_stop=should_stop, on_batch=lambda r: report_progress(r.done, r.due),
                  **options)
    if report.aborted:
        raise (TemporaryFailure if report.retry_safe else GiveUp)(report.aborted)
    if report.stopped and stopping():
        raise Interrupted
    return report


def _folder_refusal():
    """A database that has sent real mail is not written into the folder by a process that merely lacks
    the mail settings (MAIL_TRANSPORT=folder still does it on purpose).  :return: why not, or None."""
    config = current_app.config
    if mail_transport(config) != 'folder' or config.get('MAIL_TRANSPORT'):
        return None
    real = db.session.execute(sa.select(SendRun.via, SendRun.started_at).where(~SendRun.via.startswith('folder'))
                              .order_by(SendRun.id.desc()).limit(1)).first()
    if real is None:
        return None
    return (f'stopped before sending: this process has no mail settings, but this database sent through '
            f'{real.via} on {real.started_at:%Y-%m-%d}. Set MAIL_SERVER or SENDGRID_API_KEY as for the other '
            'processes, or MAIL_TRANSPORT=folder to write mail into the folder on purpose.')


@contextlib.contextmanager
def _tuned_for_sending():
    """A send mostly waits on sockets. A thread whose reply has come takes the GIL back within 0.5 ms,
    not the default 5, or composing the next messages starves the senders; and what is loaded by now
    (Flask, SQLAlchemy, the templates) is kept out of the collector's full passes, which otherwise scan
    all of it every few thousand messages while the connection waits (bench/README.md)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        sys.setswitchinterval(interval)


def check_templates(mailing):
    """Compose the mailing once for a made-up subscriber before claiming anyone: a broken template
    stops a run (or a queued send) while it holds no subscriber.  :raise TemplateError, jinja2 errors:"""
    mailing.compose(PREVIEW_RECIPIENT)


class Outgoing:
    """One claimed delivery's message, composed on first use, or ahead of it: over one SMTP connection
    each message is prepared, step by step, while the server is still busy with the one before it
    (`prepare`, called between a command and its reply). Each step must stay short, so that the server
    does not sit waiting for us; done in between messages instead, composing held the connection idle
    (bench/README.md, bench/interleaved.py)."""

    def __init__(self, mailing, claimed):
        self.mailing, self.claimed = mailing, claimed
        self.delivery_id, self.recipient = claimed.delivery_id, claimed.recipient
        self._steps = iter((lambda: self.email, lambda: self.email.mime))

    @functools.cached_property
    def email(self):
        return self.mailing.compose(self.recipient)

    def prepare(self):
        """Take the next step, if any.  :return: whether there was one. A failure belongs to this message,
        not to the one on the wire: it is dropped here and raised again when this message is sent."""
        step = next(self._steps, None)
        if step is not None:
            with contextlib.suppress(Exception):
                step()
        return step is not None

    def outcome(self, status, answers=0, error=None, retry_after=0.0):
        return Outcome(self.delivery_id, self.recipient, status, answers, error and error[:2000], retry_after)


def sort_outcome(outgoing, exc, answers):
    """What a failure to send one message means for its delivery, and whether the run must stop: the
    same rule for every way out (app/failures.py). `answers`: those it had already, in this claim.
    :return: (Outcome, why the run must stop, or None)"""
    if isinstance(exc, TransportFailure):
        return outgoing.outcome(None), f'stopped, subscribers not sent are left due: {exc}'
    if isinstance(exc, TemporaryFailure):
        delay = retry_delay(outgoing.claimed.attempts + answers + 1, cap=LONGEST_DEFERRAL)
        return outgoing.outcome(DeliveryStatus.DEFERRED, answers, str(exc), delay), None
    if isinstance(exc, PermanentFailure):
        return outgoing.outcome(DeliveryStatus.FAILED, answers + 1, str(exc)), None
    if isinstance(exc, OutcomeUnknown):
        return outgoing.outcome(DeliveryStatus.UNKNOWN, answers + 1, str(exc)), None
    # A bug, not an answer from the way out. The senders turn anything raised after a message's end went
    # out into OutcomeUnknown, so nothing of this one went: it is left due, and the run stops.
    return outgoing.outcome(None), f'stopped by an unexpected error, subscribers not sent are left due: {exc!r}'


class MailingSend:
    """One run of one mailing over a SenderPool; `run()` returns its Report. For display, `on_batch(report)`
    is called after each batch is recorded, and `on_wait(held, seconds)` when the run waits for other
    runs' claims. `should_stop()`, asked after each batch, ends the run early. `start_after` (a
    subscriber id) spreads parallel runs over the list; `deferred_only` sends only the deferred
    deliveries whose time has come."""

    def __init__(self, mailing, pool, trigger, on_batch=None, on_wait=None, start_after=0, deferred_only=False,
                 should_stop=None):
        config = current_app.config
        self.mailing, self.pool, self.trigger = mailing, pool, trigger
        self.report = Report(mailing.key, via=describe_transport())
        self.on_batch = on_batch or (lambda report: None)
        self.should_stop = should_stop or (lambda: False)
        self.log = SendLog(mailing)
        self.claimer = _Claimer(self.log, config['SEND_BATCH_SIZE'], start_after, deferred_only,
                                on_wait or (lambda held, seconds: None))
        self.record_every, self.retries = config['SEND_RECORD_EVERY'], config['MAIL_RETRIES']
        self.unknown_in_a_row, self.pace = 0, None  # seconds a message takes on the wire, lately
        self.in_flight, self.outcomes, self.releases = {}, [], []  # {future: Outgoing}; answers not yet recorded

    def run(self):
        check_templates(self.mailing)
        if held := self.mailing.not_now():
            self.report.held = held
            return self.report
        self.log.start(self.trigger, self.report.via)
        if refusal := _folder_refusal():
            self.report.aborted = refusal
            self.log.finish(self.report)
            return self.report
        refresh_planner_statistics()
        self.report.due = count_due(self.mailing, with_retries=True)
        # Left open, even a read's transaction holds back PostgreSQL's clean-up of the rows this run
        # changes, and each of its statements then walks more dead row versions than the last.
        db.session.commit()
        database_failed = False
        try:
            with Heartbeat(self.log.renew, self.log.lease / 3, name='send-heartbeat'), \
                    ThreadPoolExecutor(1, thread_name_prefix='claims') as claims:
                batch = self._take(self._claim_on(claims, wait=True))
                while batch:
                    # Claim the next batch on a thread of its own while this one is on the wire, so the
                    # wire does not wait for it. No waiting for other runs there: two runs each holding
                    # a batch while waiting for the other's would only wait until their leases ran out.
                    upcoming = self._claim_on(claims, wait=False)
                    self._send(batch)
                    self.on_batch(self.report)
                    self.report.held = self.mailing.not_now()
                    self.report.stopped = not self.report.aborted and (self.should_stop() or bool(self.report.held))
                    if self.report.aborted or self.report.stopped:
                        self._cancel_queued()
                        self.log.release([outgoing.delivery_id for outgoing in self._take(upcoming)])
                        break
                    batch = self._take(upcoming)
                    if not batch:  # what is on the wire is recorded before waiting for other runs, if need be
                        self._finish()
                        batch = self._take(self._claim_on(claims, wait=True))
                reported = self.report.done
                self._finish()
                if self.report.done != reported:  # answers that came in after the last batch was reported
                    self.on_batch(self.report)
        except sa.exc.SQLAlchemyError as exc:
            # What this run holds stays claimed until its lease runs out: then the next run makes what it
            # was sending 'unknown' and sends the rest, exactly as if this run had been killed.
            self.report.aborted, database_failed = f'stopped: the database failed: {exc}', True
        finally:
            self.log.close()
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            self.report.retry_at = next_retry(self.mailing)
            self.log.finish(self.report, abandoned=database_failed)
            suppress_refused([email for email, _ in self.report.failed])
        return self.report

    def _claim_on(self, claims, wait):
        """The claimer's next batch, on the `claims` thread, in an app context (and so a session) of its own."""
        app = current_app._get_current_object()

        def claim():
            with app.app_context():
                return self.claimer.next(wait)
        return claims.submit(claim)

    def _take(self, future):
        """The batch a claim found, as Outgoing messages; what it settled on the way goes in the report."""
        found = future.result()
        self.report.skipped += found.skipped
        self.report.unknown += found.unknown
        self.report.failed += found.failed
        return [Outgoing(self.mailing, claimed) for claimed in found.claimed]

    def _send(self, batch):
        """Send a claimed batch (in the order of its delivery ids): declare up to record_every of it as
        going out, in one commit with the outcomes that came in since the last, hand those to the pool,
        and so on, keeping its connections busy; then record what has come in. It returns once the whole
        batch is handed over, its last messages maybe still on the wire, so that the next batch follows
        them on the same connections without a pause at the seam (_finish waits for them). What is left
        unsent when the run must stop is released."""
        waiting, declared = deque(batch), deque()
        while (waiting or declared) and not self.report.aborted:
            if not declared:
                size = max(self._group_size(), self.pool.capacity - len(self.in_flight))
                group = [waiting.popleft() for _ in range(min(size, len(waiting)))]
                if not self._checkpoint(sending=[outgoing.delivery_id for outgoing in group]):
                    waiting.extendleft(reversed(group))
                    break
                declared.extend(group)
            while declared and len(self.in_flight) < self.pool.capacity and not self.report.aborted:
                outgoing = declared.popleft()
                successor = (declared[0] if declared else waiting[0] if waiting else None) if self.pool.inline else None
                self.in_flight[self.pool.submit(self._send_one, outgoing, successor)] = outgoing
            if len(self.in_flight) >= self.pool.capacity:
                self._collect()
        self.releases += [outgoing.outcome(None) for outgoing in (*declared, *waiting)]
        self._collect(wait=False)
        self._checkpoint()

    def _collect(self, wait=True):
        """Take in every answer that has come for the messages in flight, waiting for one if told."""
        done, _ = concurrent.futures.wait(self.in_flight, timeout=None if wait else 0,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            del self.in_flight[future]
            outcome, stop, seconds = future.result()
            self._keep_pace(seconds)
            (self.releases if outcome.status is None else self.outcomes).append(outcome)
            self._judge(outcome, stop)
        if self.report.aborted:
            self._cancel_queued()

    def _cancel_queued(self):
        """What waits in a connection's queue has not started: when the run stops, it is left due, not sent."""
        for future in [future for future in self.in_flight if future.cancel()]:
            self.releases.append(self.in_flight.pop(future).outcome(None))

    def _finish(self):
        """Wait for every message still in flight, and record what came in and what was released."""
        while self.in_flight:
            self._collect()
        self._checkpoint()

    def _group_size(self):
        """How many messages to declare as going out in one commit: as many as the way out takes in
        GROUP_SECONDS, but enough to keep every connection busy."""
        if self.pace is None:
            return self.pool.size
        per_message = self.pace / self.pool.size
        return max(self.pool.size, min(self.record_every, int(GROUP_SECONDS / per_message) if per_message else
                                       self.record_every))

    def _keep_pace(self, seconds):
        """The time messages take on the wire lately (not counting the commits, which would shrink the
        groups as they slowed the run), each counting for at most GROUP_SECONDS: one message held up (a
        retry's back-off, the process paused) must not shrink the groups for the rest of the run."""
        seconds = min(seconds, GROUP_SECONDS)
        self.pace = seconds if self.pace is None else 0.9 * self.pace + 0.1 * seconds

    def _checkpoint(self, sending=()):
        """SendLog.checkpoint of the outcomes and releases that came in since the last, and the report kept
        from what it recorded.  :return: whether the run still holds its claims, and so may send `sending`."""
        outcomes, releases, self.outcomes, self.releases = self.outcomes, self.releases, [], []
        # What earlier groups still have on the wire is declared again with the new group: the run's row
        # keeps one list, and a kill must leave those unknown too, never due to be sent again.
        sending = [*(outgoing.delivery_id for outgoing in self.in_flight.values()), *sending]
        recorded, held = self.log.checkpoint(outcomes, sending, [outcome.delivery_id for outcome in releases])
        if not held:
            self.report.aborted = ('stopped: another run took this one over (it was stalled for longer than '
                                   'LEASE_SECONDS); what it was sending is recorded unknown')
        # An outcome not recorded was on a delivery that is no longer this run's: taken over with the run
        # (said above), or gone with its subscriber, whom an admin erased while their message was on the
        # wire, which is no reason to stop sending to everyone else.
        for outcome in outcomes:
            status = recorded.get(outcome.delivery_id)
            if status == DeliveryStatus.SENT:
                self.report.sent += 1
            elif status is not None:
                {DeliveryStatus.FAILED: self.report.failed, DeliveryStatus.UNKNOWN: self.report.unknown,
                 DeliveryStatus.DEFERRED: self.report.deferred}[status].append((outcome.recipient.email, outcome.error))
        return held

    def _judge(self, outcome, stop):
        """Whether an outcome stops the run (see 4 in the module docstring)."""
        self.unknown_in_a_row = self.unknown_in_a_row + 1 if outcome.status == DeliveryStatus.UNKNOWN else 0
        if self.unknown_in_a_row >= UNKNOWN_IN_A_ROW_STOPS and not stop:
            # Tried again automatically, it would only lose more answers.
            self.report.retry_safe = False
            stop = (f'stopped: {self.unknown_in_a_row} messages in a row got no answer after their data went out; '
                    'the way out may be taking mail without confirming it. Check it, then run again.')
        if stop and not self.report.aborted:
            self.report.aborted = stop

    def _send_one(self, sender, outgoing, successor):
        """Runs on a pool thread, which must not touch the database, or inline.
        :return: (Outcome, why the run must stop or None, seconds it took)"""
        started = time.monotonic()
        return *self._try_to_send(sender, outgoing, successor), time.monotonic() - started

    def _try_to_send(self, sender, outgoing, successor):
        answers = 0
        try:
            try:
                email = outgoing.email
            except Exception as exc:
                # Only this subscriber's data can break it here: check_templates composed the mailing for a
                # made-up subscriber before the run claimed anyone. So this one fails and the run goes on.
                raise PermanentFailure(f'cannot compose the message: {type(exc).__name__}: {exc}') from exc
            meanwhile, then = (successor.prepare, successor.recipient.email) if successor else (None, None)
            for attempt in itertools.count(1):
                try:
                    sender.send(email, meanwhile, then)
                    return outgoing.outcome(DeliveryStatus.SENT, answers + 1), None
                except TemporaryFailure as exc:
                    answers += not isinstance(exc, TransportFailure)
                    if attempt > self.retries:
                        raise
                    time.sleep(retry_delay(attempt))
        except Exception as exc:
            return sort_outcome(outgoing, exc, answers)


class _Claimer:
    """The next batch for one run, found on the claims thread: due subscribers after a cursor (coming
    back round to the start for a run that began part-way), then deferred deliveries whose time has
    come, then what dead runs left behind; with `wait`, waiting for other live runs' claims to be
    finished or to expire. The cursor is read and written on that thread alone."""

    def __init__(self, log, batch_size, start_after, deferred_only, on_wait):
        self.log, self.batch_size, self.on_wait = log, batch_size, on_wait
        self.after, self.wrapped, self.due_done = start_after, start_after == 0, deferred_only
        self.looked = False  # the last call looked for retries and leftovers, and found none

    def next(self, wait):
        """:return: Found, whose `claimed` is empty when nothing (else) is left for this run."""
        skipped, unknown, failed = 0, [], []
        while True:
            if not self.due_done:
                recipients = due_subscribers(self.log.mailing, self.after, self.batch_size)
                if recipients:
                    self.after = recipients[-1].client_id
                    claimed = self.log.claim(recipients)
                    skipped += len(recipients) - len(claimed)
                    if claimed:
                        return Found(claimed, skipped, unknown, failed)
                elif not self.wrapped:
                    self.after, self.wrapped = 0, True
                else:
                    self.due_done = True
                continue
            if not (wait and self.looked):  # right after looking, a waiting call waits first
                for look in (lambda: self.log.claim_deferred(self.batch_size), self.log.take_over):
                    found = look()
                    unknown, failed = unknown + found.unknown, failed + found.failed
                    if found.claimed:
                        self.looked = False
                        return Found(found.claimed, skipped, unknown, failed)
            self.looked = True
            if not wait or not self._wait_for_other_runs():
                return Found([], skipped, unknown, failed)
            self.looked = False

    def _wait_for_other_runs(self):
        """While another run still holds claims on this mailing, wait: it finishes them, or it dies and
        its lease runs out and this run takes them over. :return: False when nothing is left to wait for."""
        held, seconds = self.log.held_by_others()
        if not held:
            return False
        self.on_wait(held, seconds)
        time.sleep(min(max(seconds, 0.05), 1.0))
        return True
