"""The drip: stage `weekN` goes to every active, confirmed subscriber who has received stage N-1, and
moves them on to N. The stages are the templates in STAGES_FOLDER (by default the app's own
templates/emails/newsletter/): adding week3.txt and week3.html adds week3, with no code change."""
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import sqlalchemy as sa
from flask import current_app

from app.email import make_message_id, render_email
from app.links import list_unsubscribe_headers, unsubscribe_url
from app.mailing import address_digest
from app.models import Client, greeting_name

STAGE_NAME = re.compile(r'week([1-9][0-9]*)')
TEMPLATE_PREFIX = 'stages'  # stage weekN renders from the templates stages/weekN.txt and .html


def init_app(app):
    """Serve STAGES_FOLDER's templates as stages/…, beside the app's own (which they may extend: an
    operator's stages can live outside the source tree and still use emails/_layout.html)."""
    stages = jinja2.PrefixLoader({TEMPLATE_PREFIX: jinja2.FileSystemLoader(app.config['STAGES_FOLDER'])})
    app.jinja_env.loader = jinja2.ChoiceLoader([stages, app.jinja_env.loader])


def available_stages():
    """The stages there are templates for, in order."""
    folder = Path(current_app.config['STAGES_FOLDER'])
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
