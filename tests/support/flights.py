"""A small SMTP server on 127.0.0.1 that shows how a client's commands arrive, and misbehaves in ways
aiosmtpd cannot be made to. It answers only once the client has stopped writing for `settle` seconds,
as a server far away would seem to (and as RFC 2920 lets a server: it answers when its input runs dry),
and records, per connection, each flight: the commands that arrived before it answered ('DOT' for a
message's end). A client that waits for each reply sends flights of one; one that pipelines sends
MAIL, RCPT and DATA together, and the next message's envelope behind a message's dot.

`refuse` maps an address to the reply its RCPT gets, and `answer_data` to the reply a DATA for it gets in
place of 354 (a server off the RFC: a 250, a line that is no reply). With `data_without_recipients`, it
says 354 to a DATA none of whose recipients it took (off RFC 2920 3.1), and counts the empty messages it
is then sent."""
import select
import socket
import threading

from tests.support.smtp import accept_until, free_port


class FlightServer:
    def __init__(self, pipelining=True, refuse=None, data_without_recipients=False, settle=0.2):
        self.pipelining, self.refuse, self.answer_data = pipelining, dict(refuse or {}), {}
        self.data_without_recipients, self.settle = data_without_recipients, settle
        self.conversations = []  # per connection, its flights: [['MAIL', 'RCPT', 'DATA'], ['DOT', ...], ...]
        self.messages = []  # (recipients, data) of each message taken
        self.empty_messages = 0  # ended with a dot although no recipient was taken
        self.port = free_port()
        self.listener = socket.create_server(('127.0.0.1', self.port))
        self.stopped, self.threads = threading.Event(), []

    def start(self):
        self._spawn(self._accept)
        return self

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.listener.close()

    def recipients(self):
        return [address for recipients, _ in self.messages for address in recipients]

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self):
        accept_until(self.listener, self.stopped, self._take)

    def _take(self, connection):
        flights = []
        self.conversations.append(flights)
        self._spawn(self._converse, connection, flights)

    def _converse(self, connection, flights):
        with connection:
            connection.sendall(b'220 flights ESMTP\r\n')
            session = {'recipients': [], 'data': None}
            buffer, flight, replies = b'', [], []
            while not self.stopped.is_set():
                if not select.select([connection], [], [], self.settle)[0]:
                    if replies:  # the client has gone quiet: answer everything so far at once
                        flights.append(flight)
                        connection.sendall(b''.join(reply + b'\r\n' for reply in replies))
                        if flight[-1:] == ['QUIT']:
                            return
                        flight, replies = [], []
                    continue
                chunk = connection.recv(65536)
                if not chunk:
                    if flight:
                        flights.append(flight)
                    return
                buffer += chunk
                while b'\r\n' in buffer:
                    line, buffer = buffer.split(b'\r\n', 1)
                    if session['data'] is not None:
                        if line == b'.':
                            flight.append('DOT')
                            replies.append(self._end_of_data(session))
                        else:
                            session['data'].append(line)
                        continue
                    verb = line.split(b' ', 1)[0].decode('ascii', 'replace').upper()
                    flight.append(verb)
                    replies.append(self._answer(verb, line, session))

    def _answer(self, verb, line, session):
        if verb in ('EHLO', 'HELO'):
            return b'250-flights\r\n250-PIPELINING\r\n250 HELP' if self.pipelining else b'250-flights\r\n250 HELP'
        if verb in ('MAIL', 'RSET'):
            session['recipients'] = []
            return b'250 2.1.0 OK'
        if verb == 'RCPT':
            address = line.split(b'<', 1)[1].split(b'>', 1)[0].decode()
            if address in self.refuse:
                return self.refuse[address].encode()
            session['recipients'].append(address)
            return b'250 2.1.5 OK'
        if verb == 'DATA':
            if not session['recipients'] and not self.data_without_recipients:
                return b'554 5.5.1 No valid recipients'
            if answers := [self.answer_data[address] for address in session['recipients'] if address in self.answer_data]:
                return answers[0].encode()
            session['data'] = []
            return b'354 End data with <CR><LF>.<CR><LF>'
        if verb == 'NOOP':
            return b'250 2.0.0 OK'
        if verb == 'QUIT':
            return b'221 2.0.0 Bye'
        return b'500 5.5.2 Unknown command'

    def _end_of_data(self, session):
        recipients, data = session['recipients'], session['data']
        session['recipients'], session['data'] = [], None
        if not recipients:
            self.empty_messages += 1
            return b'554 5.5.1 No valid recipients'
        self.messages.append((recipients, b'\r\n'.join(data)))
        return b'250 2.0.0 Accepted'
