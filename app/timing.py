"""When a drip stage may go out: a set time after the step before it, for each subscriber, and only
inside the sending window.

A stage's delay is written in its own .txt, on the line after its Subject: (`Delay: 7 days`): week1's
counts from the subscriber's confirmation, weekN's from when weekN-1 was delivered to them (its
`sent_at` in the send log). So the spacing follows each subscriber, not the order cron fires in, and a
stage added later reaches those who finished the one before it at least its delay ago. A stage with no
Delay: line goes to everyone who has the stage before it, as soon as it is sent.

The window (SEND_WINDOW, e.g. `08:00-20:00`, read in SCHEDULE_TIMEZONE) keeps stages from going out at
3 a.m.: a run outside it sends nothing and says why, and a run that reaches its end stops after the
batch on the wire, leaving the rest due for the next run. Broadcasts and confirmation mail are not held
back: an admin chose a broadcast's time, and a confirmation is awaited."""
import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

UNITS = {'minute': 60, 'hour': 3600, 'day': 86400, 'week': 7 * 86400}
DURATION = re.compile(r'(\d+)\s*(minute|hour|day|week)s?', re.IGNORECASE)
DELAY_LINE = re.compile(r'Delay:(.*)')
WINDOW = re.compile(r'\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*')


# The longest delay a stage may declare. The wait is worked out on the database's clock, as now minus the
# delay: SQLite's calendar starts at the year 0 (before it, its answer was NULL, and a weekN with such a delay
# went out at once), PostgreSQL's in 4713 BC (before it, every run of every stage failed), and Python's
# timedelta holds a little under 2.74 million years.
MAX_DELAY = timedelta(days=36525)


class TimingError(ValueError):
    """A delay or a window written so that it cannot be read, in words for the operator."""


def parse_duration(text):
    """'7 days', '36 hours', '1 week 2 days', '90 minutes' -> timedelta.  :raise TimingError:"""
    parts = DURATION.findall(text)
    if not parts or DURATION.sub('', text).strip(' ,and'):
        raise TimingError(f'{text.strip()!r} is not a duration such as "7 days", "36 hours" or "1 week 2 days"')
    seconds = sum(int(count) * UNITS[unit.lower()] for count, unit in parts)
    if seconds > MAX_DELAY.total_seconds():
        raise TimingError(f'{text.strip()!r} is longer than a drip can wait ({MAX_DELAY.days // 365} years at most)')
    return timedelta(seconds=seconds)


def stage_delay(template):
    """The delay a stage's .txt (`template`, a Path) declares on the line after its Subject:, or None.
    :raise TimingError: naming the file."""
    lines = template.read_text().splitlines()[1:2]
    if not lines or not (declared := DELAY_LINE.fullmatch(lines[0].strip())):
        return None
    try:
        return parse_duration(declared.group(1))
    except TimingError as exc:
        raise TimingError(f'{template.name}: Delay: {exc}') from None


def describe_delay(delay):
    """timedelta -> '7 days', '1 day 12 hours', for admins."""
    seconds, words = int(delay.total_seconds()), []
    for unit in ('day', 'hour', 'minute'):
        count, seconds = divmod(seconds, UNITS[unit])
        if count:
            words.append(f'{count} {unit}{"s" if count > 1 else ""}')
    return ' '.join(words) or 'none'


@dataclass(frozen=True)
class SendingWindow:
    """The hours of the day, in `zone`, in which drip stages may go out; it may span midnight."""
    opens: time
    closes: time
    zone: ZoneInfo

    @classmethod
    def parse(cls, text, zone_name):
        """'08:00-20:00' -> SendingWindow, or None for ''.  :raise TimingError:"""
        if not (text or '').strip():
            return None
        match = WINDOW.fullmatch(text)
        try:
            zone = ZoneInfo(zone_name)
            opens, closes = time(int(match[1]), int(match[2])), time(int(match[3]), int(match[4]))
        except (TypeError, ValueError, ZoneInfoNotFoundError) as exc:
            raise TimingError(f'SEND_WINDOW: {text!r} should look like "08:00-20:00" (hours in '
                              f'SCHEDULE_TIMEZONE, {zone_name})') from exc
        if opens == closes:
            raise TimingError(f'SEND_WINDOW: {text!r} opens and closes at the same time')
        return cls(opens, closes, zone)

    def is_open(self, now):
        """Whether `now` (naive UTC) is inside the window."""
        local = now.replace(tzinfo=timezone.utc).astimezone(self.zone).time()
        if self.opens < self.closes:
            return self.opens <= local < self.closes
        return local >= self.opens or local < self.closes

    def __str__(self):
        return f'{self.opens:%H:%M}-{self.closes:%H:%M} {self.zone.key}'


def outside(window, now=None):
    """Why nothing may go out now, or None: the window is open (or there is none)."""
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    if window is None or window.is_open(now):
        return None
    return f'outside the sending window ({window}): nothing sent; the next run inside it sends'
