"""A "node" of its own for tests: a network namespace with its own address on a veth pair, and
TCP forwards from inside it to a service on this namespace's loopback.

A browser here reaches the node only by its address, exactly as a user on another machine
reaches a server: nothing of the node is on this namespace's loopback, and nothing of this one
is on the node's (except what ``Forward`` carries). Needs root (``ip netns``, ``setns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass(frozen=True)
class Node:
    """A network namespace ``name`` reached at ``address`` from this one's ``peer``."""

    name: str
    address: str
    peer: str

    def exec(self, *argv: str) -> list[str]:
        """``argv`` run inside the node (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]


@contextlib.contextmanager
def node(subnet: str = "10.231.7") -> Iterator[Node]:
    """A fresh namespace with ``<subnet>.2/24`` on one end of a veth pair, ``<subnet>.1`` on
    the other end here; both gone on leaving, whatever happened."""
    tag = secrets.token_hex(3)
    name, here, there = f"carom-node-{tag}", f"cn{tag}h", f"cn{tag}n"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", name)
        _ip("addr", "add", f"{subnet}.1/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", name, "addr", "add", f"{subnet}.2/24", "dev", there)
        _ip("-n", name, "link", "set", there, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield Node(name, f"{subnet}.2", f"{subnet}.1")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", here)  # takes its peer in the namespace with it
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", name)


def socket_in(namespace: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket of ``namespace`` (made on a thread that enters it; a socket stays in the
    namespace it was made in, whichever thread uses it)."""
    got: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
            finally:
                os.close(fd)
            got.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller
            got.append(exc)

    t = threading.Thread(target=make, name=f"setns-{namespace}")
    t.start()
    t.join()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


class Forward:
    """``127.0.0.1:port`` inside ``namespace`` carried to ``127.0.0.1:port`` here.

    For a broker that listens on loopback only and advertises ``127.0.0.1:port`` (a Pulsar
    client connects to the advertised address after its lookup): inside the node the same
    address works. Threads, not processes: everything stops with ``close``.
    """

    def __init__(self, namespace: str, port: int) -> None:
        self.port = port
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket_in(namespace)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, name=f"forward-{port}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                inner, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                inner.close()
                continue
            outer.settimeout(None)
            inner.settimeout(None)
            with self._lock:
                self._conns += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
