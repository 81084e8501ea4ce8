"""The send, the heart of the product. A mailing goes to every subscriber it is due to: drip stage
`weekN` (a DripStage, below) to every active, confirmed subscriber who has received stage N-1; a
broadcast (app/broadcasts.py) to everyone confirmed when it started. Both go through MailingSend.

How it keeps its promises, in the order the code below does things:

1. At most once per subscriber and mailing. Before a message goes out, its row in `deliveries`
   (unique per subscriber and mailing) is inserted and committed by this run. Two runs racing for the
   same subscriber (cron fired twice, an admin by hand while cron runs) both try the insert; one
   wins, the other counts the subscriber as skipped.
2. Resumable. Subscribers are claimed, sent and recorded a batch (SEND_BATCH_SIZE) at a time, and
   each batch's outcome is committed at once. While one batch is on the wire the next is claimed,
   but none of it is sent before the first is recorded. A run killed part-way leaves those claims
   behind; when their lease runs out, the next run takes them over and sends them. So only the
   batch in flight at the kill can arrive twice, and its messages carry a Message-ID made from
   mailing and subscriber, so a repeat is the same message. A run asked to stop (a paused broadcast,
   a worker shutting down) stops the same way, after recording its batch.
3. Failures. A temporary failure is retried MAIL_RETRIES times with back-off; if it persists the
   subscriber's claim is released and the next run tries again. A permanent one (SMTP 5xx) is
   recorded on that subscriber's delivery and the run goes on. If the way out itself stays down, the
   run stops, releases what it has not sent, and says so: nothing is lost, nothing is marked sent.
   An unexpected error (a bug) marks its one subscriber failed, and the run records its batch and stops.
4. Efficient. Subscribers are read by id in batches (never the whole table), messages go out over
   MAIL_CONCURRENCY reused connections, and the database sees four statements per batch, not per
   subscriber, with as many parameters whatever the batch's size. The next batch is claimed on a
   thread of its own while one is on the wire. Over one connection each message is composed while the
   server is still busy with the one before it (Outgoing), so the send stays close to the transport's
   own limit.
"""
import concurrent.futures
import contextlib
import functools
import hashlib
import itertools
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from flask import current_app

from app import db
from app.email import make_message_id, render_email
from app.leases import claim, lease_end, new_owner, renew
from app.links import list_unsubscribe_headers, unsubscribe_url
from app.models import Client, Delivery, among, greeting_name, insert_ignoring_conflicts, utcnow, values_table
from app.transports import PermanentFailure, TemporaryFailure, TransportFailure, retry_delay

STAGES_DIR = Path(__file__).parent / 'templates' / 'emails' / 'newsletter'
STAGE_NAME = re.compile(r'week([1-9][0-9]*)')


def available_stages():
    """The stages there are templates for, in order: adding week3.txt and week3.html adds week3."""
    names = {path.stem for path in STAGES_DIR.glob('week*.txt')
             if STAGE_NAME.fullmatch(path.stem) and path.with_suffix('.html').exists()}
    return sorted(names, key=stage_number)


def stage_number(name):
    return int(STAGE_NAME.fullmatch(name).group(1))


@dataclass(frozen=True)
class Recipient:
    client_id: int
    email: str


PREVIEW_RECIPIENT = Recipient(0, 'preview@example.com')


class DripStage:
    """Stage `weekN` of the drip, as a mailing for MailingSend. Sending it advances `num_newsletter`,
    which is what makes the subscriber due the next stage."""

    def __init__(self, name):
        self.key, self.number = name, stage_number(name)

    def conditions(self):
        return Client.active, Client.email_confirmed_at.is_not(None), Client.num_newsletter == self.number - 1

    def message_id(self, recipient):
        """Made from stage and subscriber, so a message sent again is recognisably the same."""
        return make_message_id('newsletter', self.key, recipient.client_id, address_digest(recipient.email))

    def compose(self, recipient):
        """The stage's email for one subscriber, with its personal unsubscribe link and headers."""
        link = unsubscribe_url(recipient.client_id)
        return render_email(
            f'emails/newsletter/{self.key}', recipient.email, self.message_id(recipient),
            headers=list_unsubscribe_headers(link, recipient.client_id),
            email=recipient.email, greeting_name=greeting_name(recipient.email), unsubscribe_url=link)

    def advance(self, client_ids):
        clients = Client.__table__
        return sa.update(clients).where(among(clients.c.id, client_ids)).values(num_newsletter=self.number)


