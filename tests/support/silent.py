"""A TCP server on 127.0.0.1 that accepts every connection and never says a word: an SMTP server or a
Redis that hangs instead of refusing, which only a time-out of the client's own can get past."""
import socket
import threading

from tests.support.smtp import free_port


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
        self.listener.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(connection)  # held open, unanswered, until stop()

    def stop(self):
        self.stopped.set()
        self.thread.join()
        for connection in self.accepted:
            connection.close()
        self.listener.close()
