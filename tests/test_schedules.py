"""In-app schedules (app/schedules.py): cron syntax in a named time zone, exactly once per due time
however many workers tick, never again after a restart, and skipped (and logged) when far past due."""
import logging
import re
import time
from collections import Counter
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from app import create_app
from app.jobs import run_next
from app.schedules import Schedule, fire_due_schedules, parse_schedules
from config import Config
from tests.support.jobs import jobs


def run_bulk_jobs():
    """Run what the schedules queued, without a clock tick at the real time."""
    while run_next('bulk'):
        pass


@pytest.fixture
def hourly_settings(settings):
    settings.update(SCHEDULES='week1=0 * * * *', SCHEDULE_TIMEZONE='Europe/Paris')
    return settings


def wait_clear_of_the_hour():
    """The test fires 'the latest due time'; make sure all its workers see the same one."""
    now = datetime.now()
    if now.minute == 59 and now.second > 30:
        time.sleep(61 - now.second)


def test_a_schedule_fires_once_per_due_time_with_three_workers_and_not_again_after_a_restart(
        hourly_settings, request, smtp, subscribers, flask_command):
    app = request.getfixturevalue('app')
    emails = subscribers(25)
    wait_clear_of_the_hour()
    schedule_env = dict(SCHEDULES=hourly_settings['SCHEDULES'], SCHEDULE_TIMEZONE='Europe/Paris')

    workers = [flask_command('worker', '--once', **schedule_env) for _ in range(3)]
    outputs = [worker.communicate(timeout=120) for worker in workers]

    [job] = jobs(app)
    assert job.task == 'send_stage' and job.payload == {'stage': 'week1', 'trigger': 'schedule'}, outputs
    assert job.status == 'done', outputs
    assert job.unique_key.startswith('schedule:week1:') and job.unique_key.endswith(':00Z')
    assert Counter(smtp.recipients()) == Counter(emails), 'everyone once'

    out, err = flask_command('worker', '--once', **schedule_env).communicate(timeout=60)  # a restart

    assert len(jobs(app)) == 1 and len(smtp.messages) == 25, (out, err)


def test_a_due_time_far_in_the_past_is_skipped_and_logged_instead_of_sent_late(hourly_settings, request, smtp,
                                                                              subscribers, caplog):
    app = request.getfixturevalue('app')
    subscribers(3)
    app.config['SCHEDULE_MAX_LATE'] = 600
    caplog.set_level(logging.WARNING, logger='app.schedules')

    with app.app_context():
        due = Schedule('week1', '0 * * * *').latest_due(datetime(2026, 11, 23, 8, 10), ZoneInfo('Europe/Paris'))
        back_after_downtime = due + timedelta(minutes=45)
        decided = fire_due_schedules(now=back_after_downtime)
        again = fire_due_schedules(now=back_after_downtime + timedelta(minutes=1))
        run_bulk_jobs()

    assert decided == [('week1', due, 'skipped')] and again == []
    [job] = jobs(app)
    assert job.status == 'skipped' and '0.8 h past due' in job.error
    assert smtp.messages == [], 'no late blast'
    assert 'skipped 2026-11-23 08:00:00 UTC, 0.8 h past due' in caplog.text


def test_a_due_time_within_the_allowed_lateness_is_still_sent(hourly_settings, request, smtp, subscribers):
    app = request.getfixturevalue('app')
    subscribers(3)

    with app.app_context():
        due = Schedule('week1', '0 * * * *').latest_due(datetime(2026, 11, 23, 8, 10), ZoneInfo('Europe/Paris'))
        decided = fire_due_schedules(now=due + timedelta(minutes=20))
        run_bulk_jobs()

    assert decided == [('week1', due, 'queued')] and len(smtp.messages) == 3


