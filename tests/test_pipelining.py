"""Over a server that offers PIPELINING (RFC 2920), each message's envelope goes out in one flight and
the next message's envelope rides behind the previous one's final dot, and the ledger's rules still hold
per message: a refused recipient fails or defers that message alone; if the line drops, the message
whose dot went out unanswered is unknown and the one whose envelope only went out is sent again. A
server that does not offer it is spoken to one command at a time, as before."""
import math
import signal
import subprocess
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from app.drip import DripStage
from app.email import Email
from app.extensions import db
from app.models import Client, Delivery
from app.sending import send
from app.smtp import SmtpSender
from tests.support.flights import FlightServer
from tests.support.jobs import jobs, queue_emails, run_due_jobs
from tests.support.smtp import MailSink

ENVELOPE = ['MAIL', 'RCPT', 'DATA']


@pytest.fixture
def flights(settings):
    """A FlightServer that the app sends to (ask for it before `app`); a test may change how it behaves."""
    server = FlightServer().start()
    settings['MAIL_PORT'] = server.port
    yield server
    server.stop()


@pytest.fixture
def pipelining(smtp):
    """The suite's aiosmtpd server, offering PIPELINING."""
    smtp.pipelining = True
    return smtp


@pytest.fixture
def deep_queues(pipelining, app):
    """Three connections to a server offering PIPELINING: nine messages in flight, of which each
    connection has one on the wire and two waiting in its queue."""
    app.config.update(MAIL_CONCURRENCY=3)
    return pipelining


def test_each_envelope_goes_in_one_flight_and_the_next_rides_behind_the_dot(flights, app, runner, subscribers):
    server = flights
    emails = subscribers(5)

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    [conversation] = server.conversations
    assert conversation == [['EHLO'], ENVELOPE, *[['DOT', *ENVELOPE]] * 4, ['DOT'], ['QUIT']]
    assert server.recipients() == emails


def test_confirmation_emails_claimed_together_ride_behind_each_others_dots(flights, app):
    recipients = [f'reader{n}@example.com' for n in range(3)]
    queue_emails(app, *recipients)

    assert run_due_jobs(app) == 3

    [conversation] = flights.conversations
    assert conversation == [['EHLO'], ENVELOPE, ['DOT', *ENVELOPE], ['DOT', *ENVELOPE], ['DOT'], ['QUIT']]
    assert flights.recipients() == recipients
    assert {job.status for job in jobs(app)} == {'done'}


def test_a_server_that_does_not_offer_pipelining_gets_one_command_at_a_time(flights, app, runner, subscribers):
    server = flights
    server.pipelining = False
    emails = subscribers(3)

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    [conversation] = server.conversations
    assert conversation == [['EHLO'], *[['MAIL'], ['RCPT'], ['DATA'], ['DOT']] * 3, ['QUIT']]
    assert server.recipients() == emails


def test_a_refused_and_a_greylisted_recipient_in_the_pipeline_fail_and_defer_alone(pipelining, app, runner,
                                                                                   subscribers, promise_kept):
    emails = subscribers(8)
    refused, greylisted = emails[2], emails[5]
    pipelining.refuse_for_good[refused] = '550 5.1.1 No such user'
    pipelining.refuse_for_now[greylisted] = 100

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    by_status = promise_kept('week1', emails)
    assert by_status == {'sent': [e for e in emails if e not in (refused, greylisted)], 'failed': [refused],
                         'deferred': [greylisted]}
    assert 'sent 6, skipped 0, failed 1, unknown 0, deferred 1' in result.output
    assert pipelining.connections == 1, 'a refusal is answered by RSET, not by a new connection'


@pytest.mark.parametrize('misbehaviour', [MailSink.DROP, MailSink.GARBLED])
def test_an_answer_lost_after_a_dot_leaves_that_message_unknown_and_sends_the_next_once(pipelining, app, runner,
                                                                                     subscribers, promise_kept,
                                                                                     misbehaviour):
    emails = subscribers(8)
    dropped = emails[3]
    pipelining.after_dot[dropped] = misbehaviour  # takes it, then hangs up, or answers a line that is no
    # reply, with the next envelope in hand

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    by_status = promise_kept('week1', emails)
    assert by_status == {'sent': [e for e in emails if e != dropped], 'unknown': [dropped]}
    assert Counter(pipelining.recipients()) == Counter(emails), 'the next one went again, on a new connection, once'
    assert pipelining.connections == 2 and 'unknown 1' in result.output


