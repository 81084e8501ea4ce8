"""A real SMTP server on 127.0.0.1 (aiosmtpd) that records what it takes and misbehaves, per recipient,
the ways real servers do: refuse an address for good or for now (greylisting), hang up before the
end of the data, take a message and then hang up or fall silent instead of answering, or take its time
answering. It can offer STARTTLS (or speak TLS from the first byte) with a certificate of the test's
choosing.

A message counts as delivered (`messages`) once the server has taken it, whatever the client then
hears: exactly what a receiving server does when the connection drops after the final dot."""
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


def accept_until(listener, stopped, take):
    """Hand each connection `listener` accepts to `take(connection)`, until the event `stopped` is set:
    the accept loop of the small socket servers that misbehave precisely."""
    listener.settimeout(0.1)
    while not stopped.is_set():
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        take(connection)


class MailSink:
    # What to do once a message's data is in, for `after_dot`: take it and hang up without a word; take
    # it and never answer; take it and answer with a line that is no SMTP reply; or refuse it for now
    # (451). A number: take it, answer 250 that many seconds later.
    DROP, SILENT, GARBLED, REFUSE_FOR_NOW = 'drop', 'silent', 'garbled', 'refuse-for-now'

    def __init__(self, tls_context=None, implicit_tls=False, pipelining=False):
        self.pipelining = pipelining  # advertise PIPELINING (RFC 2920): aiosmtpd takes grouped commands as they come
        self.messages = []
        self.misdirected = []  # (envelope recipients, To) of each message whose envelope was not its own
        self.lock = threading.Lock()
        self.refuse_for_good = {}  # address -> SMTP reply, at RCPT
        self.refuse_for_now = {}  # address -> how many more times to answer 451 at RCPT (greylisting)
        self.hang_up_at_rcpt = {}  # address -> how many more times to hang up at RCPT: nothing taken
        self.after_dot = {}  # address -> [what to do once its data is in, one per attempt; the last stays]
        self.delay = 0.0  # seconds to take over each message
        self.connections = 0
        self.quits = 0  # connections the client ended with QUIT, not by hanging up
        self.taken = {}  # per connection (its aiosmtpd session) that took any, how many messages it took
        self.port = free_port()
        self.tls_context, self.implicit_tls = tls_context, implicit_tls
        self.controller = None

    def start(self):
        """Listen on the port (again, after stop(): a server back from an outage)."""
        tls = {'ssl_context': self.tls_context} if self.implicit_tls else {'tls_context': self.tls_context}
        self.controller = Controller(self, hostname='127.0.0.1', port=self.port, **tls)
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
        if self.pipelining:
            responses.insert(-1, '250-PIPELINING')  # before the last line, '250 HELP'
        return responses

    async def handle_QUIT(self, server, session, envelope):
        with self.lock:
            self.quits += 1
        return '221 Bye'

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            if address in self.refuse_for_good:
                return self.refuse_for_good[address]
            if self.refuse_for_now.get(address, 0) > 0:
                self.refuse_for_now[address] -= 1
                return '451 4.7.1 Greylisted, try again later'
            if self.hang_up_at_rcpt.get(address, 0) > 0:
                self.hang_up_at_rcpt[address] -= 1
                server.transport.close()
                return '421 4.4.2 Closing'
        envelope.rcpt_tos.append(address)
        return '250 OK'

    async def handle_DATA(self, server, session, envelope):
        action = self._after_dot(envelope.rcpt_tos[0])
        if action == self.REFUSE_FOR_NOW:
            return '451 4.3.0 Not now'
        message = message_from_bytes(envelope.content, policy=policy.default)
        with self.lock:
            self.messages.append(message)
            self.taken[session] = self.taken.get(session, 0) + 1
            if list(envelope.rcpt_tos) != [message['To']]:
                self.misdirected.append((list(envelope.rcpt_tos), message['To']))
        if action == self.DROP:
            server.transport.close()
        elif action == self.SILENT:
            await asyncio.sleep(3600)
        elif action == self.GARBLED:
            return 'Queued as 4F2A9'  # no three digits: smtplib reads it as code -1
        elif action is not None:
            await asyncio.sleep(action)
        if self.delay:
            await asyncio.sleep(self.delay)
        return '250 2.0.0 Accepted'

    def _after_dot(self, address):
        with self.lock:
            plan = self.after_dot.get(address)
            if not isinstance(plan, list):
                return plan
            return plan.pop(0) if len(plan) > 1 else plan[0]

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
