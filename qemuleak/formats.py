"""Whole reports for a list of scans: kmemleak text, summary, JSON, SARIF 2.1.0, JUnit XML.

A session appends one Scan per scan and rewrites its output file with render() after
every one, so each format describes all the scans so far. text, summary and JSON come
from qemuleak.report; this module adds the two formats CI systems read: SARIF (code
scanning: GitHub, GitLab, SonarQube...) and JUnit XML (test reports: GitLab, Jenkins).
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from urllib.parse import quote

from qemuleak import __version__, report
from qemuleak.report import Frame, Leak, Scan

__all__ = [
    "ALLOCATOR_PATTERNS", "FORMATS", "RULE_ID", "SARIF_SCHEMA_URI", "backtrace_fingerprint",
    "frame_key", "is_allocator", "junit_text", "render", "sarif_text", "site_frame",
    "to_sarif",
]

FORMATS = ("text", "json", "summary", "sarif", "junit")

# Frames inside the allocator (entry points, their *_noprof/_node/_trace variants, and
# slab/page/tracing internals): the leak is reported at the first frame after them.
ALLOCATOR_PATTERNS: tuple[str, ...] = (
    "kmalloc*", "__kmalloc*", "___kmalloc*", "__do_kmalloc*", "kzalloc*", "kcalloc*",
    "kmem_cache_alloc*", "__kmem_cache_alloc*", "kmem_cache_zalloc*",
    "kvmalloc*", "__kvmalloc*", "kvzalloc*", "kvcalloc*", "kvrealloc*",
    "vmalloc*", "__vmalloc*", "vzalloc*", "vcalloc*",
    "krealloc*", "__krealloc*", "kmemdup*", "kstrdup*", "kstrndup*", "kasprintf*",
    "kvasprintf*", "devm_kmalloc*", "devm_kzalloc*", "mempool_alloc*",
    "pcpu_alloc*", "__alloc_percpu*", "alloc_percpu*",
    "slab_alloc*", "__slab_alloc*", "___slab_alloc*", "slab_post_alloc_hook",
    "alloc_slab_page", "allocate_slab", "new_slab",
    "alloc_pages*", "__alloc_pages*", "__get_free_pages*", "get_zeroed_page*",
    "folio_alloc*", "__folio_alloc*",
    "kmemleak_*", "trace_kmalloc*", "trace_kmem_cache_alloc*", "__traceiter_*",
)

SARIF_SCHEMA_URI = ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
                    "sarif-schema-2.1.0.json")
RULE_ID = "kernel-memory-leak"
FINGERPRINT_KEY = "leakBacktrace/v1"
MAX_ADDRESSES = 100      # per result: a leak in a hot path can have millions of objects

_RULE = {
    "id": RULE_ID,
    "name": "KernelMemoryLeak",
    "shortDescription": {"text": "Kernel memory leak"},
    "fullDescription": {"text": (
        "A kernel object that nothing points to any more (kmemleak's definition): it can "
        "no longer be freed. Direct leaks are reported as errors; groups of only indirect "
        "leaks (reachable from a leaked object alone) as warnings.")},
    "helpUri": "https://docs.kernel.org/dev-tools/kmemleak.html",
    "defaultConfiguration": {"level": "error"},
}


# --------------------------------------------------------------------------
# all formats


def render(fmt: str, scans: Sequence[Scan], source_root: str | None = None) -> str:
    """The whole report for these scans in format `fmt` (one of FORMATS);
    `source_root`: see to_sarif."""
    renderers: dict[str, Callable[[Sequence[Scan]], str]] = {
        "text": lambda s: _per_scan(s, lambda one: report.format_text(one.leaks)),
        "summary": lambda s: _per_scan(
            s, lambda one: report.format_summary(one.leaks, one.suppressed)),
        "json": report.json_text,
        "sarif": lambda s: sarif_text(s, source_root),
        "junit": junit_text,
    }
    if fmt not in renderers:
        raise ValueError(f"unknown report format {fmt!r} (one of {', '.join(FORMATS)})")
    return renderers[fmt](scans)


def _per_scan(scans: Sequence[Scan], one: Callable[[Scan], str]) -> str:
    # one scan stays exactly what kmemleak prints; several get a header each
    if len(scans) == 1:
        return one(scans[0])
    return "".join(f"# scan {s.label}: {report._plural(len(s.leaks), 'leak')}\n{one(s)}"
                   for s in scans)


# --------------------------------------------------------------------------
# SARIF 2.1.0


def is_allocator(function: str | None) -> bool:
    """Whether a frame's function is part of the allocator (see ALLOCATOR_PATTERNS)."""
    return function is not None and any(fnmatchcase(function, p) for p in ALLOCATOR_PATTERNS)


