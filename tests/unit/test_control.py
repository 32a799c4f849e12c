"""Unit tests for qemuleak.control: command parsing, the control socket server (real
unix sockets, clients in threads) and the `qemuleak ctl` client."""

from __future__ import annotations

import os
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qemuleak import control
from qemuleak.control import Command, ControlError, ControlServer, Request, ctl_main, send
from qemuleak.errors import QemuleakError

# --------------------------------------------------------------------------
# Command.parse


@pytest.mark.parametrize("line, expected", [
    ("scan", Command("scan", None)),
    ("scan boot", Command("scan", "boot")),
    ("  scan   after unload \n", Command("scan", "after unload")),
    ("clear", Command("clear")),
    ("report", Command("report")),
    ("off", Command("off")),
    ("off\r\n", Command("off")),
    ("dump=0xffff888003a1b000", Command("dump", 0xFFFF888003A1B000)),
    ("dump=0XFF", Command("dump", 0xFF)),
    ("dump=4096", Command("dump", 4096)),
    ("stack=on", Command("stack", True)),
    ("stack=off", Command("stack", False)),
    ("scan=600", Command("scan_interval", 600)),
    ("scan=off", Command("scan_interval", None)),
    ("scan=0", Command("scan_interval", None)),      # kmemleak: 0 stops periodic scans
])
def test_parse(line, expected):
    cmd = Command.parse(line)
    assert cmd == expected
    assert type(cmd.arg) is type(expected.arg)      # True is not 1, "5" is not 5
    assert Command.parse(cmd.line()) == cmd         # the canonical form reads back


@pytest.mark.parametrize("line, words", [
    ("", "empty"),
    ("   \n", "empty"),
    ("frobnicate", "unknown command"),
    ("SCAN", "unknown command"),
    ("scanx", "unknown command"),
    ("clear all", "no argument"),
    ("report now", "no argument"),
    ("off 1", "no argument"),
    ("stack", "stack=on"),
    ("stack=maybe", "on or off"),
    ("stack=", "on or off"),
    ("dump", "dump=ADDR"),
    ("dump=", "address"),
    ("dump=zz", "address"),
    ("dump=0x", "address"),
    ("dump=-1", "address"),
    ("dump=ffff888003a1b000", "address"),           # hex needs its 0x
    ("dump=0x1ffffffffffffffff", "address"),        # more than 64 bits
    ("dump=0x1 2", "unexpected"),
    ("scan=", "whole seconds"),
    ("scan=-1", "whole seconds"),
    ("scan=1.5", "whole seconds"),
    ("scan=abc", "whole seconds"),
    ("scan=\u0661", "whole seconds"),               # an Arabic-Indic one is not ASCII
    ("scan=5 more", "unexpected"),
    ("color=red", "unknown command"),
    ("scan\x00boot", "control characters"),
    ("scan\x1b[31mred", "control characters"),
])
def test_parse_rejects(line, words):
    with pytest.raises(ControlError) as info:
        Command.parse(line)
    e = info.value
    assert isinstance(e, QemuleakError)
    assert words in e.message
    assert "\n" not in e.message and e.hint and "\n" not in e.hint


def test_parse_error_message_stays_short():
    with pytest.raises(ControlError) as info:
        Command.parse("x" * 5000)
    assert len(info.value.message) < 120


# --------------------------------------------------------------------------
# Helpers: a short socket directory, clients in threads, the attach loop's polling


