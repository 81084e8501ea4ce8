"""The SMTP way out: one connection, reused for many messages, with RFC 2920 pipelining when the server
offers it. Written here rather than taken from a library: smtplib's sendmail waits for each reply in one
call, so nothing can be done while the server works; aiosmtplib (5.1) does the same on asyncio and does
not pipeline at all.

Pipelining. A relay far away costs a round trip for each reply waited for: four per message in the
classic exchange (MAIL, RCPT, DATA, the final dot). When the server advertises PIPELINING, a message's
MAIL, RCPT and DATA go out in one write, and the envelope of the message the caller announces next
(`then`) goes out right behind this message's final dot, so that its three replies come back with the
dot's: one round trip per message. It is the next message's envelope that rides with the dot, not this
one's data, because the data may only follow DATA's 354.

How each message keeps an outcome of its own (app/failures.py), in the order send() meets them:
- Replies come in the order of the commands, and each send() reads those of its own message alone: its
  envelope's three and its dot's. A refused RCPT fails that message (5xx) or defers it (4xx); the
  server then refuses its DATA (RFC 2920 3.1) and the transaction is reset for the next message.
- A reply to RCPT or DATA that is no refusal (no 4xx or 5xx) and not the one expected (a line that is no
  SMTP reply, a 250 where DATA's 354 belongs) refuses nobody: the server is off the protocol, so we hang
  up, and the subscriber is left due (TransportFailure), never failed for good.
- A server that answers 354 to a DATA none of whose recipients it took is off the RFC: it would have us
  send a lone dot, an empty message we would then trust it not to deliver. We hang up instead, which
  delivers nothing for certain and costs one reconnect.
- The next message's envelope is written in a write of its own after the data's, never appended to it:
  if the data's write fails, the dot went whole or not at all, as without pipelining, and only the
  envelope can be half out. TCP_NODELAY, or the kernel holds that small write back until the data is
  acknowledged (Nagle), and the round trip saved is paid again.
- The final dot's reply is read by its first digit (RFC 5321 4.2.1). A line that is no SMTP reply at
  all is not a refusal: the server has the message and may deliver it, so that message is unknown, as
  when the line drops, and never failed, which an admin's --retry-failed would send again.
- An envelope out ahead delivers nothing: no message is delivered without its data and dot. If the
  connection drops after this message's dot, this message is unknown and the next one goes again, whole,
  on a new connection. If the caller sends another message than the one it announced, or the connection
  must close with an envelope out ahead, the connection is dropped without QUIT: after a 354, QUIT would
  only be more data.
Without PIPELINING each command waits for its reply, as smtplib's would.
"""
import functools
import re
import smtplib
import socket
import ssl
from email.utils import parseaddr

from flask import current_app

from app.failures import DeliveryFailure, OutcomeUnknown, PermanentFailure, TemporaryFailure, TransportFailure
from app.sender import Sender

IN_DOUBT = object()  # what went ahead when writing an envelope ahead failed part-way


