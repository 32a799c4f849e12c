"""Leak reports: kmemleak's text format, a grouped summary, JSON, suppressions.

The text report is byte-for-byte what /sys/kernel/debug/kmemleak prints (mm/kmemleak.c
print_unreferenced, hex_dump_object) so existing tooling that parses it keeps working.
Suppression files follow LeakSanitizer's `leak:PATTERN` syntax.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path

from qemuleak.errors import QemuleakError

__all__ = [
    "Frame", "JSON_SCHEMA", "Leak", "Reporter", "Scan", "Suppressions", "filter_leaks",
    "format_dump", "format_leak", "format_summary", "format_text", "group_by_backtrace",
    "hex_dump_lines", "json_text", "to_json",
]

_HEX_ROW = 16            # kmemleak HEX_ROW_SIZE
_HEX_MAX = 2 * _HEX_ROW  # HEX_MAX_LINES rows
_ASCII_COLUMN = 49       # hex_dump_to_buffer: rowsize * 2 + rowsize / groupsize + 1


@dataclass(frozen=True)
class Frame:
    """One backtrace entry."""

    address: int
    symbol: str                 # "name+0x36/0x60", or "0x<hex>" when unknown
    function: str | None
    module: str | None          # None for the kernel image
    source: str | None = None   # "file.c:123"

    def text(self) -> str:
        """The frame as the kernel's %pS prints it."""
        return f"{self.symbol} [{self.module}]" if self.module else self.symbol


@dataclass
class Leak:
    """One unreferenced object (or, for `dump`, any object)."""

    address: int
    size: int
    comm: str
    pid: int
    cpu: int
    jiffies: int
    age_s: float
    kind: str                   # "direct" | "indirect" | "referenced"
    backtrace: tuple[Frame, ...]
    hexdump: bytes              # first min(size, 32) bytes
    seq: int = 0                # allocation order
    object_kind: str = "kmalloc"
    cache: str | None = None

    @property
    def module(self) -> str | None:
        """Module of the first frame that has one."""
        return next((f.module for f in self.backtrace if f.module), None)


@dataclass
class Scan:
    """One scan's results."""

    label: str
    time: float
    objects_tracked: int
    bytes_scanned: int
    leaks: list[Leak]
    suppressed: int = 0
    paused_s: float = 0.0
    duration_s: float = 0.0


# --------------------------------------------------------------------------
# kmemleak text


def hex_dump_lines(data: bytes) -> list[str]:
    """Rows of print_hex_dump(rowsize 16, groupsize 1, ascii), without prefix."""
    rows = []
    for i in range(0, len(data), _HEX_ROW):
        row = data[i:i + _HEX_ROW]
        # isascii() && isprint(): the kernel's ctype calls Latin-1 printable too
        ascii_ = "".join(chr(b) if 0x20 <= b <= 0x7E else "." for b in row)
        rows.append(f"{row.hex(' '):<{_ASCII_COLUMN}}{ascii_}")
    return rows


def _hex_block(leak: Leak) -> list[str]:
    n = max(0, min(leak.size, _HEX_MAX))
    return [f"  hex dump (first {n} bytes):",
            *("    " + row for row in hex_dump_lines(leak.hexdump[:n]))]


def _frame_lines(backtrace: Iterable[Frame]) -> list[str]:
    return [f"    [<{f.address:016x}>] {f.text()}" for f in backtrace]


def _age(age_s: float) -> str:
    # the kernel prints integer milliseconds as "%d.%03d"; round, not truncate, so a
    # float age such as 375.486 does not come out as 375.485
    ms = max(0, round(age_s * 1000))
    return f"{ms // 1000}.{ms % 1000:03d}"


def format_leak(leak: Leak) -> str:
    """One kmemleak block, ending with a newline."""
    lines = [
        f"unreferenced object 0x{leak.address:08x} (size {leak.size}):",
        f'  comm "{leak.comm}", pid {leak.pid}, jiffies {leak.jiffies} '
        f"(age {_age(leak.age_s)}s)",
        *_hex_block(leak),
        "  backtrace:",
        *(_frame_lines(leak.backtrace) or ["    (unknown: allocated before tracing began)"]),
    ]
    return "\n".join(lines) + "\n"


def format_text(leaks: Iterable[Leak]) -> str:
    """What /sys/kernel/debug/kmemleak would show, in the order given."""
    return "".join(format_leak(leak) for leak in leaks)