def test_drops_after_several_dots_over_several_pipelining_connections_lose_and_double_nothing(
        pipelining, settings, app, runner, subscribers, promise_kept):
    app.config.update(MAIL_CONCURRENCY=3, SEND_BATCH_SIZE=7)
    emails = subscribers(40)
    dropped = emails[5::12]
    for address in dropped:
        pipelining.after_dot[address] = MailSink.DROP

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    by_status = promise_kept('week1', emails)
    assert sorted(by_status['unknown']) == sorted(dropped) and len(by_status['sent']) == 40 - len(dropped)
    assert Counter(pipelining.recipients()) == Counter(emails)
    assert f'unknown {len(dropped)}' in result.output


def test_several_connections_each_pipeline(flights, app, runner, subscribers):
    server = flights
    app.config.update(MAIL_CONCURRENCY=2, SEND_BATCH_SIZE=50)
    emails = subscribers(30)

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert sorted(server.recipients()) == sorted(emails) and len(server.conversations) == 2
    flights = [flight for conversation in server.conversations for flight in conversation]
    behind_a_dot = flights.count(['DOT', *ENVELOPE])
    # Each connection's first message has nobody ahead of it, and its queue runs dry at the very end.
    assert behind_a_dot >= 30 - 2 * 3, repr(server.conversations)


def test_a_server_that_takes_data_for_no_recipient_gets_no_empty_message(flights, app, runner, subscribers):
    """RFC 2920 3.1 would have the client end that DATA with a lone dot; the client hangs up instead."""
    emails = subscribers(3)
    server = flights
    server.refuse[emails[1]], server.data_without_recipients = '550 5.1.1 No such user', True

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert 'sent 2, skipped 0, failed 1' in result.output and '550 5.1.1' in result.output
    assert server.recipients() == [emails[0], emails[2]] and server.empty_messages == 0
    assert len(server.conversations) == 2


@pytest.mark.parametrize('pipelined', [False, True], ids=['classic', 'pipelined'])
@pytest.mark.parametrize('misbehaviour', ['rcpt-garbled', 'data-250', 'data-garbled'])
def test_a_reply_to_rcpt_or_data_that_is_no_refusal_fails_nobody_and_stops_the_run_with_the_rest_due(
        flights, app, runner, subscribers, pipelined, misbehaviour):
    """Neither a line that is no SMTP reply nor a 250 where DATA's 354 belongs refuses anyone: the relay
    is off the protocol, and nothing of the message went."""
    server = flights
    server.pipelining = pipelined
    emails = subscribers(3)
    reply = {'rcpt-garbled': 'Recipient OK', 'data-250': '250 2.0.0 OK', 'data-garbled': 'Go ahead'}[misbehaviour]
    (server.refuse if misbehaviour.startswith('rcpt') else server.answer_data)[emails[1]] = reply

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    with app.app_context():
        recorded = dict(db.session.execute(sa.select(Client.email, Delivery.status).join(Delivery)).all())
    assert recorded == {emails[0]: 'sent'}, result.output  # the others left due, to be sent once it is mended
    assert result.exit_code == 1 and 'failed 0' in result.output and 'left due' in result.output, result.output
    assert server.recipients() == [emails[0]] and server.empty_messages == 0


def test_a_message_retried_after_its_dot_is_refused_for_now_does_not_land_in_the_announced_envelope(
        pipelining, app, runner, subscribers, promise_kept):
    emails = subscribers(4)
    pipelining.after_dot[emails[1]] = [MailSink.REFUSE_FOR_NOW, None]  # 451 at its dot, then taken

    runner.invoke(args=['send-newsletter-email', 'week1'])

    assert promise_kept('week1', emails) == {'sent': emails}, 'each in its own envelope (promise_kept checks)'
    assert Counter(pipelining.recipients()) == Counter(emails), 'each to its own address, once'


def test_an_announced_address_with_a_line_break_is_never_written_ahead(flights, app):
    server = flights
    email = Email('jane@example.com', 'Hello', 'text', '<p>html</p>', '<m.1@example.com>')

    with app.app_context(), SmtpSender(app.config) as sender:
        sender.send(email, then='eve@example.com>\r\nRCPT TO:<mallory@example.com')

    [conversation] = server.conversations
    assert conversation == [['EHLO'], ENVELOPE, ['DOT'], ['QUIT']]


