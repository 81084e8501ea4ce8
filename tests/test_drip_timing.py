"""Drip timing (app/timing.py): each stage a set time after the step before it, for each subscriber; every
due stage in one run, the latest first; the sending window. The clock is controlled through the data:
a test sets the moments its subscribers confirmed or received a stage in the past, and sets the window
around the real time of day."""
import signal
from collections import Counter
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from app import create_app
from app.database import utcnow
from app.drip import DripStage, available_stages, send_stage
from app.extensions import db
from app.jobs import run_due
from app.models import Client, Delivery, Job
from app.schedules import parse_schedules
from app.sending import send
from app.timing import TimingError, parse_duration, stage_delay
from config import Config

WEEK2 = 'Subject: Week 2 for {{ greeting_name }}\nDelay: 7 days\nWeek two. {{ unsubscribe_url }}\n'
WEEK3 = 'Subject: Week 3 for {{ greeting_name }}\nDelay: 7 days\nWeek three. {{ unsubscribe_url }}\n'


@pytest.fixture
def weekly(stage_templates):
    """week1 at once after confirming, week2 and week3 each seven days after the stage before."""
    stage_templates('week2', WEEK2, '<p>Week two.</p>')
    stage_templates('week3', WEEK3, '<p>Week three.</p>')


@pytest.fixture
def aged(app):
    """Move a subscriber's last step (their confirmation, or their delivery of `stage`) `days` back."""
    def age(emails, days, stage=None):
        then = utcnow() - timedelta(days=days)
        with app.app_context():
            ids = sa.select(Client.id).where(Client.email.in_(emails)).scalar_subquery()
            if stage is None:
                db.session.execute(sa.update(Client).where(Client.id.in_(ids)).values(email_confirmed_at=then))
            else:
                db.session.execute(sa.update(Delivery).where(Delivery.client_id.in_(ids), Delivery.mailing == stage)
                                   .values(sent_at=then))
            db.session.commit()
    return age


@pytest.fixture
def had(app, subscribers):
    """Subscribers who got stages 1..`stage` (recorded as a send leaves them), the last `days` ago."""
    def make(count, stage, days, start):
        emails = subscribers(count, start=start, num_newsletter=stage)
        then = utcnow() - timedelta(days=days)
        with app.app_context():
            clients = db.session.scalars(sa.select(Client.id).where(Client.email.in_(emails))).all()
            db.session.execute(sa.insert(Delivery), [
                {'client_id': client, 'mailing': f'week{n}', 'status': 'sent', 'attempts': 1,
                 'sent_at': then - timedelta(days=30 * (stage - n)), 'created_at': then}
                for client in clients for n in range(1, stage + 1)])
            db.session.commit()
        return emails
    return make


def received(smtp):
    """{email: [stage, ...]} in the order they arrived."""
    got = {}
    for message in smtp.messages:
        got.setdefault(message['To'], []).append(message['Message-ID'].split('.')[1])
    return got


@pytest.mark.parametrize('text, seconds', [
    ('7 days', 7 * 86400), ('36 hours', 36 * 3600), ('1 week 2 days', 9 * 86400), ('90 minutes', 5400),
    (' 1 day and 12 hours ', 36 * 3600), ('1 Week', 7 * 86400)])