@pytest.fixture
def sock_dir():
    """A short directory: AF_UNIX paths stop at 107 bytes, pytest's tmp_path can be long."""
    with tempfile.TemporaryDirectory(prefix="qml", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def path(sock_dir) -> str:
    return str(sock_dir / "ctl")


@pytest.fixture
def server(path):
    srv = ControlServer(path)
    yield srv
    srv.close()


class Client(threading.Thread):
    """Runs fn() in a thread; .result or .error once done."""

    def __init__(self, fn: Callable[[], object]):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:     # noqa: BLE001 - reported to the test
            self.error = e


def poll_until(srv: ControlServer, done: Callable[[list[Request]], bool],
               timeout: float = 5.0) -> list[Request]:
    """Poll like the attach loop until done(requests so far); fail after timeout."""
    got: list[Request] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, f"gave up polling; got {got}"
        got += srv.poll()
        time.sleep(0.001)
    return got


def raw_exchange(path: str, data: bytes, shut_wr: bool = False) -> bytes:
    """Send raw bytes like socat would, read the reply until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        if shut_wr:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


# --------------------------------------------------------------------------
# The server


def test_socket_is_private_even_with_umask_0(path, sock_dir):
    old = os.umask(0)
    try:
        srv = ControlServer(path)
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(sock_dir) == ["ctl"]          # no temporary directory left
    finally:
        srv.close()
    assert not os.path.exists(path)                     # close() removes it


def test_round_trip(server, path):
    client = Client(lambda: send(path, "scan boot"))
    [req] = poll_until(server, lambda got: got)
    assert req.command == Command("scan", "boot")
    time.sleep(0.05)
    assert client.is_alive()                             # waits for the attach loop's answer
    req.reply("2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)")
    client.join(5)
    assert client.error is None
    assert client.result == (True, "2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)\n")
    assert req.answered


def test_error_reply_from_the_attach_loop(server, path):
    client = Client(lambda: send(path, "dump=0x1000"))
    [req] = poll_until(server, lambda got: got)
    req.reply("0x1000 is not a tracked object\nknown objects: 0", ok=False)
    client.join(5)
    assert client.result == (False, "0x1000 is not a tracked object\nknown objects: 0\n")


def test_bad_command_answered_by_server(server, path):
    client = Client(lambda: send(path, "frobnicate"))
    got: list[Request] = []
    deadline = time.monotonic() + 5
    while client.is_alive():
        assert time.monotonic() < deadline
        got += server.poll()
        time.sleep(0.001)
    assert got == []                                     # the attach loop never saw it
    assert client.error is None
    ok, text = client.result
    assert not ok
    message, hint = text.splitlines()
    assert message == "unknown command 'frobnicate'"
    assert hint.startswith("hint: commands: scan [LABEL]")


def test_poll_is_not_stalled_by_a_slow_client(server, path):
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(path)
    slow.sendall(b"sca")                                # half a command, then nothing
    try:
        # poll() in a thread: if it blocked on the slow client the thread would hang.
        polls = Client(lambda: [server.poll() for _ in range(200)])
        polls.join(10)
        assert not polls.is_alive(), "poll() blocked on a client that sent half a line"
        assert polls.error is None
        assert all(r == [] for r in polls.result)
        slow.sendall(b"n lab")
        assert all(server.poll() == [] for _ in range(50))   # still no newline
        slow.sendall(b"el\n")
        [req] = poll_until(server, lambda got: got)
        assert req.command == Command("scan", "label")
        req.reply("done")
        slow.settimeout(5)
        assert slow.recv(100) == b"ok\ndone\n"
    finally:
        slow.close()


def test_idle_poll_returns_nothing(server):
    assert all(server.poll() == [] for _ in range(1000))


def test_eof_without_newline_is_a_command(server, path):
    client = Client(lambda: raw_exchange(path, b"report", shut_wr=True))
    [req] = poll_until(server, lambda got: got)
    assert req.command == Command("report")
    req.reply("")
    client.join(5)
    assert client.result == b"ok\n"


def test_only_the_first_line_counts(server, path):
    client = Client(lambda: raw_exchange(path, b"clear\nscan=5\n"))
    [req] = poll_until(server, lambda got: got)
    assert req.command == Command("clear")
    req.reply("")
    client.join(5)
    assert client.error is None and client.result == b"ok\n"
    assert server.poll() == []                          # "scan=5" is not a second request


def test_not_utf8_and_too_long(server, path):
    bad = Client(lambda: raw_exchange(path, b"scan \xff\xfe\n"))
    long = Client(lambda: send(path, "scan " + "x" * (control.MAX_LINE + 10)))
    got: list[Request] = []
    deadline = time.monotonic() + 5
    while bad.is_alive() or long.is_alive():
        assert time.monotonic() < deadline
        got += server.poll()
    assert got == []
    assert bad.result == b"error: command is not UTF-8 text\n"
    assert long.error is None
    assert long.result == (False, f"command longer than {control.MAX_LINE} bytes")


def test_client_gone_before_reply(server, path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b"scan\n")
        [req] = poll_until(server, lambda got: got)
    req.reply("x" * (4 << 20))                          # EPIPE on the first send
    req.reply("again")                                  # a second reply does nothing
    assert req.answered
    assert server.poll() == []
    # And the server still serves.
    client = Client(lambda: send(path, "off"))
    [req] = poll_until(server, lambda got: got)
    req.reply("detached")
    client.join(5)
    assert client.result == (True, "detached\n")


def test_big_reply_is_sent_from_later_polls(server, path):
    body = "".join(f"unreferenced object 0x{i:016x} (size 64):\n" for i in range(100_000))
    client = Client(lambda: send(path, "report"))
    [req] = poll_until(server, lambda got: got)
    req.reply(body)                                     # more than the socket buffer
    poll_until(server, lambda got: not client.is_alive(), timeout=20)
    assert client.error is None
    assert client.result == (True, body)


def test_close_delivers_queued_reply_and_answers_pending(path):
    srv = ControlServer(path)
    body = "y" * (2 << 20)
    first = Client(lambda: send(path, "report"))
    [req] = poll_until(srv, lambda got: got)
    req.reply(body)
    second = Client(lambda: send(path, "scan"))
    [pending] = poll_until(srv, lambda got: got)
    srv.close()
    first.join(5)
    second.join(5)
    assert first.result == (True, body + "\n")
    assert second.result == (False, "qemuleak stopped before answering")
    assert pending.answered
    pending.reply("too late")                          # no-op, no exception
    assert srv.poll() == []
    srv.close()                                        # twice is fine


def test_idle_client_dropped(path):
    with ControlServer(path, idle_timeout=0.2) as srv:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(b"sca")
            s.settimeout(5)
            reader = Client(lambda: s.recv(1000))
            poll_until(srv, lambda got: not reader.is_alive())
            assert reader.result == b"error: no command within 0.2 s\n"
            assert srv._conns == {}


def test_connect_and_leave_is_quiet(server, path):
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)                             # and leave without a word
    client = Client(lambda: send(path, "report"))       # accepted after them
    got = poll_until(server, lambda got: got)
    assert [r.command for r in got] == [Command("report")]
    got[0].reply("")
    client.join(5)
    assert client.result == (True, "")
    poll_until(server, lambda got: not server._conns)   # the silent ones are closed
    assert got[0].answered and server._pending == set()


def test_stale_socket_replaced(path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()                                        # the file stays, nothing listens
    before = os.lstat(path).st_ino
    with ControlServer(path) as srv:
        assert os.lstat(path).st_ino != before
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        client = Client(lambda: send(path, "clear"))
        [req] = poll_until(srv, lambda got: got)
        req.reply("")
        client.join(5)
        assert client.result == (True, "")


def test_second_server_refused(server, path):
    ino = os.lstat(path).st_ino
    with pytest.raises(QemuleakError) as info:
        ControlServer(path)
    assert info.value.message == f"another qemuleak already listens on {path}"
    assert "ctl" in info.value.hint
    assert os.lstat(path).st_ino == ino                 # the first one's socket is intact
    client = Client(lambda: send(path, "report"))
    [req] = poll_until(server, lambda got: got)
    req.reply("still here")
    client.join(5)
    assert client.result == (True, "still here\n")


def test_close_leaves_a_replaced_socket_alone(path):
    srv = ControlServer(path)
    os.unlink(path)
    other = ControlServer(path)
    srv.close()
    assert os.path.exists(path)                         # other's socket, not srv's
    other.close()
    assert not os.path.exists(path)


def test_path_that_is_not_a_socket_refused(path):
    Path(path).write_text("precious")
    with pytest.raises(QemuleakError, match="not a socket"):
        ControlServer(path)
    assert Path(path).read_text() == "precious"


def test_unusable_directory(sock_dir):
    with pytest.raises(QemuleakError, match="cannot create the control socket"):
        ControlServer(str(sock_dir / "missing" / "ctl"))
    long_path = sock_dir / ("d" * 100)
    long_path.mkdir()
    with pytest.raises(QemuleakError) as info:
        ControlServer(str(long_path / "ctl"))
    assert "shorter" in info.value.hint
    assert os.listdir(long_path) == []                  # temporary directory removed


# --------------------------------------------------------------------------
# The client


def test_send_to_missing_path(path):
    with pytest.raises(QemuleakError) as info:
        send(path, "scan")
    assert info.value.message == f"no control socket at {path}"
    assert "qemuleak attach" in info.value.hint


def test_send_to_dead_socket(path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with pytest.raises(QemuleakError, match="nothing listens on"):
        send(path, "scan")


def test_send_timeout(server, path):
    # Nobody polls: the server never reads the command.
    with pytest.raises(QemuleakError, match="no reply from .* within 0.2 s"):
        send(path, "scan", timeout=0.2)


def test_send_not_a_control_socket(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)
        other.listen()

        def answer():
            conn, _ = other.accept()
            conn.sendall(b"SSH-2.0-OpenSSH\r\n")
            conn.close()
        t = Client(answer)
        with pytest.raises(QemuleakError, match="not a qemuleak control socket"):
            send(path, "scan", timeout=5)
        t.join(5)


def test_send_closed_without_answer(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)
        other.listen()
        t = Client(lambda: other.accept()[0].close())
        with pytest.raises(QemuleakError, match="without answering"):
            send(path, "scan", timeout=5)
        t.join(5)


def test_send_ctrl_c(server, path):
    """A blocked send() (no timeout, nobody answering) ends with KeyboardInterrupt."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            send(path, "scan")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)


# --------------------------------------------------------------------------
# ctl_main


def test_ctl_main_ok(server, path, capsys):
    client = Client(lambda: ctl_main(path, " dump=4096 "))
    [req] = poll_until(server, lambda got: got)
    assert req.command == Command("dump", 4096)
    req.reply("unreferenced object 0x1000 (size 32):\n  comm \"insmod\"")
    client.join(5)
    assert client.result == 0
    out, err = capsys.readouterr()
    assert out == "unreferenced object 0x1000 (size 32):\n  comm \"insmod\"\n"
    assert err == ""


def test_ctl_main_error_reply(server, path, capsys):
    client = Client(lambda: ctl_main(path, "scan"))
    [req] = poll_until(server, lambda got: got)
    req.reply("a scan is already running\nhint: wait for it", ok=False)
    client.join(5)
    assert client.result == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "qemuleak: error: a scan is already running\nqemuleak: hint: wait for it\n"


def test_ctl_main_checks_locally_first(path):
    # No socket at path: a typo must be reported as such, not as "no control socket".
    with pytest.raises(ControlError, match="unknown command"):
        ctl_main(path, "sacn")
