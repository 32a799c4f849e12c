"""The command line as a user meets it: bad input gives one clear line and exit
code 2, never a traceback."""

import socket
import subprocess
import sys
import threading

import pytest

CLI = [sys.executable, "-m", "qemuleak.cli"]


def qemuleak(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=60)


def one_line_error(p, text):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert text in p.stderr.splitlines()[0], p.stderr


@pytest.fixture
def ssh_server():
    """A TCP port where something that is not a gdbstub answers."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


def test_attach_nothing_listening(tmp_path):
    one_line_error(qemuleak("attach", f"unix:{tmp_path}/none.sock"), "nothing listening")


def test_attach_not_a_gdbstub(ssh_server):
    one_line_error(qemuleak("attach", ssh_server), "is not a gdbstub")


def test_run_missing_files(tmp_path):
    one_line_error(qemuleak("run", "-c", "true", "--kernel", tmp_path / "k", "--initrd",
                            tmp_path / "i"), "kernel image not found")
    one_line_error(qemuleak("run", "--script", tmp_path / "missing.sh"), "cannot read the script")


def test_ctl_without_attach(tmp_path):
    one_line_error(qemuleak("ctl", tmp_path / "ctl.sock", "scan"), "")
    one_line_error(qemuleak("ctl", tmp_path / "ctl.sock", "bogus"), "")


def test_suppressions_file_errors_name_the_line(tmp_path):
    supp = tmp_path / "supp"
    supp.write_text("leak:ok\nnonsense\n")
    one_line_error(qemuleak("attach", f"unix:{tmp_path}/none.sock", "--suppressions", supp),
                   f"{supp}:2")


@pytest.mark.parametrize("command", ["attach", "run", "ctl", "trace", "info", "resume"])
def test_help(command):
    p = qemuleak(command, "--help")
    assert p.returncode == 0 and "usage: qemuleak " + command in p.stdout
