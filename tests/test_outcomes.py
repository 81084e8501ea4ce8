"""How the send sorts what happened to one message (app/sending.py, sort_outcome), with no server at all:
the answer decides, and nothing is held against a subscriber the way out did not answer about."""
import pytest

from app import create_app
from app.failures import OutcomeUnknown, PermanentFailure, TemporaryFailure, TransportFailure
from app.mailing import Recipient
from app.models import DeliveryStatus
from app.sending import Outgoing, sort_outcome
from app.sendlog import Claimed
from config import Config


@pytest.fixture(scope='module')
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp('outcomes')
    settings = {'TESTING': True, 'INSTANCE_PATH': str(folder), 'SECRET_KEY': 'k', 'MAIL_TRANSPORT': 'folder',
                'SQLALCHEMY_DATABASE_URI': f'sqlite:///{folder}/db.sqlite', 'MAIL_RETRY_BACKOFF': 2, 'JOB_WORKER': 'off'}
    app = create_app(type('Settings', (Config,), settings))
    with app.app_context():
        yield app


def outgoing(attempts_before=0):
    return Outgoing(mailing=None, claimed=Claimed(7, Recipient(3, 'jane@example.com'), attempts_before))


def test_a_permanent_refusal_fails_that_subscriber_and_the_run_goes_on(app):
    outcome, stop = sort_outcome(outgoing(), PermanentFailure('550 no such user'), answers=0)
    assert (outcome.status, outcome.answers, outcome.error, stop) == (DeliveryStatus.FAILED, 1, '550 no such user', None)


def test_a_temporary_refusal_is_deferred_further_each_time_up_to_an_hour(app):
    first, stop = sort_outcome(outgoing(), TemporaryFailure('451 greylisted'), answers=4)
    later, _ = sort_outcome(outgoing(attempts_before=4), TemporaryFailure('451 greylisted'), answers=4)
    much_later, _ = sort_outcome(outgoing(attempts_before=100), TemporaryFailure('451 greylisted'), answers=4)

    assert (first.status, first.answers, stop) == (DeliveryStatus.DEFERRED, 4, None)
    assert first.retry_after == 2 * 2 ** 4 and later.retry_after == 2 * 2 ** 8 and much_later.retry_after == 3600


def test_no_answer_after_the_end_of_the_data_is_unknown_never_a_failure_to_retry(app):
    outcome, stop = sort_outcome(outgoing(), OutcomeUnknown('dropped after the dot'), answers=0)
    assert (outcome.status, outcome.answers, stop) == (DeliveryStatus.UNKNOWN, 1, None)


@pytest.mark.parametrize('failure, why', [
    (TransportFailure('cannot connect'), 'left due: cannot connect'),
    (RuntimeError('a bug'), "unexpected error, subscribers not sent are left due: RuntimeError('a bug')"),
])
def test_the_way_out_down_or_a_bug_leaves_the_subscriber_due_and_stops_the_run(app, failure, why):
    outcome, stop = sort_outcome(outgoing(), failure, answers=2)
    assert outcome.status is None, 'released: nothing is recorded against the subscriber'
    assert why in stop
