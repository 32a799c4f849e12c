"""A small GDB Remote Serial Protocol client for QEMU's gdbstub.

Standard library only, raw sockets, one connection per `RSPClient`.  Written
against QEMU 7.2: packets up to `PacketSize` (0x1000) bytes, `m` reads of at
most 2048 bytes, hex only (no binary `x`), acks always on (no no-ack mode),
all-stop only: any byte sent while the guest runs stops it, so while running
we send nothing but the interrupt byte.

Not thread-safe, except that `interrupt()` may be called from another thread
while `wait_stop()` blocks.
"""

from __future__ import annotations

import binascii
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, NoReturn
from xml.sax.saxutils import unescape as _xml_unescape
from zlib import adler32

from .errors import GuestConnectionError, ProtocolError

__all__ = [
    "DEFAULT_TIMEOUT",
    "Register",
    "RSPClient",
    "StopReply",
    "parse_target",
]

DEFAULT_TIMEOUT = 5.0
#: Used when the stub does not announce PacketSize (QEMU always does: 0x1000).
DEFAULT_PACKET_SIZE = 4096
#: QEMU refuses `m` requests for more than 2048 bytes.
MAX_MEMORY_CHUNK = 2048
QSUPPORTED = b"qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn+;vContSupported+"

HINT_START = "is QEMU running with -gdb tcp::1234 or -s?"
HINT_NOT_STUB = ("point qemuleak at QEMU's -gdb port, and make sure no other "
                 "debugger is attached to it")
HINT_GONE = "QEMU exited or the guest shut down; start it again and reconnect"
HINT_RECONNECT = "QEMU or the guest may be hung; check QEMU and reconnect"
HINT_TARGET = "use HOST:PORT, :PORT (localhost) or unix:PATH"

_ACK, _NAK = 0x2B, 0x2D  # '+', '-'
_MAX_XML_BYTES = 16 << 20
_MAX_XML_FILES = 64

_SPECIAL = re.compile(rb"[-+$]")
_NEEDS_ESCAPE = re.compile(rb"[#$}*]")
_RLE_OR_ESCAPE = re.compile(rb"[}*]")
_ERROR = re.compile(rb"E(?:[0-9a-fA-F]{2}|\..*)", re.S)
_CONSOLE = re.compile(rb"O(?:[0-9a-fA-F]{2})+")
_STOP = re.compile(
    rb"T[0-9a-fA-F]{2}(?:[^;:]+:[^;]*;)*(?:[^;:]+:[^;]*)?"
    rb"|S[0-9a-fA-F]{2}"
    rb"|[WX][0-9a-fA-F]{2}(?:;[^;:]+:[^;]*)*;?",
    re.S,
)
_ASYNC_FIRST = frozenset(b"OTSWX")
_HEXDIGITS = b"0123456789abcdefABCDEF"
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<(xi:include|reg)\b([^>]*)>", re.S)
_ATTR = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_ANNEX = re.compile(r"[\w.+/-]+")

StopKind = Literal["T", "S", "W", "X"]


# --------------------------------------------------------------------------
# Data types


@dataclass(frozen=True)
class StopReply:
    """A parsed stop reply.

    kind: 'T'/'S' the guest stopped with `signal`; 'W' the process exited with
    status `signal`; 'X' it was killed by signal `signal`.  `info` holds every
    `key:value` pair of a T/W/X packet (register values included, as hex
    strings), `thread` the `thread:` value if any.
    """

    kind: StopKind
    signal: int
    thread: str | None = None
    info: dict[str, str] = field(default_factory=dict)

    @property
    def exited(self) -> bool:
        """True for W/X: the guest (process) is gone."""
        return self.kind in ("W", "X")

    @classmethod
    def parse(cls, payload: bytes) -> StopReply:
        """Parse a stop-reply payload; ProtocolError if it is not one."""
        if not _STOP.fullmatch(payload):
            raise ProtocolError(f"expected a stop reply from the gdbstub, got {_show(payload)}")
        text = payload.decode("ascii", "replace")
        kind: StopKind = text[0]  # type: ignore[assignment]
        info: dict[str, str] = {}
        for item in text[3:].split(";"):
            if item:
                key, _, value = item.partition(":")
                info[key] = value
        return cls(kind, int(text[1:3], 16), info.get("thread"), info)


class Register(NamedTuple):
    """One register from the target description.

    `offset` is its byte offset in the `g` packet (registers ordered by
    regnum); registers at or past the end of `g` must be read with `p`.
    """

    name: str
    bitsize: int
    regnum: int
    offset: int


# --------------------------------------------------------------------------
# Helpers


class _Timeout(Exception):
    """Internal: a deadline passed."""


class _Closed(Exception):
    """Internal: the connection broke (reason in args[0])."""


class _NotRSP(Exception):
    """Internal: non-RSP bytes seen while checking that the peer is a gdbstub."""


class _Desync(ProtocolError):
    """Framing broke down (retries exhausted, runaway packet): the stream is
    out of sync and the connection unusable."""