def site_frame(backtrace: Sequence[Frame]) -> Frame | None:
    """Where a leak is reported: the first frame outside the allocator (the last frame if
    all are inside it, as when only the allocator's entry was unwound), None if empty."""
    return next((f for f in backtrace if not is_allocator(f.function)),
                backtrace[-1] if backtrace else None)


def frame_key(frame: Frame) -> str:
    """module!function+offset: the same code in every boot (KASLR moves the addresses)."""
    return f"{_module_name(frame) or '?'}!{frame.symbol.partition('/')[0]}"


def backtrace_fingerprint(backtrace: Iterable[Frame]) -> str:
    """A stable hash of a backtrace's frame_key()s, for CI systems to match across runs."""
    return hashlib.sha256("\n".join(map(frame_key, backtrace)).encode()).hexdigest()


def _module_name(frame: Frame) -> str | None:
    # a symbolized frame without a module is in the kernel image; an unknown one is nowhere
    return frame.module or ("vmlinux" if frame.function else None)


def _uri(path: str) -> str:
    return PurePosixPath(path).as_uri() if path.startswith("/") else quote(path)


SRCROOT = "%SRCROOT%"


def _artifact(path: str, root: str | None) -> dict:
    """A file: relative to `root` (uriBaseId SRCROOT) when under it, as GitHub code
    scanning needs to show a result in the file; else as it is."""
    if root is not None and path.startswith("/"):
        p, r = PurePosixPath(path), PurePosixPath(root)
        if p.is_relative_to(r) and p != r:
            return {"uri": quote(str(p.relative_to(r))), "uriBaseId": SRCROOT}
    return {"uri": _uri(path)}


def _physical_location(source: str, root: str | None = None) -> dict:
    path, sep, line = source.rpartition(":")
    if not sep or not line.isdigit() or int(line) < 1:    # no usable line number
        return {"artifactLocation": _artifact(source, root)}
    return {"artifactLocation": _artifact(path, root), "region": {"startLine": int(line)}}


def _location(frame: Frame, root: str | None = None) -> dict:
    name = frame.function or frame.symbol
    module = _module_name(frame)
    location: dict = {}
    if frame.source:
        location["physicalLocation"] = _physical_location(frame.source, root)
    location["logicalLocations"] = [{
        "name": name, "fullyQualifiedName": f"{module}!{name}" if module else name,
        "kind": "function"}]
    return location


def _stack_frame(frame: Frame, root: str | None) -> dict:
    out = {"location": {**_location(frame, root), "message": {"text": frame.symbol}}}
    if (module := _module_name(frame)) is not None:
        out["module"] = module
    return out


def _result(group: list[Leak], labels: dict[int, str], root: str | None) -> dict:
    first = group[0]
    nbytes = sum(x.size for x in group)
    direct = sum(x.kind == "direct" for x in group)
    chain = " <- ".join(f.text() for f in first.backtrace) or "no backtrace"
    site = site_frame(first.backtrace)
    result = {
        "ruleId": RULE_ID,
        "ruleIndex": 0,
        "level": "error" if direct else "warning",
        "message": {"text": f"{report._plural(len(group), 'object')} ({nbytes} bytes) "
                            f'leaked, allocated by comm "{first.comm}" pid {first.pid}: '
                            f"{chain}"},
        "locations": [_location(site, root)] if site else [],
        "partialFingerprints": {FINGERPRINT_KEY: backtrace_fingerprint(first.backtrace)},
        "properties": {
            "count": len(group), "bytes": nbytes, "direct": direct,
            "indirect": len(group) - direct,
            "addresses": [hex(x.address) for x in group[:MAX_ADDRESSES]],
            "scans": list(dict.fromkeys(labels[id(x)] for x in group)),
        },
    }
    if first.backtrace:
        result["stacks"] = [{"message": {"text": "allocation backtrace"},
                             "frames": [_stack_frame(f, root) for f in first.backtrace]}]
    return result


