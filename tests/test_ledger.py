"""`flask mailing status`: a mailing's ledger (audience = sent + failed + unknown + deferred + pending),
counted against the subscribers' own records, so that a gap between the two is seen."""
from datetime import datetime

import pytest
import sqlalchemy as sa

from app import broadcasts
from app.extensions import db
from app.models import Client, Delivery
from tests.support.smtp import MailSink


@pytest.fixture
def mixed_week1(app, runner, smtp, subscribers):
    """week1 sent to 8: one refused for good, one answer lost after the dot, one greylisted past the
    run; then 2 more confirm, due and not yet sent."""
    app.config.update(MAIL_RETRIES=0, MAIL_RETRY_BACKOFF=60)
    subscribers(8)
    smtp.refuse_for_good['reader1@example.com'] = '550 5.1.1 No such user'
    smtp.after_dot['reader2@example.com'] = MailSink.DROP
    smtp.refuse_for_now['reader3@example.com'] = 5
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 1
    subscribers(2, start=100)


def test_the_ledger_of_a_drip_stage_balances_and_says_where_everyone_stands(runner, mixed_week1):
    result = runner.invoke(args=['mailing', 'status', 'week1'])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        'week1: audience 10',
        '  sent            5',
        '  failed          1',
        '  unknown         1',
        '  deferred        1',
        '  pending         2 (2 due, 0 being sent now)',
        '  balances: 5 + 1 + 1 + 1 + 2 = 10',
    ]


@pytest.mark.parametrize('state, expected', [
    ('failed', ['reader1@example.com\treader1@example.com: 550 5.1.1 No such user']),
    ('pending', ['reader100@example.com\tdue', 'reader101@example.com\tdue']),
])
def test_the_list_behind_a_number_says_why(runner, mixed_week1, state, expected):
    result = runner.invoke(args=['mailing', 'status', 'week1', '--list', state])
    assert result.exit_code == 0, result.exception
    assert result.output.splitlines()[-len(expected):] == [f'  {line}' for line in expected]


def test_a_deferred_one_shows_when_it_is_tried_next(runner, mixed_week1):
    result = runner.invoke(args=['mailing', 'status', 'week1', '--list', 'deferred'])
    assert 'reader3@example.com\tnext attempt 20' in result.output and '1 so far: reader3@example.com: 451' in result.output


def test_a_stage_recorded_sent_to_someone_it_did_not_move_on_does_not_balance(app, runner, smtp, subscribers):
    subscribers(3)
    assert runner.invoke(args=['send-newsletter-email', 'week1']).exit_code == 0
    with app.app_context():  # what the old unconditional advance could leave behind
        db.session.execute(sa.update(Client).where(Client.email == 'reader0@example.com').values(num_newsletter=0))
        db.session.execute(sa.update(Client).where(Client.email == 'reader1@example.com').values(num_newsletter=1))
        db.session.execute(sa.delete(Delivery).where(Delivery.client_id == sa.select(Client.id).where(
            Client.email == 'reader1@example.com').scalar_subquery()))
        db.session.commit()

    result = runner.invoke(args=['mailing', 'status', 'week1'])

    assert result.exit_code == 1
    assert 'DOES NOT BALANCE: 2 + 0 + 0 + 0 + 0 = 2, audience 3' in result.output
    assert '1 recorded sent but not moved on to week1: they would never get the next stage' in result.output
    assert '1 past week1 with no record of it' in result.output


def test_a_broadcasts_ledger_counts_its_audience(app, runner, smtp, subscribers):
    from datetime import timedelta

    from app import broadcasts
    from app.jobs import run_due
    from app.models import Job, utcnow
    subscribers(4)
    smtp.after_dot['reader0@example.com'] = MailSink.DROP
    with app.app_context():
        broadcast_id = broadcasts.schedule_broadcast('Sale', 'Hi', '<p>Hi</p>', utcnow() + timedelta(minutes=5), 'UTC',
                                                     'admin@example.com').id
        db.session.execute(sa.update(Job).values(run_after=utcnow()))
        db.session.commit()
        run_due()

    result = runner.invoke(args=['mailing', 'status', f'broadcast{broadcast_id}'])

    assert result.exit_code == 0, result.output
    assert 'audience 4' in result.output and 'balances: 3 + 0 + 1 + 0 + 0 = 4' in result.output


def test_a_cancelled_broadcast_is_due_to_nobody(app, runner, subscribers):
    """Its ledger said everyone active was pending, due it (and its not-received CSV listed them so), for a
    broadcast that will never go: an audience that grew with every sign-up, long after it was cancelled."""
    subscribers(3)
    with app.app_context():
        broadcast_id = broadcasts.schedule_broadcast('Sale', 'Hi', '<p>Hi</p>', datetime(2031, 1, 1, 9, 0), 'UTC',
                                                     'admin@example.com').id
        broadcasts.cancel(broadcast_id)

    result = runner.invoke(args=['mailing', 'status', f'broadcast{broadcast_id}'])
    pending = runner.invoke(args=['mailing', 'status', f'broadcast{broadcast_id}', '--list', 'pending'])

    assert result.exit_code == 0, result.output
    assert 'audience 0' in result.output and 'pending         0 (0 due' in result.output, result.output
    assert 'reader' not in pending.output, pending.output


def test_an_unknown_mailing_is_a_clear_error(runner):
    result = runner.invoke(args=['mailing', 'status', 'week0'])
    assert result.exit_code == 2 and "no mailing 'week0'" in result.output


@pytest.mark.parametrize('number', [str(2 ** 31), '9' * 20], ids=['past PostgreSQL', 'past SQLite'])
def test_a_stage_number_no_row_can_have_is_no_mailing(runner, number):
    """Past PostgreSQL's integer (the type of num_newsletter) the database refused the query, and the
    command was a traceback."""
    result = runner.invoke(args=['mailing', 'status', f'week{number}'])
    assert result.exit_code == 2 and f"no mailing 'week{number}'" in result.output


def test_a_stage_whose_delay_cannot_be_read_is_a_clear_error(stage_templates, runner):
    stage_templates('week2', 'Subject: Week 2\nDelay: soon\nWeek two.\n', '<p>Week two.</p>')
    result = runner.invoke(args=['mailing', 'status', 'week2'])
    assert result.exit_code == 1 and "week2 cannot be read: week2.txt: Delay: 'soon' is not a duration" in result.output
