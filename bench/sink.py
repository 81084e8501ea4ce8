"""An SMTP server (aiosmtpd) in a process of its own that accepts and counts messages per recipient,
with an optional per-message delay to imitate a remote server. Messages to LIMIT_PREFIX addresses are
the transport-limit run's (bench/drip.py) and are counted apart, so that the app's duplicates, losses
and first-to-last rate stay exact while both share the server.

It advertises PIPELINING (RFC 2920) in its EHLO answer unless told not to, which aiosmtpd does not by
default: its reader already takes commands that arrive together one after another, and a client that
pipelines only does so with a server that says it may."""
import asyncio
import multiprocessing
import threading
import time
from collections import Counter

from aiosmtpd.controller import Controller

LIMIT_PREFIX = 'limit'


class _Counting:
    def __init__(self, delay, pipelining):
        self.delay, self.pipelining, self.received, self.limit_received = delay, pipelining, Counter(), 0
        self.lock = threading.Lock()
        self.first = self.last = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # this hook's job once it is defined
        if self.pipelining and '250-PIPELINING' not in responses:
            responses.insert(-1, '250-PIPELINING')  # before the last line, '250 HELP'
        return responses

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            app = [rcpt for rcpt in envelope.rcpt_tos if not rcpt.startswith(LIMIT_PREFIX)]
            self.limit_received += len(envelope.rcpt_tos) - len(app)
            if app:
                self.received.update(app)
                self.last = time.monotonic()
                self.first = self.first or self.last
        return '250 OK'


def _serve(port, delay, pipelining, commands, replies):
    handler = _Counting(delay, pipelining)
    controller = Controller(handler, hostname='127.0.0.1', port=port)
    controller.start()
    replies.put('ready')
    for command in iter(commands.get, 'stop'):
        with handler.lock:
            if command == 'progress':
                replies.put((handler.received.total(), handler.limit_received))
                continue
            replies.put((dict(handler.received), handler.first, handler.last))
            if command == 'reset':
                handler.received.clear()
                handler.limit_received = 0
                handler.first = handler.last = None
    controller.stop()


class Sink:
    """`counts()` returns ({recipient: messages received}, first arrival, last arrival) for the app's
    messages, in monotonic seconds; `reset()` also starts counting afresh; `progress()` returns
    (the app's messages, the limit run's messages) received so far."""

    def __init__(self, port, delay=0.0, pipelining=True):
        self.port = port
        self.commands, self.replies = multiprocessing.Queue(), multiprocessing.Queue()
        self.process = multiprocessing.Process(target=_serve, args=(port, delay, pipelining, self.commands,
                                                                    self.replies), daemon=True)

    def __enter__(self):
        self.process.start()
        assert self.replies.get(timeout=30) == 'ready'
        return self

    def __exit__(self, *exc_info):
        self.commands.put('stop')
        self.process.join(timeout=10)

    def counts(self):
        return self._ask('count')

    def reset(self):
        return self._ask('reset')

    def progress(self):
        return self._ask('progress')

    def _ask(self, command):
        self.commands.put(command)
        return self.replies.get(timeout=60)
