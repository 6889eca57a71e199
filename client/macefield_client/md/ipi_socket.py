"""The driver side of i-PI's socket protocol (checked against i-PI 3.3.1), with its batched form.

i-PI is the server; a driver connects to it and answers 12-byte, space-padded
ASCII headers.  All numbers are native-endian int32 / float64 in atomic units
(Bohr, Hartree)::

    i-PI -> driver                           driver -> i-PI
    STATUS                                   NEEDINIT | READY | HAVEDATA
    INIT  int32 replica, int32 n, n bytes    (nothing)
    POSDATA  h (3x3), h^-1 (3x3),            (nothing: compute now)
             int32 N, positions (N x 3)
    GETFORCE                                 FORCEREADY, float64 energy, int32 N, forces (N x 3),
                                             virial (3x3), int32 n, n bytes of extras (JSON)
    EXIT                                     (close)

h holds the lattice vectors as *columns* (the ASE cell is h.T); the virial is
-stress * volume in Hartree.  GETFORCE may follow POSDATA directly, without a
STATUS between (i-PI's default ``consolidate_messages``).

Batched protocol (i-PI >= 3.3, ``<ffsocket><batch_size>B</batch_size>``): the
INIT string carries ``batch_size:B`` and every exchange then holds exactly B
structures (i-PI pads a short batch with copies of its last structure)::

    POSDATA  int32 N, B x (h, h^-1), positions (B x N x 3)
    GETFORCE -> FORCEREADY, energies (B), int32 N, forces (B x N x 3),
                virials (B x 3 x 3), B x (int32 n, n bytes of extras)

i-PI's ``mode='shm'`` transport (numbers in shared memory) is not spoken here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

HDRLEN = 12
#: where i-PI puts its unix sockets: ``--unix NAME`` connects to ``/tmp/ipi_NAME``
SOCKETS_PREFIX = "/tmp/ipi_"


def header(name: str) -> bytes:
    """A protocol header: the upper-case name space-padded to 12 bytes."""
    return name.upper().ljust(HDRLEN).encode("ascii")


STATUS, INIT, POSDATA, GETFORCE, EXIT = (header(n) for n in ("STATUS", "INIT", "POSDATA", "GETFORCE", "EXIT"))
NEEDINIT, READY, HAVEDATA, FORCEREADY = (header(n) for n in ("NEEDINIT", "READY", "HAVEDATA", "FORCEREADY"))


class IPIClosed(ConnectionError):
    """i-PI closed the connection (it finished, or was stopped)."""


class IPIProtocolError(RuntimeError):
    """i-PI sent something this driver does not understand, or asked for forces it never sent positions for."""


@dataclass
class Evaluation:
    """One structure's answer to i-PI, in atomic units."""

    energy: float  #: Hartree
    forces: np.ndarray  #: (N, 3) Hartree/Bohr
    virial: np.ndarray  #: (3, 3) Hartree: -stress * volume (zeros when there is no cell)
    extras: str = ""  #: JSON text (i-PI parses it into ``forces.extras``)


#: compute(cells (B, 3, 3) h with lattice vectors as columns, Bohr; positions (B, N, 3), Bohr) -> B evaluations
Compute = Callable[[np.ndarray, np.ndarray], Sequence[Evaluation]]


def parse_init(text: str) -> tuple[int, str]:
    """(batch size, the rest) of an INIT string: i-PI appends ``batch_size:B`` to the forcefield's parameters."""
    batch, rest = 1, []
    for token in text.split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip() == "batch_size":
            try:
                batch = int(value.strip())
            except ValueError:
                raise IPIProtocolError(f"INIT: batch_size {value.strip()!r} is not an integer") from None
            if batch < 1:
                raise IPIProtocolError(f"INIT: batch_size {batch} < 1")
        elif token.strip():
            rest.append(token.strip())
    return batch, ",".join(rest)


def connect(*, unix: str | None = None, host: str | None = None, port: int | None = None,
            sockets_prefix: str = SOCKETS_PREFIX, wait_s: float = 60.0) -> socket.socket:
    """Connect to a running i-PI: ``unix`` NAME (socket ``sockets_prefix + NAME``) or ``host``:``port`` (TCP).

    i-PI may still be starting: refused or missing sockets are retried for ``wait_s`` seconds.
    """
    if (unix is None) == (host is None):
        raise ValueError("i-PI address: give either a unix socket name or a host and port")
    address: str | tuple[str, int]
    if unix is not None:
        family, address = socket.AF_UNIX, sockets_prefix + unix
    else:
        if port is None:
            raise ValueError("i-PI address: a host needs a port")
        family, address = socket.AF_INET, (str(host), int(port))
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no i-PI listening at {address} after {wait_s:g} s ({exc.strerror})") from None
            time.sleep(0.2)
            continue
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, latency bound
        return sock


