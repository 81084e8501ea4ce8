"""The drip: stage `weekN` goes to every active, confirmed subscriber who has received stage N-1, and
moves them on to N. The stages are the templates in STAGES_FOLDER (by default the app's own
templates/emails/newsletter/): adding week3.txt and week3.html adds week3, with no code change. Cron
sends a stage with `flask send-newsletter-email` (app/cli.py); schedules and admins, with the send_stage
job below."""
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import sqlalchemy as sa
from flask import current_app

from app.email import greeting_name, make_message_id, render_email
from app.jobs import Reschedule, define_task
from app.links import list_unsubscribe_headers, unsubscribe_url
from app.mailing import address_digest
from app.models import Client
from app.sending import send_as_job

STAGE_NAME = re.compile(r'week([1-9][0-9]*)')
TEMPLATE_PREFIX = 'stages'  # stage weekN renders from the templates stages/weekN.txt and .html


def init_app(app):
    """Serve STAGES_FOLDER's templates as stages/…, beside the app's own (which they may extend: an
    operator's stages can live outside the source tree and still use emails/_layout.html)."""
    stages = jinja2.PrefixLoader({TEMPLATE_PREFIX: jinja2.FileSystemLoader(app.config['STAGES_FOLDER'])})
    app.jinja_env.loader = jinja2.ChoiceLoader([stages, app.jinja_env.loader])


def available_stages(app=None):
    """The stages there are templates for (in `app`'s STAGES_FOLDER, by default the current app's), in order."""
    folder = Path((app or current_app).config['STAGES_FOLDER'])
    names = {path.stem for path in folder.glob('week*.txt')
             if STAGE_NAME.fullmatch(path.stem) and path.with_suffix('.html').exists()}
    return sorted(names, key=stage_number)


def stage_number(name):
    return int(STAGE_NAME.fullmatch(name).group(1))


@dataclass(frozen=True)
class DripStage:
    """Stage `weekN` of the drip, as a Mailing. Sending it advances `num_newsletter`, which is what
    makes the subscriber due the next stage."""
    key: str
    number: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, 'number', stage_number(self.key))

    def conditions(self):
        return Client.active, Client.email_confirmed_at.is_not(None), Client.num_newsletter == self.number - 1

    def message_id(self, recipient):
        return make_message_id('newsletter', self.key, recipient.client_id, address_digest(recipient.email))

    def compose(self, recipient):
        link = unsubscribe_url(recipient.client_id)
        return render_email(
            f'{TEMPLATE_PREFIX}/{self.key}', recipient.email, self.message_id(recipient),
            headers=list_unsubscribe_headers(link, recipient.client_id),
            email=recipient.email, greeting_name=greeting_name(recipient.email), unsubscribe_url=link)

    def advance(self, client_ids):
        """From N-1 to N only: a subscriber moved on by anything else in the meantime is left alone, so
        a stage can never be recorded as sent to someone the drip then skips past or sends back."""
        clients = Client.__table__
        return (sa.update(clients).where(clients.c.id.in_(client_ids), clients.c.num_newsletter == self.number - 1)
                .values(num_newsletter=self.number))


@define_task(queue='bulk')
def send_stage(stage, trigger='admin', deferred_only=False):
    """A drip stage sent by a schedule or an admin (the same send as `flask send-newsletter-email`), or
    its deferred deliveries tried again. Deferred ones come back as a job of their own, so that the stage
    itself never goes out again at an hour nobody chose."""
    report = send_as_job(DripStage(stage), trigger, deferred_only=deferred_only)
    if report.retry_at and not report.stopped:
        if deferred_only:
            raise Reschedule(report.retry_at, report.as_dict())
        queue_retry(stage, report.retry_at)
    return report.as_dict()


def queue_retry(stage, at):
    """Outside a job (cron, RQ), the drip stage's deferred deliveries come back as a job at `at`, so that
    a greylisted subscriber gets this week's stage in minutes rather than at next week's run.
    :return: True if this call queued it (one job per stage and time)."""
    return send_stage.apply_once(f'retry:{stage}:{at:%Y-%m-%dT%H:%M:%S}', run_after=at, stage=stage, trigger='retry',
                                 deferred_only=True)
