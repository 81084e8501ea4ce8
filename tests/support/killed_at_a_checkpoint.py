"""`flask --app main ARGS...`, as cron runs it, but the process SIGKILLs itself right after the first
checkpoint that declares going out both deliveries with higher ids and deliveries with lower ids than
others the run holds and has not declared: the moment a run moves from its new claims (high ids) to
older ones (deferred, or a dead run's), with messages of the first still on the wire. What it declared
is written as JSON to $KILL_REPORT first."""
import json
import os
import signal
import sys

import sqlalchemy as sa

sys.path.insert(0, os.getcwd())  # the repository: tests.conftest's flask_command runs there

from app.models import Delivery  # noqa: E402
from app.sendlog import SendLog  # noqa: E402

checkpoint = SendLog.checkpoint


def checkpoint_then_die_if_straddling(self, outcomes=(), sending=(), release=()):
    result = checkpoint(self, outcomes, sending, release)
    if sending:
        held = self._connection().execute(sa.select(Delivery.id).where(
            Delivery.claimed_by == self.owner, Delivery.status == 'claimed',
            Delivery.id.between(min(sending), max(sending)))).scalars().all()
        self._connection().rollback()
        if set(held) - set(sending):
            with open(os.environ['KILL_REPORT'], 'w') as report:
                json.dump({'declared': list(sending), 'held_between': sorted(set(held) - set(sending))}, report)
            os.kill(os.getpid(), signal.SIGKILL)
    return result


SendLog.checkpoint = checkpoint_then_die_if_straddling

if __name__ == '__main__':
    from flask.cli import main
    sys.argv = ['flask', '--app', 'main', *sys.argv[1:]]
    main()
