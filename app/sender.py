"""What every way out (app/smtp.py, and the SendGrid API and the folder in app/transports.py) promises
its callers, so that the send (app/sending.py) and a single transactional email treat them alike."""


class Sender:
    """`send(email, meanwhile=None, then=None)` delivers one email or raises one of the failures of
    app/failures.py. Both hints are optional, and a way out that cannot use one ignores it:

    - `meanwhile()` takes a short step of the caller's work (preparing its next message) while waiting
      for an answer, and says whether it took one; a way out that never waits leaves the work to be
      done when that message is sent.
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
