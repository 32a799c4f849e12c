"""Control channel of `qemuleak attach --control PATH`: kmemleak's debugfs file, as a
unix socket.

kmemleak is driven by writing to /sys/kernel/debug/kmemleak; `qemuleak attach` is
driven the same way, one command per connection:

    scan [LABEL]   scan now; the reply is the scan's summary once it is written
    clear          forget the leaks reported so far
    dump=ADDR      print one object's record (ADDR: 0x-prefixed hex or decimal)
    stack=on|off   scan task stacks or not
    scan=SECS      scan every SECS seconds (scan=0, like scan=off, stops that)
    scan=off       no periodic scans
    report         print the latest report
    off            stop tracing and detach

Wire protocol, kept trivial: the client sends one line ending in "\\n" (a client that
half-closes after the text without a newline is fine too; anything after the first
line is ignored); the server replies and closes. The reply's first line is "ok" or
"error: MESSAGE", the rest is the body. `qemuleak ctl PATH COMMAND` is the client,
but any unix-socket tool works:

    echo scan | socat -t 600 - UNIX-CONNECT:PATH

(-t: socat gives up on the reply 0.5 s after sending the line unless told otherwise,
and a scan can take a minute.)

The socket is created with mode 0600 (only the user running qemuleak may drive it).
The attach loop calls ControlServer.poll() from the tracer's predicate, many times a
second: it never blocks, and costs one epoll_wait when idle.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass

from .errors import QemuleakError

MAX_LINE = 4096            # longer "commands" are garbage, not commands
IDLE_TIMEOUT = 10.0        # seconds a client may stay silent (or not read its reply)
ACCEPT_PER_POLL = 16       # bound the work one poll() does when flooded
CLOSE_FLUSH = 2.0          # seconds close() spends delivering replies still queued

USAGE = ("commands: scan [LABEL], clear, dump=ADDR, stack=on|off, scan=SECS, "
         "scan=off, report, off")
HINT_START = "start `qemuleak attach TARGET --control PATH` first"
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)   # EPIPE as an error, not a signal


class ControlError(QemuleakError):
    """A control command is malformed, or the control socket is unusable."""


# --------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class Command:
    """One parsed command. `name` and what `arg` holds:

    scan           label (str) or None
    clear, report, off
                   None
    dump           address (int)
    stack          True (on) or False (off)
    scan_interval  seconds (int > 0) or None (no periodic scans)
    """

    name: str
    arg: str | int | bool | None = None

    @classmethod
    def parse(cls, line: str) -> Command:
        """Parse one command line (surrounding whitespace ignored); ControlError if bad."""
        text = line.strip()
        if not text:
            raise ControlError("empty command", hint=USAGE)
        if any(not c.isprintable() for c in text):
            raise ControlError(f"control characters in command {_shorten(text)!r}", hint=USAGE)
        word, _, rest = text.partition(" ")
        rest = rest.strip()
        if "=" in word:
            key, _, value = word.partition("=")
            if rest:
                raise ControlError(f"unexpected {_shorten(rest)!r} after {_shorten(word)!r}",
                                   hint=USAGE)
            return cls._parse_setting(text, key, value)
        if word == "scan":
            return cls("scan", rest or None)
        if word in ("clear", "report", "off"):
            if rest:
                raise ControlError(f"'{word}' takes no argument (got {_shorten(rest)!r})",
                                   hint=USAGE)
            return cls(word)
        if word == "stack":
            raise ControlError("'stack' needs a value: stack=on or stack=off", hint=USAGE)
        if word == "dump":
            raise ControlError("'dump' needs an address: dump=ADDR", hint=USAGE)
        raise ControlError(f"unknown command {_shorten(text)!r}", hint=USAGE)

    @classmethod
    def _parse_setting(cls, text: str, key: str, value: str) -> Command:
        """KEY=VALUE commands: dump=, stack=, scan=."""
        if key == "dump":
            return cls("dump", _parse_address(value))
        if key == "stack":
            if value not in ("on", "off"):
                raise ControlError(f"stack= takes on or off, not {_shorten(value)!r}",
                                   hint=USAGE)
            return cls("stack", value == "on")
        if key == "scan":
            if value == "off":
                return cls("scan_interval", None)
            if not value.isascii() or not value.isdigit():
                raise ControlError(f"scan= takes whole seconds or off, not {_shorten(value)!r}",
                                   hint="e.g. scan=600; scan=0 or scan=off stops periodic scans")
            # kmemleak's scan=0 stops the scan thread: same here, so 0 never means
            # "scan continuously" to the attach loop.
            return cls("scan_interval", int(value) or None)
        raise ControlError(f"unknown command {_shorten(text)!r}", hint=USAGE)

    def line(self) -> str:
        """The canonical command text (what parse() turns back into this Command)."""
        if self.name == "scan":
            return f"scan {self.arg}" if self.arg else "scan"
        if self.name == "dump":
            return f"dump={self.arg:#x}"
        if self.name == "stack":
            return "stack=on" if self.arg else "stack=off"
        if self.name == "scan_interval":
            return f"scan={self.arg}" if self.arg else "scan=off"
        return self.name


def _parse_address(value: str) -> int:
    """dump=ADDR: 0x-prefixed hex or decimal, a 64-bit address."""
    try:
        if value[:2].lower() == "0x":
            digits = value[2:]
            addr = int(digits, 16) if digits.isascii() and digits.isalnum() else -1
        else:
            addr = int(value, 10) if value.isascii() and value.isdigit() else -1
    except ValueError:
        addr = -1
    if not 0 <= addr < 1 << 64:
        raise ControlError(f"dump= takes an address, not {_shorten(value)!r}",
                           hint="hex with 0x (as in kmemleak's reports) or decimal: "
                                "dump=0xffff888003a1b000")
    return addr


def _shorten(text: str, limit: int = 60) -> str:
    """Keep error messages one short line whatever the client sent."""
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------
# Server


class _Conn:
    """One client connection: its partial command line, then its queued reply."""

    __slots__ = ("sock", "inbuf", "outbuf", "last", "closed")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf: bytes | memoryview = b""
        self.last = now            # last progress (data in or out): the idle timer
        self.closed = False


class Request:
    """A command from a client, waiting for the attach loop's answer."""

    def __init__(self, server: ControlServer, conn: _Conn, command: Command):
        self.command = command
        self._server = server
        self._conn: _Conn | None = conn

    def reply(self, text: str, ok: bool = True) -> None:
        """Answer and close the connection. `text` is the body when ok, else the error
        message (first line) and body. Never raises, never blocks: what the client
        does not take at once is sent from later poll() calls; a client that went
        away is ignored. Later calls do nothing."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._server._pending.discard(self)
        self._server._send(conn, _format_reply(text, ok))

    @property
    def answered(self) -> bool:
        """reply() was called (or close() answered for the attach loop)."""
        return self._conn is None

    def __repr__(self) -> str:
        return f"Request({self.command!r}, answered={self.answered})"


def _format_reply(text: str, ok: bool) -> bytes:
    """'ok' or 'error: MESSAGE' on the first line, then the body, newline-terminated."""
    if ok:
        head, body = "ok", text
    else:
        message, _, body = text.partition("\n")
        head = f"error: {message.strip() or 'failed'}"
    if body and not body.endswith("\n"):
        body += "\n"
    return f"{head}\n{body}".encode("utf-8", "replace")


class ControlServer:
    """The listening socket and its clients. Single-threaded: only the attach loop
    calls poll(), the requests' reply() and close()."""

    def __init__(self, path: str, idle_timeout: float = IDLE_TIMEOUT):
        self.path = path
        self.idle_timeout = idle_timeout
        self._conns: dict[int, _Conn] = {}        # reading or writing, by fd
        self._pending: set[Request] = set()       # handed out, not answered yet
        _clear_stale(path)
        self._listener, self._ident = _bind_private(path)
        self._listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._closed = False

    # The attach loop's side

    def poll(self) -> list[Request]:
        """Accept clients, read their command lines, send queued replies; never blocks.
        Returns the requests that are complete and valid; malformed ones are answered
        here."""
        if self._closed:
            return []
        requests: list[Request] = []
        # One epoll_wait with no timeout: the whole cost of an idle poll().
        for key, events in self._sel.select(0):
            conn = key.data
            if conn is None:
                self._accept()
            elif conn.closed:
                continue
            elif conn.outbuf:
                self._flush(conn)
            else:
                req = self._read(conn)
                if req is not None:
                    requests.append(req)
        if self._conns:
            self._drop_idle(time.monotonic())
        return requests

    def close(self) -> None:
        """Answer pending requests with an error, deliver queued replies (for at most
        CLOSE_FLUSH seconds), close everything and remove the socket file."""
        if self._closed:
            return
        self._sel.unregister(self._listener)
        self._listener.close()
        _unlink_if_ours(self.path, self._ident)
        for req in list(self._pending):
            req.reply("qemuleak stopped before answering", ok=False)
        for conn in [c for c in self._conns.values() if not c.outbuf]:
            self._error(conn, "qemuleak stopped before reading the command")
        deadline = time.monotonic() + CLOSE_FLUSH
        while self._conns and time.monotonic() < deadline:
            for key, _ in self._sel.select(0.05):
                if not key.data.closed:
                    self._flush(key.data)
        for conn in list(self._conns.values()):
            self._close_conn(conn)
        self._sel.close()
        self._closed = True

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Connections

    def _accept(self) -> None:
        now = time.monotonic()
        for _ in range(ACCEPT_PER_POLL):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:           # ECONNABORTED, EMFILE...: try again next poll
                return
            sock.setblocking(False)
            conn = _Conn(sock, now)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> Request | None:
        """Take what the client sent; a Request once its first line is complete."""
        try:
            data = conn.sock.recv(MAX_LINE + 1)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self._close_conn(conn)
            return None
        if data:
            conn.inbuf += data
            conn.last = time.monotonic()
        end = conn.inbuf.find(b"\n", 0, MAX_LINE + 1)
        if end < 0 and len(conn.inbuf) > MAX_LINE:
            self._error(conn, f"command longer than {MAX_LINE} bytes")
            return None
        if end < 0 and data:
            return None          # a slow client: keep the partial line for later
        if end < 0 and not conn.inbuf:
            self._close_conn(conn)   # connected and left without a word
            return None
        # A newline, or EOF after text without one (printf scan | socat ...).
        raw = bytes(conn.inbuf if end < 0 else conn.inbuf[:end])
        try:
            command = Command.parse(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._error(conn, "command is not UTF-8 text")
            return None
        except ControlError as e:
            self._error(conn, e.message, e.hint)
            return None
        # The attach loop owns the connection now: no idle timer while it works.
        self._sel.unregister(conn.sock)
        del self._conns[conn.sock.fileno()]
        req = Request(self, conn, command)
        self._pending.add(req)
        return req

    def _error(self, conn: _Conn, message: str, hint: str | None = None) -> None:
        self._sel.unregister(conn.sock)
        del self._conns[conn.sock.fileno()]
        body = f"\nhint: {hint}" if hint else ""
        self._send(conn, _format_reply(message + body, ok=False))

    def _send(self, conn: _Conn, payload: bytes) -> None:
        """Send what the socket takes now; queue the rest for poll() to flush."""
        if self._closed or conn.closed:
            conn.sock.close()
            conn.closed = True
            return
        conn.outbuf = memoryview(payload)   # slices without copying a big report
        conn.last = time.monotonic()
        self._conns[conn.sock.fileno()] = conn
        self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf, _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:               # the client went away: nobody to tell
            self._close_conn(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        conn.last = time.monotonic()
        if not conn.outbuf:
            self._close_conn(conn)

    def _drop_idle(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if now - conn.last <= self.idle_timeout:
                continue
            if conn.outbuf:           # not reading its reply: give up on it
                self._close_conn(conn)
            else:
                self._error(conn, f"no command within {self.idle_timeout:g} s")

    def _close_conn(self, conn: _Conn) -> None:
        if conn.closed:
            return
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            self._sel.unregister(conn.sock)
        conn.sock.close()
        conn.closed = True
        conn.outbuf = b""


def _clear_stale(path: str) -> None:
    """Refuse a path another qemuleak listens on or that is not a socket; remove the
    socket file a dead one left behind."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket",
                           hint="choose another --control path, or remove that file")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)               # stale: its server is gone
        return
    except PermissionError:
        raise ControlError(f"cannot use {path}: permission denied",
                           hint="another user's qemuleak? choose another --control path") from None
    except TimeoutError:
        pass                          # a full backlog: someone is listening
    except OSError as e:
        raise ControlError(f"cannot use {path}: {e.strerror or e}",
                           hint="choose another --control path") from None
    finally:
        probe.close()
    raise ControlError(f"another qemuleak already listens on {path}",
                       hint=f"stop it (`qemuleak ctl {path} off`) or choose another --control path")


def _bind_private(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Listen on `path` with mode 0600 from the first instant: bind in a fresh 0700
    directory next to it (umask is process-wide, so not that), chmod, then link into
    place. Returns the socket and the file's (st_dev, st_ino)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        tmpdir = tempfile.mkdtemp(prefix=".qml", dir=parent)
    except OSError as e:
        raise ControlError(f"cannot create the control socket {path}: {e.strerror or e}",
                           hint="choose a --control path in a directory you can write") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmp = os.path.join(tmpdir, "s")
        try:
            sock.bind(tmp)
        except OSError as e:
            # AF_UNIX paths are limited to 107 bytes; the temporary one is a bit longer.
            raise ControlError(f"cannot create the control socket {path}: {e.strerror or e}",
                               hint="choose a shorter --control path") from None
        os.chmod(tmp, 0o600)
        sock.listen(16)
        try:
            os.link(tmp, path)        # unlike rename, refuses to replace a newcomer
        except FileExistsError:
            raise ControlError(f"{path} appeared while the control socket was created",
                               hint="another qemuleak started with the same --control path?") from None
        except OSError:
            os.rename(tmp, path)      # a filesystem without hard links
        st = os.lstat(path)
        return sock, (st.st_dev, st.st_ino)
    except BaseException:
        sock.close()
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    """Remove the socket file unless it has been replaced since (then it is not ours)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


# --------------------------------------------------------------------------
# Client


def send(path: str, line: str, timeout: float | None = None) -> tuple[bool, str]:
    """Send one command line to the server at `path` and wait for its reply:
    (True, body) or (False, "MESSAGE\\nbody"). `timeout` bounds the whole exchange;
    None waits as long as the command takes. Ctrl-C raises KeyboardInterrupt."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, path)
        chunks: list[bytes] = []
        try:
            try:
                sock.sendall(line.rstrip("\r\n").encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass              # answered (an error, surely) before reading it all
            while True:
                if deadline is not None:
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    # Linux resets instead of EOF when the server closes with bytes
                    # of ours unread: the reply (if any) is already here.
                    break
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            raise ControlError(f"no reply from {path} within {timeout:g} s",
                               hint="qemuleak attach is still busy; try a longer timeout") from None
        except OSError as e:
            raise ControlError(f"lost the connection to {path}: {e.strerror or e}",
                               hint="did qemuleak attach exit?") from None
    return _parse_reply(path, b"".join(chunks).decode("utf-8", "replace"))


def _connect(sock: socket.socket, path: str) -> None:
    """Connect, turning the usual failures into one-line errors."""
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}", hint=HINT_START) from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing listens on {path}",
                           hint="the qemuleak attach that made it has exited; " + HINT_START) from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}",
                           hint="the socket is private (mode 0600) to the user "
                                "running qemuleak attach") from None
    except TimeoutError:
        raise ControlError(f"timed out connecting to {path}",
                           hint="qemuleak attach is not accepting connections") from None
    except OSError as e:
        raise ControlError(f"cannot connect to {path}: {e.strerror or e}", hint=HINT_START) from None


def _parse_reply(path: str, text: str) -> tuple[bool, str]:
    head, _, body = text.partition("\n")
    if head == "ok":
        return True, body
    if head.startswith("error: "):
        return False, head[len("error: "):] + ("\n" + body if body else "")
    if not text:
        raise ControlError(f"{path} closed the connection without answering",
                           hint="qemuleak attach exited or detached meanwhile?")
    raise ControlError(f"{path} answered {_shorten(head)!r}: not a qemuleak control socket",
                       hint="check the path given to --control")


def ctl_main(path: str, command: str) -> int:
    """`qemuleak ctl PATH COMMAND`: check the command, send it, print the reply.
    Returns 0 (body on stdout) or 2 (error reply on stderr). Local problems (bad
    command, no socket) raise QemuleakError for the CLI to print."""
    cmd = Command.parse(command)          # no round trip for a typo
    ok, text = send(path, cmd.line())
    if ok:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    message, _, body = text.partition("\n")
    print(f"qemuleak: error: {message}", file=sys.stderr)
    for extra in body.splitlines():
        # The server's hints look like the CLI's own.
        print(f"qemuleak: {extra}" if extra.startswith("hint: ") else extra, file=sys.stderr)
    return 2
