"""MAIL_RATE_LIMIT: messages per second, because providers (SES, SendGrid plans, many ISPs' relays)
refuse or throttle senders that go faster than they allow.

Each send reserves the next free slot on a schedule spaced 1/rate apart and waits for it. Alone, a
process keeps its schedule in memory. With REDIS_URL set the schedule lives in Redis and every
sending process (on any machine) reserves from the same one, so the limit holds in total."""
import threading
import time

import redis
from flask import current_app


def redis_client():
    """A Redis client with time-outs of its own (REDIS_TIMEOUT): without them a Redis that stops
    answering, rather than refusing, would hang the send that waits on it for ever."""
    timeout = current_app.config['REDIS_TIMEOUT']
    return redis.Redis.from_url(current_app.config['REDIS_URL'], socket_timeout=timeout,
                                socket_connect_timeout=timeout)


def rate_limiter():
    """The limiter the configuration asks for, or None when there is no limit."""
    rate = current_app.config['MAIL_RATE_LIMIT']
    if not rate:
        return None
    if current_app.config['REDIS_URL']:
        return SharedSchedule(redis_client(), rate)
    return LocalSchedule(rate)


class LocalSchedule:
    def __init__(self, rate, clock=time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep = 1.0 / rate, clock, sleep
        self.next_slot, self.lock = 0.0, threading.Lock()

    def reserve(self):
        """:return: seconds to wait before sending."""
        with self.lock:
            now = self.clock()
            slot = max(now, self.next_slot)
            self.next_slot = slot + self.interval
            return slot - now

    def acquire(self):
        self.sleep(self.reserve())


class SharedSchedule:
    """The slot arithmetic runs inside Redis (one Lua script, so atomic) on Redis's own clock, so
    processes on machines whose clocks disagree still share one schedule."""

    SCRIPT = """
    local now = redis.call('TIME')
    local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
    local slot = math.max(now_us, tonumber(redis.call('GET', KEYS[1]) or 0))
    redis.call('SET', KEYS[1], slot + tonumber(ARGV[1]), 'PX', 60000)
    return slot - now_us
    """

    def __init__(self, client, rate, key='newsletter:mail-rate', sleep=time.sleep):
        self.interval_us, self.key, self.sleep = int(1_000_000 / rate), key, sleep
        self.script = client.register_script(self.SCRIPT)

    def reserve(self):
        return self.script(keys=[self.key], args=[self.interval_us]) / 1_000_000

    def acquire(self):
        self.sleep(self.reserve())
