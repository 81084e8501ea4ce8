"""A TCP proxy on 127.0.0.1 that adds a fixed delay each way: a relay far away, on this machine.

    .venv/bin/python bench/latency_proxy.py --target 127.0.0.1:2525 --round-trip 50

    with LatencyProxy(target_port, one_way_seconds) as proxy:
        smtplib.SMTP('127.0.0.1', proxy.port)

It models latency, not bandwidth: every chunk read from one side is stamped with the time it arrived
and written to the other side at that time plus the one-way delay. Chunks in flight are delayed side
by side, as on a long wire, so bytes sent back to back arrive back to back one delay later, and a
client that pipelines (RFC 2920) pays one round trip for a group of commands. A proxy that slept the
delay before forwarding each chunk would add it once per chunk, one after another: it would charge
pipelining as many round trips as the commands it saved, and hide exactly what is to be measured.

The TCP handshake is modelled too: the proxy connects to the target three one-way delays after it
accepts (SYN, SYN-ACK, ACK), so a server that speaks first (an SMTP greeting) is heard two round trips
after the connect, and a client that speaks first reaches the server when it would over a real path.
An end of file is passed on as a half-close after the same delay, and the connection closed once both
ends have passed. A side that closes or fails outright has the other closed too, once what it sent
before has arrived. The event loop's timers wake up to a millisecond late: a round trip takes about a
millisecond more than asked, the same for every client measured through the proxy.

The proxy runs its event loop in a process of its own, so that it takes no share of the interpreter
from the clients measured through it.
"""
import argparse
import asyncio
import collections
import contextlib
import multiprocessing

GONE = object()  # in place of data: the side it was read from has closed or failed


class _Side(asyncio.Protocol):
    """One of the two sockets of a proxied connection. What it reads is written to the other one
    (`peer`) one delay after it arrived, in order; its end of file, as a half-close, likewise."""

    def __init__(self, one_way, sides):
        self.one_way, self.sides = one_way, sides
        self.loop = asyncio.get_running_loop()
        self.transport = self.peer = self.timer = None
        self.in_flight = collections.deque()  # (due, bytes or None for the end or GONE), as they came
        self.ended = False  # its end has been passed on

    def connection_made(self, transport):
        self.transport = transport
        self.sides.add(self)

    def data_received(self, data):
        self._stamp(data)

    def eof_received(self):
        self._stamp(None)
        return True  # keep the other direction open until its own end

    def _stamp(self, data):
        self.in_flight.append((self.loop.time() + self.one_way, data))
        if self.timer is None and self.peer is not None:
            self.timer = self.loop.call_at(self.in_flight[0][0], self._release)

    def _release(self):
        now, self.timer, peer = self.loop.time(), None, self.peer.transport
        while self.in_flight and self.in_flight[0][0] <= now:
            _, data = self.in_flight.popleft()
            if peer.is_closing():
                continue
            if data is GONE:
                peer.close()
            elif data is not None:
                peer.write(data)
            else:
                peer.write_eof()
                self.ended = True
                if self.peer.ended:
                    self.transport.close()
                    peer.close()
        if self.in_flight:
            self.timer = self.loop.call_at(self.in_flight[0][0], self._release)

    # The other side cannot take more for now: stop reading this one (as a full wire would).
    def pause_writing(self):
        self.peer.transport.pause_reading()

    def resume_writing(self):
        self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        """Closed by the proxy, or failed (a reset): the peer is closed too, once what this side sent
        before has reached it."""
        self.sides.discard(self)
        if self.peer is not None and not self.peer.transport.is_closing():
            self._stamp(GONE)


class _Client(_Side):
    """The side a client connected to. The target is connected to three one-way delays later, the
    handshake's time; what the client sends meanwhile is stamped as it comes and waits for it."""

    def __init__(self, target, one_way, sides):
        super().__init__(one_way, sides)
        self.target = target

    def connection_made(self, transport):
        super().connection_made(transport)
        self.connecting = self.loop.create_task(self._connect())

    async def _connect(self):
        await asyncio.sleep(3 * self.one_way)
        try:
            _, server = await self.loop.create_connection(lambda: _Side(self.one_way, self.sides), *self.target)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client went away meanwhile
            server.transport.close()
            return
        self.peer, server.peer = server, self
        if self.in_flight:
            self.timer = self.loop.call_at(self.in_flight[0][0], self._release)

    def connection_lost(self, exc):
        self.connecting.cancel()
        super().connection_lost(exc)


async def _serve(target, one_way, port, started, stop):
    sides = set()
    server = await asyncio.get_running_loop().create_server(lambda: _Client(target, one_way, sides), '127.0.0.1', port)
    started(server.sockets[0].getsockname()[1])
    async with server:
        await stop()
        server.close()
        for side in list(sides):
            side.transport.abort()


def _run(target, one_way, port, pipe):
    """The proxy's process: report the port, serve until the parent says stop."""
    async def stop():
        await asyncio.get_running_loop().run_in_executor(None, _wait_for_stop, pipe)

    asyncio.run(_serve(target, one_way, port, pipe.send, stop))


def _wait_for_stop(pipe):
    with contextlib.suppress(EOFError):
        pipe.recv()


class LatencyProxy:
    """`with LatencyProxy(target_port, one_way_seconds) as proxy:` listens on 127.0.0.1:`proxy.port`
    (a free port unless `port` is given) and forwards to `target_host`:`target_port`."""

    def __init__(self, target_port, one_way_seconds, target_host='127.0.0.1', port=0):
        self.target, self.one_way, self.port = (target_host, target_port), one_way_seconds, port
        self.pipe, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=_run, args=(self.target, one_way_seconds, port, child),
                                               daemon=True)

    def __enter__(self):
        self.process.start()
        if not self.pipe.poll(30):
            raise RuntimeError('the latency proxy did not start')
        self.port = self.pipe.recv()
        return self

    def __exit__(self, *exc_info):
        self.pipe.send('stop')
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--target', required=True, help='host:port to forward to')
    parser.add_argument('--round-trip', type=float, required=True, help='milliseconds added to a round trip')
    parser.add_argument('--port', type=int, default=0, help='port to listen on (default: a free one)')
    args = parser.parse_args()
    host, _, port = args.target.rpartition(':')
    one_way = args.round_trip / 2000

    def started(listening):
        print(f'127.0.0.1:{listening} -> {host}:{port}, {args.round_trip:g} ms round trip '
              f'({one_way * 1000:g} ms each way); Ctrl-C stops', flush=True)

    async def forever():
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((host, int(port)), one_way, args.port, started, forever))


if __name__ == '__main__':
    main()