def address_digest(email):
    """Part of a Message-ID: ties it to the address, so a subscriber row reused for another address
    never repeats an ID."""
    return hashlib.sha256(email.encode()).hexdigest()[:10]


class Outgoing:
    """One subscriber's message of a mailing, composed on first use, or ahead of it: over one SMTP
    connection each message is prepared, step by step, while the server is still busy with the one
    before it (`prepare`, called between a command and its reply). Each step must stay short, so that
    the server does not sit waiting for us. Done in between messages instead, composing and encoding
    held the connection idle: 0.70 of raw smtplib's speed against 0.84 (bench/interleaved.py, SQLite)."""

    def __init__(self, mailing, recipient):
        self.mailing, self.recipient = mailing, recipient
        self.message_id = mailing.message_id(recipient)
        self._steps = iter((lambda: self.email, lambda: self.email.mime))

    @functools.cached_property
    def email(self):
        return self.mailing.compose(self.recipient)

    def prepare(self):
        """Take the next step, if any. A failure belongs to this message, not to the one on the wire: it
        is dropped here and raised again when this message is sent."""
        step = next(self._steps, None)
        if step is not None:
            with contextlib.suppress(Exception):
                step()


@dataclass
class Report:
    mailing: str
    due: int = 0
    sent: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (email, reason)
    aborted: str | None = None
    stopped: bool = False  # asked to stop part-way (paused, or its worker shutting down)

    @property
    def ok(self):
        return not self.failed and not self.aborted

    def summary(self):
        return f'{self.mailing}: sent {self.sent}, skipped {self.skipped}, failed {len(self.failed)}'

    def as_dict(self):
        return {'sent': self.sent, 'skipped': self.skipped, 'failed': len(self.failed), 'aborted': self.aborted,
                'stopped': self.stopped}


def due_subscribers(mailing, after, limit):
    """The next `limit` subscribers by id after `after` who are due `mailing` and not claimed by any run."""
    # `client_id > after` repeats the outer bound so PostgreSQL starts its walk of the send log there
    # too, instead of from the beginning, for every batch.
    claimed = sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.mailing == mailing.key,
                                           Delivery.client_id > after)
    rows = db.session.execute(
        sa.select(Client.id, Client.email)
        .where(*mailing.conditions(), Client.id > after, ~sa.exists(claimed))
        .order_by(Client.id).limit(limit))
    return [Recipient(*row) for row in rows]