class DriverConnection:
    """One connection to i-PI: answers its messages, calling ``compute`` for each POSDATA."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.batch_size = 1  #: structures per exchange, from INIT
        self.replica: int | None = None  #: the replica index of the INIT message
        self.parameters = ""  #: the forcefield's parameter string from INIT (without batch_size)
        self.exchanges = 0  #: POSDATA messages answered
        self._initialised = False
        self._pending: tuple[int, list[Evaluation]] | None = None  # (N, evaluations) awaiting GETFORCE

    # ------------------------------------------------------------------ bytes
    def _recv(self, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            n = self.sock.recv_into(view[got:], nbytes - got)
            if n == 0:
                raise IPIClosed("i-PI closed the connection")
            got += n
        return bytes(buf)

    def _int32(self) -> int:
        return int(np.frombuffer(self._recv(4), dtype=np.int32)[0])

    def _float64(self, count: int) -> np.ndarray:
        return np.frombuffer(self._recv(8 * count), dtype=np.float64).copy()

    # --------------------------------------------------------------- messages
    def _on_init(self) -> None:
        self.replica = self._int32()
        length = self._int32()
        text = self._recv(length).decode("utf-8", errors="replace") if length > 0 else ""
        self.batch_size, self.parameters = parse_init(text)
        self._initialised = True

    def _on_posdata(self, compute: Compute) -> None:
        if self.batch_size == 1:
            h = self._float64(9).reshape(1, 3, 3)
            self._float64(9)  # h^-1: not needed
            natoms = self._int32()
            positions = self._float64(3 * natoms).reshape(1, natoms, 3)
        else:
            natoms = self._int32()
            cells = self._float64(18 * self.batch_size).reshape(self.batch_size, 2, 3, 3)
            h = cells[:, 0].copy()
            positions = self._float64(3 * natoms * self.batch_size).reshape(self.batch_size, natoms, 3)
        results = list(compute(h, positions))
        if len(results) != len(positions):
            raise IPIProtocolError(f"compute returned {len(results)} results for {len(positions)} structures")
        self._pending = (natoms, results)
        self.exchanges += 1

    def _forces_message(self) -> bytes:
        if self._pending is None:
            raise IPIProtocolError("GETFORCE before any POSDATA")
        natoms, results = self._pending
        self._pending = None
        n = np.int32(natoms).tobytes()
        energies = np.array([r.energy for r in results], dtype=np.float64)
        forces = [np.ascontiguousarray(r.forces, dtype=np.float64).reshape(natoms * 3) for r in results]
        virials = [np.ascontiguousarray(r.virial, dtype=np.float64).reshape(9) for r in results]
        extras = [r.extras.encode("utf-8") for r in results]
        parts = [FORCEREADY]
        if self.batch_size == 1:
            (f,), (v,), (x,) = forces, virials, extras
            parts += [energies.tobytes(), n, f.tobytes(), v.tobytes(), np.int32(len(x)).tobytes(), x]
        else:
            parts += [energies.tobytes(), n, np.concatenate(forces).tobytes(), np.concatenate(virials).tobytes()]
            for x in extras:
                parts += [np.int32(len(x)).tobytes(), x]
        return b"".join(parts)  # one sendall: i-PI reads the reply with short socket timeouts

    def serve(self, compute: Compute) -> str:
        """Answer i-PI until it sends EXIT ("exit") or closes the connection ("closed")."""
        while True:
            try:
                msg = self._recv(HDRLEN)
            except (IPIClosed, ConnectionResetError):  # a killed i-PI resets the stream instead of closing it
                return "closed"
            try:
                if msg == STATUS:
                    reply = NEEDINIT if not self._initialised else HAVEDATA if self._pending is not None else READY
                    self.sock.sendall(reply)
                elif msg == INIT:
                    self._on_init()
                elif msg == POSDATA:
                    self._on_posdata(compute)
                elif msg == GETFORCE:
                    self.sock.sendall(self._forces_message())
                elif msg == EXIT:
                    return "exit"
                else:
                    raise IPIProtocolError(f"unexpected message {msg!r} from i-PI")
            except (IPIClosed, BrokenPipeError, ConnectionResetError):
                return "closed"

    def close(self, drain_s: float = 2.0) -> None:
        """Close without a reset: stop sending, read what i-PI still sends until it closes too, then close.

        Closing a socket with unread input (a GETFORCE after a refused POSDATA)
        sends a TCP reset, which i-PI 3.3's poll thread does not survive; a
        plain end of stream makes i-PI drop this driver and hand its structure
        to the next one.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(drain_s)
            while self.sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            self.sock.close()


__all__ = [
    "EXIT",
    "FORCEREADY",
    "GETFORCE",
    "HAVEDATA",
    "HDRLEN",
    "INIT",
    "NEEDINIT",
    "POSDATA",
    "READY",
    "SOCKETS_PREFIX",
    "STATUS",
    "Compute",
    "DriverConnection",
    "Evaluation",
    "IPIClosed",
    "IPIProtocolError",
    "connect",
    "header",
    "parse_init",
]
