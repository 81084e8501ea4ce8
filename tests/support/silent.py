"""A TCP server on 127.0.0.1 that accepts every connection and never says a word: an SMTP server or a
Redis that hangs instead of refusing, which only a time-out of the client's own can get past."""
import socket
import threading

from tests.support.smtp import accept_until, free_port


class SilentServer:
    def __init__(self):
        self.port = free_port()
        self.listener = socket.create_server(('127.0.0.1', self.port))
        self.accepted, self.stopped = [], threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _accept(self):
        accept_until(self.listener, self.stopped, self.accepted.append)  # each held open, unanswered, until stop()

    def stop(self):
        self.stopped.set()
        self.thread.join()
        for connection in self.accepted:
            connection.close()
        self.listener.close()
