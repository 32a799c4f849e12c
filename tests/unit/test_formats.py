"""Unit tests for qemuleak.formats: render() for every format, SARIF 2.1.0, JUnit XML.

SARIF documents are validated against the official OASIS schema (tests/sarif.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import xml.etree.ElementTree as ET

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemuleak import __version__
from tests.sarif import official_schema, validator
from qemuleak.formats import (
    FINGERPRINT_KEY, FORMATS, MAX_ADDRESSES, RULE_ID, backtrace_fingerprint, frame_key,
    is_allocator, junit_text, render, sarif_text, site_frame, to_sarif,
)
from qemuleak.report import (
    Frame, Leak, Scan, format_summary, format_text, group_by_backtrace, json_text,
)

KASLR = 0x200000      # the same code at another address, as after a reboot

KMALLOC = Frame(0xFFFFFFFF812A0010, "__kmalloc_cache_noprof+0x10/0x40",
                "__kmalloc_cache_noprof", None, "mm/slub.c:4321")
TRACE = Frame(0xFFFFFFFF812A1000, "kmalloc_trace+0x20/0x80", "kmalloc_trace", None)
LEAKY = Frame(0xFFFFFFFFC01D2036, "make_leaks+0x36/0x60", "make_leaks", "leaky",
              "drivers/leaky/leaky.c:42")
LEAKY_NOSRC = Frame(0xFFFFFFFFC01D2036, "make_leaks+0x36/0x60", "make_leaks", "leaky")
OTHER = Frame(0xFFFFFFFFC01D2100, "other_leak+0x10/0x30", "other_leak", "leaky")
INITCALL = Frame(0xFFFFFFFF81000F0A, "do_one_initcall+0x41/0x1df", "do_one_initcall", None)
UNKNOWN = Frame(0xFFFFFFFFC0FF0000, "0xffffffffc0ff0000", None, None)
MAKE_LEAKS = (KMALLOC, TRACE, LEAKY, INITCALL)


def shifted(frame: Frame) -> Frame:
    return Frame(frame.address + KASLR, frame.symbol, frame.function, frame.module,
                 frame.source)


def leak(address: int = 0xFFFF888000001000, size: int = 64, *, kind: str = "direct",
         backtrace=MAKE_LEAKS, comm: str = "insmod",
         pid: int = 123) -> Leak:
    return Leak(address=address, size=size, comm=comm, pid=pid, cpu=0, jiffies=4294680594,
                age_s=12.5, kind=kind, backtrace=tuple(backtrace),
                hexdump=(b"k" * 32)[:min(size, 32)])


def scan(label: str, leaks, *, time: float = 1700000000.25, **kw) -> Scan:
    return Scan(label, time, kw.pop("objects_tracked", 1000), kw.pop("bytes_scanned", 1 << 20),
                list(leaks), **kw)


def session() -> list[Scan]:
    """boot: 3 objects from make_leaks (one indirect) and an indirect-only group;
    after-reboot: make_leaks again at shifted addresses; final: clean."""
    return [
        scan("boot", [leak(0x1000), leak(0x2000, kind="indirect"), leak(0x3000),
                      leak(0x4000, 32, kind="indirect", backtrace=(KMALLOC, OTHER))],
             suppressed=1, duration_s=1.25, paused_s=0.5),
        scan("after-reboot", [leak(0x5000, backtrace=map(shifted, MAKE_LEAKS))],
             time=1700000100.0, duration_s=0.5),
        scan("final", [], time=1700000200.0, objects_tracked=900, bytes_scanned=2048,
             duration_s=0.25),
    ]


# --------------------------------------------------------------------------
# render


def test_formats_and_unknown_format():
    assert FORMATS == ("text", "json", "summary", "sarif", "junit")
    for fmt in FORMATS:
        assert render(fmt, session())
    with pytest.raises(ValueError, match="unknown report format 'xml'"):
        render("xml", session())


def test_text_one_scan_is_kmemleak_text_exactly():
    one = session()[0]
    assert render("text", [one]) == format_text(one.leaks)
    assert render("text", [session()[2]]) == ""           # a clean scan prints nothing


def test_text_several_scans_get_a_header_each():
    boot, again, final = session()
    assert render("text", [boot, again, final]) == (
        "# scan boot: 4 leaks\n" + format_text(boot.leaks)
        + "# scan after-reboot: 1 leak\n" + format_text(again.leaks)
        + "# scan final: 0 leaks\n")
    assert render("text", []) == ""


def test_summary_one_and_several_scans():
    boot, again, final = session()
    assert render("summary", [boot]) == format_summary(boot.leaks, 1)
    text = render("summary", [boot, final])
    assert text == ("# scan boot: 4 leaks\n" + format_summary(boot.leaks, 1)
                    + "# scan final: 0 leaks\nSUMMARY: no leaks\n")


def test_json_sarif_junit_are_the_whole_documents():
    scans = session()
    assert render("json", scans) == json_text(scans)
    assert render("sarif", scans) == sarif_text(scans)
    assert json.loads(sarif_text(scans)) == to_sarif(scans) and sarif_text(scans)[-2:] == "}\n"
    assert render("junit", scans) == junit_text(scans)


# --------------------------------------------------------------------------
# SARIF: the official schema


@pytest.fixture(scope="module")
def sarif_validator() -> jsonschema.protocols.Validator:
    return validator()


def test_schema_is_the_official_one():
    schema = official_schema()
    assert schema["id"] == ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/"
                            "schemas/sarif-schema-2.1.0.json")
    assert schema["$schema"] == "http://json-schema.org/draft-04/schema#"
    assert schema["title"] == "Static Analysis Results Format (SARIF) Version 2.1.0 JSON Schema"
    assert schema["properties"]["version"]["enum"] == ["2.1.0"]


def edge_cases() -> list[Scan]:
    """Frames without source, unknown frames, a bare allocator entry, no backtrace,
    a source without a line and an absolute path with a space."""
    odd = Frame(0xFFFFFFFF81234000, "odd+0x1/0x2", "odd", None, "/build dir/odd.c")
    return [scan("edge", [
        leak(0x1000, backtrace=(KMALLOC, LEAKY_NOSRC)),
        leak(0x2000, backtrace=(UNKNOWN, INITCALL)),
        leak(0x3000, backtrace=(KMALLOC,)),
        leak(0x4000, backtrace=()),
        leak(0x5000, backtrace=(TRACE, odd), comm='we"ird\x01', pid=-1),
    ])]


@pytest.mark.parametrize("scans", [session, edge_cases, list], ids=["session", "edge", "none"])
def test_sarif_validates_against_official_schema(sarif_validator, scans):
    sarif_validator.validate(to_sarif(scans()))


@pytest.mark.parametrize("breakage", [
    lambda d: d.update(version="2.0.0"),
    lambda d: d["runs"][0]["results"][0].update(level="fatal"),
    lambda d: d["runs"][0]["results"][0].pop("message"),
    lambda d: d["runs"][0]["results"][0].update(count=3),
    lambda d: d["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]
    .update(startLine=0),
    lambda d: d["runs"][0]["tool"]["driver"].pop("name"),
    lambda d: d["runs"][0]["invocations"][0].pop("executionSuccessful"),
])
def test_broken_sarif_fails_the_schema(sarif_validator, breakage):
    doc = copy.deepcopy(to_sarif(session()))
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError):
        sarif_validator.validate(doc)


leak_frames = st.sampled_from([KMALLOC, TRACE, LEAKY, LEAKY_NOSRC, OTHER, INITCALL, UNKNOWN])
random_leaks = st.builds(leak, st.integers(0, 1 << 48), st.integers(0, 4096),
                         kind=st.sampled_from(["direct", "indirect"]),
                         backtrace=st.lists(leak_frames, max_size=4))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(random_leaks, max_size=6), max_size=3))
def test_sarif_counts_every_leak_once_property(per_scan):
    scans = [scan(f"s{i}", leaks) for i, leaks in enumerate(per_scan)]
    results = to_sarif(scans)["runs"][0]["results"]
    every = [x for s in scans for x in s.leaks]
    assert sum(r["properties"]["count"] for r in results) == len(every)
    assert sum(r["properties"]["bytes"] for r in results) == sum(x.size for x in every)
    keys = {tuple(map(frame_key, x.backtrace)) for x in every}
    assert len(results) == len(keys)
    assert len({r["partialFingerprints"][FINGERPRINT_KEY] for r in results}) == len(keys)


# --------------------------------------------------------------------------
# SARIF: content


def results(scans) -> list[dict]:
    return to_sarif(scans)["runs"][0]["results"]


def test_tool_rule_and_invocation():
    run = to_sarif(session())["runs"][0]
    driver = run["tool"]["driver"]
    assert (driver["name"], driver["version"]) == ("qemuleak", __version__)
    assert [r["id"] for r in driver["rules"]] == [RULE_ID]
    assert all(r["ruleId"] == RULE_ID and r["ruleIndex"] == 0 for r in run["results"])
    (invocation,) = run["invocations"]
    assert [(s["label"], s["leaks"], s["bytes"], s["objectsTracked"], s["suppressed"])
            for s in invocation["properties"]["scans"]] == [
        ("boot", 4, 224, 1000, 1), ("after-reboot", 1, 64, 1000, 0), ("final", 0, 0, 900, 0)]
    assert invocation["startTimeUtc"] == "2023-11-14T22:13:20.250000Z"
    assert invocation["endTimeUtc"] == "2023-11-14T22:16:40.000000Z"


def test_results_group_by_backtrace_across_scans():
    first, second = results(session())
    # make_leaks: 2 objects in boot, 1 in after-reboot at KASLR-shifted addresses
    assert first["properties"] == {
        "count": 4, "bytes": 256, "direct": 3, "indirect": 1,
        "addresses": ["0x1000", "0x2000", "0x3000", "0x5000"],
        "scans": ["boot", "after-reboot"]}
    assert second["properties"]["addresses"] == ["0x4000"]
    assert second["properties"]["scans"] == ["boot"]
    assert first["message"]["text"] == (
        '4 objects (256 bytes) leaked, allocated by comm "insmod" pid 123: '
        "__kmalloc_cache_noprof+0x10/0x40 <- kmalloc_trace+0x20/0x80 <- "
        "make_leaks+0x36/0x60 [leaky] <- do_one_initcall+0x41/0x1df")
    assert second["message"]["text"].startswith("1 object (32 bytes) leaked")


def test_group_by_backtrace_key():
    a, b = leak(0x1000), leak(0x2000, backtrace=map(shifted, MAKE_LEAKS))
    assert group_by_backtrace([a, b]) == [[a], [b]]               # by address
    assert group_by_backtrace([a, b], key=frame_key) == [[a, b]]


def test_addresses_are_capped():
    many = scan("many", [leak(0x1000 + 64 * i) for i in range(MAX_ADDRESSES + 5)])
    (only,) = results([many])
    assert only["properties"]["count"] == MAX_ADDRESSES + 5
    assert len(only["properties"]["addresses"]) == MAX_ADDRESSES


def test_level_direct_error_indirect_only_warning():
    mixed, indirect_only = results(session())
    assert (mixed["level"], indirect_only["level"]) == ("error", "warning")
    (direct_only,) = results([scan("d", [leak(kind="direct")])])
    assert direct_only["level"] == "error"


@pytest.mark.parametrize("function, inside", [
    ("kmalloc_trace", True), ("__kmalloc_cache_noprof", True), ("__kmalloc_node", True),
    ("kmem_cache_alloc_lru", True), ("kvmalloc_node", True), ("__kvmalloc_node_noprof", True),
    ("kvzalloc", True), ("vmalloc", True), ("__vmalloc_node_range", True), ("vzalloc", True),
    ("krealloc", True), ("kmemdup", True), ("kstrdup_const", True), ("pcpu_alloc", True),
    ("__alloc_percpu_gfp", True), ("___slab_alloc", True), ("slab_alloc_node", True),
    ("alloc_pages_mpol", True), ("__alloc_pages_noprof", True),
    ("make_leaks", False), ("do_one_initcall", False), ("my_kmalloc", False),
    ("skb_kmalloc_helper", False), (None, False),
])
def test_is_allocator(function, inside):
    assert is_allocator(function) is inside


def test_site_frame_choice():
    assert site_frame(MAKE_LEAKS) is LEAKY
    assert site_frame((UNKNOWN, KMALLOC)) is UNKNOWN     # unknown code is not the allocator
    assert site_frame((KMALLOC, TRACE)) is TRACE         # only the allocator was unwound
    assert site_frame(()) is None


def test_location_with_source():
    (result,) = results([scan("s", [leak()])])
    (location,) = result["locations"]
    assert location["physicalLocation"] == {
        "artifactLocation": {"uri": "drivers/leaky/leaky.c"}, "region": {"startLine": 42}}
    assert location["logicalLocations"] == [
        {"name": "make_leaks", "fullyQualifiedName": "leaky!make_leaks", "kind": "function"}]


def test_location_without_source_and_odd_sources():
    by_address = {r["properties"]["addresses"][0]: r for r in results(edge_cases())}
    nosrc = by_address["0x1000"]["locations"]
    assert nosrc == [{"logicalLocations": [
        {"name": "make_leaks", "fullyQualifiedName": "leaky!make_leaks", "kind": "function"}]}]
    unknown = by_address["0x2000"]["locations"][0]["logicalLocations"][0]
    assert unknown["fullyQualifiedName"] == "0xffffffffc0ff0000"
    bare = by_address["0x3000"]["locations"][0]
    assert bare["logicalLocations"][0]["fullyQualifiedName"] == "vmlinux!__kmalloc_cache_noprof"
    assert bare["physicalLocation"]["region"] == {"startLine": 4321}
    assert by_address["0x4000"]["locations"] == [] and "stacks" not in by_address["0x4000"]
    odd = by_address["0x5000"]["locations"][0]["physicalLocation"]
    assert odd == {"artifactLocation": {"uri": "file:///build%20dir/odd.c"}}


def test_stack_is_the_whole_backtrace():
    (result,) = results([scan("s", [leak()])])
    (stack,) = result["stacks"]
    frames = stack["frames"]
    assert [f["location"]["message"]["text"] for f in frames] == [
        "__kmalloc_cache_noprof+0x10/0x40", "kmalloc_trace+0x20/0x80", "make_leaks+0x36/0x60",
        "do_one_initcall+0x41/0x1df"]
    assert [f["module"] for f in frames] == ["vmlinux", "vmlinux", "leaky", "vmlinux"]
    assert frames[2]["location"]["physicalLocation"]["region"]["startLine"] == 42
    assert "physicalLocation" not in frames[1]["location"]


def test_fingerprint_is_stable_and_specific():
    bt = (LEAKY, INITCALL)
    expected = hashlib.sha256(b"leaky!make_leaks+0x36\nvmlinux!do_one_initcall+0x41").hexdigest()
    assert backtrace_fingerprint(bt) == expected          # v1 must never change
    assert backtrace_fingerprint(map(shifted, bt)) == expected
    assert backtrace_fingerprint((LEAKY_NOSRC, INITCALL)) == expected
    assert backtrace_fingerprint((OTHER, INITCALL)) != expected
    assert backtrace_fingerprint((INITCALL, LEAKY)) != expected
    moved = Frame(LEAKY.address + 4, "make_leaks+0x3a/0x60", "make_leaks", "leaky")
    assert backtrace_fingerprint((moved, INITCALL)) != expected
    first, second = results(session())
    assert first["partialFingerprints"] == {
        FINGERPRINT_KEY: backtrace_fingerprint(MAKE_LEAKS)}
    assert results(session())[0]["partialFingerprints"] == first["partialFingerprints"]
    assert second["partialFingerprints"] != first["partialFingerprints"]


# --------------------------------------------------------------------------
# JUnit XML


def parse(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n')
    return ET.fromstring(text.encode("utf-8"))


def test_junit_structure_and_counts():
    scans = session()
    root = parse(junit_text(scans))
    assert root.tag == "testsuites"
    assert {k: root.get(k) for k in ("tests", "failures", "errors", "time")} == {
        "tests": "3", "failures": "2", "errors": "0", "time": "2.000"}
    (suite,) = root
    assert suite.tag == "testsuite" and suite.get("name") == "qemuleak"
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")} == {
        "tests": "3", "failures": "2", "errors": "0", "skipped": "0", "time": "2.000"}
    assert suite.get("timestamp") == "2023-11-14T22:13:20"
    # the Ant/Jenkins schema's order: properties, then the test cases
    assert [c.tag for c in suite] == ["properties", "testcase", "testcase", "testcase"]
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props == {
        "qemuleak.version": __version__,
        "boot.objects_tracked": "1000", "boot.bytes_scanned": str(1 << 20),
        "after-reboot.objects_tracked": "1000", "after-reboot.bytes_scanned": str(1 << 20),
        "final.objects_tracked": "900", "final.bytes_scanned": "2048"}


def test_junit_one_testcase_per_scan_failure_iff_leaks():
    scans = session()
    cases = parse(junit_text(scans)).findall("testsuite/testcase")
    assert [(c.get("classname"), c.get("name"), c.get("time")) for c in cases] == [
        ("qemuleak.scan", "boot", "1.250"), ("qemuleak.scan", "after-reboot", "0.500"),
        ("qemuleak.scan", "final", "0.250")]
    for case, s in zip(cases, scans):
        failures = case.findall("failure")
        assert len(failures) == (1 if s.leaks else 0)
        assert [c.tag for c in case] == ["failure"] * len(failures) + ["system-out"]
    boot, again = (c.find("failure") for c in cases[:2])
    assert (boot.get("message"), boot.get("type")) == ("4 leaks (224 bytes)", "memory-leak")
    assert boot.text == format_text(scans[0].leaks)
    assert again.get("message") == "1 leak (64 bytes)"
    assert cases[2].find("system-out").text.startswith(
        "objects tracked: 900, bytes scanned: 2048, suppressed: 0")


def test_junit_without_scans_and_with_unprintable_text():
    root = parse(junit_text([]))
    assert (root.get("tests"), root.get("failures")) == ("0", "0")
    assert root.find("testsuite").findall("testcase") == []
    assert root.find("testsuite").get("timestamp") is None
    odd = scan("lab\x02el", [leak(comm="bad\x01comm")])
    case = parse(junit_text([odd])).find("testsuite/testcase")
    assert case.get("name") == "lab\ufffdel"
    assert 'comm "bad\ufffdcomm"' in case.find("failure").text


def test_source_root_makes_paths_relative_for_code_scanning(sarif_validator):
    inside = Frame(LEAKY.address, LEAKY.symbol, "make_leaks", "leaky",
                   "/home/dev/mymod/src/leaky.c:42")
    outside = Frame(0xFFFFFFFF81000F0A, INITCALL.symbol, "do_one_initcall", None,
                    "/usr/src/linux/init/main.c:1234")
    doc = to_sarif([scan("s", [leak(backtrace=(KMALLOC, inside, outside))])],
                   source_root="/home/dev/mymod")
    sarif_validator.validate(doc)
    run = doc["runs"][0]
    assert run["originalUriBaseIds"] == {"%SRCROOT%": {"uri": "file:///home/dev/mymod/"}}
    (result,) = run["results"]
    assert result["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "src/leaky.c", "uriBaseId": "%SRCROOT%"},
        "region": {"startLine": 42}}
    frames = [f["location"].get("physicalLocation") for f in result["stacks"][0]["frames"]]
    assert frames[2]["artifactLocation"] == {"uri": "file:///usr/src/linux/init/main.c"}
    # a relative source (the kernel's own DWARF paths) stays as it is
    assert frames[0]["artifactLocation"] == {"uri": "mm/slub.c"}
    assert "originalUriBaseIds" not in to_sarif([scan("s", [leak()])])["runs"][0]
