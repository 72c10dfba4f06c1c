"""A TCP fault proxy on loopback: sites dial it instead of the coordinator, it forwards the bytes both ways and
injects one fault when told to.

TLS stays end-to-end (the proxy only moves bytes; the site keeps the coordinator's TLS name through
``server_name``), so what a fault breaks is the transport under gRPC, exactly as a real middlebox or a flaky link
would. Directions: ``"up"`` is site -> coordinator, ``"down"`` coordinator -> site.

Faults are armed at any moment and count bytes from the moment they are armed, over every connection (a site's
channel is one connection, but a reconnect opens another):

- :meth:`FaultProxy.reset_after`: after ``n`` more bytes in one direction, reset the connection that carries them
  (RST to both ends via ``SO_LINGER`` 0), ``times`` times.
- :meth:`FaultProxy.corrupt_at`: flip the bits of the byte ``n`` bytes further on in one direction.
- :meth:`FaultProxy.throttle` / :meth:`FaultProxy.delay`: at most ``bytes_per_s`` in one direction, or a fixed delay
  per forwarded piece.
- :meth:`FaultProxy.blackhole`: stop forwarding one direction (the connection stays open, nothing arrives).

Counters (:attr:`FaultProxy.sent`) say how many bytes went each way, so a test can show a resumed upload did not
start again at 0.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

DIRECTIONS = ("up", "down")
_PIECE = 16 * 1024  # bytes read per recv: small enough that a throttle or an offset lands inside a gRPC message


@dataclass
class _Fault:
    kind: str  # "reset" or "corrupt"
    direction: str
    remaining: int  # bytes still to pass before the fault lands
    times: int = 1
    every: int = 0  # for a repeated reset: the byte count it starts again from after each


@dataclass
class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` (see the module docstring).

    Use as a context manager, or call :meth:`start` and :meth:`close`; :attr:`port` is the free port it listens on.
    """

    target_host: str
    target_port: int
    host: str = "127.0.0.1"
    port: int = 0
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    resets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    corrupted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    connections: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._rate: dict[str, float] = {}
        self._delay: dict[str, float] = {}
        self._holes: set[str] = set()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._listener: socket.socket | None = None

    # -- faults -------------------------------------------------------------------------------------------------
    def reset_after(self, direction: str, n: int, times: int = 1) -> None:
        """Reset the connection once ``n`` more bytes went ``direction`` (``times`` times, counting anew after each)."""
        self._arm(_Fault("reset", _check(direction), n, times, n))

    def corrupt_at(self, direction: str, n: int) -> None:
        """Flip every bit of the byte ``n`` bytes further on in ``direction``."""
        self._arm(_Fault("corrupt", _check(direction), n))

    def open_connections(self) -> int:
        """Connections still forwarding (a side's close is passed on only after what it had sent is through)."""
        with self._lock:
            return len(self._socks) // 2

    def throttle(self, direction: str, bytes_per_s: float | None) -> None:
        """Forward at most ``bytes_per_s`` in ``direction`` (None: no limit)."""
        with self._lock:
            if bytes_per_s is None:
                self._rate.pop(_check(direction), None)
            else:
                self._rate[_check(direction)] = float(bytes_per_s)

    def delay(self, direction: str, seconds: float) -> None:
        """Hold every forwarded piece in ``direction`` for ``seconds`` (0: none)."""
        with self._lock:
            self._delay[_check(direction)] = float(seconds)

    def blackhole(self, direction: str, on: bool = True) -> None:
        """Stop (or resume) forwarding ``direction``; bytes read meanwhile are dropped."""
        with self._lock:
            (self._holes.add if on else self._holes.discard)(_check(direction))

    def clear(self) -> None:
        """Disarm every fault, throttle, delay and black hole."""
        with self._lock:
            self._faults.clear()
            self._rate.clear()
            self._delay.clear()
            self._holes.clear()

    def armed(self) -> int:
        """How many armed faults have not landed yet."""
        with self._lock:
            return len(self._faults)

    def _arm(self, fault: _Fault) -> None:
        if fault.remaining < 0 or fault.times < 1:
            raise ValueError(f"fault offset must be >= 0 and times >= 1, got {fault.remaining}, {fault.times}")
        with self._lock:
            self._faults.append(fault)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        lst = socket.create_server((self.host, self.port))
        self.port = lst.getsockname()[1]
        lst.settimeout(0.1)  # close() from another thread does not wake a blocked accept on Linux: poll instead
        self._listener = lst
        self._spawn(self._accept_loop)
        return self

    def close(self) -> None:
        """Stop listening, reset every open connection, and join the threads."""
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _abort(s)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection((self.target_host, self.target_port), timeout=10)
            except OSError:
                _abort(client)
                continue
            # Short timeouts: a pump blocked in recv notices within 0.1 s that its connection was reset by the
            # other direction's pump (a close() from another thread does not wake a blocked recv on Linux).
            client.settimeout(0.1)
            server.settimeout(0.1)
            dead = threading.Event()
            with self._lock:
                self.connections += 1
                self._socks.update((client, server))
            self._spawn(self._pump, client, server, "up", dead)
            self._spawn(self._pump, server, client, "down", dead)

    # -- forwarding ---------------------------------------------------------------------------------------------
    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, dead: threading.Event) -> None:
        try:
            while True:
                if dead.is_set() or self._closed.is_set():
                    raise ConnectionResetError
                try:
                    data = src.recv(_PIECE)
                except TimeoutError:
                    continue
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # a clean half-close passes through
                    return
                data, reset = self._apply(direction, bytearray(data))
                with self._lock:
                    rate, pause, hole = self._rate.get(direction), self._delay.get(direction, 0.0), direction in self._holes
                if hole:
                    continue
                if pause:
                    time.sleep(pause)
                if rate:  # send in small slices so the limit holds inside one piece too
                    for i in range(0, len(data), 1024):
                        _send(dst, data[i:i + 1024], dead)
                        time.sleep(len(data[i:i + 1024]) / rate)
                elif data:
                    _send(dst, data, dead)
                with self._lock:
                    self.sent[direction] += len(data)
                if reset:
                    with self._lock:
                        self.resets[direction] += 1
                    raise ConnectionResetError
        except OSError:
            dead.set()
            _abort(src)
            _abort(dst)
        finally:
            with self._lock:
                self._socks.discard(src)
                self._socks.discard(dst)

    def _apply(self, direction: str, data: bytearray) -> tuple[bytearray, bool]:
        """Land the armed faults that fall inside ``data``: returns what to forward and whether to reset after."""
        with self._lock:
            for f in list(self._faults):
                if f.direction != direction:
                    continue
                if f.remaining >= len(data):
                    f.remaining -= len(data)
                    continue
                if f.kind == "corrupt":
                    data[f.remaining] ^= 0xFF
                    self.corrupted[direction] += 1
                    self._faults.remove(f)
                    continue
                # reset: forward the bytes before the offset, then reset the connection
                data = data[:f.remaining]
                f.times -= 1
                if f.times == 0:
                    self._faults.remove(f)
                else:
                    f.remaining = f.every  # counts anew
                return data, True
        return data, False


def _check(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def _send(sock: socket.socket, data: bytes | bytearray, dead: threading.Event) -> None:
    """``sendall`` on a socket with a short timeout: retries until sent, gives up when the connection died."""
    view = memoryview(data)
    while view:
        if dead.is_set():
            raise ConnectionResetError
        try:
            n = sock.send(view)
        except TimeoutError:
            continue
        view = view[n:]


def _abort(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER on, 0 s) instead of a FIN, the way a crashed middlebox or peer ends it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
