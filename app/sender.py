"""What every way out (app/smtp.py, and the SendGrid API and the folder in app/transports.py) promises
its callers, so that the send (app/sending.py) and a single transactional email treat them alike."""


class Sender:
    """`send(email, meanwhile=None, then=None)` delivers one email or raises one of the failures of
    app/failures.py. Both hints are optional, and a way out that cannot use one ignores it:

    - `meanwhile` is work (preparing the caller's next message) to do while waiting for an answer; a
      way out that never waits does it when that message is sent instead.
    - `then` is the address of the message the caller will give this same sender next, if it knows:
      over SMTP with PIPELINING its envelope goes out behind this message's end, saving round trips.
      A hint, not a promise: a sender asked for another message next copes, at some cost.

    A sender is a context manager that closes its connection, if it has one, when done."""

    pipelining = False  # whether it uses `then`: for SMTP, known once connected

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        pass