def test_a_delay_is_written_in_words(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize('text', ['soon', '7', 'days', '7 fortnights', '3 days later', ''])
def test_a_delay_that_cannot_be_read_is_refused_with_an_example(text):
    with pytest.raises(TimingError, match='is not a duration such as "7 days"'):
        parse_duration(text)


def test_the_delay_is_the_line_after_the_subject_and_only_that_line(tmp_path):
    declared, undeclared, later, broken = (tmp_path / f'{name}.txt' for name in ('a', 'b', 'c', 'd'))
    declared.write_text('Subject: Hi\nDelay: 3 days\nText\n')
    undeclared.write_text('Subject: Hi\nText\n')
    later.write_text('Subject: Hi\nText\nDelay: 3 days\n')
    broken.write_text('Subject: Hi\nDelay: next Tuesday\nText\n')

    assert stage_delay(declared) == timedelta(days=3)
    assert stage_delay(undeclared) is None and stage_delay(later) is None
    with pytest.raises(TimingError, match=r'd\.txt: Delay: .*next Tuesday'):
        stage_delay(broken)


def test_week2_goes_only_to_those_who_got_week1_at_least_its_delay_ago(weekly, app, runner, smtp, subscribers, aged):
    emails = subscribers(4)
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    aged(emails[:2], days=8, stage='week1')
    aged(emails[2:3], days=6, stage='week1')
    smtp.messages.clear()

    result = runner.invoke(args=['send-newsletter-email', 'week2'])

    assert result.exit_code == 0, result.output
    assert sorted(smtp.recipients()) == emails[:2]
    assert 'Delay:' not in smtp.messages[0].get_body(('plain',)).get_content(), 'the line is not part of the text'
    with app.app_context():
        assert DripStage('week2').delay == timedelta(days=7)
        stages = dict(db.session.execute(sa.select(Client.email, Client.num_newsletter)).all())
    assert stages == {emails[0]: 2, emails[1]: 2, emails[2]: 1, emails[3]: 1}


def test_week1_waits_its_delay_after_the_confirmation(stage_templates, app, runner, smtp, subscribers, aged):
    stage_templates('week1', 'Subject: Welcome\nDelay: 2 days\nWelcome. {{ unsubscribe_url }}\n', '<p>Welcome.</p>')
    emails = subscribers(3)
    aged(emails[:1], days=3)

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert smtp.recipients() == emails[:1]


def test_due_sends_every_stage_latest_first_and_never_two_to_one_subscriber(weekly, app, runner, smtp,
                                                                             subscribers, had):
    new = subscribers(1, start=0)  # confirmed: week1 at once
    finished_week1 = had(1, stage=1, days=8, start=10)  # due week2
    yesterday = had(1, stage=1, days=1, start=15)  # waits for week2
    finished_week2 = had(1, stage=2, days=8, start=20)  # due week3

    result = runner.invoke(args=['send-newsletter-email', '--due'])
    again = runner.invoke(args=['send-newsletter-email', '--due'])

    assert result.exit_code == 0 and again.exit_code == 0, (result.output, again.output)
    assert received(smtp) == {new[0]: ['week1'], finished_week1[0]: ['week2'], finished_week2[0]: ['week3']}
    assert yesterday[0] not in received(smtp)
    summaries = [line.split(':')[0] for line in result.output.splitlines() if '(through SMTP' in line]
    assert summaries == ['week3', 'week2', 'week1'], result.output


def test_without_delays_due_still_sends_one_stage_per_subscriber_per_run(app, runner, smtp, subscribers):
    emails = subscribers(3)

    first = runner.invoke(args=['send-newsletter-email', '--due'])
    second = runner.invoke(args=['send-newsletter-email', '--due'])

    assert first.exit_code == 0 and second.exit_code == 0
    assert received(smtp) == {email: ['week1', 'week2'] for email in emails}


def test_a_stage_added_later_reaches_those_who_finished_the_one_before_at_least_its_delay_ago(
        stage_templates, app, runner, smtp, subscribers, aged):
    emails = subscribers(3, num_newsletter=1)
    assert runner.invoke(args=['send-newsletter-email', 'week2']).exit_code == 0
    aged(emails[:2], days=10, stage='week2')
    smtp.messages.clear()
    stage_templates('week3', WEEK3, '<p>Week three.</p>')  # written weeks after week2 went out

    result = runner.invoke(args=['send-newsletter-email', '--due'])

    assert result.exit_code == 0, result.output
    assert received(smtp) == {emails[0]: ['week3'], emails[1]: ['week3']}


def test_a_late_joiner_goes_through_the_stages_in_order_with_the_delays(weekly, app, runner, smtp, subscribers,
                                                                        aged):
    [late] = subscribers(1)

    def due_run():
        result = runner.invoke(args=['send-newsletter-email', '--due'])
        assert result.exit_code == 0, result.output
        return received(smtp).get(late, [])

    assert due_run() == ['week1']
    assert due_run() == ['week1'], 'week2 waits its seven days'
    aged([late], days=7, stage='week1')
    assert due_run() == ['week1', 'week2']
    aged([late], days=6, stage='week2')
    assert due_run() == ['week1', 'week2']
    aged([late], days=8, stage='week2')
    assert due_run() == ['week1', 'week2', 'week3']


def window_around_now(zone, hours_from_now, hours_long):
    """A SEND_WINDOW that opens `hours_from_now` from now, in the time zone named `zone`."""
    start = datetime.now(ZoneInfo(zone)) + timedelta(hours=hours_from_now)
    return f'{start:%H:%M}-{start + timedelta(hours=hours_long):%H:%M}'


def test_outside_the_sending_window_a_run_sends_nothing_and_says_why(settings, request, smtp):
    settings.update(SEND_WINDOW=window_around_now('America/New_York', 2, 3), SCHEDULE_TIMEZONE='America/New_York')
    request.getfixturevalue('subscribers')(2)

    result = request.getfixturevalue('runner').invoke(args=['send-newsletter-email', '--due'])

    assert result.exit_code == 0, result.output
    assert 'outside the sending window' in result.output and settings['SEND_WINDOW'] in result.output
    assert smtp.messages == []


def test_inside_the_sending_window_a_run_sends(settings, request, smtp):
    settings.update(SEND_WINDOW=window_around_now('Asia/Kolkata', -1, 3), SCHEDULE_TIMEZONE='Asia/Kolkata')
    emails = request.getfixturevalue('subscribers')(2)

    result = request.getfixturevalue('runner').invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert sorted(smtp.recipients()) == emails


class ClosesAfter:
    """A sending window that is open for the first `times` looks, then closed."""

    def __init__(self, times):
        self.times = times

    def is_open(self, now):
        self.times -= 1
        return self.times >= 0

    def __str__(self):
        return 'closing'


def test_a_window_that_closes_mid_run_stops_it_after_the_batch_on_the_wire(app, smtp, subscribers, promise_kept):
    emails = subscribers(30)  # three batches of ten
    with app.app_context():
        stage = DripStage('week1')
        object.__setattr__(stage, 'window', ClosesAfter(2))  # open at the start and after the first batch
        report = send(stage, 'cli')

    assert (report.sent, report.stopped) == (20, True) and 'outside the sending window (closing)' in report.held
    assert len(promise_kept('week1', emails).get(None, [])) == 10, 'the rest are left due'


def test_a_stage_whose_delay_cannot_be_read_is_not_sent_and_the_command_says_why(stage_templates, app, runner, smtp,
                                                                                 subscribers):
    stage_templates('week2', 'Subject: Week 2\nDelay: next week\nWeek two.\n', '<p>Week two.</p>')
    subscribers(2, num_newsletter=1)

    result = runner.invoke(args=['send-newsletter-email', 'week2'])

    assert result.exit_code == 1 and "week2 cannot be sent, nothing was: week2.txt: Delay: 'next week'" in result.output
    assert smtp.messages == []


UNSENDABLE_WEEK3 = [  # the newest stage, with a mistake in it: (its .txt, the reason it is not sent)
    pytest.param('Subject: Week 3\nDelay: next week\nWeek three.\n', "week3.txt: Delay: 'next week'", id='delay'),
    pytest.param('Week three, and no subject line.\n', 'week3.txt must start with a "Subject: ..." line', id='template'),
    # Longer than Python's timedelta holds (every run failed, on both databases), or than a database's calendar
    # reaches back from now: SQLite sent week3 at once, and on PostgreSQL every run failed, week1's and week2's too.
    pytest.param('Subject: Week 3\nDelay: 1000000000 days\nWeek three.\n', "week3.txt: Delay: '1000000000 days' is "
                 'longer than a drip can wait', id='past timedelta'),
    pytest.param('Subject: Week 3\nDelay: 1000000 weeks\nWeek three.\n', "week3.txt: Delay: '1000000 weeks' is "
                 'longer than a drip can wait', id='past the calendar'),
]


@pytest.mark.parametrize('week3, reason', UNSENDABLE_WEEK3)
def test_due_sends_the_other_stages_when_one_cannot_be_sent_and_exits_1_saying_why(stage_templates, app, runner,
                                                                                   smtp, subscribers, had, week3,
                                                                                   reason):
    stage_templates('week3', week3, '<p>Week three.</p>')
    new, ready = subscribers(2), had(2, stage=1, days=8, start=10)
    waiting_for_week3 = had(2, stage=2, days=8, start=20)

    result = runner.invoke(args=['send-newsletter-email', '--due'])

    assert result.exit_code == 1 and 'week3' in result.output and reason in result.output, result.output
    assert received(smtp) == {**{email: ['week1'] for email in new}, **{email: ['week2'] for email in ready}}
    assert not set(waiting_for_week3) & set(received(smtp))


@pytest.mark.parametrize('week3, reason', UNSENDABLE_WEEK3)
def test_the_due_job_sends_the_other_stages_when_one_cannot_be_sent_and_fails_saying_why(stage_templates, app, smtp,
                                                                                        subscribers, had, week3,
                                                                                        reason):
    stage_templates('week3', week3, '<p>Week three.</p>')
    new, ready = subscribers(2), had(2, stage=1, days=8, start=10)
    with app.app_context():
        send_stage.apply(stage='due', trigger='schedule')
        db.session.commit()
        run_due()
        job = db.session.scalars(sa.select(Job)).one()

    assert received(smtp) == {**{email: ['week1'] for email in new}, **{email: ['week2'] for email in ready}}
    assert job.status == 'failed' and 'week3' in job.error and reason in job.error, (job.status, job.error)


def test_the_job_a_schedule_fires_can_send_every_stage_as_it_is_due(weekly, app, smtp, subscribers, had):
    new, ready = subscribers(2), had(2, stage=1, days=8, start=10)
    with app.app_context():
        send_stage.apply(stage='due', trigger='schedule')
        db.session.commit()
        run_due()

    assert received(smtp) == {**{email: ['week1'] for email in new}, **{email: ['week2'] for email in ready}}


def test_one_schedule_can_send_every_stage_as_it_is_due(app):
    with app.app_context():
        [schedule] = parse_schedules('due=0 * * * *', available_stages())
    assert (schedule.stage, schedule.cron) == ('due', '0 * * * *')


@pytest.mark.parametrize('window', ['8-20', '08:00', '25:00-26:00', '09:00-09:00'])
def test_a_sending_window_that_cannot_be_read_stops_the_app_at_start_up(settings, window):
    settings.update(SEND_WINDOW=window)
    with pytest.raises(ValueError, match='SEND_WINDOW'):
        create_app(type('TestConfig', (Config,), settings))


def test_overlapping_due_runs_with_delays_send_each_stage_once(weekly, app, smtp, subscribers, had, flask_command,
                                                               promise_kept):
    new = subscribers(30)
    ready = had(30, stage=1, days=8, start=100)
    smtp.delay = 0.02  # ~1 s of sending each: the second run starts while the first is mid-way

    runs = [flask_command('send-newsletter-email', '--due', SEND_BATCH_SIZE='5')]
    assert smtp.wait_for(3) >= 3
    runs.append(flask_command('send-newsletter-email', '--due', SEND_BATCH_SIZE='5'))
    results = [run.communicate(timeout=120) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], results
    assert promise_kept('week1', new) == {'sent': new}
    assert promise_kept('week2', ready) == {'sent': ready}
    assert Counter(map(len, received(smtp).values())) == {1: 60}, 'one stage each in this run'


def test_a_killed_due_run_can_be_run_again_and_repeats_nothing(weekly, app, smtp, subscribers, had, flask_command,
                                                               promise_kept):
    new = subscribers(40)
    ready = had(40, stage=1, days=8, start=100)
    smtp.delay = 0.02

    doomed = flask_command('send-newsletter-email', '--due', SEND_BATCH_SIZE='10', LEASE_SECONDS='1')
    assert smtp.wait_for(50) >= 50, 'into week1, after all of week2'
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    rerun = flask_command('send-newsletter-email', '--due', SEND_BATCH_SIZE='10')
    out, err = rerun.communicate(timeout=120)

    outcome = {'week1': promise_kept('week1', new), 'week2': promise_kept('week2', ready)}
    unknown = outcome['week1'].get('unknown', []) + outcome['week2'].get('unknown', [])
    assert len(unknown) <= 11, 'at most a group, and the one on the wire'
    assert len(outcome['week1']['sent']) + len(outcome['week2']['sent']) + len(unknown) == 80
    assert rerun.returncode == (1 if unknown else 0), (out, err)
    assert max(map(len, received(smtp).values())) == 1, 'nobody got two stages'
