"""Schedules inside the app, for hosts with no system cron (containers, PaaS): SCHEDULES, e.g.
`week1=0 9 * * mon; week2=0 9 * * tue`, in cron syntax, read in SCHEDULE_TIMEZONE (DST included, as cron
keeps it: Schedule.latest_due); or
`due=0 * * * *`, every stage as it is due for each subscriber (its Delay:, app/timing.py), hourly.

Every worker's clock thread calls fire_due_schedules() every few seconds. For each schedule it works out
the latest due time and applies the drip send as a job whose unique key is that due time; the
database's unique constraint lets exactly one insert win, however many workers tick at once, and the
row outlives restarts, so a due time never fires twice. A due time more than SCHEDULE_MAX_LATE seconds
in the past (the app was down) is recorded as a skipped job and logged, instead of a late blast."""
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from flask import current_app

from app.database import utcnow
from app.drip import DUE, available_stages, send_stage
from app.models import JobStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    stage: str
    cron: str

    def latest_due(self, now, zone):
        """The latest due time at or before `now` (naive UTC), as naive UTC. When summer time ends and the
        clock shows a time of day twice, it is due at the first only, as cron runs it: the key of a due time
        is UTC, and a second one would send a weekly stage again, or the next stage half an hour after it.
        A schedule with * in its minute or hour is due every hour that passes, the repeated one too. A time
        the clock skips when summer time begins is due once, at the jump (croniter's own answer, and cron's)."""
        local_now = now.replace(tzinfo=timezone.utc).astimezone(zone)
        due = croniter(self.cron, local_now).get_prev(datetime)
        if due.fold and self.at_a_time_of_day():
            due = due.replace(fold=0)
        return due.astimezone(timezone.utc).replace(tzinfo=None)

    def at_a_time_of_day(self):
        """Cron's own test for what it runs once in a repeated hour: neither minute nor hour starts with *."""
        minute, hour = croniter(self.cron).expressions[:2]
        return not (minute.startswith('*') or hour.startswith('*'))


def parse_schedules(text, stages):
    """'week1=0 9 * * mon; week2=...' -> [Schedule]. :raise ValueError: with what is wrong, so a bad
    setting stops the app at start-up instead of silently never sending."""
    schedules = []
    for entry in filter(None, (part.strip() for part in (text or '').split(';'))):
        stage, sep, cron = (piece.strip() for piece in entry.partition('='))
        if not sep or not cron:
            raise ValueError(f'SCHEDULES: {entry!r} should look like "week1=0 9 * * mon"')
        if stage not in stages and stage != DUE:
            raise ValueError(f'SCHEDULES: {stage!r} is not a drip stage with templates ({", ".join(stages)}), '
                             f'nor "{DUE}" (every stage as it is due)')
        if not croniter.is_valid(cron):
            raise ValueError(f'SCHEDULES: {cron!r} (for {stage}) is not a valid cron expression')
        schedules.append(Schedule(stage, cron))
    return schedules


def init_app(app):
    try:
        zone = ZoneInfo(app.config['SCHEDULE_TIMEZONE'])
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f'SCHEDULE_TIMEZONE: unknown time zone {app.config["SCHEDULE_TIMEZONE"]!r}') from exc
    with app.app_context():
        stages = available_stages()
    app.extensions['schedules'] = (parse_schedules(app.config['SCHEDULES'], stages), zone)


def fire_due_schedules(now=None):
    """Queue each schedule's latest due time unless it has been queued (or skipped) already.
    :return: the (stage, due time, 'queued' | 'skipped') this call decided."""
    schedules, zone = current_app.extensions['schedules']
    now, max_late = now or utcnow(), current_app.config['SCHEDULE_MAX_LATE']
    decided = []
    for schedule in schedules:
        due = schedule.latest_due(now, zone)
        late = (now - due).total_seconds()
        key = f'schedule:{schedule.stage}:{due:%Y-%m-%dT%H:%M}Z'
        if late <= max_late:
            if send_stage.apply_once(key, stage=schedule.stage, trigger='schedule'):
                log.info('schedule %s (%s): fired for %s UTC', schedule.stage, schedule.cron, due)
                decided.append((schedule.stage, due, JobStatus.QUEUED))
        elif send_stage.apply_once(key, status=JobStatus.SKIPPED, stage=schedule.stage, trigger='schedule', error=(
                f'not sent: {late / 3600:.1f} h past due when a worker next ran (SCHEDULE_MAX_LATE is '
                f'{max_late:.0f} s); the next due time is sent as usual')):
            log.warning('schedule %s (%s): skipped %s UTC, %.1f h past due (the app was not running)',
                        schedule.stage, schedule.cron, due, late / 3600)
            decided.append((schedule.stage, due, JobStatus.SKIPPED))
    return decided
