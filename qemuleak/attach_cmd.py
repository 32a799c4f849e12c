"""`qemuleak attach`: trace a running guest until Ctrl-C (or `ctl off`), scanning
every --scan-interval seconds and whenever the control socket asks, like the
in-kernel kmemleak thread and its debugfs file. On the way out a final scan is
written, every breakpoint removed and the guest left running."""

import sys
import time

from .errors import QemuleakError
from .formats import render
from .guest import Guest
from .kernel.kernel import Kernel
from .session import ReportOptions, Session, scan_line
from .tracer import tracing

STREAMED = ("text", "summary")     # formats printed scan by scan on stdout


class Status:
    """The live status line: redrawn in place on a terminal, else a plain line
    every `every` seconds."""

    def __init__(self, stream, every: float = 30.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 1.0 if self.tty else every
        self.last = 0.0
        self.shown = False

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self.shown = True
        else:
            self.stream.write(f"qemuleak: {text}\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        """A line of its own (the status line is redrawn after it)."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.shown = False
        self.stream.write(f"qemuleak: {text}\n")
        self.stream.flush()


def attach(target: str, options: ReportOptions, interval: float = 600.0,
           control: str | None = None, vmlinux=None, system_map=None, backend="auto",
           out=sys.stdout, err=sys.stderr) -> int:
    """Trace and scan until stopped; 1 if any leak was reported, else 0."""
    from .control import ControlServer
    with Guest.connect(target, backend=backend) as guest:
        kernel = Kernel.open(guest, vmlinux=vmlinux, system_map=system_map)
        session = Session(kernel, options, out)
        server = ControlServer(control) if control else None
        try:
            _loop(session, server, interval, out, Status(err))
        finally:
            if server is not None:
                server.close()
        guest.was_running = True
    if options.output is None and options.format not in STREAMED:
        out.write(session.report_text())
    return 1 if session.leaks_reported else 0


def _loop(session: Session, server, interval: float, out, status: Status) -> None:
    tracer = session.tracer
    requests: list = []
    next_scan = time.monotonic() + interval if interval > 0 else float("inf")
    last_poll = 0.0
    status.say(f"{session.describe()}; "
               + (f"scanning every {interval:g} s; " if interval > 0 else "")
               + "Ctrl-C for a final scan and detach")

    def until() -> bool:
        nonlocal last_poll
        now = time.monotonic()
        if now - last_poll >= 0.05:
            last_poll = now
            if server is not None:
                requests.extend(server.poll())
            status.update(session.status())
        return bool(requests) or now >= next_scan

    def do_scan(label: str) -> str:
        done = session.scan(label)
        line = scan_line(done)
        status.say(line)
        if session.options.output is None and session.options.format in STREAMED:
            out.write(render(session.options.format, [done], session.options.source_root))
            out.flush()
        return line

    with tracing(tracer):
        n = 0
        while True:
            tracer.run(until)
            if tracer.interrupted:
                break
            if time.monotonic() >= next_scan:
                n += 1
                do_scan(f"periodic-{n}")
                next_scan = time.monotonic() + interval
            stop = False
            while requests:
                request = requests.pop(0)
                try:
                    stop |= _answer(request, session, do_scan)
                except QemuleakError as e:
                    request.reply(str(e), ok=False)
                if request.command.name == "scan_interval":
                    interval = request.command.arg or 0
                    next_scan = time.monotonic() + interval if interval else float("inf")
            if stop:
                break
        do_scan("final")
    status.say(f"detached; {session.leaks_reported} leaks reported in "
               f"{len(session.scans)} scans; the guest runs on")


def _answer(request, session: Session, do_scan) -> bool:
    """Carry out one control command and reply; True for `off`."""
    c = request.command
    if c.name == "scan":
        request.reply(do_scan(c.arg or f"ctl-{len(session.scans) + 1}"))
    elif c.name == "clear":
        request.reply(f"cleared {session.clear()} reported leaks")
    elif c.name == "dump":
        request.reply(session.dump(c.arg))
    elif c.name == "stack":
        session.options.stack = c.arg
        request.reply(f"stack scanning {'on' if c.arg else 'off'}")
    elif c.name == "scan_interval":
        request.reply(f"scanning every {c.arg} s" if c.arg else "periodic scans off")
    elif c.name == "report":
        request.reply(session.report_text())
    elif c.name == "off":
        request.reply("tracing off; final scan and detach")
        return True
    return False