def _now() -> float:
    return time.monotonic()


def _show(data: bytes | bytearray, limit: int = 40) -> str:
    """Short printable rendering of a packet for error messages."""
    text = bytes(data[:limit]).decode("latin-1").encode("unicode_escape").decode("ascii")
    return f"'{text}...'" if len(data) > limit else f"'{text}'"


def _checksum(data: bytes | bytearray) -> int:
    """Sum of the bytes modulo 256 (adler32's A term, in exact 256-byte steps)."""
    n = len(data)
    if n <= 256:
        return (adler32(data) - 1) & 0xFF
    return (sum([adler32(data[i:i + 256]) for i in range(0, n, 256)]) - ((n + 255) >> 8)) & 0xFF


def _escape(data: bytes) -> bytes:
    return _NEEDS_ESCAPE.sub(lambda m: bytes((0x7D, m[0][0] ^ 0x20)), data)


def _decode(raw: bytes) -> bytes:
    """Undo `}` escapes and `*` run-length encoding of a packet body."""
    if b"*" not in raw and b"}" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        m = _RLE_OR_ESCAPE.search(raw, i)
        if m is None:
            out += raw[i:]
            break
        j = m.start()
        out += raw[i:j]
        if j + 1 >= n:
            raise ProtocolError(f"gdbstub packet ends inside an escape: {_show(raw[-40:])}")
        nxt = raw[j + 1]
        if raw[j] == 0x7D:  # '}'
            out.append(nxt ^ 0x20)
        else:  # '*': repeat the previous byte (nxt - 29) more times
            if not out or nxt < 29:
                raise ProtocolError(f"gdbstub sent a bad run-length encoding: {_show(raw[max(0, j - 8):j + 2])}")
            out += out[-1:] * (nxt - 29)
        i = j + 2
    return bytes(out)


def _unhex(payload: bytes, what: str) -> bytes:
    """Hex-decode a reply ('x' digits, meaning unavailable, read as 0)."""
    if b"x" in payload:
        payload = payload.replace(b"x", b"0")
    try:
        return binascii.unhexlify(payload)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"gdbstub sent malformed hex in the answer to {what}: {_show(payload)}") from None


def _error_code(reply: bytes) -> bool:
    return bool(reply) and reply[0] == 0x45 and _ERROR.fullmatch(reply) is not None


def parse_target(target: str) -> tuple[str, str | tuple[str, int]]:
    """Split a target into ('tcp', (host, port)) or ('unix', path).

    Accepts HOST:PORT, :PORT (127.0.0.1), [V6ADDR]:PORT, tcp:HOST:PORT and
    unix:PATH; GuestConnectionError for anything else.
    """
    if not isinstance(target, str) or not target.strip():
        raise GuestConnectionError(f"malformed gdbstub address {target!r}", hint=HINT_TARGET)
    spec = target.strip()
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise GuestConnectionError(f"malformed gdbstub address {target!r}: no socket path", hint=HINT_TARGET)
        return ("unix", path)
    if spec.startswith("tcp:"):
        spec = spec[4:]
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        raise GuestConnectionError(f"malformed gdbstub address {target!r}: no port", hint=HINT_TARGET)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        host = "127.0.0.1"
    if not port_text.isdecimal() or not 0 < int(port_text) < 65536:
        raise GuestConnectionError(f"malformed gdbstub address {target!r}: bad port {port_text!r}",
                                   hint=HINT_TARGET)
    if any(c.isspace() for c in host) or "/" in host:
        raise GuestConnectionError(f"malformed gdbstub address {target!r}: bad host {host!r}", hint=HINT_TARGET)
    return ("tcp", (host, int(port_text)))


# --------------------------------------------------------------------------
# The client