def spread_starts(mailing, runs):
    """Where `runs` parallel runs should start in the list of due subscribers (by id) so that they
    do not all contend for the same first batch."""
    due = count_due(mailing)
    starts = [0]
    for i in range(1, runs):
        starts.append(db.session.scalar(
            sa.select(Client.id).where(*mailing.conditions()).order_by(Client.id)
            .offset(max(due * i // runs - 1, 0)).limit(1)) or 0)
    return starts


def count_due(mailing):
    return db.session.scalar(sa.select(sa.func.count(Client.id)).where(*mailing.conditions()))


def iter_due(mailing):
    """Everyone due `mailing`, read a batch at a time (for --dry-run)."""
    after, batch = 0, current_app.config['SEND_BATCH_SIZE']
    while recipients := due_subscribers(mailing, after, batch):
        yield from recipients
        after = recipients[-1].client_id


def forget_failures(mailing):
    """Make permanently failed subscribers due again (after the admin fixed the cause)."""
    db.session.execute(sa.delete(Delivery).where(Delivery.mailing == mailing.key, Delivery.status == 'failed'))
    db.session.commit()


def refresh_planner_statistics():
    """On PostgreSQL, ANALYZE before a send. Subscribers are often imported in bulk just before one,
    and with statistics from before the import the planner sorts every remaining subscriber for each
    batch instead of walking the index in id order (bench/drip.py showed a 10,000-subscriber send
    take 30 times longer). Skipped with a warning where the database user may not analyze."""
    if db.engine.dialect.name != 'postgresql':
        return
    try:
        db.session.execute(sa.text('ANALYZE clients, deliveries'))
        db.session.commit()
    except sa.exc.DBAPIError as exc:
        db.session.rollback()
        current_app.logger.warning('could not ANALYZE before sending (the send may be slower): %s', exc)


def check_templates(mailing):
    """Compose the mailing once for a made-up subscriber before claiming anyone: a broken template
    stops a run (or a queued send) while it holds no subscriber.  :raise TemplateError, jinja2 errors:"""
    mailing.compose(PREVIEW_RECIPIENT)


class MailingSend:
    """One run of one mailing over a SenderPool. `run()` returns a Report. For display, `on_batch(report)`
    is called after each batch is recorded, and `on_wait(claimed, lease_until)` when the run waits for
    another run's claims. `should_stop()`, asked after each batch, ends the run early."""

    def __init__(self, mailing, pool, on_batch=None, on_wait=None, start_after=0, should_stop=None):
        self.mailing, self.pool, self.start_after = mailing, pool, start_after
        self.on_batch = on_batch or (lambda report: None)
        self.on_wait = on_wait or (lambda claimed, lease_until: None)
        self.should_stop = should_stop or (lambda: False)
        config = current_app.config
        self.batch_size, self.lease = config['SEND_BATCH_SIZE'], config['LEASE_SECONDS']
        self.retries = config['MAIL_RETRIES']
        self.owner = new_owner()
        self.report = Report(mailing.key)
        self.renew_at = 0.0

    def run(self):
        check_templates(self.mailing)
        refresh_planner_statistics()
        self.report.due = count_due(self.mailing)
        self.after, self.wrapped = self.start_after, self.start_after == 0
        with ThreadPoolExecutor(1, thread_name_prefix='claims') as claims:
            batch = self._claim_on(claims, wait=True).result()
            while batch:
                # Claim the next batch on a thread of its own while this one is on the wire, so the wire
                # does not wait for it. A claim reserves subscribers and sends nothing, and none of the
                # next batch is sent before this one is recorded: whatever crashes, only this batch's
                # messages can have gone out unrecorded. No waiting for other runs here: two runs each
                # holding an unrecorded batch while waiting for the other's would wait until their leases
                # ran out, then send each other's batch.
                upcoming = self._claim_on(claims, wait=False)
                self._finish(self._submit(batch))
                self.on_batch(self.report)
                if self.report.aborted or self.should_stop():
                    self.report.stopped = not self.report.aborted
                    self._record(released=[delivery_id for delivery_id, _ in upcoming.result()])
                    break
                batch = upcoming.result() or self._claim_on(claims, wait=True).result()
        return self.report

    def _claim_on(self, claims, wait):
        """_next_batch on the `claims` thread, in an app context (and so a database session) of its own."""
        app = current_app._get_current_object()

        def claim():
            with app.app_context():
                return self._next_batch(wait)
        return claims.submit(claim)

    def _next_batch(self, wait):
        """Claim the next batch of (delivery id, Outgoing). With `wait`, wait for other runs' claims
        to be finished or to expire.  :return: [] when nothing (else) is left for this run."""
        while True:
            recipients = due_subscribers(self.mailing, self.after, self.batch_size)
            if recipients:
                self.after = recipients[-1].client_id
                prepared = [Outgoing(self.mailing, recipient) for recipient in recipients]
                batch = self._claim(prepared)
                self.report.skipped += len(prepared) - len(batch)
                if batch:
                    return batch
            elif not self.wrapped:
                # A run that started part-way through the list (one of several workers) comes back
                # round for the subscribers before its starting point.
                self.after, self.wrapped = 0, True
            elif batch := self._take_over_expired_claims():
                return batch
            elif not wait or not self._wait_for_other_runs():
                return []

    def _claim(self, prepared):
        """Insert this run's claims; a subscriber another run claimed first is silently not ours."""
        deliveries = Delivery.__table__
        wanted = values_table([(o.recipient.client_id, o.message_id) for o in prepared],
                              client_id=sa.Integer, message_id=sa.String)
        rows = sa.select(wanted.c.client_id, wanted.c.message_id, sa.literal(self.mailing.key),
                         sa.literal('sending'), sa.literal(self.owner), sa.literal(lease_end(self.lease), sa.DateTime),
                         sa.literal(utcnow(), sa.DateTime), sa.literal(1))
        won = dict(db.session.execute(
            insert_ignoring_conflicts(deliveries, ['client_id', 'mailing'])
            .from_select(['client_id', 'message_id', 'mailing', 'status', 'claimed_by', 'lease_until', 'created_at',
                          'attempts'], rows.where(sa.true()))  # SQLite parses ON CONFLICT only after a WHERE
            .returning(deliveries.c.client_id, deliveries.c.id)).all())
        db.session.commit()
        self._lease_renewed()
        return [(won[o.recipient.client_id], o) for o in prepared if o.recipient.client_id in won]

    def _take_over_expired_claims(self):
        """Claims whose lease ran out belong to a run that died: take them over and send them again."""
        ids = claim(Delivery, Delivery.mailing == self.mailing.key, Delivery.status == 'sending',
                    owner=self.owner, seconds=self.lease, limit=self.batch_size)
        if not ids:
            return []
        self._lease_renewed()
        rows = db.session.execute(
            sa.select(Delivery.id, Client.id, Client.email, sa.and_(*self.mailing.conditions()))
            .join(Client, Client.id == Delivery.client_id).where(Delivery.id.in_(ids)).order_by(Client.id)).all()
        gone = [delivery_id for delivery_id, _, _, eligible in rows if not eligible]
        if gone:  # unsubscribed since the dead run claimed them
            self._record(released=gone)
        return [(delivery_id, Outgoing(self.mailing, Recipient(client_id, email)))
                for delivery_id, client_id, email, eligible in rows if eligible]

    def _wait_for_other_runs(self):
        """While another live run still holds claims on this mailing, wait: it finishes them, or it dies
        and its lease runs out and we take them over. :return: False when nothing is left to wait for."""
        claimed, soonest = db.session.execute(
            sa.select(sa.func.count(Delivery.id), sa.func.min(Delivery.lease_until))
            .where(Delivery.mailing == self.mailing.key, Delivery.status == 'sending',
                   Delivery.claimed_by != self.owner)
        ).one()
        db.session.commit()
        if not claimed:
            return False
        self.on_wait(claimed, soonest)
        time.sleep(min(max((soonest - utcnow()).total_seconds(), 0.05), 1.0))
        return True

    def _submit(self, batch):
        """Over one connection (an inline pool), each message's successor is prepared while it is sent."""
        successors = ([outgoing for _, outgoing in batch[1:]] + [None]) if self.pool.inline else [None] * len(batch)
        return [(self.pool.submit(self._send_with_retries, outgoing, successor), delivery_id, outgoing.recipient)
                for (delivery_id, outgoing), successor in zip(batch, successors, strict=True)]

    def _finish(self, sending):
        """Wait for a submitted batch, then record its outcome in one commit, whatever happened. Only
        this thread touches the database: it keeps the lease while it waits."""
        sent, failed, released = [], [], []
        try:
            self._wait_keeping_lease([future for future, _, _ in sending])
            for future, delivery_id, recipient in sending:
                try:
                    future.result()
                except concurrent.futures.CancelledError:
                    released.append(delivery_id)  # never started: the way out was down
                except TransportFailure as exc:
                    released.append(delivery_id)
                    self.report.aborted = f'stopped, subscribers not sent are left due: {exc}'
                except PermanentFailure as exc:
                    failed.append({'id': delivery_id, 'status': 'failed', 'error': str(exc)[:2000],
                                   'lease_until': None, 'claimed_by': None})
                    self.report.failed.append((recipient.email, str(exc)))
                except TemporaryFailure as exc:
                    released.append(delivery_id)
                    self.report.failed.append((recipient.email, f'will be retried by the next run: {exc}'))
                except Exception as exc:
                    # A bug, not an answer from the way out: whether it went is unknown, so it is kept as
                    # failed (never sent again unasked), the rest of the batch is recorded, and the run stops.
                    failed.append({'id': delivery_id, 'status': 'failed', 'error': repr(exc)[:2000],
                                   'lease_until': None, 'claimed_by': None})
                    self.report.failed.append((recipient.email, f'unexpected error: {exc!r}'))
                    self.report.aborted = f'stopped by an unexpected error: {exc!r}'
                else:
                    sent.append((delivery_id, recipient.client_id))
        finally:
            self._record(sent, failed, released)
            self.report.sent += len(sent)

    def _wait_keeping_lease(self, futures):
        """Wait for the batch; once the way out is down, give up on what has not started."""
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=self.lease / 3,
                                                    return_when=concurrent.futures.FIRST_EXCEPTION)
            if any(not f.cancelled() and isinstance(f.exception(), TransportFailure) for f in done):
                for future in pending:
                    future.cancel()
            if time.monotonic() > self.renew_at:
                self._keep_lease()

    def _send_with_retries(self, sender, outgoing, successor):
        """Runs on a pool thread, which must not touch the database; or, with an inline pool, on this
        thread, which then keeps the lease between attempts (each is bounded by MAIL_TIMEOUT)."""
        try:
            email = outgoing.email
        except Exception as exc:
            # Only this subscriber's data can break it here: check_templates composed the mailing for a
            # made-up subscriber before the run claimed anyone. So this one fails and the run goes on.
            raise PermanentFailure(f'cannot compose the message: {type(exc).__name__}: {exc}') from exc
        meanwhile = successor.prepare if successor else None
        for attempt in itertools.count(1):
            if self.pool.inline and time.monotonic() > self.renew_at:
                self._keep_lease()
            try:
                return sender.send(email, meanwhile)
            except TemporaryFailure:
                if attempt > self.retries:
                    raise
                self._back_off(retry_delay(attempt))

    def _back_off(self, seconds):
        """Sleep before a retry. Inline, in slices that keep the lease: a back-off may outlast it."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if self.pool.inline and time.monotonic() > self.renew_at:
                self._keep_lease()
            time.sleep(min(left, self.lease / 3))

    def _record(self, sent=(), failed=(), released=()):
        """One commit for the whole batch: sent ones advance, failed ones keep their reason, released
        ones become due again."""
        deliveries = Delivery.__table__
        if sent:
            delivery_ids, client_ids = zip(*sent, strict=True)
            db.session.execute(
                sa.update(deliveries).where(among(deliveries.c.id, delivery_ids))
                .values(status='sent', sent_at=utcnow(), lease_until=None, claimed_by=None))
            if (advance := self.mailing.advance(client_ids)) is not None:
                db.session.execute(advance)
        if failed:
            db.session.execute(sa.update(Delivery), list(failed))
        if released:
            db.session.execute(sa.delete(deliveries).where(among(deliveries.c.id, released)))
        db.session.commit()

    def _keep_lease(self):
        renew(Delivery, Delivery.status == 'sending', owner=self.owner, seconds=self.lease)
        self._lease_renewed()

    def _lease_renewed(self):
        # Renew once a third of the lease has passed, so a slow but live run never loses its claims.
        self.renew_at = time.monotonic() + self.lease / 3
