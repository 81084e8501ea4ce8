"""A real SMTP server on 127.0.0.1 (aiosmtpd) that records what it accepts and can be told to
misbehave the ways real servers do: refuse an address for good, refuse it for now, drop the
connection, or take its time."""
import asyncio
import socket
import threading
import time
from email import message_from_bytes, policy

from aiosmtpd.controller import Controller


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class MailSink:
    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()
        self.refuse_for_good = {}  # address -> SMTP reply
        self.refuse_for_now = {}  # address -> how many more times to answer 451
        self.drops = 0  # how many DATA commands to answer by hanging up
        self.delay = 0.0  # seconds to take over each message
        self.connections = 0
        self.port = free_port()
        self.controller = None

    def start(self):
        """Listen on the port (again, after stop(): a server back from an outage)."""
        self.controller = Controller(self, hostname='127.0.0.1', port=self.port)
        self.controller.start()
        return self

    def stop(self):
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self.lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            if address in self.refuse_for_good:
                return self.refuse_for_good[address]
            if self.refuse_for_now.get(address, 0) > 0:
                self.refuse_for_now[address] -= 1
                return '451 4.3.0 Mailbox busy, try again later'
        envelope.rcpt_tos.append(address)
        return '250 OK'

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            drop = self.drops > 0
            self.drops -= drop
        if drop:
            server.transport.close()
            return '421 4.4.2 Connection dropped'
        if self.delay:
            await asyncio.sleep(self.delay)
        message = message_from_bytes(envelope.content, policy=policy.default)
        with self.lock:
            self.messages.append(message)
        return '250 2.0.0 Accepted'

    def received_by(self, address):
        with self.lock:
            return [m for m in self.messages if m['To'] == address]

    def recipients(self):
        with self.lock:
            return [m['To'] for m in self.messages]

    def wait_for(self, count, timeout=30):
        """Until `count` messages have arrived; returns how many did (the caller asserts)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.messages)