def format_dump(leak: Leak, *, count: int, min_count: int, flags: str = "") -> str:
    """kmemleak's `dump=` output (dump_object_info) for one object, without log prefix."""
    state = "referenced" if leak.kind == "referenced" else f"{leak.kind} leak"
    lines = [
        f"Object 0x{leak.address:08x} (size {leak.size}):",
        f'  comm "{leak.comm}", pid {leak.pid}, jiffies {leak.jiffies}',
        f"  min_count = {min_count}",
        f"  count = {count}",
        f"  flags = {flags or '0x0'}",
        f"  kind = {leak.object_kind}",
        *([f"  cache = {leak.cache}"] if leak.cache else []),
        f"  state = {state}",
        *_hex_block(leak),
        "  backtrace:",
        *_frame_lines(leak.backtrace),
    ]
    return "\n".join(lines) + "\n"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def group_by_backtrace(leaks: Iterable[Leak],
                       key: Callable[[Frame], Hashable] = lambda f: f.address,
                       ) -> list[list[Leak]]:
    """Leaks whose backtraces match frame by frame (compared by `key`: the address unless
    told), biggest group (bytes, then count) first; ties keep first-seen order."""
    groups: dict[tuple[Hashable, ...], list[Leak]] = {}
    for leak in leaks:
        groups.setdefault(tuple(key(f) for f in leak.backtrace), []).append(leak)
    # sorted() is stable: ties keep first-seen order, so output is deterministic
    return sorted(groups.values(),
                  key=lambda g: (sum(x.size for x in g), len(g)), reverse=True)


def format_summary(leaks: Iterable[Leak], suppressed: int = 0) -> str:
    """Leaks grouped by backtrace, biggest first, and a LeakSanitizer-style SUMMARY line."""
    ordered = group_by_backtrace(leaks)
    if not ordered:
        return "SUMMARY: no leaks" + (f"; {suppressed} suppressed" if suppressed else "") + "\n"
    out = []
    for group in ordered:
        first = group[0]
        direct = sum(x.kind == "direct" for x in group)
        out.append(
            f"{_plural(len(group), 'leak')} ({direct} direct, {len(group) - direct} indirect), "
            f"{sum(x.size for x in group)} bytes, e.g. 0x{first.address:x} (size {first.size}):")
        out.extend(_frame_lines(first.backtrace))
        out.append("")
    every = [x for g in ordered for x in g]
    direct = sum(x.kind == "direct" for x in every)
    out.append(f"SUMMARY: {sum(x.size for x in every)} bytes leaked in "
               f"{_plural(len(every), 'object')} ({direct} direct, {len(every) - direct} "
               f"indirect); {suppressed} suppressed")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# JSON

_ADDRESS = {"type": "string", "pattern": "^0x[0-9a-f]+$"}
_NULLABLE_STR = {"type": ["string", "null"]}

JSON_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "qemuleak report",
    "type": "object",
    "required": ["scans"],
    "additionalProperties": False,
    "properties": {"scans": {"type": "array", "items": {"$ref": "#/$defs/scan"}}},
    "$defs": {
        "scan": {
            "type": "object",
            "required": ["label", "time", "objects_tracked", "bytes_scanned", "leaks",
                         "suppressed"],
            "additionalProperties": False,
            "properties": {
                "label": {"type": "string"},
                "time": {"type": "number"},
                "objects_tracked": {"type": "integer", "minimum": 0},
                "bytes_scanned": {"type": "integer", "minimum": 0},
                "leaks": {"type": "array", "items": {"$ref": "#/$defs/leak"}},
                "suppressed": {"type": "integer", "minimum": 0},
                "paused_s": {"type": "number", "minimum": 0},
                "duration_s": {"type": "number", "minimum": 0},
            },
        },
        "leak": {
            "type": "object",
            "required": ["address", "size", "comm", "pid", "jiffies", "age_s", "cpu", "kind",
                         "module", "backtrace", "hexdump"],
            "additionalProperties": False,
            "properties": {
                "address": _ADDRESS,
                "size": {"type": "integer", "minimum": 0},
                "comm": {"type": "string"},
                "pid": {"type": "integer"},
                "jiffies": {"type": "integer", "minimum": 0},
                "age_s": {"type": "number"},
                "cpu": {"type": "integer"},
                "kind": {"enum": ["direct", "indirect"]},
                "module": _NULLABLE_STR,
                "backtrace": {"type": "array", "items": {"$ref": "#/$defs/frame"}},
                "hexdump": {"type": "string", "pattern": "^([0-9a-f]{2})*$",
                            "maxLength": 2 * _HEX_MAX},
                "object_kind": {"type": "string"},
                "cache": _NULLABLE_STR,
                "seq": {"type": "integer", "minimum": 0},
            },
        },
        "frame": {
            "type": "object",
            "required": ["address", "symbol", "module"],
            "additionalProperties": False,
            "properties": {
                "address": _ADDRESS,
                "symbol": {"type": "string"},
                "module": _NULLABLE_STR,
                "source": _NULLABLE_STR,
            },
        },
    },
}


def _frame_json(f: Frame) -> dict:
    return {"address": hex(f.address), "symbol": f.symbol, "module": f.module,
            "source": f.source}


def _leak_json(leak: Leak) -> dict:
    return {
        "address": hex(leak.address), "size": leak.size, "comm": leak.comm, "pid": leak.pid,
        "jiffies": leak.jiffies, "age_s": leak.age_s, "cpu": leak.cpu, "kind": leak.kind,
        "module": leak.module, "backtrace": [_frame_json(f) for f in leak.backtrace],
        "hexdump": leak.hexdump[:_HEX_MAX].hex(), "object_kind": leak.object_kind,
        "cache": leak.cache, "seq": leak.seq,
    }


