"""SendGrid's Event Webhook with a large batch of bounces: how long the app takes to answer it, against a
batch of the same size whose events it reads and passes over (deliveries), in one run.

    .venv/bin/python bench/webhook.py --database sqlite
    .venv/bin/python bench/webhook.py --database postgresql --events 3000 --round-trip 2

A batch of bounces is what follows a broadcast to an old list. SendGrid waits only so long for an answer,
then posts the batch again, and after enough tries drops it: its bounces are then never suppressed. So
the figure that matters is the time of one batch against the database as deployed, often on another
machine: `--round-trip MS` puts a latency proxy (bench/latency_proxy.py) between the app and PostgreSQL.

The batch is posted three times through Flask's test client, signed with a key made for the run: the
deliveries (read, verified, acted on by none), the bounces (each suppresses a subscriber), and the same
bounces again (SendGrid's retry: each counts once). Printed for each: seconds, events a second, SQL
statements, and the ratio of its time to the deliveries'. Then the check: every bounced subscriber
suppressed and off the drip, once; none other. It exits with status 1 if the check fails."""
import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.drip import FreshDatabase, reached_through, run_flask, seed  # noqa: E402

REASON = '550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking it.'


def batch(kind, events):
    return [{'email': f'reader{n}@example.com', 'event': kind, 'sg_event_id': f'{kind}-{n:020d}',
             'sg_message_id': f'14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.{n}', 'timestamp': int(time.time()),
             'smtp-id': '<14c5d75ce93.dfd.64b469@ismtpd-555>', 'category': ['newsletter'],
             **({'reason': REASON, 'status': '5.1.1', 'type': 'bounce'} if kind == 'bounce' else
                {'response': '250 OK', 'ip': '168.1.1.1'})}
            for n in range(events)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--database', choices=['sqlite', 'postgresql'], default='sqlite')
    parser.add_argument('--subscribers', type=int, default=50_000)
    parser.add_argument('--events', type=int, default=3000, help='in each batch (SendGrid posts up to 768 KB)')
    parser.add_argument('--round-trip', type=float, help='ms between the app and PostgreSQL (a latency proxy)')
    args = parser.parse_args()
    if args.round_trip and args.database != 'postgresql':
        parser.error('--round-trip is for PostgreSQL')

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory() as folder, FreshDatabase(args.database, folder) as database:
        env = {'FLASK_SKIP_DOTENV': '1', 'INSTANCE_PATH': folder, 'DATABASE_URL': database.url,
               'SECRET_KEY': 'bench-secret-key-0123456789', 'MAIL_TRANSPORT': 'folder', 'JOB_WORKER': 'off',
               'SENDGRID_WEBHOOK_PUBLIC_KEY': base64.b64encode(public).decode()}
        run_flask({**os.environ, **env}, 'db', 'upgrade')
        seed(database.url, args.subscribers)
        with reached_through(5432 if args.database == 'postgresql' else None, args.round_trip) as port:
            if args.round_trip:
                url = urlsplit(database.url)
                env['DATABASE_URL'] = urlunsplit(url._replace(netloc=f'{url.username}@127.0.0.1:{port}'))
            os.environ.update(env)
            from main import app
            figures = _post_all(app, key, args.events)
        for label, (seconds, statements, answer) in figures.items():
            print(f'{label:<16} {seconds:7.3f} s {args.events / seconds:8.0f} events/s {statements:6d} statements '
                  f'{seconds / figures["deliveries"][0]:6.1f}x   {answer}')
        return _check(database.url, args.events, figures)


def _post_all(app, key, events):
    statements = []
    sa.event.listen(sa.engine.Engine, 'before_cursor_execute', lambda *_: statements.append(1))
    client, figures = app.test_client(), {}
    _post(client, key, batch('delivered', 1))  # the first request connects and compiles: not what a batch costs
    for label, kind in (('deliveries', 'delivered'), ('bounces', 'bounce'), ('bounces again', 'bounce')):
        body = batch(kind, events)
        statements.clear()
        started = time.perf_counter()
        answer = _post(client, key, body)
        figures[label] = (time.perf_counter() - started, len(statements), answer)
    return figures


def _post(client, key, events):
    body, timestamp = json.dumps(events), str(int(time.time()))
    signature = base64.b64encode(key.sign((timestamp + body).encode(), ec.ECDSA(hashes.SHA256()))).decode()
    response = client.post('/webhooks/sendgrid', data=body, content_type='application/json', headers={
        'X-Twilio-Email-Event-Webhook-Signature': signature, 'X-Twilio-Email-Event-Webhook-Timestamp': timestamp})
    if response.status_code != 200:
        raise SystemExit(f'the webhook answered {response.status}: {response.get_data(as_text=True)[:500]}')
    return response.get_json()


def _check(url, events, figures):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        suppressed = conn.scalar(sa.text("SELECT count(*) FROM suppressions WHERE reason = 'bounced'"))
        left = conn.scalar(sa.text('SELECT count(*) FROM clients WHERE NOT active'))
        wrong = conn.scalar(sa.text(
            "SELECT count(*) FROM clients c WHERE c.active = EXISTS (SELECT 1 FROM suppressions s WHERE s.email = c.email)"))
    engine.dispose()
    answers = [figures['bounces'][2], figures['bounces again'][2]]
    failed = {'suppressed': suppressed != events, 'off the drip': left != events, 'active though suppressed, '
              'or not though not': wrong != 0,
              'answers': answers != [{'received': events, 'suppressed': events}, {'received': events, 'suppressed': 0}]}
    print(f'check: {suppressed} suppressed, {left} off the drip, {wrong} wrong: '
          f'{"FAILED " + ", ".join(k for k, v in failed.items() if v) if any(failed.values()) else "ok"}')
    return 1 if any(failed.values()) else 0


if __name__ == '__main__':
    sys.exit(main())
