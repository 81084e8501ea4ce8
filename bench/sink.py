"""An SMTP server (aiosmtpd) in a process of its own that accepts and counts messages per recipient,
with an optional per-message delay to imitate a remote server."""
import asyncio
import multiprocessing
import threading
import time
from collections import Counter

from aiosmtpd.controller import Controller


class _Counting:
    def __init__(self, delay):
        self.delay, self.received, self.lock = delay, Counter(), threading.Lock()
        self.first = self.last = None

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            self.received.update(envelope.rcpt_tos)
            self.last = time.monotonic()
            self.first = self.first or self.last
        return '250 OK'


def _serve(port, delay, commands, replies):
    handler = _Counting(delay)
    controller = Controller(handler, hostname='127.0.0.1', port=port)
    controller.start()
    replies.put('ready')
    for command in iter(commands.get, 'stop'):
        with handler.lock:
            replies.put((dict(handler.received), handler.first, handler.last))
            if command == 'reset':
                handler.received.clear()
                handler.first = handler.last = None
    controller.stop()


class Sink:
    """`counts()` returns ({recipient: messages received}, first arrival, last arrival) in monotonic
    seconds; `reset()` also starts counting afresh."""

    def __init__(self, port, delay=0.0):
        self.port = port
        self.commands, self.replies = multiprocessing.Queue(), multiprocessing.Queue()
        self.process = multiprocessing.Process(target=_serve, args=(port, delay, self.commands, self.replies),
                                               daemon=True)

    def __enter__(self):
        self.process.start()
        assert self.replies.get(timeout=30) == 'ready'
        return self

    def __exit__(self, *exc_info):
        self.commands.put('stop')
        self.process.join(timeout=10)

    def counts(self):
        self.commands.put('count')
        return self.replies.get(timeout=60)

    def reset(self):
        self.commands.put('reset')
        return self.replies.get(timeout=60)