def to_json(scans: Iterable[Scan]) -> dict:
    """The JSON report document (see JSON_SCHEMA)."""
    return {"scans": [{
        "label": s.label, "time": s.time, "objects_tracked": s.objects_tracked,
        "bytes_scanned": s.bytes_scanned, "leaks": [_leak_json(x) for x in s.leaks],
        "suppressed": s.suppressed, "paused_s": s.paused_s, "duration_s": s.duration_s,
    } for s in scans]}


def json_text(scans: Iterable[Scan]) -> str:
    """to_json() as indented text with a trailing newline."""
    return json.dumps(to_json(scans), indent=2) + "\n"


# --------------------------------------------------------------------------
# suppressions, filtering, once-only reporting


def _compile(pattern: str) -> re.Pattern[str]:
    # LSan TemplateMatch: substring match, '*' any run, leading '^' / trailing '$' anchor
    start = pattern.startswith("^")
    end = pattern.endswith("$") and len(pattern) > start
    body = pattern[start:len(pattern) - end]
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(("^" if start else "") + regex + ("$" if end else ""), re.DOTALL)


class Suppressions:
    """LeakSanitizer-style `leak:PATTERN` suppressions, matched on function and module names."""

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns = list(dict.fromkeys(patterns))
        self._compiled = [(p, _compile(p)) for p in self.patterns]
        self.hits: dict[str, int] = {p: 0 for p in self.patterns}

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> Suppressions:
        """Suppressions from file text; a bad line raises QemuleakError naming source:line."""
        patterns = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            kind, sep, pattern = line.partition(":")
            pattern = pattern.strip()
            if kind.strip() != "leak" or not sep or not pattern:
                raise QemuleakError(
                    f"{source}:{lineno}: not a suppression: {line!r}",
                    "write leak:PATTERN (function or module name, * and ^/$ allowed); "
                    "# starts a comment")
            patterns.append(pattern)
        return cls(patterns)

    @classmethod
    def load(cls, path: str | Path) -> Suppressions:
        """Suppressions from a file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise QemuleakError(f"cannot read suppressions file {path}: {reason}",
                                "check the --suppressions path") from None
        return cls.parse(text, str(path))

    def matches(self, leak: Leak) -> str | None:
        """The first pattern matching a frame's function or module (counted in hits), or None."""
        names = [n for f in leak.backtrace for n in (f.function, f.module) if n]
        for pattern, regex in self._compiled:
            if any(regex.search(n) for n in names):
                self.hits[pattern] += 1
                return pattern
        return None

    def __len__(self) -> int:
        return len(self.patterns)


# Functions that allocate what the kernel itself marks with kmemleak_not_leak() or
# kmemleak_ignore(): objects meant to have no reference (sysctl table headers that
# are never unregistered). In a kernel without kmemleak the mark compiles to
# nothing, so it cannot be read from memory; the allocating function is known.
KERNEL_NOT_LEAKS = ("^__register_sysctl_base$", "^__register_sysctl_init$",
                    "^init_fs_stat_sysctls$", "^user_namespace_sysctl_init$")


def filter_leaks(leaks: Iterable[Leak], *, suppressions: Suppressions | None = None,
                 module: str | None = None, min_age: float = 0.0,
                 kernel_not_leaks: bool = True) -> tuple[list[Leak], int]:
    """(leaks kept, how many suppressions removed); module and age filters apply first,
    so a leak they drop neither counts as suppressed nor as a suppression hit. The
    kernel's own not-leaks (KERNEL_NOT_LEAKS) count as suppressed too."""
    kept: list[Leak] = []
    suppressed = 0
    kernel = Suppressions(KERNEL_NOT_LEAKS if kernel_not_leaks else ())
    for leak in leaks:
        if module is not None and not any(f.module == module for f in leak.backtrace):
            continue
        if leak.age_s < min_age:
            continue
        if kernel.matches(leak) is not None or \
                suppressions is not None and suppressions.matches(leak) is not None:
            suppressed += 1
            continue
        kept.append(leak)
    return kept, suppressed


class Reporter:
    """Reports each leak once across scans, keyed by (address, seq) as kmemleak does."""

    def __init__(self) -> None:
        self._reported: set[tuple[int, int]] = set()
        self._cleared: set[tuple[int, int]] = set()

    def new(self, leaks: Iterable[Leak]) -> list[Leak]:
        """The leaks not reported before (order kept); they count as reported from now on."""
        fresh = []
        for leak in leaks:
            key = (leak.address, leak.seq)
            if key not in self._reported:
                self._reported.add(key)
                fresh.append(leak)
        return fresh

    def clear(self) -> set[tuple[int, int]]:
        """Mark everything reported so far as cleared and return those keys."""
        self._cleared |= self._reported
        return set(self._reported)

    @property
    def reported(self) -> set[tuple[int, int]]:
        """Keys reported so far (cleared ones included)."""
        return set(self._reported)

    @property
    def cleared(self) -> set[tuple[int, int]]:
        """Keys marked by clear()."""
        return set(self._cleared)
