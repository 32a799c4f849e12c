"""Unit tests for qemuleak.rsp against a scripted fake gdbstub (no QEMU needed)."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuleak.errors import GuestConnectionError, ProtocolError, QemuleakError
from qemuleak.rsp import Register, RSPClient, StopReply, _decode, _escape, parse_target

# --------------------------------------------------------------------------
# The fake gdbstub


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes | str, cs: int | None = None) -> bytes:
    """Frame a payload as-is (the caller escapes/run-length-encodes if it wants)."""
    if isinstance(payload, str):
        payload = payload.encode()
    return b"$%b#%02x" % (payload, checksum(payload) if cs is None else cs)


def rsp_escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def rsp_unescape(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        if data[i] == 0x7D:
            out.append(data[i + 1] ^ 0x20)
            i += 2
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def rle(data: bytes) -> bytes:
    """Run-length encode like gdbserver: runs of 4+ become X*<count+29>."""
    out, i = bytearray(), 0
    while i < len(data):
        j = i
        while j < len(data) and data[j] == data[i] and j - i < 97:
            j += 1
        run = j - i
        extra = run - 1
        if run >= 4 and chr(extra + 29) not in "#$+-":
            out += bytes((data[i], 0x2A, extra + 29))
        else:
            out += data[i:j]
        i = j
    return bytes(out)


CLOSE = object()  # handler result: send nothing more and close the connection
SILENT = object()  # handler result: swallow the packet, send no ack, no reply

X86_TARGET = """<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target><architecture>i386:x86-64</architecture>
<!-- <reg name="commented_out" bitsize="64"/> -->
<xi:include href="64bit-core.xml"/>
<xi:include href="64bit-extra.xml"/>
</target>
"""
X86_CORE = """<?xml version="1.0"?>
<!DOCTYPE feature SYSTEM "gdb-target.dtd">
<feature name="org.gnu.gdb.i386.core">
  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/>
    <field name="" start="1" end="1"/>
  </flags>
  <reg name="rax" bitsize="64" type="int64"/>
  <reg name="rbx" bitsize="64" type="int64"/>
  <reg name="rcx" bitsize="64" type="int64"/>
  <reg name="rdx" bitsize="64" type="int64"/>
  <reg name="rsi" bitsize="64" type="int64"/>
  <reg name="rdi" bitsize="64" type="int64"/>
  <reg name="rbp" bitsize="64" type="data_ptr"/>
  <reg name="rsp" bitsize="64" type="data_ptr"/>
  <reg name="r8" bitsize="64" type="int64"/>
  <reg name="r9" bitsize="64" type="int64"/>
  <reg name="r10" bitsize="64" type="int64"/>
  <reg name="r11" bitsize="64" type="int64"/>
  <reg name="r12" bitsize="64" type="int64"/>
  <reg name="r13" bitsize="64" type="int64"/>
  <reg name="r14" bitsize="64" type="int64"/>
  <reg name="r15" bitsize="64" type="int64"/>
  <reg name="rip" bitsize="64" type="code_ptr"/>
  <reg name="eflags" bitsize="32" type="i386_eflags"/>
  <reg name="cs" bitsize="32" type="int32"/>
  <reg name="ss" bitsize="32" type="int32"/>
  <reg name="ds" bitsize="32" type="int32"/>
  <reg name="es" bitsize="32" type="int32"/>
  <reg name="fs" bitsize="32" type="int32"/>
  <reg name="gs" bitsize="32" type="int32"/>
  <reg name="st0" bitsize="80" type="i387_ext"/>
  <reg name="st1" bitsize="80" type="i387_ext"/>
</feature>
"""
X86_EXTRA = """<?xml version="1.0"?>
<feature name="org.qemu.extra">
  <reg name='fs_base' bitsize='64' type='int64' regnum='40'/>
  <reg name="gs_base" bitsize="64" type="int64"/>
  <reg name="orig_rax" bitsize="64" regnum="57" type="int"/>