@functools.lru_cache(maxsize=4)
def tls_context(ca_file, verify):
    """Certificates checked against the system's CA store (or `ca_file`, for a private CA) and the host
    name, as a browser would: smtplib's own default checks nothing, so anyone on the path to the relay
    would read MAIL_PASSWORD and every email, admins' sign-in links included."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def stuffed(payload):
    """RFC 5321 4.5.2: a line that starts with a period gets another; a lone period ends the data."""
    return re.sub(rb'(?m)^\.', b'..', payload) + b'.\r\n'


def writable(address):
    """Whether `address` may go into a command as it is. A message's own address has been checked by
    then (Email.refuse_unsendable); an address announced ahead has not: its message is not built yet."""
    return address.isascii() and '\r' not in address and '\n' not in address


class SmtpSender(Sender):
    """One SMTP connection, reused for many messages. It is opened here rather than by Flask-Mail (whose
    settings it uses): with a verified TLS context, and with a time-out of its own, never the
    process-wide socket default that threads opening connections at the same moment would trample.

    Each command is sent and its reply read in two steps, so that the caller's `meanwhile()` runs in
    between: while the server works on the command, the caller prepares its next message. The reply to
    the final dot is awaited for MAIL_DATA_TIMEOUT (RFC 5321 4.5.3.2.6: 10 minutes), not the command
    time-out: a server may scan a message that long before taking it, and giving up sooner would only
    turn a delivery into an unknown."""

    def __init__(self, config):
        super().__init__(config)
        self.state = current_app.extensions['mail']
        self.envelope_from = parseaddr(config['MAIL_DEFAULT_SENDER'])[1]
        self.smtp = None
        self.ahead = None  # the address whose envelope went out ahead on this connection, if any
        self.sent_on_connection = 0

    def describe(self):
        return f'SMTP {self.state.server}:{self.state.port}'

    def _connect(self):
        state, timeout = self.state, self.config['MAIL_TIMEOUT']
        context = tls_context(self.config['MAIL_TLS_CA_FILE'], self.config['MAIL_TLS_VERIFY'])
        try:
            if state.use_ssl:
                smtp = smtplib.SMTP_SSL(state.server, state.port, timeout=timeout, context=context)
            else:
                smtp = smtplib.SMTP(state.server, state.port, timeout=timeout)
                if state.use_tls:
                    smtp.starttls(context=context)
            if state.username and state.password:
                smtp.login(state.username, state.password)
            smtp.ehlo_or_helo_if_needed()
            self.pipelining = smtp.has_extn('pipelining')
            if self.pipelining:
                smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, smtplib.SMTPException) as exc:
            raise TransportFailure(f'cannot connect to {self.describe()}: {exc}') from exc
        self.smtp, self.sent_on_connection, self.ahead = smtp, 0, None

    def send(self, email, meanwhile=None, then=None):
        """:param meanwhile: see Sender; called while a command waits for its reply; it must not raise.
        :param then: see Sender."""
        payload = email.mime
        if self.ahead is not None and self.ahead != email.recipient:
            self.close()  # another message was announced: its envelope may hold the server in DATA mode
        if self.smtp is None:
            self._connect()
        meanwhile = meanwhile or (lambda: False)
        data_went = False
        try:
            data = self._open_transaction(email, payload, meanwhile)
            self.smtp.send(data)  # sendall: if it raises, the final dot did not (all) go
            data_went = True
            if then is not None and self.pipelining and not self._last_on_connection():
                self._write_ahead(then)
            code, reply = self._final_reply(meanwhile)
            if code // 100 not in (2, 4, 5):  # no reply, not a refusal: smtplib reads a line without one as -1
                raise smtplib.SMTPResponseException(code, reply)
            if code // 100 != 2:
                raise self._failure(code, reply, email)
        except DeliveryFailure:
            raise
        except (smtplib.SMTPException, OSError) as exc:
            self.close(hang_up=True)  # whatever state the server is in, DATA mode included
            if data_went:
                raise OutcomeUnknown(f'{self.describe()}: no answer after the end of the data: '
                                     f'{exc or type(exc).__name__}') from exc
            raise TransportFailure(f'{self.describe()}: {exc or type(exc).__name__}') from exc
        except BaseException as exc:
            self.close(hang_up=True)  # mid-conversation, in a state nobody can vouch for
            if data_went:
                raise OutcomeUnknown(f'unexpected error after the end of the data went out: {exc!r}') from exc
            raise
        self.sent_on_connection += 1
        if self.state.max_emails and self.sent_on_connection >= self.state.max_emails:
            self.close()  # the next send reconnects

    def _open_transaction(self, email, payload, meanwhile):
        """MAIL, RCPT and DATA, up to the server's 354: pipelined in one write, unless the envelope went
        out ahead already, or one command at a time.
        :return: the data to send.  :raise DeliveryFailure: the connection left ready for another message, or closed."""
        smtp = self.smtp
        if self.pipelining:
            # An envelope that went out ahead has its replies in by now, with the previous dot's: the one
            # wait left is for this message's dot, and the caller's work goes there (_final_reply).
            if self.ahead is None:
                smtp.send(self._envelope(email.recipient))
            self.ahead = None
            data = stuffed(payload)
            mail, rcpt, go = smtp.getreply(), smtp.getreply(), smtp.getreply()
        else:
            smtp.putcmd('MAIL', f'FROM:<{self.envelope_from}>')
            data = stuffed(payload)  # while the server answers MAIL
            mail, rcpt, go = self._reply(meanwhile), None, None
            if mail[0] == 250:
                smtp.putcmd('RCPT', f'TO:<{email.recipient}>')
                rcpt = self._reply(meanwhile)
                if rcpt[0] in (250, 251):
                    smtp.putcmd('DATA')
                    go = self._reply(meanwhile)
        if mail[0] != 250:
            # Our own sender address refused is a configuration problem, not this subscriber's.
            self.close(hang_up=go is not None and go[0] == 354)
            raise TransportFailure(f'{self.describe()} refused sender: {mail[0]} {mail[1]!r}')
        refusal = rcpt if rcpt[0] not in (250, 251) else go if go[0] != 354 else None
        if refusal is not None and refusal[0] // 100 not in (4, 5):
            # No refusal (a line that is no reply, a 250 where DATA's 354 belongs): the server is off the
            # protocol, in a state nobody can vouch for, DATA mode maybe. Nobody was refused, nothing went.
            self.close(hang_up=True)
            command = 'RCPT' if refusal is rcpt else 'DATA'
            raise TransportFailure(f'{self.describe()} answered {command} with no SMTP reply to it: '
                                   f'{refusal[0]} {refusal[1]!r}')
        if refusal is not None:
            if go is not None and go[0] == 354:
                self.close(hang_up=True)  # see the module's docstring: no lone dot
            else:
                smtp.rset()
            raise self._failure(*refusal, email)
        return data

    def _envelope(self, address):
        return f'MAIL FROM:<{self.envelope_from}>\r\nRCPT TO:<{address}>\r\nDATA\r\n'.encode('ascii')

    def _write_ahead(self, address):
        """The next message's envelope, behind this one's dot, in a write of its own (see the module's
        docstring). A failure here is this message's business only through its reply."""
        if not writable(address):
            return
        try:
            self.smtp.sock.sendall(self._envelope(address))
            self.ahead = address
        except OSError:
            self.ahead = IN_DOUBT  # it may be half out: the next message starts on a new connection

    def _last_on_connection(self):
        return bool(self.state.max_emails) and self.sent_on_connection + 1 >= self.state.max_emails

    def _reply(self, meanwhile):
        meanwhile()
        return self.smtp.getreply()

    def _final_reply(self, meanwhile):
        if self.pipelining:
            while meanwhile():  # the one wait a pipelined message has: all of the caller's work goes here
                pass
        else:
            meanwhile()
        self.smtp.sock.settimeout(self.config['MAIL_DATA_TIMEOUT'])
        code, reply = self.smtp.getreply()  # on a time-out or hang-up it closes and raises
        self.smtp.sock.settimeout(self.config['MAIL_TIMEOUT'])
        return code, reply

    def _failure(self, code, reply, email):
        text = f'{code} {reply.decode(errors="replace") if isinstance(reply, bytes) else reply}'
        if code == 421:  # the server is closing the connection
            self.close()
            return TransportFailure(f'{self.describe()}: {text}')
        if 400 <= code < 500:
            return TemporaryFailure(f'{email.recipient}: {text}')
        return PermanentFailure(f'{email.recipient}: {text}')

    def close(self, hang_up=False):
        """QUIT; or hang up without a word when the server may be in DATA mode (after a 354, or with an
        envelope out ahead), where QUIT would be taken for data: without a dot nothing is delivered."""
        if self.smtp is not None:
            if hang_up or self.ahead is not None:
                self.smtp.close()
            else:
                try:
                    self.smtp.quit()
                except (smtplib.SMTPException, OSError):
                    pass  # already gone: nothing left to close cleanly
            self.smtp = None
        self.ahead = None
