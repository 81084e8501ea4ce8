"""A TCP proxy on 127.0.0.1 in front of a server, which a test can cut: every connection through it is
closed and new ones are refused until it is restored. A PostgreSQL restarting or failing over, as the
clients that go through the proxy see it, while every other client of the server goes on."""
import socket
import threading

from tests.support.smtp import accept_until, free_port


class CuttableProxy:
    def __init__(self, host, port):
        self.target = (host, port)
        self.port = free_port()
        self.listener = socket.create_server(('127.0.0.1', self.port))
        self.sockets, self.lock = [], threading.Lock()
        self.cut_off, self.stopped = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=accept_until, args=(self.listener, self.stopped, self._take),
                                       daemon=True)

    def start(self):
        self.thread.start()
        return self

    def cut(self):
        """Close every connection through the proxy, and refuse new ones until restore()."""
        self.cut_off.set()
        self._close_all()

    def restore(self):
        self.cut_off.clear()

    def stop(self):
        self.stopped.set()
        self.thread.join()
        self._close_all()
        self.listener.close()

    def _close_all(self):
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            _hang_up(sock)

    def _take(self, client):
        if self.cut_off.is_set():
            client.close()
            return
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self.lock:
            self.sockets += [client, server]
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _hang_up(sink)


def _hang_up(sock):
    """Shut down first: a close alone does not wake the thread that waits on the socket's recv."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
