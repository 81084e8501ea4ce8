"""The drip: stage `weekN` goes to every active, confirmed subscriber who has received stage N-1 (and
has waited the stage's delay since, if it declares one: app/timing.py), and moves them on to N. The
stages are the templates in STAGES_FOLDER (by default the app's own templates/emails/newsletter/):
adding week3.txt and week3.html adds week3, with no code change. Cron sends a stage with `flask
send-newsletter-email` (app/cli.py), or every stage that is due with `--due`; schedules and admins, with
the send_stage job below."""
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import jinja2
import sqlalchemy as sa
from flask import current_app

from app.email import TemplateError, greeting_name, make_message_id, render_email
from app.extensions import db
from app.jobs import GiveUp, Reschedule, define_task
from app.leases import db_later
from app.links import list_unsubscribe_headers, unsubscribe_url
from app.mailing import address_digest
from app.models import Client, Delivery, DeliveryStatus
from app.sending import send_as_job
from app.suppression import not_suppressed
from app.timing import SendingWindow, TimingError, outside, stage_delay

STAGE_NAME = re.compile(r'week([1-9][0-9]*)')
TEMPLATE_PREFIX = 'stages'  # stage weekN renders from the templates stages/weekN.txt and .html
DUE = 'due'  # every stage, as far as it is due for each subscriber, the latest stages first
# A stage that cannot be sent as it is written (its Delay: line, its templates), found before anyone is
# claimed: only its author can mend it, so it is reported and the other stages still go.
UNSENDABLE = (TimingError, TemplateError, jinja2.TemplateError)


class NoStages(ValueError):
    """STAGES_FOLDER holds no stage: a drip that sends nothing there must say so, not report success."""


def init_app(app):
    """Serve STAGES_FOLDER's templates as stages/…, beside the app's own (which they may extend: an
    operator's stages can live outside the source tree and still use emails/_layout.html).
    :raise NoStages: at start-up, for a folder mistyped or emptied, instead of a drip that sends nothing."""
    stages_there_are(app)
    stages = jinja2.PrefixLoader({TEMPLATE_PREFIX: jinja2.FileSystemLoader(app.config['STAGES_FOLDER'])})
    app.jinja_env.loader = jinja2.ChoiceLoader([stages, app.jinja_env.loader])
    app.extensions['sending_window'] = SendingWindow.parse(app.config['SEND_WINDOW'], app.config['SCHEDULE_TIMEZONE'])


def available_stages(app=None):
    """The stages there are templates for (in `app`'s STAGES_FOLDER, by default the current app's), in order."""
    folder = Path((app or current_app).config['STAGES_FOLDER'])
    names = {path.stem for path in folder.glob('week*.txt')
             if STAGE_NAME.fullmatch(path.stem) and path.with_suffix('.html').exists()}
    return sorted(names, key=stage_number)


def stages_there_are(app=None):
    """available_stages(), where none is an error.  :raise NoStages: naming STAGES_FOLDER and what is wrong."""
    if stages := available_stages(app):
        return stages
    folder = Path((app or current_app).config['STAGES_FOLDER'])
    why = 'holds no stages (weekN.txt, each with its weekN.html)' if folder.is_dir() else 'does not exist'
    raise NoStages(f'STAGES_FOLDER: {folder} {why}')


def stage_number(name):
    return int(STAGE_NAME.fullmatch(name).group(1))


def latest_first():
    """The stages in the order `--due` sends them: a subscriber who gets a stage in a run is then past
    the stages this run has still to send, so nobody gets two stages in one run.  :raise NoStages:"""
    return stages_there_are()[::-1]