def _utc(t: float, fmt: str = "%Y-%m-%dT%H:%M:%S.%fZ") -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime(fmt)


def _invocation(scans: Sequence[Scan]) -> dict:
    invocation: dict = {"executionSuccessful": True, "properties": {"scans": [{
        "label": s.label, "time": s.time, "leaks": len(s.leaks),
        "bytes": sum(x.size for x in s.leaks), "objectsTracked": s.objects_tracked,
        "bytesScanned": s.bytes_scanned, "suppressed": s.suppressed,
    } for s in scans]}}
    if scans:
        invocation["startTimeUtc"] = _utc(scans[0].time)
        invocation["endTimeUtc"] = _utc(scans[-1].time)
    return invocation


def to_sarif(scans: Sequence[Scan], source_root: str | None = None) -> dict:
    """A SARIF 2.1.0 log: one run, one rule (RULE_ID; direct leaks are level "error",
    groups of only indirect ones "warning"), one result per backtrace (frame_key()s)
    across all scans, located at its site_frame(). Source files under `source_root`
    (an absolute directory: a checkout's top) are given relative to it, with
    uriBaseId %SRCROOT%."""
    root = str(PurePosixPath(source_root)) if source_root else None
    labels = {id(leak): s.label for s in scans for leak in s.leaks}
    groups = report.group_by_backtrace((x for s in scans for x in s.leaks), key=frame_key)
    run = {
        "tool": {"driver": {"name": "qemuleak", "version": __version__,
                            "semanticVersion": __version__, "rules": [_RULE]}},
        "invocations": [_invocation(scans)],
        "results": [_result(g, labels, root) for g in groups],
    }
    if root is not None:
        run["originalUriBaseIds"] = {SRCROOT: {"uri": PurePosixPath(root).as_uri() + "/"}}
    return {"$schema": SARIF_SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def sarif_text(scans: Sequence[Scan], source_root: str | None = None) -> str:
    """to_sarif() as indented JSON with a trailing newline."""
    return json.dumps(to_sarif(scans, source_root), indent=2) + "\n"


# --------------------------------------------------------------------------
# JUnit XML

# characters XML 1.0 cannot carry (a comm or a label may hold any byte)
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    return _XML_ILLEGAL.sub("\ufffd", text)


def _seconds(t: float) -> str:
    return f"{t:.3f}"


def _testcase(suite: ET.Element, scan: Scan) -> None:
    case = ET.SubElement(suite, "testcase", classname="qemuleak.scan", name=_xml(scan.label),
                         time=_seconds(scan.duration_s))
    if scan.leaks:
        nbytes = sum(x.size for x in scan.leaks)
        failure = ET.SubElement(
            case, "failure", type="memory-leak",
            message=f"{report._plural(len(scan.leaks), 'leak')} ({nbytes} bytes)")
        failure.text = _xml(report.format_text(scan.leaks))
    ET.SubElement(case, "system-out").text = (
        f"objects tracked: {scan.objects_tracked}, bytes scanned: {scan.bytes_scanned}, "
        f"suppressed: {scan.suppressed}, guest paused: {scan.paused_s:.3f} s\n")


def junit_text(scans: Sequence[Scan]) -> str:
    """JUnit XML (the Ant/Jenkins schema GitLab reads too): one testsuite "qemuleak", one
    testcase per scan, failed when the scan found leaks (its kmemleak text as the
    failure's body); per-scan counts as suite properties "LABEL.objects_tracked" and
    "LABEL.bytes_scanned"."""
    counts = {"tests": str(len(scans)), "failures": str(sum(1 for s in scans if s.leaks)),
              "errors": "0"}
    elapsed = _seconds(sum(s.duration_s for s in scans))
    root = ET.Element("testsuites", name="qemuleak", **counts, time=elapsed)
    suite = ET.SubElement(root, "testsuite", name="qemuleak", **counts, skipped="0",
                          time=elapsed)
    if scans:
        # the Ant schema's timestamp has no zone: it is UTC here
        suite.set("timestamp", _utc(scans[0].time, "%Y-%m-%dT%H:%M:%S"))
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", name="qemuleak.version", value=__version__)
    for s in scans:
        for name in ("objects_tracked", "bytes_scanned"):
            ET.SubElement(properties, "property", name=_xml(f"{s.label}.{name}"),
                          value=str(getattr(s, name)))
    for s in scans:
        _testcase(suite, s)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"