class RSPClient:
    """A connection to one gdbstub.  Use `RSPClient.connect(target)`."""

    #: how often a packet is resent after a NAK, and how many bad packets in a
    #: row we NAK before giving up
    max_retries = 3
    #: `m` requests sent at once by read_memory (replies come back in order)
    read_window = 16

    def __init__(self, sock: socket.socket, target: str = "gdbstub", timeout: float = DEFAULT_TIMEOUT,
                 on_output: Callable[[bytes], None] | None = None) -> None:
        """Wrap an already connected socket (no handshake; see `connect`)."""
        self.target = target
        self.timeout = timeout
        #: called with console output (`O` packets); else collected in `output`
        self.on_output = on_output
        self.output = bytearray()
        #: features from qSupported (name -> value, or True/False for +/-)
        self.features: dict[str, str | bool] = {}
        self.packet_size = DEFAULT_PACKET_SIZE
        self.max_read = MAX_MEMORY_CHUNK
        self.last_stop: StopReply | None = None
        #: the guest was running and our connection stopped it
        self.stopped_on_connect = False
        self._sock: socket.socket | None = sock
        self._buf = bytearray()
        self._rbuf = bytearray(1 << 16)
        self._rview = memoryview(self._rbuf)
        self._max_frame = 1 << 16
        self._pending: deque[bytes] = deque()  # packets that arrived before an ack
        self._owed = 0  # acks we owe the stub (sent with our next bytes)
        self._bad = 0  # consecutive packets with a bad checksum
        self._strict = False  # handshake: non-RSP bytes mean "not a gdbstub"
        self._dead: str | None = None  # why the connection is unusable
        self._running = False
        self._thread: str | None = None  # thread selected with Hg
        self._phys: bool | None = None  # Qqemu.PhyMemMode state, None = unknown
        self._breakpoints: set[tuple[int, int]] = set()
        self._xml: dict[str, str] | None = None
        self._set_packet_size(DEFAULT_PACKET_SIZE)

    # -- connection --------------------------------------------------------

    @classmethod
    def connect(cls, target: str, timeout: float = DEFAULT_TIMEOUT,
                on_output: Callable[[bytes], None] | None = None) -> RSPClient:
        """Connect to HOST:PORT, :PORT or unix:PATH and do the RSP handshake.

        Stops a running guest (QEMU does so on connect) and drops QEMU's
        breakpoints (it does so on `?`).
        """
        kind, addr = parse_target(target)
        try:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(addr)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(addr, timeout=timeout)  # type: ignore[arg-type]
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (ConnectionRefusedError, FileNotFoundError):
            raise GuestConnectionError(f"nothing listening at {target}", hint=HINT_START) from None
        except socket.gaierror as e:
            raise GuestConnectionError(f"cannot resolve the host in {target}: {e.strerror}", hint=HINT_TARGET) from None
        except TimeoutError:
            raise GuestConnectionError(f"timed out after {timeout:g}s connecting to {target}",
                                       hint=HINT_START) from None
        except OSError as e:
            raise GuestConnectionError(f"cannot connect to {target}: {e.strerror or e}", hint=HINT_START) from None
        client = cls(sock, target, timeout, on_output)
        try:
            client._handshake()
        except BaseException:
            client.close()
            raise
        return client

    def _handshake(self) -> None:
        """qSupported (proves it is a gdbstub), then `?` for the stop state."""
        self._strict = True
        why = ""
        try:
            deadline = _now() + self.timeout
            self._send_packet(QSUPPORTED, deadline)
            reply = self._recv_reply(deadline)
        except _NotRSP as e:
            why = f"it sent {_show(e.args[0], 24)}"
        except _Timeout:
            why = f"no answer to qSupported within {self.timeout:g}s"
        except _Closed:
            why = "it closed the connection without answering qSupported"
        except ProtocolError as e:
            why = e.message
        finally:
            self._strict = False
        if why:
            self._dead = "not connected"
            raise GuestConnectionError(f"{self.target} is not a gdbstub ({why})", hint=HINT_NOT_STUB)
        if not _error_code(reply):
            self._parse_features(reply)
        # QEMU stops a running guest when we connect and says so with a stop
        # packet before anything else; a guest that was already stopped sends none.
        self.stopped_on_connect = self.last_stop is not None
        stop = StopReply.parse(self._transact(b"?", expect_stop=True))
        self._note_stop(stop)
        if stop.exited:
            self._raise_dead()

    def _parse_features(self, reply: bytes) -> None:
        for item in reply.decode("ascii", "replace").split(";"):
            if not item:
                continue
            name, eq, value = item.partition("=")
            if eq:
                self.features[name] = value
            elif item[-1] in "+-":
                self.features[item[:-1]] = item[-1] == "+"
            else:
                self.features[item.rstrip("?")] = "?" if item.endswith("?") else True
        size = self.features.get("PacketSize")
        if isinstance(size, str):
            try:
                self._set_packet_size(int(size, 16))
            except ValueError:
                pass

    def _set_packet_size(self, size: int) -> None:
        if size < 16:
            return
        self.packet_size = size
        self.max_read = max(1, min(MAX_MEMORY_CHUNK, size // 2))
        self._max_frame = max(1 << 16, 4 * size)

    def close(self) -> None:
        """Remove our breakpoints (best effort) and close; the guest stays as it is."""
        if self._sock is None:
            return
        if self._breakpoints and self._dead is None and not self._running:
            try:
                self.remove_all_breakpoints()
            except (GuestConnectionError, ProtocolError):
                pass
        sock, self._sock = self._sock, None
        self._dead = f"the connection to {self.target} is closed"
        try:
            if self._owed:
                sock.setblocking(False)
                sock.send(b"+" * self._owed)
        except OSError:
            pass
        sock.close()

    def __enter__(self) -> RSPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._dead or ("running" if self._running else "stopped")
        return f"<RSPClient {self.target} {state}>"

    @property
    def usable(self) -> bool:
        """False once the guest or the connection is gone (every call then raises)."""
        return self._dead is None

    @property
    def running(self) -> bool:
        """True between `cont()` and the stop reply."""
        return self._running

    # -- byte and packet layer ---------------------------------------------

    def _sendall(self, data: bytes) -> None:
        if self._owed:
            data = b"+" * self._owed + data
            self._owed = 0
        sock = self._sock
        if sock is None:
            raise _Closed(self._dead or "closed")
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
        except TimeoutError:
            raise _Timeout from None
        except OSError as e:
            raise _Closed(f"lost the connection to {self.target}: {e.strerror or e}") from None

    def _fill(self, deadline: float | None) -> None:
        """Receive more bytes into the buffer (paying owed acks first)."""
        if self._owed:
            self._sendall(b"")
        sock = self._sock
        if sock is None:
            raise _Closed(self._dead or "closed")
        if deadline is None:
            sock.settimeout(None)
        else:
            remaining = deadline - _now()
            if remaining <= 0:
                raise _Timeout
            sock.settimeout(remaining)
        try:
            n = sock.recv_into(self._rview)
        except TimeoutError:
            raise _Timeout from None
        except OSError as e:
            raise _Closed(f"lost the connection to {self.target}: {e.strerror or e}") from None
        if not n:
            raise _Closed(f"{self.target} closed the connection")
        self._buf += self._rview[:n]

    def _stray(self, data: bytes | bytearray) -> None:
        """Bytes outside packets: ignored, except during the handshake."""
        if self._strict and data:
            raise _NotRSP(bytes(self._buf))  # data starts it; show all we have

    def _next_event(self, deadline: float | None) -> int | bytes:
        """Next ack (`_ACK`/`_NAK`) or good packet (decoded payload, ack owed)."""
        buf = self._buf
        while True:
            m = _SPECIAL.search(buf)
            if m is None:
                if buf:
                    self._stray(buf)
                    buf.clear()
                self._fill(deadline)
                continue
            i = m.start()
            if i:
                self._stray(buf[:i])
                del buf[:i]
            if buf[0] != 0x24:  # '+' or '-'
                c = buf[0]
                del buf[:1]
                return c
            end = buf.find(b"#", 1)
            restart = buf.find(b"$", 1, end if end >= 0 else len(buf))
            if restart > 0:  # a new packet started inside this one: drop the torn one
                self._stray(buf[:restart])
                del buf[:restart]
                continue
            if end < 0 or len(buf) < end + 3:
                if len(buf) > self._max_frame:
                    raise _Desync(f"gdbstub sent a packet longer than {self._max_frame} bytes")
                self._fill(deadline)
                continue
            raw = bytes(buf[1:end])
            cs = bytes(buf[end + 1:end + 3])
            del buf[:end + 3]
            if not cs.strip(_HEXDIGITS) and int(cs, 16) == _checksum(raw):
                self._bad = 0
                self._owed += 1
                return _decode(raw)
            self._bad += 1
            if self._bad > self.max_retries:
                raise _Desync(f"gdbstub sent {self._bad} packets with bad checksums in a row")
            self._sendall(b"-")

    def _next_packet(self, deadline: float | None) -> bytes:
        if self._pending:
            return self._pending.popleft()
        while True:
            ev = self._next_event(deadline)
            if type(ev) is bytes:
                return ev

    def _send_packet(self, payload: bytes, deadline: float) -> None:
        """Send one packet and wait for its ack, resending on NAK."""
        if _NEEDS_ESCAPE.search(payload):
            payload = _escape(payload)
        packet = b"$%b#%02x" % (payload, _checksum(payload))
        self._sendall(packet)
        naks = 0
        while True:
            ev = self._next_event(deadline)
            if ev == _ACK:
                return
            if ev == _NAK:
                naks += 1
                if naks > self.max_retries:
                    raise _Desync(f"gdbstub rejected {_show(payload)} {naks} times (bad checksum?)")
                self._sendall(packet)
            else:  # a packet before the ack: keep it for the reader
                assert isinstance(ev, bytes)
                self._pending.append(ev)
                if not (ev and ev[0] in _ASYNC_FIRST and (_STOP.fullmatch(ev) or _CONSOLE.fullmatch(ev))):
                    return  # looks like our reply: the ack is implied

    def _recv_reply(self, deadline: float, expect_stop: bool = False, keep_output: bool = False) -> bytes:
        """Next reply packet, skipping console output and stale stop replies."""
        while True:
            pkt = self._next_packet(deadline)
            if pkt and pkt[0] in _ASYNC_FIRST:
                if pkt[0] == 0x4F:  # 'O'
                    if not keep_output and _CONSOLE.fullmatch(pkt):
                        self._console(pkt)
                        continue
                elif not expect_stop and _STOP.fullmatch(pkt):
                    stop = StopReply.parse(pkt)
                    self._note_stop(stop)
                    if stop.exited:
                        self._raise_dead()
                    continue
            return pkt

    def _transact_many(self, payloads: list[bytes]) -> list[bytes]:
        """Send several packets in one write and return their replies in order.

        The stub handles them one after the other; a NAK cannot be answered by a
        resend without reordering, so it ends the connection like a timeout."""
        if len(payloads) == 1:
            return [self._transact(payloads[0])]
        if self._dead is not None:
            self._raise_dead()
        deadline = _now() + self.timeout
        framed = []
        for payload in payloads:
            body = _escape(payload) if _NEEDS_ESCAPE.search(payload) else payload
            framed.append(b"$%b#%02x" % (body, _checksum(body)))
        try:
            self._sendall(b"".join(framed))
            replies = []
            for payload in payloads:
                self._await_ack(payload, deadline)
                replies.append(self._recv_reply(deadline))
            return replies
        except (_Timeout, _Closed, _Desync) as e:
            self._fail(e, f"the answers to {len(payloads)} pipelined packets")

    def _await_ack(self, payload: bytes, deadline: float) -> None:
        """Wait for the ack of a pipelined packet (a reply before it implies it)."""
        while True:
            ev = self._next_event(deadline)
            if ev == _ACK:
                return
            if ev == _NAK:
                raise _Desync(f"gdbstub rejected pipelined {_show(payload)} (bad checksum?)")
            assert isinstance(ev, bytes)
            self._pending.append(ev)
            if not (ev and ev[0] in _ASYNC_FIRST and (_STOP.fullmatch(ev) or _CONSOLE.fullmatch(ev))):
                return

    def _transact(self, payload: bytes, expect_stop: bool = False, keep_output: bool = False) -> bytes:
        """Send a packet and return the raw reply payload."""
        if self._dead is not None:
            self._raise_dead()
        deadline = _now() + self.timeout
        try:
            self._send_packet(payload, deadline)
            return self._recv_reply(deadline, expect_stop, keep_output)
        except (_Timeout, _Closed, _Desync) as e:
            self._fail(e, f"the answer to {_show(payload)}")

    def _fail(self, exc: Exception, what: str) -> NoReturn:
        """Turn an internal failure into a QemuleakError; the connection is dead."""
        if isinstance(exc, _Timeout):
            self._dead = f"the connection to {self.target} is unusable after a timeout"
            raise GuestConnectionError(f"timed out after {self.timeout:g}s waiting for {what} from {self.target}",
                                       hint=HINT_RECONNECT) from None
        if isinstance(exc, _Closed):
            self._dead = f"{exc.args[0]} (guest is gone?)"
            raise GuestConnectionError(f"{exc.args[0]} while waiting for {what} (guest is gone?)",
                                       hint=HINT_GONE) from None
        if isinstance(exc, _Desync):
            self._dead = f"the connection to {self.target} is unusable after a protocol error"
        raise exc

    def _raise_dead(self) -> NoReturn:
        raise GuestConnectionError(self._dead or "not connected", hint=HINT_GONE)

    def _check_stopped(self) -> None:
        if self._dead is not None:
            self._raise_dead()
        if self._running:
            raise ProtocolError("the guest is running", hint="call interrupt() and wait_stop() first")

    def _console(self, pkt: bytes) -> None:
        data = binascii.unhexlify(pkt[1:])
        if self.on_output is not None:
            self.on_output(data)
        else:
            self.output += data

    def take_output(self) -> bytes:
        """Return and clear console output collected from `O` packets."""
        data = bytes(self.output)
        self.output.clear()
        return data

    def _note_stop(self, stop: StopReply) -> None:
        self.last_stop = stop
        self._running = False
        self._thread = None  # QEMU selects the stopping CPU
        if stop.exited:
            how = f"exited with status {stop.signal}" if stop.kind == "W" else f"killed by signal {stop.signal}"
            self._dead = f"guest is gone ({how})"

    # -- commands ------------------------------------------------------------

    def command(self, data: str | bytes, *, required: bool = False) -> bytes:
        """Send one packet and return the reply payload.

        `E NN` raises ProtocolError.  An empty reply means "unsupported": it is
        returned as b"" unless `required`, which makes it a ProtocolError.
        """
        self._check_stopped()
        payload = data.encode("latin-1") if isinstance(data, str) else bytes(data)
        reply = self._transact(payload)
        self._check_reply(payload, reply, required)
        return reply

    def _check_reply(self, payload: bytes, reply: bytes, required: bool = True) -> None:
        if _error_code(reply):
            raise ProtocolError(f"gdbstub answered {_show(reply)} to {_show(payload)}",
                                hint="the command failed in the guest or is not allowed now")
        if not reply and required:
            raise ProtocolError(f"gdbstub does not support {_show(payload)} (empty answer)",
                                hint="this QEMU's gdbstub lacks the feature; try a newer QEMU")

    def _require(self, payload: bytes) -> bytes:
        """`command` for our own use: error and empty replies raise."""
        self._check_stopped()
        reply = self._transact(payload)
        self._check_reply(payload, reply)
        return reply

    def _expect_ok(self, payload: bytes) -> None:
        reply = self._require(payload)
        if reply != b"OK":
            raise ProtocolError(f"gdbstub answered {_show(reply)} to {_show(payload)} instead of OK")

    # -- running and stopping ----------------------------------------------

    def cont(self) -> None:
        """Resume the guest (`c`) without waiting; see `wait_stop`."""
        self._resume(b"c")

    def _resume(self, payload: bytes) -> None:
        self._check_stopped()
        try:
            self._send_packet(payload, _now() + self.timeout)
        except (_Timeout, _Closed, _Desync) as e:
            self._fail(e, f"the ack of {_show(payload)}")
        self._running = True
        self._thread = None

    def interrupt(self) -> None:
        """Stop a running guest (sends 0x03); a no-op if it is stopped."""
        if self._dead is not None:
            self._raise_dead()
        if not self._running or self._sock is None:
            return
        data, self._owed = b"+" * self._owed + b"\x03", 0
        try:  # no settimeout(): wait_stop() may be blocked in recv() in another thread
            self._sock.send(data)
        except OSError as e:
            self._fail(_Closed(f"lost the connection to {self.target}: {e.strerror or e}"), "sending the interrupt")

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """Wait (at most `timeout` s, None = forever) for the guest to stop.

        Returns the stop reply; if the guest is already stopped, the last one.
        A timeout raises GuestConnectionError but leaves the connection usable
        (the guest keeps running: `interrupt()` then `wait_stop()`).  After a
        W/X reply (returned once) every call raises "guest is gone".
        """
        if self._dead is not None:
            self._raise_dead()
        if not self._running:
            if self.last_stop is None:
                raise ProtocolError("the guest is neither running nor stopped (no stop reply yet)")
            return self.last_stop
        try:
            return self._wait_stop(None if timeout is None else _now() + timeout)
        except _Timeout:
            raise GuestConnectionError(f"the guest did not stop within {timeout:g}s",
                                       hint="it is still running: call interrupt() to stop it") from None

    def _wait_stop(self, deadline: float | None) -> StopReply:
        try:
            while True:
                pkt = self._next_packet(deadline)
                if pkt and pkt[0] == 0x4F and _CONSOLE.fullmatch(pkt):
                    self._console(pkt)
                    continue
                if not _STOP.fullmatch(pkt):
                    raise ProtocolError(f"gdbstub sent {_show(pkt)} while the guest was running")
                stop = StopReply.parse(pkt)
                self._note_stop(stop)
                return stop
        except (_Closed, _Desync) as e:
            self._fail(e, "the guest to stop")

    def resume_and_wait(self, timeout: float | None = None) -> StopReply:
        """Continue, wait up to `timeout` s for a stop, else interrupt; return the stop."""
        self.cont()
        return self._stop_within(timeout)

    def _stop_within(self, timeout: float | None) -> StopReply:
        try:
            return self._wait_stop(None if timeout is None else _now() + timeout)
        except _Timeout:
            pass
        self.interrupt()
        try:
            return self._wait_stop(_now() + self.timeout)
        except _Timeout as e:
            self._fail(e, "the guest to stop after an interrupt")

    def step(self, thread: str | None = None, timeout: float | None = None) -> StopReply:
        """Single-step (`s`, or `vCont;s:thread`) and return the stop reply.

        Waits `timeout` s (default: the client timeout), then interrupts.
        """
        self._resume(b"s" if thread is None else b"vCont;s:" + thread.encode("ascii"))
        return self._stop_within(self.timeout if timeout is None else timeout)

    # -- registers -----------------------------------------------------------

    def read_registers(self, thread: str | None = None) -> bytes:
        """All `g` registers of `thread` (default: the current one), raw target bytes."""
        if thread is not None:
            self.select_thread(thread)
        return _unhex(self._require(b"g"), "'g'")

    def read_register(self, num: int, thread: str | None = None) -> bytes:
        """Register `num` (a regnum from `register_layout`) via `p`."""
        if thread is not None:
            self.select_thread(thread)
        payload = b"p%x" % num
        return _unhex(self._require(payload), _show(payload))

    def write_register(self, num: int, value: bytes, thread: str | None = None) -> None:
        """Set register `num` to `value` (raw target-endian bytes) via `P`."""
        if thread is not None:
            self.select_thread(thread)
        self._expect_ok(b"P%x=%b" % (num, binascii.hexlify(value)))

    def target_xml(self) -> dict[str, str]:
        """The target description: {file name: XML text}, target.xml first,
        then every file reached through `<xi:include href=...>`."""
        if self._xml is None:
            files: dict[str, str] = {}
            todo = ["target.xml"]
            while todo:
                name = todo.pop(0)
                if name in files:
                    continue
                if len(files) >= _MAX_XML_FILES:
                    raise ProtocolError(f"target description includes more than {_MAX_XML_FILES} files")
                text = self._read_xfer("features", name).decode("utf-8", "replace")
                files[name] = text
                for tag, attrs in _TAG.findall(_COMMENT.sub("", text)):
                    if tag == "xi:include":
                        href = _attrs(attrs).get("href")
                        if href is None or not _ANNEX.fullmatch(href):
                            raise ProtocolError(f"target description {name} has a bad xi:include: {href!r}")
                        todo.append(href)
            self._xml = files
        return dict(self._xml)

    def _read_xfer(self, obj: str, annex: str) -> bytes:
        """Read a whole qXfer object in chunks (`m` more follows, `l` last)."""
        chunk = max(16, self.packet_size - 5)
        parts: list[bytes] = []
        offset = 0
        while True:
            payload = b"qXfer:%b:read:%b:%x,%x" % (obj.encode(), annex.encode(), offset, chunk)
            reply = self._require(payload)
            kind, data = reply[:1], reply[1:]
            if kind not in (b"m", b"l"):
                raise ProtocolError(f"gdbstub answered {_show(reply)} to {_show(payload)}")
            parts.append(data)
            offset += len(data)
            if kind == b"l":
                return b"".join(parts)
            if not data:
                raise ProtocolError(f"gdbstub sent an empty chunk of {annex} without ending it")
            if offset > _MAX_XML_BYTES:
                raise ProtocolError(f"gdbstub's {annex} is larger than {_MAX_XML_BYTES} bytes")

    def register_layout(self) -> list[Register]:
        """Registers from the target description, in document order.

        regnum defaults to the previous one + 1 (starting at 0); `offset` is
        the position in the `g` packet, registers being ordered by regnum.
        """
        files = self.target_xml()
        regs: list[tuple[str, int, int]] = []
        state = {"next": 0}

        def walk(name: str, depth: int) -> None:
            if depth > 16:
                raise ProtocolError(f"target description includes are nested too deeply at {name}")
            text = files.get(name)
            if text is None:
                raise ProtocolError(f"target description file {name} is missing")
            for tag, attr_text in _TAG.findall(_COMMENT.sub("", text)):
                attrs = _attrs(attr_text)
                if tag == "xi:include":
                    walk(attrs.get("href", ""), depth + 1)
                    continue
                reg_name = attrs.get("name")
                try:
                    bitsize = int(attrs["bitsize"])
                    regnum = int(attrs["regnum"]) if "regnum" in attrs else state["next"]
                except (KeyError, ValueError):
                    raise ProtocolError(f"target description {name} has a bad <reg{attr_text}>") from None
                if not reg_name or bitsize <= 0 or regnum < 0:
                    raise ProtocolError(f"target description {name} has a bad <reg{attr_text}>")
                regs.append((reg_name, bitsize, regnum))
                state["next"] = regnum + 1

        walk("target.xml", 0)
        offsets: dict[int, int] = {}
        pos = 0
        for _, bitsize, regnum in sorted(regs, key=lambda r: r[2]):
            if regnum in offsets:
                raise ProtocolError(f"target description defines register number {regnum} twice")
            offsets[regnum] = pos
            pos += (bitsize + 7) // 8
        return [Register(n, b, r, offsets[r]) for n, b, r in regs]

    # -- memory ----------------------------------------------------------------

    def read_memory(self, addr: int, length: int) -> bytes:
        """Read guest memory (virtual, or physical after set_physical_mode(True))."""
        if length < 0 or addr < 0:
            raise ValueError(f"bad memory range {addr:#x}+{length}")
        self._check_stopped()
        parts: list[bytes] = []
        end = addr + length
        step = self.max_read
        window: list[tuple[int, int]] = []
        replies: list[bytes] = []
        while addr < end:
            if not replies:
                # Pipelined: a window of `m` requests in one write, replies in order.
                window, pos = [], addr
                while pos < end and len(window) < self.read_window:
                    window.append((pos, min(step, end - pos)))
                    pos += window[-1][1]
                replies = self._transact_many([b"m%x,%x" % w for w in window])
                replies.reverse()
            reply = replies.pop()
            addr_w, n = window[len(window) - len(replies) - 1]
            if addr_w != addr:      # a short read earlier in the window: redo from here
                replies = []
                continue
            try:
                data = binascii.unhexlify(reply)
            except (binascii.Error, ValueError):
                if _error_code(reply):
                    raise ProtocolError(
                        f"cannot read guest memory at {addr:#x} ({n} bytes): gdbstub answered {_show(reply)}",
                        hint="the address is not mapped in the guest") from None
                raise ProtocolError(f"gdbstub sent malformed hex in the answer to 'm{addr:x},{n:x}': "
                                    f"{_show(reply)}") from None
            if not data or len(data) > n:
                raise ProtocolError(f"gdbstub answered {len(data)} bytes to a read of {n} bytes at {addr:#x}")
            parts.append(data)
            addr += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write guest memory with `M` packets that fit in PacketSize."""
        if addr < 0:
            raise ValueError(f"bad memory address {addr:#x}")
        step = max(1, min(MAX_MEMORY_CHUNK, (self.packet_size - 64) // 2))
        view = memoryview(data)
        for i in range(0, len(view), step):
            part = view[i:i + step]
            payload = b"M%x,%x:%b" % (addr + i, len(part), binascii.hexlify(part))
            try:
                self._expect_ok(payload)
            except ProtocolError as e:
                raise ProtocolError(f"cannot write guest memory at {addr + i:#x}: {e.message}",
                                    hint="the address is not mapped in the guest") from None

    def set_physical_mode(self, physical: bool) -> None:
        """Make `m`/`M` use guest-physical (True) or virtual (False) addresses."""
        if self._phys is physical:
            return
        self._expect_ok(b"Qqemu.PhyMemMode:1" if physical else b"Qqemu.PhyMemMode:0")
        self._phys = physical

    @property
    def physical_mode(self) -> bool | None:
        """Current memory mode as set by us (None: never set on this connection)."""
        return self._phys

    # -- breakpoints -------------------------------------------------------------

    def insert_breakpoint(self, addr: int, kind: int = 1) -> None:
        """Insert a software breakpoint (`Z0`); kind is 1 on x86."""
        self._expect_ok(b"Z0,%x,%x" % (addr, kind))
        self._breakpoints.add((addr, kind))

    def remove_breakpoint(self, addr: int, kind: int = 1) -> None:
        """Remove a software breakpoint (`z0`)."""
        self._expect_ok(b"z0,%x,%x" % (addr, kind))
        self._breakpoints.discard((addr, kind))

    def drop_stub_breakpoints(self) -> None:
        """Make QEMU forget every breakpoint, ours or a dead debugger's.

        QEMU 7.2 answers `?` by removing the breakpoints of the vCPU that `Hc`
        selected, and only of that one: so select each vCPU in turn and ask."""
        for tid in self.threads():
            self._expect_ok(b"Hc" + tid.encode("ascii"))
            self._note_stop(StopReply.parse(self._transact(b"?", expect_stop=True)))
        self._breakpoints.clear()

    def remove_stray_breakpoint(self, addr: int, kind: int = 1) -> bool:
        """Remove a breakpoint that may or may not be there (one a dead debugger
        left); False if the stub had none at `addr`."""
        try:
            self._expect_ok(b"z0,%x,%x" % (addr, kind))
        except ProtocolError:
            return False
        self._breakpoints.discard((addr, kind))
        return True

    def remove_all_breakpoints(self) -> None:
        """Remove every breakpoint we inserted; raises the first failure at the end."""
        first: Exception | None = None
        for addr, kind in sorted(self._breakpoints):
            try:
                self.remove_breakpoint(addr, kind)
            except (GuestConnectionError, ProtocolError) as e:
                if isinstance(e, GuestConnectionError):
                    self._breakpoints.clear()
                    raise
                first = first or e
                self._breakpoints.discard((addr, kind))
        if first is not None:
            raise first

    @property
    def breakpoints(self) -> frozenset[tuple[int, int]]:
        """(address, kind) of the breakpoints we inserted."""
        return frozenset(self._breakpoints)

    # -- threads -----------------------------------------------------------------

    def threads(self) -> list[str]:
        """Thread ids (one per vCPU in QEMU, like 'p01.01')."""
        result: list[str] = []
        payload = b"qfThreadInfo"
        for _ in range(100000):
            reply = self._require(payload)
            if reply[:1] == b"l":
                return result
            if reply[:1] != b"m":
                raise ProtocolError(f"gdbstub answered {_show(reply)} to {_show(payload)}")
            result += [t for t in reply[1:].decode("ascii", "replace").split(",") if t]
            payload = b"qsThreadInfo"
        raise ProtocolError("gdbstub's thread list does not end")

    def select_thread(self, tid: str) -> None:
        """Make `tid` current for register access (`Hg`), if it is not already."""
        if tid == self._thread:
            return
        self._expect_ok(b"Hg" + tid.encode("ascii"))
        self._thread = tid

    # -- monitor -----------------------------------------------------------------

    def monitor(self, cmd: str) -> str:
        """Run a QEMU monitor (HMP) command via qRcmd and return its output."""
        self._check_stopped()
        payload = b"qRcmd," + binascii.hexlify(cmd.encode("utf-8"))
        out = bytearray()
        reply = self._transact(payload, keep_output=True)
        deadline = _now() + self.timeout
        try:
            while reply != b"OK":
                if reply and reply[0] == 0x4F and _CONSOLE.fullmatch(reply):
                    out += binascii.unhexlify(reply[1:])
                    reply = self._recv_reply(deadline, keep_output=True)
                    continue
                self._check_reply(payload, reply)
                if _CONSOLE.fullmatch(b"O" + reply):  # stubs that answer with bare hex
                    out += binascii.unhexlify(reply)
                    break
                raise ProtocolError(f"gdbstub answered {_show(reply)} to monitor command {cmd!r}")
        except (_Timeout, _Closed, _Desync) as e:
            self._fail(e, f"the output of monitor command {cmd!r}")
        return out.decode("utf-8", "replace")


def _attrs(text: str) -> dict[str, str]:
    return {m[1]: _xml_unescape(m[2] if m[2] is not None else m[3], {"&quot;": '"', "&apos;": "'"})
            for m in _ATTR.finditer(text)}