@pytest.mark.parametrize('now, expected', [
    (datetime(2026, 3, 23, 12, 0), datetime(2026, 3, 23, 8, 0)),  # winter: Paris is UTC+1
    (datetime(2026, 3, 30, 12, 0), datetime(2026, 3, 30, 7, 0)),  # summer time began on the 29th: UTC+2
    (datetime(2026, 3, 30, 6, 59), datetime(2026, 3, 23, 8, 0)),  # before this week's 09:00 in Paris
])
def test_monday_nine_oclock_is_nine_oclock_in_the_named_time_zone_across_daylight_saving(now, expected):
    assert Schedule('week1', '0 9 * * mon').latest_due(now, ZoneInfo('Europe/Paris')) == expected


def due_times_through_the_night(cron, night):
    """The due times a worker's clock, ticking every five minutes from 23:00 UTC on `night` for five hours,
    finds for `cron` in Paris (the night's own, not those of the week before)."""
    start = datetime.combine(night, datetime.min.time()) + timedelta(hours=23)
    ticks = (start + timedelta(minutes=5 * n) for n in range(60))
    return sorted({due for due in (Schedule('week1', cron).latest_due(now, ZoneInfo('Europe/Paris')) for now in ticks)
                   if due > start})


@pytest.mark.parametrize('cron, night, expected', [
    # Summer time ends: 02:00-03:00 comes twice. A time of day in it is due at the first 02:30 only...
    ('30 2 * * sun', date(2026, 10, 24), [datetime(2026, 10, 25, 0, 30)]),
    # ...but an hourly schedule is due every hour that passes, the repeated one too.
    ('0 * * * *', date(2026, 10, 24), [datetime(2026, 10, 25, hour) for hour in range(4)]),
    # Summer time begins: the clock jumps from 02:00 to 03:00, and 02:30 is due once, at the jump.
    ('30 2 * * sun', date(2026, 3, 28), [datetime(2026, 3, 29, 1, 0)]),
    ('0 * * * *', date(2026, 3, 28), [datetime(2026, 3, 29, hour) for hour in range(4)]),
])
def test_on_the_nights_daylight_saving_changes_a_schedule_is_due_as_cron_would_run_it(cron, night, expected):
    assert due_times_through_the_night(cron, night) == expected


def test_weekly_cohorts_in_the_hour_repeated_when_summer_time_ends_go_out_once_and_a_week_apart(
        settings, request, smtp):
    settings.update(SCHEDULES='week2=0 2 * * sun; week1=30 2 * * sun', SCHEDULE_TIMEZONE='Europe/Paris')
    app = request.getfixturevalue('app')
    [newcomer] = request.getfixturevalue('subscribers')(1)

    now, fired = datetime(2026, 10, 24, 23, 0), []  # 01:00 in Paris, the night summer time ends
    with app.app_context():
        while now < datetime(2026, 10, 25, 3, 0):
            fired += fire_due_schedules(now=now)
            run_bulk_jobs()
            now += timedelta(minutes=5)

    assert [(stage, due) for stage, due, status in fired if status == 'queued'] == [
        ('week2', datetime(2026, 10, 25, 0, 0)), ('week1', datetime(2026, 10, 25, 0, 30))]
    assert [message['Message-ID'].split('.')[1] for message in smtp.messages] == ['week1'], 'week2 waits a week'


@pytest.mark.parametrize('setting, message', [
    ('week1 0 9 * * mon', 'should look like "week1=0 9 * * mon"'),
    ('week7=0 9 * * mon', "'week7' is not a drip stage"),
    ('week1=0 25 * * mon', 'not a valid cron expression'),
])
def test_a_bad_schedule_stops_the_app_at_start_up_with_what_is_wrong(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedules(setting, ['week1', 'week2'])


def test_an_unknown_schedule_time_zone_stops_the_app_at_start_up(settings):
    settings.update(SCHEDULE_TIMEZONE='Europe/Pariss')
    with pytest.raises(ValueError, match="unknown time zone 'Europe/Pariss'"):
        create_app(type('TestConfig', (Config,), settings))
