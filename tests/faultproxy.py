"""A fault-injecting TCP proxy on 127.0.0.1 for storage fault tests (in front of SeaweedFS).

Usage::

    with FaultProxy(target_port=s3.port) as proxy:     # proxy.endpoint: http://127.0.0.1:P
        proxy.reset(3)              # the next 3 connections are reset (and all open ones now)
        proxy.answer_503(1.5)       # every request for 1.5 s gets HTTP 503 SlowDown
        proxy.stall(2)              # the next 2 connections are accepted and never answered
        proxy.down()                # refuse every connection (the store is "stopped") ...
        proxy.up()                  # ... until it is back
        proxy.when(lambda: done_once(), proxy.down)    # a fault mid-run, once a condition holds

Faults apply to new connections; starting one also resets the connections open at that moment,
so clients with pooled keep-alive connections meet it on their next request. Counters of what
was injected are in :attr:`FaultProxy.injected`; :attr:`FaultProxy.bytes_served` counts the bytes the
store sent back (what a client really read, headers included).
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from typing import Callable

_SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"Content-Length: %d\r\n\r\n%s")
_SLOWDOWN_BODY = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
                  b"<Message>Please reduce your request rate.</Message></Error>")


def _close_listener(sock: socket.socket) -> None:
    """Stop listening now: ``shutdown`` wakes a thread blocked in ``accept`` (a plain ``close``
    would leave that ``accept`` taking connections on Linux)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _rst(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed or overloaded server does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``target_port``, injecting faults on demand."""

    def __init__(self, target_port: int, port: int = 0):
        self.target = ("127.0.0.1", target_port)
        self.port = port
        self._lock = threading.Lock()
        self._resets = 0
        self._stalls = 0
        self._slowdown_until = 0.0
        self._slowdowns = 0
        self._down = False
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.injected = {"reset": 0, "stall": 0, "503": 0}
        self.connections = 0
        self.bytes_served = 0       # bytes passed from the store to its clients (responses)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ fault controls

    def reset(self, n: int) -> None:
        with self._lock:
            self._resets += n
        self._reset_open()

    def stall(self, n: int) -> None:
        with self._lock:
            self._stalls += n
        self._reset_open()

    def answer_503(self, seconds: float, at_least: int = 0) -> None:
        """HTTP 503 SlowDown to every request for ``seconds``, and in any case to the next
        ``at_least`` requests (after pending resets and stalls), however late they come."""
        with self._lock:
            self._slowdown_until = time.monotonic() + seconds
            self._slowdowns += at_least
        self._reset_open()

    def down(self) -> None:
        """Refuse connections (the listening socket is closed) until :meth:`up`."""
        with self._lock:
            self._down = True
            listener, self._listener = self._listener, None
        if listener is not None:
            _close_listener(listener)
        self._reset_open()

    def up(self) -> None:
        with self._lock:
            self._down = False
        self._listen()

    def when(self, condition: Callable[[], bool], action: Callable[[], None],
             timeout: float = 300.0, poll: float = 0.1) -> threading.Thread:
        """Run ``action`` (e.g. a burst of faults) once ``condition()`` holds, e.g. mid-run."""
        def watch():
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._stop.is_set():
                if condition():
                    action()
                    return
                time.sleep(poll)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        return t

    def clear(self) -> None:
        with self._lock:
            self._resets = self._stalls = 0
            self._slowdown_until = 0.0
            self._slowdowns = 0

    # ------------------------------------------------------------------ machinery

    def _reset_open(self) -> None:
        with self._lock:
            socks, self._open = list(self._open), set()
        for s in socks:
            _rst(s)

    def _listen(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(128)
        self.port = lst.getsockname()[1]
        with self._lock:
            self._listener = lst
        threading.Thread(target=self._accept_loop, args=(lst,), daemon=True).start()

    def _accept_loop(self, lst: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = lst.accept()
            except OSError:
                return                              # closed by down() or stop()
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.connections += 1
            if self._resets:
                self._resets -= 1
                return "reset"
            if self._stalls:
                self._stalls -= 1
                return "stall"
            if self._slowdowns:
                self._slowdowns -= 1
                return "503"
            if time.monotonic() < self._slowdown_until:
                return "503"
        return None

    def _handle(self, client: socket.socket) -> None:
        fault = self._next_fault()
        if fault is not None:
            self.injected[fault] += 1
        if fault == "reset":
            _rst(client)
            return
        if fault == "stall":
            with self._lock:
                self._open.add(client)
            return                                  # never answered; reset by stop()
        if fault == "503":
            client.settimeout(2.0)
            try:
                client.recv(65536)                  # the request head (the body is dropped)
                client.sendall(_SLOWDOWN % (len(_SLOWDOWN_BODY), _SLOWDOWN_BODY))
            except OSError:
                pass
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _rst(client)
            return
        with self._lock:
            self._open |= {client, upstream}
        self._pipe(client, upstream)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                    if key.fileobj is b:
                        with self._lock:
                            self.bytes_served += len(data)
        except (OSError, ValueError):
            return                                  # reset by a fault, or closed by the peer
        finally:
            sel.close()
            with self._lock:
                self._open -= {a, b}
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def start(self) -> "FaultProxy":
        self._listen()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            _close_listener(listener)
        self._reset_open()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