@dataclass(frozen=True)
class DripStage:
    """Stage `weekN` of the drip, as a Mailing. Sending it advances `num_newsletter`, which is what
    makes the subscriber due the next stage (once its delay has passed)."""
    key: str
    number: int = field(init=False)
    delay: timedelta | None = field(init=False)  # after the step before, per subscriber: app/timing.py
    window: SendingWindow | None = field(init=False, compare=False)

    def __post_init__(self):
        template = Path(current_app.config['STAGES_FOLDER']) / f'{self.key}.txt'
        object.__setattr__(self, 'number', stage_number(self.key))
        object.__setattr__(self, 'delay', stage_delay(template) if template.exists() else None)
        object.__setattr__(self, 'window', current_app.extensions['sending_window'])

    def conditions(self, after=0):
        return *self.reached(), *self.waited(after)

    def reached(self):
        """Those who have the stage before it: its audience, due now or waiting for the delay."""
        return (Client.active, Client.email_confirmed_at.is_not(None), Client.num_newsletter == self.number - 1,
                not_suppressed())

    def waited(self, after=0):
        """The delay, on the database's clock: since the confirmation for week1; for weekN, no delivery
        of weekN-1 more recent than that (a subscriber with no record of it, from before the send log,
        has waited long enough)."""
        if not self.delay:
            return ()
        since = db_later(-self.delay.total_seconds())
        if self.number == 1:
            return (Client.email_confirmed_at <= since,)
        recent = sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.client_id > after,
                                              Delivery.mailing == f'week{self.number - 1}',
                                              Delivery.status == DeliveryStatus.SENT, Delivery.sent_at > since)
        return (~sa.exists(recent),)

    def not_now(self):
        return outside(self.window)

    def message_id(self, recipient):
        return make_message_id('newsletter', self.key, recipient.client_id, address_digest(recipient.email))

    def compose(self, recipient):
        link = unsubscribe_url(recipient.client_id, recipient.email)
        return render_email(
            f'{TEMPLATE_PREFIX}/{self.key}', recipient.email, self.message_id(recipient),
            headers=list_unsubscribe_headers(link, recipient.client_id, recipient.email),
            email=recipient.email, greeting_name=greeting_name(recipient.email), unsubscribe_url=link)

    def advance(self, client_ids):
        """From N-1 to N only: a subscriber moved on by anything else in the meantime is left alone, so
        a stage can never be recorded as sent to someone the drip then skips past or sends back."""
        clients = Client.__table__
        return (sa.update(clients).where(clients.c.id.in_(client_ids), clients.c.num_newsletter == self.number - 1)
                .values(num_newsletter=self.number))


def waiting(stage):
    """How many have the stage before `stage` but not yet its delay since: its due-later."""
    if not stage.delay:
        return 0
    logged = sa.select(Delivery.id).where(Delivery.client_id == Client.id, Delivery.mailing == stage.key)
    return db.session.scalar(sa.select(sa.func.count(Client.id)).where(
        *stage.reached(), ~sa.and_(*stage.waited()), ~sa.exists(logged)))


@define_task(queue='bulk')
def send_stage(stage, trigger='admin', deferred_only=False):
    """A drip stage sent by a schedule or an admin (the same send as `flask send-newsletter-email`), or
    its deferred deliveries tried again. Deferred ones come back as a job of their own, so that the stage
    itself never goes out again at an hour nobody chose. `stage` may be DUE: every stage, latest first."""
    if stage == DUE:
        return send_due(trigger)
    report = send_as_job(DripStage(stage), trigger, deferred_only=deferred_only)
    if report.retry_at and not report.stopped:
        if deferred_only:
            raise Reschedule(report.retry_at, report.as_dict())
        queue_retry(stage, report.retry_at)
    return report.as_dict()


def send_due(trigger):
    """Every stage, latest first. One that cannot be sent as written holds none of the others back; once
    they are sent, the job fails for good, naming it and why: trying again cannot mend a template, and
    the next due time sends it once its author has.  :raise GiveUp:"""
    sent, unsendable = {}, []
    for key in latest_first():
        try:
            sent[key] = send_stage.fn(key, trigger)
        except UNSENDABLE as exc:
            unsendable.append(f'{key}: {exc}')
    if unsendable:
        raise GiveUp(f'not sent: {"; ".join(unsendable)}. Sent to whoever was due: {", ".join(sent) or "no stage"}')
    return sent


def queue_retry(stage, at):
    """Outside a job (cron, RQ), the drip stage's deferred deliveries come back as a job at `at`, so that
    a greylisted subscriber gets this week's stage in minutes rather than at next week's run.
    :return: True if this call queued it (one job per stage and time)."""
    return send_stage.apply_once(f'retry:{stage}:{at:%Y-%m-%dT%H:%M:%S}', run_after=at, stage=stage, trigger='retry',
                                 deferred_only=True)