</feature>
"""
QEMU_FEATURES = "PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+"
MEM_SIZE = 0x10000


def mem_pattern(size: int = MEM_SIZE) -> bytearray:
    return bytearray((i * 7 + 3 + (i >> 8)) & 0xFF for i in range(size))


class FakeStub:
    """A scripted gdbstub served by a thread on a loopback or unix socket.

    Answers like QEMU by default (see `respond`); `overrides[prefix]` replaces
    the answer to packets starting with `prefix` (longest prefix wins) with
    bytes to send after the ack (a callable gets the payload, a list is
    consumed one entry per packet).  `serve` replaces the whole server (for
    peers that are not gdbstubs).
    """

    def __init__(self, *, unix: bool = False, greeting: bytes = b"",
                 serve: Callable[[socket.socket], None] | None = None):
        if unix:
            self.path = os.path.join(tempfile.mkdtemp(prefix="rsptest"), "gdb.sock")
            self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.lsock.bind(self.path)
            self.target = f"unix:{self.path}"
        else:
            self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.lsock.bind(("127.0.0.1", 0))
            self.target = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.lsock.listen(4)
        self.greeting = greeting
        self.features = QEMU_FEATURES
        self.overrides: dict[bytes, object] = {}
        self.received: list[bytes] = []  # decoded payloads, in order
        self.raw_in = bytearray()
        self.naks_received = 0
        self.nak_next = 0  # NAK this many upcoming packets
        self.retransmit: bytes | None = None  # sent on '-' instead of the last reply
        self.interrupts = 0
        self.running = False
        self.memory = mem_pattern()
        self.xml_files = {"target.xml": X86_TARGET, "64bit-core.xml": X86_CORE, "64bit-extra.xml": X86_EXTRA}
        self.xfer_chunk = 1000
        self.thread_ids = ["p01.01", "p01.02", "p01.03"]
        self.monitor_output = ["monitor said: ", "{cmd}\n"]
        self.conn: socket.socket | None = None
        self.closed = threading.Event()
        self._serve = serve
        self._ti = 0
        self._last = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    # -- plumbing

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except OSError:
            return
        self.conn = conn
        try:
            if self._serve is not None:
                self._serve(conn)
            else:
                self._loop(conn)
        except OSError:
            pass
        finally:
            self.closed.set()
            conn.close()

    def _loop(self, conn: socket.socket) -> None:
        if self.greeting:
            conn.sendall(self.greeting)
        buf = bytearray()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            self.raw_in += data
            buf += data
            while buf:
                c = buf[0]
                if c in b"+":
                    del buf[:1]
                elif c in b"-":
                    del buf[:1]
                    self.naks_received += 1
                    conn.sendall(self.retransmit if self.retransmit is not None else self._last)
                    self.retransmit = None
                elif c == 3:
                    del buf[:1]
                    self.interrupts += 1
                    if self.running:
                        self.running = False
                        conn.sendall(frame("T02thread:p01.01;"))
                elif c != 0x24:
                    del buf[:1]
                else:
                    end = buf.find(b"#")
                    if end < 0 or len(buf) < end + 3:
                        break
                    raw, cs = bytes(buf[1:end]), bytes(buf[end + 1:end + 3])
                    del buf[:end + 3]
                    if int(cs, 16) != checksum(raw):
                        conn.sendall(b"-")
                        continue
                    payload = rsp_unescape(raw)
                    self.received.append(payload)
                    if self.nak_next:
                        self.nak_next -= 1
                        conn.sendall(b"-")
                        continue
                    out = self._answer(payload)
                    if out is SILENT:
                        continue
                    if out is CLOSE:
                        return
                    if isinstance(out, tuple):  # (bytes, CLOSE)
                        conn.sendall(b"+" + out[0])
                        return
                    conn.sendall(b"+" + out)
                    self._last = out

    def _answer(self, payload: bytes) -> object:
        keys = [k for k in self.overrides if payload.startswith(k)]
        if keys:
            key = max(keys, key=len)
            action = self.overrides[key]
            if isinstance(action, list):
                if action:
                    return action.pop(0)
            elif callable(action):
                return action(payload)
            else:
                return action
        return self.respond(payload)

    def respond(self, p: bytes) -> bytes:
        """QEMU-like default answers (framed)."""
        if p.startswith(b"qSupported"):
            return frame(self.features)
        if p == b"?":
            return frame("T05thread:p01.01;")
        if p.startswith(b"m"):
            addr, length = (int(x, 16) for x in p[1:].split(b","))
            if length > 2048:
                return frame("E22")
            if addr + length > len(self.memory):
                return frame("E14")
            return frame(self.memory[addr:addr + length].hex())
        if p.startswith(b"M"):
            head, data = p[1:].split(b":", 1)
            addr, length = (int(x, 16) for x in head.split(b","))
            assert len(data) == 2 * length
            self.memory[addr:addr + length] = bytes.fromhex(data.decode())
            return frame("OK")
        if p == b"g":
            return frame(bytes(range(24)).hex())
        if p.startswith(b"p"):
            return frame(bytes([int(p[1:], 16)] * 8).hex())
        if p.startswith((b"P", b"Hg", b"Z0", b"z0", b"Qqemu.PhyMemMode:")):
            return frame("OK")
        if p == b"qfThreadInfo":
            self._ti = 2
            return frame("m" + ",".join(self.thread_ids[:2]))
        if p == b"qsThreadInfo":
            rest = self.thread_ids[self._ti:self._ti + 1]
            self._ti += 1
            return frame("m" + ",".join(rest)) if rest else frame("l")
        if p.startswith(b"qXfer:features:read:"):
            annex, span = p[len(b"qXfer:features:read:"):].decode().split(":")
            off, length = (int(x, 16) for x in span.split(","))
            if annex not in self.xml_files:
                return frame("E00")
            data = self.xml_files[annex].encode()
            part = data[off:off + min(length, self.xfer_chunk)]
            kind = b"l" if off + len(part) >= len(data) else b"m"
            return frame(rsp_escape(kind + part))
        if p.startswith(b"qRcmd,"):
            cmd = bytes.fromhex(p[6:].decode()).decode()
            out = b"".join(frame(b"O" + s.format(cmd=cmd).encode().hex().encode()) for s in self.monitor_output)
            return out + frame("OK")
        if p == b"c":
            self.running = True
            return b""
        if p == b"s" or p.startswith(b"vCont;s"):
            return frame("T05thread:p01.01;")
        return frame("")  # unsupported

    def packets(self, prefix: bytes) -> list[bytes]:
        return [p for p in self.received if p.startswith(prefix)]

    def close(self) -> None:
        for s in (self.conn, self.lsock):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self.thread.join(2)


def drain(conn: socket.socket) -> None:
    """Read and ignore everything until the peer closes."""
    while conn.recv(4096):
        pass


@pytest.fixture
def make_stub():
    stubs: list[FakeStub] = []

    def factory(**kw) -> FakeStub:
        stub = FakeStub(**kw)
        stubs.append(stub)
        return stub

    yield factory
    for stub in stubs:
        stub.close()


@pytest.fixture
def connect():
    clients: list[RSPClient] = []

    def do(stub: FakeStub, timeout: float = 2.0, **kw) -> RSPClient:
        client = RSPClient.connect(stub.target, timeout=timeout, **kw)
        clients.append(client)
        return client

    yield do
    for client in clients:
        client.close()


@pytest.fixture
def stub(make_stub) -> FakeStub:
    return make_stub()


# --------------------------------------------------------------------------
# Targets and connecting


def test_parse_target_forms():
    assert parse_target("localhost:1234") == ("tcp", ("localhost", 1234))
    assert parse_target(":1234") == ("tcp", ("127.0.0.1", 1234))
    assert parse_target("tcp::1234") == ("tcp", ("127.0.0.1", 1234))
    assert parse_target("[::1]:99") == ("tcp", ("::1", 99))
    assert parse_target("unix:/tmp/q.sock") == ("unix", "/tmp/q.sock")


@pytest.mark.parametrize("bad", ["", "1234", "host:", "host:port", ":0", ":70000", "unix:", "a b:12"])
def test_parse_target_rejects_malformed(bad):
    with pytest.raises(GuestConnectionError) as e:
        parse_target(bad)
    assert "malformed" in e.value.message
    assert e.value.hint


def test_connect_handshake(stub, connect):
    c = connect(stub)
    assert stub.received[0].startswith(b"qSupported:") and b"multiprocess+" in stub.received[0]
    assert stub.received[1] == b"?"
    assert c.features["PacketSize"] == "1000" and c.features["multiprocess"] is True
    assert c.packet_size == 4096 and c.max_read == 2048
    assert c.last_stop == StopReply("T", 5, "p01.01", {"thread": "p01.01"})
    assert not c.running


def test_connect_sets_nodelay(stub, connect):
    c = connect(stub)
    assert c._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_connect_unix_socket(make_stub, connect):
    stub = make_stub(unix=True)
    c = connect(stub)
    assert c.threads() == ["p01.01", "p01.02", "p01.03"]


def test_nothing_listening_tcp():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(GuestConnectionError) as e:
        RSPClient.connect(f"127.0.0.1:{port}", timeout=1)
    assert e.value.message == f"nothing listening at 127.0.0.1:{port}"
    assert "-gdb" in e.value.hint


def test_nothing_listening_unix(tmp_path):
    with pytest.raises(GuestConnectionError) as e:
        RSPClient.connect(f"unix:{tmp_path}/none.sock", timeout=1)
    assert e.value.message.startswith("nothing listening at unix:")


def test_not_a_gdbstub_ssh_banner(make_stub):
    def ssh(conn):
        conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
        drain(conn)

    stub = make_stub(serve=ssh)
    t0 = time.monotonic()
    with pytest.raises(GuestConnectionError) as e:
        RSPClient.connect(stub.target, timeout=2)
    assert time.monotonic() - t0 < 1.0  # noticed at once, not by timing out
    assert "is not a gdbstub" in e.value.message and "SSH-2.0" in e.value.message


def test_not_a_gdbstub_http(make_stub):
    def http(conn):
        conn.recv(1000)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    stub = make_stub(serve=http)
    with pytest.raises(GuestConnectionError) as e:
        RSPClient.connect(stub.target, timeout=2)
    assert e.value.message.startswith(f"{stub.target} is not a gdbstub")


def test_not_a_gdbstub_closes_silently(make_stub):
    stub = make_stub(serve=lambda conn: conn.recv(1000))
    with pytest.raises(GuestConnectionError) as e:
        RSPClient.connect(stub.target, timeout=2)
    assert "is not a gdbstub" in e.value.message and "closed" in e.value.message


def test_not_a_gdbstub_never_answers(make_stub):
    stub = make_stub(serve=drain)
    t0 = time.monotonic()
    with pytest.raises(GuestConnectionError) as e:
        RSPClient.connect(stub.target, timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.0
    assert "is not a gdbstub" in e.value.message and "no answer to qSupported" in e.value.message


def test_unsolicited_stop_on_connect_is_drained(make_stub, connect):
    stub = make_stub(greeting=frame("T02thread:p01.02;"))
    c = connect(stub)
    assert c.features["PacketSize"] == "1000"
    assert c.last_stop.signal == 5  # the answer to '?', not the stale T02
    assert c.threads() == ["p01.01", "p01.02", "p01.03"]
    assert c.read_memory(0x10, 4) == bytes(stub.memory[0x10:0x14])


def test_stale_stop_between_ack_and_reply_is_skipped(stub, connect):
    c = connect(stub)
    c.select_thread("p01.03")
    stub.overrides[b"qC"] = frame("T02thread:p01.02;") + frame("QCp01.02")
    assert c.command("qC") == b"QCp01.02"
    assert c.last_stop == StopReply("T", 2, "p01.02", {"thread": "p01.02"})
    c.select_thread("p01.03")  # QEMU switched to the stopping CPU: select again
    assert stub.packets(b"Hg") == [b"Hgp01.03", b"Hgp01.03"]


def test_console_output_during_command_is_collected(stub, connect):
    c = connect(stub)
    stub.overrides[b"qC"] = frame(b"O" + b"log line\n".hex().encode()) + frame("QCp01.01")
    assert c.command("qC") == b"QCp01.01"
    assert c.take_output() == b"log line\n"


def test_qsupported_without_packetsize_keeps_defaults(stub, connect):
    stub.features = "qXfer:features:read+;swbreak-"
    c = connect(stub)
    assert c.packet_size == 4096 and c.features["swbreak"] is False


# --------------------------------------------------------------------------
# Packet layer


def test_bad_checksum_is_nakked_and_retransmitted(stub, connect):
    c = connect(stub)
    good = frame(stub.memory[0x100:0x108].hex())
    bad = good[:-2] + b"%02x" % ((int(good[-2:], 16) + 1) & 0xFF)
    stub.overrides[b"m100,"] = [bad]
    stub.retransmit = good
    assert c.read_memory(0x100, 8) == bytes(stub.memory[0x100:0x108])
    assert stub.naks_received == 1


def test_client_retransmits_on_nak(stub, connect):
    c = connect(stub)
    stub.nak_next = 2
    assert c.read_memory(0x200, 4) == bytes(stub.memory[0x200:0x204])
    assert stub.packets(b"m200,4") == [b"m200,4"] * 3


def test_retransmits_are_bounded(stub, connect):
    c = connect(stub)
    stub.nak_next = 100
    with pytest.raises(ProtocolError) as e:
        c.read_memory(0x200, 4)
    assert "rejected" in e.value.message
    assert len(stub.packets(b"m200,4")) == c.max_retries + 1
    with pytest.raises(GuestConnectionError):  # stream state unknown: unusable now
        c.threads()


def test_endless_bad_checksums_are_bounded(stub, connect):
    c = connect(stub)
    stub.overrides[b"qX"] = frame("OK", cs=0)  # every NAK makes the stub resend it
    with pytest.raises(ProtocolError) as e:
        c.command("qX")
    assert "bad checksums" in e.value.message
    assert stub.naks_received == c.max_retries


def test_run_length_encoded_reply(stub, connect):
    c = connect(stub)
    stub.overrides[b"m1000,"] = frame(b"0*,")  # '0' + 15 more = 16 hex digits
    assert c.read_memory(0x1000, 8) == bytes(8)
    data = bytes([0xAB] * 40 + [1, 2, 3] + [0] * 20)
    stub.overrides[b"m2000,"] = frame(rle(data.hex().encode()))
    assert b"*" in rle(data.hex().encode())
    assert c.read_memory(0x2000, len(data)) == data


def test_escaped_bytes_in_reply_and_request(stub, connect):
    c = connect(stub)
    stub.overrides[b"qEcho"] = lambda p: frame(rsp_escape(b"got:" + p))
    assert c.command(b"qEcho#$}*x") == b"got:qEcho#$}*x"
    raw = bytes(stub.raw_in)
    assert b"}\x03}\x04}]}\nx" in raw  # '#$}*' went out escaped


def test_stray_bytes_between_packets_are_ignored(stub, connect):
    c = connect(stub)
    stub.overrides[b"qC"] = b"\r\n++junk" + frame("QCp01.01") + b"\n"
    assert c.command("qC") == b"QCp01.01"
    assert c.command("qD") == b""  # the trailing newline did not confuse the next reply


def test_runaway_packet_is_refused(stub, connect):
    c = connect(stub, timeout=5)
    stub.overrides[b"qC"] = b"$" + b"a" * 300000
    t0 = time.monotonic()
    with pytest.raises(ProtocolError) as e:
        c.command("qC")
    assert "longer than" in e.value.message
    assert time.monotonic() - t0 < 2


def test_torn_packet_is_dropped_at_next_dollar(stub, connect):
    c = connect(stub)
    stub.overrides[b"qC"] = b"$QCp0" + frame("QCp01.02")
    assert c.command("qC") == b"QCp01.02"


def test_error_reply_names_the_command(stub, connect):
    c = connect(stub)
    stub.overrides[b"qFoo"] = frame("E01")
    with pytest.raises(ProtocolError) as e:
        c.command("qFoo")
    assert "E01" in e.value.message and "qFoo" in e.value.message
    assert c.command("qBar") == b""  # still usable afterwards


def test_empty_reply_means_unsupported(stub, connect):
    c = connect(stub)
    assert c.command("qUnknown") == b""
    with pytest.raises(ProtocolError) as e:
        c.command("qUnknown", required=True)
    assert "does not support" in e.value.message and "qUnknown" in e.value.message


def test_peer_closes_mid_reply(stub, connect):
    c = connect(stub, timeout=5)
    stub.overrides[b"m"] = (b"$0102", CLOSE)
    t0 = time.monotonic()
    with pytest.raises(GuestConnectionError) as e:
        c.read_memory(0, 16)
    assert time.monotonic() - t0 < 1.0
    assert "closed the connection" in e.value.message
    with pytest.raises(GuestConnectionError):
        c.read_memory(0, 16)


def test_peer_never_answers_times_out(stub, connect):
    c = connect(stub, timeout=0.3)
    stub.overrides[b"m"] = SILENT
    t0 = time.monotonic()
    with pytest.raises(GuestConnectionError) as e:
        c.read_memory(0, 16)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.0
    assert "timed out after 0.3s" in e.value.message and "'m0,10'" in e.value.message
    with pytest.raises(GuestConnectionError) as e2:  # a late reply could desync: refuse
        c.threads()
    assert "unusable" in e2.value.message


def test_ack_then_silence_times_out(stub, connect):
    c = connect(stub, timeout=0.3)
    stub.overrides[b"g"] = b"$00112233"  # ack, half a packet, nothing more
    t0 = time.monotonic()
    with pytest.raises(GuestConnectionError):
        c.read_registers()
    assert time.monotonic() - t0 < 1.0


def test_acks_are_sent_for_every_packet(stub, connect):
    c = connect(stub)
    c.read_memory(0, 1)
    c.read_memory(1, 1)
    c.close()
    assert stub.closed.wait(2)
    # qSupported, ?, m, m replies: each acked exactly once (acks may ride on
    # the next packet or be flushed by close())
    outside_packets = re.sub(rb"\$[^#]*#..", b"", bytes(stub.raw_in))
    assert outside_packets == b"++++"


# --------------------------------------------------------------------------
# Stop replies, running, console output


def test_stop_reply_parsing():
    t = StopReply.parse(b"T05thread:p01.02;06:0000000000000000;swbreak:;")
    assert (t.kind, t.signal, t.thread) == ("T", 5, "p01.02")
    assert t.info == {"thread": "p01.02", "06": "0000000000000000", "swbreak": ""}
    assert StopReply.parse(b"S05") == StopReply("S", 5)
    w = StopReply.parse(b"W00")
    assert (w.kind, w.signal, w.exited) == ("W", 0, True)
    x = StopReply.parse(b"X09;process:1")
    assert (x.kind, x.signal, x.info, x.exited) == ("X", 9, {"process": "1"}, True)
    assert not t.exited
    for bad in (b"", b"T5", b"OK", b"Q05", b"S5x", b"T0g"):
        with pytest.raises(ProtocolError):
            StopReply.parse(bad)


def test_cont_interrupt_wait_stop(stub, connect):
    c = connect(stub)
    c.cont()
    assert c.running
    with pytest.raises(ProtocolError) as e:
        c.read_memory(0, 4)
    assert "running" in e.value.message
    c.interrupt()
    stop = c.wait_stop(2)
    assert stop == StopReply("T", 2, "p01.01", {"thread": "p01.01"})
    assert stub.interrupts == 1 and not c.running
    assert c.read_memory(0, 4) == bytes(stub.memory[:4])


def test_wait_stop_timeout_leaves_connection_usable(stub, connect):
    c = connect(stub)
    c.cont()
    t0 = time.monotonic()
    with pytest.raises(GuestConnectionError) as e:
        c.wait_stop(0.2)
    assert 0.15 <= time.monotonic() - t0 < 1.0
    assert "did not stop" in e.value.message
    c.interrupt()
    assert c.wait_stop(2).signal == 2


def test_resume_and_wait_interrupts_after_timeout(stub, connect):
    c = connect(stub)
    stop = c.resume_and_wait(0.1)
    assert stop.signal == 2 and stub.interrupts == 1 and not c.running


def test_resume_and_wait_collects_console_output(stub, connect):
    seen: list[bytes] = []
    c = connect(stub, on_output=seen.append)
    stub.overrides[b"c"] = frame(b"O" + b"Hello, ".hex().encode()) + frame(b"O" + b"world\n".hex().encode()) \
        + frame("T05thread:p01.02;")
    stop = c.resume_and_wait(2)
    assert stop == StopReply("T", 5, "p01.02", {"thread": "p01.02"})
    assert b"".join(seen) == b"Hello, world\n"


def test_console_output_collected_without_callback(stub, connect):
    c = connect(stub)
    stub.overrides[b"c"] = frame(b"O" + b"boot\n".hex().encode()) + frame("S05")
    assert c.resume_and_wait(2) == StopReply("S", 5)
    assert c.take_output() == b"boot\n" and c.take_output() == b""


def test_exit_means_guest_is_gone(stub, connect):
    c = connect(stub)
    stub.overrides[b"c"] = frame("W00")
    stop = c.resume_and_wait(2)
    assert stop.kind == "W" and stop.exited
    with pytest.raises(GuestConnectionError) as e:
        c.read_memory(0, 4)
    assert "guest is gone" in e.value.message
    with pytest.raises(GuestConnectionError):
        c.wait_stop()


def test_unsolicited_exit_during_command(stub, connect):
    c = connect(stub)
    stub.overrides[b"qC"] = frame("X09")
    with pytest.raises(GuestConnectionError) as e:
        c.command("qC")
    assert "guest is gone" in e.value.message and "signal 9" in e.value.message


def test_step(stub, connect):
    c = connect(stub)
    assert c.step().signal == 5
    assert c.step("p01.02").thread == "p01.01"
    assert stub.received[-2:] == [b"s", b"vCont;s:p01.02"]


# --------------------------------------------------------------------------
# Registers and target description


def test_read_registers(stub, connect):
    c = connect(stub)
    assert c.read_registers() == bytes(range(24))
    assert c.read_register(0x10) == bytes([0x10] * 8)
    assert stub.received[-1] == b"p10"
    c.write_register(0x10, b"\x01\x02")
    assert stub.received[-1] == b"P10=0102"


def test_read_registers_of_thread_selects_it_once(stub, connect):
    c = connect(stub)
    c.read_registers("p01.02")
    c.read_registers("p01.02")
    c.read_register(3, "p01.02")
    assert stub.packets(b"Hg") == [b"Hgp01.02"]
    c.select_thread("p01.03")
    c.resume_and_wait(0.05)  # a stop makes QEMU pick the stopping CPU: cache dropped
    c.select_thread("p01.03")
    assert stub.packets(b"Hg") == [b"Hgp01.02", b"Hgp01.03", b"Hgp01.03"]


def test_target_xml_chunked_with_includes(stub, connect):
    stub.xfer_chunk = 100
    c = connect(stub)
    files = c.target_xml()
    assert list(files) == ["target.xml", "64bit-core.xml", "64bit-extra.xml"]
    assert files == stub.xml_files
    reqs = stub.packets(b"qXfer:features:read:64bit-core.xml:")
    assert len(reqs) == -(-len(X86_CORE) // 100)
    offsets = [int(r.split(b":")[-1].split(b",")[0], 16) for r in reqs]
    assert offsets == list(range(0, len(X86_CORE), 100))


def test_target_xml_escaped_content(stub, connect):
    stub.xml_files = {"target.xml": "<target><!-- a#b$c}d*e --><reg name='x' bitsize='8'/></target>"}
    c = connect(stub)
    assert c.target_xml()["target.xml"] == stub.xml_files["target.xml"]
    assert c.register_layout() == [Register("x", 8, 0, 0)]


def test_register_layout_x86_64(stub, connect):
    c = connect(stub)
    layout = c.register_layout()
    names = [r.name for r in layout]
    assert "commented_out" not in names
    assert layout[0] == Register("rax", 64, 0, 0)
    assert layout[16] == Register("rip", 64, 16, 128)
    assert layout[17] == Register("eflags", 32, 17, 136)
    assert layout[18] == Register("cs", 32, 18, 140)
    assert layout[24] == Register("st0", 80, 24, 164)
    assert layout[25] == Register("st1", 80, 25, 174)
    assert layout[26] == Register("fs_base", 64, 40, 184)
    assert layout[27] == Register("gs_base", 64, 41, 192)
    assert layout[28] == Register("orig_rax", 64, 57, 200)
    assert len(layout) == 29


def test_register_layout_orders_offsets_by_regnum(stub, connect):
    stub.xml_files = {"target.xml": '<target><reg name="b" bitsize="32" regnum="2"/>'
                                    '<reg name="a" bitsize="64" regnum="0"/><reg name="c" bitsize="16"/></target>'}
    c = connect(stub)
    assert c.register_layout() == [Register("b", 32, 2, 10), Register("a", 64, 0, 0), Register("c", 16, 1, 8)]


def test_register_layout_rejects_bad_reg(stub, connect):
    stub.xml_files = {"target.xml": '<target><reg name="a" type="int"/></target>'}
    c = connect(stub)
    with pytest.raises(ProtocolError):
        c.register_layout()


def test_target_xml_unsupported(stub, connect):
    stub.overrides[b"qXfer"] = frame("")
    c = connect(stub)
    with pytest.raises(ProtocolError) as e:
        c.target_xml()
    assert "does not support" in e.value.message


# --------------------------------------------------------------------------
# Memory


def test_read_memory_splits_into_2048_byte_packets(stub, connect):
    c = connect(stub)
    data = c.read_memory(0x1000, 5000)
    assert data == bytes(stub.memory[0x1000:0x1000 + 5000])
    assert stub.packets(b"m") == [b"m1000,800", b"m1800,800", b"m2000,388"]


def test_read_memory_chunk_follows_packet_size(stub, connect):
    stub.features = "PacketSize=200;multiprocess+"
    c = connect(stub)
    assert c.max_read == 256
    assert c.read_memory(0, 600) == bytes(stub.memory[:600])
    assert stub.packets(b"m") == [b"m0,100", b"m100,100", b"m200,58"]


@pytest.mark.parametrize("features, max_read", [("PacketSize=2000", 2048), ("PacketSize=1000", 2048),
                                                 ("PacketSize=100", 128), ("PacketSize=zz", 2048)])
def test_max_read_from_packet_size(stub, connect, features, max_read):
    stub.features = features
    assert connect(stub).max_read == max_read


def test_read_memory_short_answers_continue(stub, connect):
    c = connect(stub)
    stub.overrides[b"m40,"] = [frame(stub.memory[0x40:0x44].hex())]
    assert c.read_memory(0x40, 10) == bytes(stub.memory[0x40:0x4A])
    assert stub.packets(b"m") == [b"m40,a", b"m44,6"]


def test_read_memory_error(stub, connect):
    c = connect(stub)
    with pytest.raises(ProtocolError) as e:
        c.read_memory(MEM_SIZE - 8, 16)
    assert f"{MEM_SIZE - 8:#x}" in e.value.message and "E14" in e.value.message
    assert c.read_memory(0, 0) == b"" and len(stub.packets(b"m")) == 1


def test_read_memory_malformed_hex(stub, connect):
    c = connect(stub)
    stub.overrides[b"m"] = frame("zz12")
    with pytest.raises(ProtocolError) as e:
        c.read_memory(0, 2)
    assert "malformed" in e.value.message


def test_write_memory_splits(stub, connect):
    c = connect(stub)
    data = os.urandom(5000)
    c.write_memory(0x3000, data)
    assert bytes(stub.memory[0x3000:0x3000 + 5000]) == data
    sizes = [int(p.split(b":")[0].split(b",")[1], 16) for p in stub.packets(b"M")]
    assert sizes == [2016, 2016, 968]
    assert all(len(p) <= c.packet_size for p in stub.packets(b"M"))
    assert c.read_memory(0x3000, 5000) == data


def test_physical_mode_sent_only_on_change(stub, connect):
    c = connect(stub)
    assert c.physical_mode is None
    c.set_physical_mode(True)
    c.set_physical_mode(True)
    c.set_physical_mode(False)
    c.set_physical_mode(False)
    assert stub.packets(b"Qqemu") == [b"Qqemu.PhyMemMode:1", b"Qqemu.PhyMemMode:0"]
    assert c.physical_mode is False


# --------------------------------------------------------------------------
# Breakpoints, threads, monitor, close


def test_breakpoints(stub, connect):
    c = connect(stub)
    c.insert_breakpoint(0xFFFFFFFF81000000)
    c.insert_breakpoint(0x1234, 1)
    assert c.breakpoints == {(0xFFFFFFFF81000000, 1), (0x1234, 1)}
    c.remove_breakpoint(0x1234)
    assert c.breakpoints == {(0xFFFFFFFF81000000, 1)}
    c.insert_breakpoint(0x5678)
    c.remove_all_breakpoints()
    assert c.breakpoints == frozenset()
    assert stub.packets(b"Z0") == [b"Z0,ffffffff81000000,1", b"Z0,1234,1", b"Z0,5678,1"]
    assert sorted(stub.packets(b"z0")) == sorted([b"z0,1234,1", b"z0,5678,1", b"z0,ffffffff81000000,1"])


def test_breakpoint_error(stub, connect):
    c = connect(stub)
    stub.overrides[b"Z0"] = frame("E22")
    with pytest.raises(ProtocolError) as e:
        c.insert_breakpoint(0x10)
    assert "E22" in e.value.message and "Z0,10,1" in e.value.message
    assert c.breakpoints == frozenset()


def test_close_removes_breakpoints(stub, connect):
    c = connect(stub)
    c.insert_breakpoint(0x10)
    c.close()
    assert stub.packets(b"z0") == [b"z0,10,1"]
    with pytest.raises(GuestConnectionError):
        c.read_memory(0, 1)


def test_threads(stub, connect):
    c = connect(stub)
    assert c.threads() == ["p01.01", "p01.02", "p01.03"]
    assert stub.packets(b"q")[-3:] == [b"qfThreadInfo", b"qsThreadInfo", b"qsThreadInfo"]


def test_monitor(stub, connect):
    c = connect(stub)
    assert c.monitor("info registers") == "monitor said: info registers\n"
    assert stub.received[-1] == b"qRcmd," + b"info registers".hex().encode()


def test_monitor_bare_hex_and_error(stub, connect):
    c = connect(stub)
    stub.overrides[b"qRcmd"] = [frame(b"hi\n".hex()), frame("E01")]
    assert c.monitor("x") == "hi\n"
    with pytest.raises(ProtocolError) as e:
        c.monitor("bogus")
    assert "E01" in e.value.message


def test_context_manager_closes(stub):
    with RSPClient.connect(stub.target, timeout=2) as c:
        assert c.threads()
    assert stub.closed.wait(2)
    assert "closed" in repr(c)


# --------------------------------------------------------------------------
# Codec properties and fuzzing


@given(st.binary(max_size=300))
def test_escape_and_rle_roundtrip(data):
    wire = rle(_escape(data))
    assert _decode(wire) == data
    assert not any(b in _escape(data) for b in b"#$")


VALID_PIECES = [
    b"+", b"-", b"\x03", frame("OK"), frame("E01"), frame("T05thread:p01.01;"), frame("S05"),
    frame("W00"), frame("X09"), frame(b"O" + b"hi\n".hex().encode()), frame("0011223344556677"),
    frame("0*,"), frame("m" + X86_CORE[:40]), frame("l</target>"),
    frame('l<target><reg name="a" bitsize="64"/></target>'), frame("mp01.01,p01.02"), frame("l"),
    frame(QEMU_FEATURES), frame(""), frame("}]x"), frame("*"), frame("ab*"), b"$", b"#", b"$abc#zz",
]


@st.composite
def streams(draw) -> bytes:
    pieces = draw(st.lists(st.one_of(st.binary(max_size=32), st.sampled_from(VALID_PIECES)), max_size=12))
    data = bytearray(b"".join(pieces))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


OPERATIONS = {
    "handshake": lambda c: c._handshake(),
    "command": lambda c: c.command("qC"),
    "read_memory": lambda c: c.read_memory(0x1000, 3000),
    "registers": lambda c: c.read_registers("p01.02"),
    "threads": lambda c: c.threads(),
    "monitor": lambda c: c.monitor("info"),
    "layout": lambda c: c.register_layout(),
    "run": lambda c: c.resume_and_wait(0.05),
    "breakpoint": lambda c: c.insert_breakpoint(0x10),
}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), op=st.sampled_from(sorted(OPERATIONS)), eof=st.integers(0, 7).map(bool))
def test_fuzz_replies_never_hang_or_crash(stream, op, eof):
    """Random and mutated reply streams: the client returns or raises a
    QemuleakError, quickly.  Mostly the peer then closes (fast); sometimes
    it goes silent (exercises the timeouts)."""
    a, b = socket.socketpair()
    try:
        client = RSPClient(a, "fuzz", timeout=0.05)
        b.sendall(stream)
        if eof:
            b.shutdown(socket.SHUT_WR)
        outcome: list[BaseException | None] = []

        def run():
            try:
                OPERATIONS[op](client)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - judged below
                outcome.append(e)

        t0 = time.monotonic()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(3)
        assert not worker.is_alive(), f"{op} hung on {stream!r}"
        assert time.monotonic() - t0 < 1.5
        err = outcome[0]
        assert err is None or isinstance(err, QemuleakError), repr(err)
        client.close()
    finally:
        a.close()
        b.close()


def test_fuzz_harness_detects_success():
    """The fuzz harness really runs operations: a well-formed stream succeeds."""
    a, b = socket.socketpair()
    try:
        client = RSPClient(a, "fuzz", timeout=0.5)
        b.sendall(b"+" + frame(b"mp01.01") + b"+" + frame(b"l"))
        assert client.threads() == ["p01.01"]
        assert b.recv(100) == b"$qfThreadInfo#bb+$qsThreadInfo#c8"
    finally:
        a.close()
        b.close()