@pytest.mark.parametrize('pipelined', [False, True], ids=['classic', 'pipelined'])
def test_a_run_killed_while_an_earlier_group_is_still_on_the_wire_sends_it_no_second_time(
        smtp, settings, app, runner, subscribers, flask_command, promise_kept, pipelined):
    """The run's row declares one range; messages of earlier groups still unanswered must stay in it."""
    smtp.pipelining = pipelined
    settings.update(MAIL_CONCURRENCY=2, SEND_BATCH_SIZE=40)
    emails = subscribers(40)
    slow = emails[1]
    smtp.after_dot[slow] = 30  # taken at once, answered 30 s later: still on the wire at the kill
    process = flask_command('send-newsletter-email', 'week1', LEASE_SECONDS='2', stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert smtp.wait_for(12, timeout=20) >= 12
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2.5)  # its lease runs out
    smtp.after_dot.clear()

    runner.invoke(args=['send-newsletter-email', 'week1'])

    outcome = promise_kept('week1', emails)
    assert slow in outcome["unknown"] and len(smtp.received_by(slow)) == 1


def test_a_run_asked_to_stop_leaves_what_waits_in_the_connections_queues_due(deep_queues, app, subscribers,
                                                                              promise_kept):
    app.config.update(SEND_BATCH_SIZE=12)
    emails = subscribers(24)
    deep_queues.delay = 0.3  # the first batch is all handed over while most of it still waits

    with app.app_context():
        report = send(DripStage('week1'), 'admin', should_stop=lambda: True)  # asked after the first batch

    by_status = promise_kept('week1', emails)  # and the ones left due received nothing
    assert report.stopped and set(by_status) == {'sent', None}, by_status.keys()
    assert report.sent == len(by_status['sent']) == len(deep_queues.messages)
    waited = [email for email in emails[:12] if email in by_status[None]]
    assert waited, 'the first batch went out whole: what waited in the queues was sent after the stop'


def test_three_unknowns_in_a_row_leave_what_waits_in_the_connections_queues_due_not_unknown(
        deep_queues, app, subscribers, promise_kept):
    app.config.update(SEND_BATCH_SIZE=20, MAIL_DATA_TIMEOUT=1)
    emails = subscribers(12)
    for address in emails[3:]:  # once the connections are open, every message is taken and never answered
        deep_queues.after_dot[address] = MailSink.SILENT

    with app.app_context():
        report = send(DripStage('week1'), 'admin')

    by_status = promise_kept('week1', emails)  # and the ones left due received nothing
    assert 'in a row got no answer' in report.aborted
    assert by_status['sent'] == emails[:3] and by_status.get(None), by_status
    assert len(by_status['unknown']) < 9, 'all nine in flight went out: the queued ones after the stop'


class Halt(BaseException):
    """Not an Exception: what a sender might raise like KeyboardInterrupt or SystemExit."""


@pytest.mark.timeout(60)
# Handed to its future, it is raised again on the lane's thread, which ends with it (SenderPool.run).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_a_lane_whose_send_raises_a_base_exception_hands_it_to_the_run_which_does_not_wait_for_ever(
        deep_queues, app, subscribers, monkeypatch):
    real_send = SmtpSender.send

    def send_halting_at_reader5(self, email, meanwhile=None, then=None):
        if email.recipient == 'reader5@example.com':
            raise Halt
        return real_send(self, email, meanwhile, then)

    monkeypatch.setattr(SmtpSender, 'send', send_halting_at_reader5)
    subscribers(20)  # reader5 is on a lane with more waiting behind it

    with app.app_context(), pytest.raises(Halt):
        send(DripStage('week1'), 'admin')


@pytest.mark.parametrize('connections', [1, 2])
def test_mail_max_emails_reconnects_over_pipelining_and_sends_everyone_once(pipelining, app, runner, subscribers,
                                                                           promise_kept, connections):
    app.config.update(MAIL_CONCURRENCY=connections)
    app.extensions['mail'].max_emails = 3  # MAIL_MAX_EMAILS
    emails = subscribers(20)

    result = runner.invoke(args=['send-newsletter-email', 'week1'])

    assert result.exit_code == 0, result.output
    assert promise_kept('week1', emails) == {'sent': emails}
    taken = list(pipelining.taken.values())  # messages per connection
    assert pipelining.connections == len(taken) and max(taken) == 3, taken
    # Three a connection, but each lane's last, which takes what is left of the lane's share.
    assert sum(1 for count in taken if count < 3) <= connections, taken
    assert len(taken) in range(math.ceil(20 / 3), math.ceil(20 / 3) + connections), taken
    assert pipelining.quits == pipelining.connections, 'a connection closed with an envelope announced on it'
