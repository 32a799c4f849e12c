"""Unit tests for qemuleak.report: kmemleak text, summary, JSON, suppressions."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemuleak.errors import QemuleakError
from qemuleak.report import (
    JSON_SCHEMA, Frame, Leak, Reporter, Scan, Suppressions, filter_leaks, format_dump,
    format_leak, format_summary, format_text, hex_dump_lines, json_text, to_json,
)

LEAKY_INIT = Frame(0xFFFFFFFFC01D2036, "leaky_init+0x36/0x60", "leaky_init", "leaky",
                   "leaky.c:42")
INITCALL = Frame(0xFFFFFFFF81000F0A, "do_one_initcall+0x41/0x1df", "do_one_initcall", None)
KMALLOC = Frame(0xFFFFFFFF812A0010, "__kmalloc+0x10/0x40", "__kmalloc", None)
UNKNOWN = Frame(0xFFFFFFFFC0FF0000, "0xffffffffc0ff0000", None, None)


def leak(address=0xFFFF8880053DF120, size=96, *, kind="direct", backtrace=(LEAKY_INIT, INITCALL),
         hexdump=None, age_s=375.486, seq=0, **kw) -> Leak:
    if hexdump is None:
        hexdump = b"k" * 31 + b"\xa5"
    return Leak(address=address, size=size, comm=kw.pop("comm", "insmod"), pid=kw.pop("pid", 71),
                cpu=kw.pop("cpu", 0), jiffies=kw.pop("jiffies", 4294680594), age_s=age_s,
                kind=kind, backtrace=tuple(backtrace), hexdump=hexdump[:min(size, 32)],
                seq=seq, **kw)


# --------------------------------------------------------------------------
# kmemleak text

KMEMLEAK_BLOCK = """\
unreferenced object 0xffff8880053df120 (size 96):
  comm "insmod", pid 71, jiffies 4294680594 (age 375.486s)
  hex dump (first 32 bytes):
    6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b  kkkkkkkkkkkkkkkk
    6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b a5  kkkkkkkkkkkkkkk.
  backtrace:
    [<ffffffffc01d2036>] leaky_init+0x36/0x60 [leaky]
    [<ffffffff81000f0a>] do_one_initcall+0x41/0x1df
"""


def test_frame_text_and_leak_module():
    assert LEAKY_INIT.text() == "leaky_init+0x36/0x60 [leaky]"
    assert INITCALL.text() == "do_one_initcall+0x41/0x1df"
    assert leak(backtrace=(KMALLOC, LEAKY_INIT, INITCALL)).module == "leaky"
    assert leak(backtrace=(KMALLOC, INITCALL)).module is None


def test_format_leak_matches_kmemleak_exactly():
    assert format_leak(leak()) == KMEMLEAK_BLOCK


def test_short_object_and_non_printables():
    five = leak(0xFFFF888004A1B2C0, 5, hexdump=b"\x00A~\x7f ", age_s=0.05,
                backtrace=(UNKNOWN,), comm="kworker/0:1", pid=12, jiffies=4294667296)
    assert format_leak(five) == (
        "unreferenced object 0xffff888004a1b2c0 (size 5):\n"
        '  comm "kworker/0:1", pid 12, jiffies 4294667296 (age 0.050s)\n'
        "  hex dump (first 5 bytes):\n"
        "    00 41 7e 7f 20                                   .A~. \n"
        "  backtrace:\n"
        "    [<ffffffffc0ff0000>] 0xffffffffc0ff0000\n")
    row = format_leak(five).splitlines()[3][4:]
    assert row.index(".A~") == 49


def test_row_of_high_bytes_and_17_byte_object():
    data = bytes(range(0x78, 0x89))          # 17 bytes: 0x7f..0x88 are not printable
    obj = leak(size=17, hexdump=data)
    rows = format_leak(obj).splitlines()[3:5]
    assert rows == [
        "    78 79 7a 7b 7c 7d 7e 7f 80 81 82 83 84 85 86 87  xyz{|}~.........",
        "    88                                               .",
    ]


def test_zero_size_object_has_header_without_rows():
    lines = format_leak(leak(size=0, hexdump=b"")).splitlines()
    assert lines[2:4] == ["  hex dump (first 0 bytes):", "  backtrace:"]


def test_age_is_milliseconds_with_three_decimals():
    assert "(age 1.000s)" in format_leak(leak(age_s=1))
    assert "(age 375.486s)" in format_leak(leak(age_s=375.486))   # not 375.485 from float error
    assert "(age 12.007s)" in format_leak(leak(age_s=12.0071))


def test_format_text_concatenates_blocks_in_order():
    a, b = leak(0xFFFF888000001000), leak(0xFFFF888000000800, kind="indirect")
    text = format_text([a, b])
    assert text == format_leak(a) + format_leak(b)
    assert text.index("0xffff888000001000") < text.index("0xffff888000000800")
    assert format_text([]) == ""


@given(st.binary(max_size=32))
def test_hex_dump_rows_property(data):
    rows = hex_dump_lines(data)
    assert len(rows) == (len(data) + 15) // 16
    for i, row in enumerate(rows):
        chunk = data[16 * i:16 * i + 16]
        assert row[:49].rstrip(" ") == " ".join(f"{b:02x}" for b in chunk)
        assert row[49:] == "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        assert len(row) == 49 + len(chunk)


# --------------------------------------------------------------------------
# dump


def test_format_dump():
    obj = leak(0xFFFF888005D2B000, 128, object_kind="cache", cache="kmalloc-128",
               hexdump=b"\x01" * 32)
    assert format_dump(obj, count=0, min_count=1, flags="0x1") == (
        "Object 0xffff888005d2b000 (size 128):\n"
        '  comm "insmod", pid 71, jiffies 4294680594\n'
        "  min_count = 1\n"
        "  count = 0\n"
        "  flags = 0x1\n"
        "  kind = cache\n"
        "  cache = kmalloc-128\n"
        "  state = direct leak\n"
        "  hex dump (first 32 bytes):\n"
        "    01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01  ................\n"
        "    01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01  ................\n"
        "  backtrace:\n"
        "    [<ffffffffc01d2036>] leaky_init+0x36/0x60 [leaky]\n"
        "    [<ffffffff81000f0a>] do_one_initcall+0x41/0x1df\n")


def test_format_dump_states_and_no_cache_line():
    text = format_dump(leak(kind="referenced"), count=2, min_count=1)
    assert "  state = referenced\n" in text
    assert "  flags = 0x0\n" in text and "  kind = kmalloc\n" in text
    assert "cache =" not in text
    assert "state = indirect leak" in format_dump(leak(kind="indirect"), count=0, min_count=1)


# --------------------------------------------------------------------------
# summary


def test_summary_groups_by_backtrace_sorted_by_bytes():
    other = (KMALLOC, INITCALL)
    leaks = [
        leak(0xA000, 32, backtrace=other),
        leak(0xB000, 96),
        leak(0xC000, 96, kind="indirect"),
        leak(0xD000, 64, backtrace=other, kind="indirect"),
        leak(0xE000, 500, backtrace=(UNKNOWN,)),
    ]
    assert format_summary(leaks, suppressed=3) == (
        "1 leak (1 direct, 0 indirect), 500 bytes, e.g. 0xe000 (size 500):\n"
        "    [<ffffffffc0ff0000>] 0xffffffffc0ff0000\n"
        "\n"
        "2 leaks (1 direct, 1 indirect), 192 bytes, e.g. 0xb000 (size 96):\n"
        "    [<ffffffffc01d2036>] leaky_init+0x36/0x60 [leaky]\n"
        "    [<ffffffff81000f0a>] do_one_initcall+0x41/0x1df\n"
        "\n"
        "2 leaks (1 direct, 1 indirect), 96 bytes, e.g. 0xa000 (size 32):\n"
        "    [<ffffffff812a0010>] __kmalloc+0x10/0x40\n"
        "    [<ffffffff81000f0a>] do_one_initcall+0x41/0x1df\n"
        "\n"
        "SUMMARY: 788 bytes leaked in 5 objects (3 direct, 2 indirect); 3 suppressed\n")


def test_summary_ties_on_bytes_broken_by_count():
    one = leak(0x1000, 64, backtrace=(KMALLOC,))
    two = [leak(0x2000, 32), leak(0x3000, 32)]
    text = format_summary([one, *two])
    assert text.index("e.g. 0x2000") < text.index("e.g. 0x1000")


def test_summary_without_leaks():
    assert format_summary([]) == "SUMMARY: no leaks\n"
    assert format_summary([], suppressed=2) == "SUMMARY: no leaks; 2 suppressed\n"


# --------------------------------------------------------------------------
# JSON


def scans() -> list[Scan]:
    return [
        Scan("boot", 1700000000.25, 12345, 1 << 20,
             [leak(), leak(0xFFFF888000002000, 5, kind="indirect", backtrace=(UNKNOWN,),
                           hexdump=b"\x00\x01\x02\x03\x04", object_kind="cache",
                           cache="leaky_cache", seq=7)],
             suppressed=1, paused_s=0.4, duration_s=1.5),
        Scan("empty", 1700000010.0, 0, 0, []),
    ]


def test_to_json_content_and_schema():
    doc = to_json(scans())
    jsonschema.Draft202012Validator.check_schema(JSON_SCHEMA)
    jsonschema.validate(doc, JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
    first = doc["scans"][0]["leaks"][0]
    assert first["address"] == "0xffff8880053df120"
    assert first["module"] == "leaky"
    assert first["hexdump"] == "6b" * 31 + "a5"
    assert first["backtrace"][0] == {"address": "0xffffffffc01d2036",
                                     "symbol": "leaky_init+0x36/0x60", "module": "leaky",
                                     "source": "leaky.c:42"}
    second = doc["scans"][0]["leaks"][1]
    assert (second["kind"], second["module"]) == ("indirect", None)
    assert second["hexdump"] == "0001020304"
    assert (second["object_kind"], second["cache"], second["seq"]) == ("cache", "leaky_cache", 7)
    assert doc["scans"][1]["leaks"] == [] and doc["scans"][0]["suppressed"] == 1


def test_json_text_round_trips():
    text = json_text(scans())
    assert text.endswith("}\n") and text.startswith('{\n  "scans": [')
    assert json.loads(text) == to_json(scans())


@pytest.mark.parametrize("breakage", [
    lambda d: d["scans"][0]["leaks"][0].update(kind="leaked"),
    lambda d: d["scans"][0]["leaks"][0].update(address="ffff8880053df120"),
    lambda d: d["scans"][0]["leaks"][0].update(address="0xFFFF"),
    lambda d: d["scans"][0]["leaks"][0].update(hexdump="6b6"),
    lambda d: d["scans"][0]["leaks"][0].pop("backtrace"),
    lambda d: d["scans"][0]["leaks"][0]["backtrace"][0].update(line=3),
    lambda d: d["scans"][0].update(objects_tracked="12345"),
    lambda d: d["scans"][0].pop("suppressed"),
    lambda d: d.update(version=1),
])
def test_broken_documents_fail_validation(breakage):
    doc = copy.deepcopy(to_json(scans()))
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, JSON_SCHEMA, cls=jsonschema.Draft202012Validator)


# --------------------------------------------------------------------------
# suppressions


def suppressed_by(patterns: str, obj: Leak) -> str | None:
    return Suppressions.parse(patterns).matches(obj)


@pytest.mark.parametrize("pattern, hit", [
    ("leaky_init", True),          # whole function name
    ("ky_in", True),               # substring
    ("leaky", True),               # module name (and function substring)
    ("one_initcall", True),        # any frame, not just the first
    ("leaky*init", True),
    ("do_*_initcall", True),
    ("^do_one", True),
    ("^one", False),
    ("initcall$", True),
    ("initcal$", False),
    ("^leaky$", True),             # exactly the module name
    ("^leaky_init$", True),
    ("^leak$", False),
    ("kfree", False),
    ("leaky_init+0x36", False),    # symbols with offsets are not matched
    ("0xffffffffc0ff", False),     # nor unknown frames' addresses
])
def test_pattern_semantics(pattern, hit):
    obj = leak(backtrace=(UNKNOWN, LEAKY_INIT, INITCALL))
    assert suppressed_by(f"leak:{pattern}", obj) == (pattern if hit else None)


def test_module_only_match():
    obj = leak(backtrace=(Frame(0xFFFFFFFFC0000010, "0xffffffffc0000010", None, "e1000"),))
    assert suppressed_by("leak:^e1000$", obj) == "^e1000$"


def test_parse_comments_blanks_whitespace_and_first_match():
    s = Suppressions.parse("# known leaks\n\n   leak:kfree  \n\t# indented comment\n"
                           "leak:leaky_init\nleak:leaky\n")
    assert s.patterns == ["kfree", "leaky_init", "leaky"]
    assert s.matches(leak()) == "leaky_init"
    assert s.matches(leak(backtrace=(KMALLOC,))) is None
    s.matches(leak())
    assert s.hits == {"kfree": 0, "leaky_init": 2, "leaky": 0}


@pytest.mark.parametrize("bad", ["leaky_init", "called_from_lib:libfoo.so", "leak:", "leak"])
def test_bad_line_names_source_and_line(bad):
    with pytest.raises(QemuleakError) as exc:
        Suppressions.parse(f"# header\nleak:ok\n{bad}\n", source="supp.txt")
    assert exc.value.message.startswith("supp.txt:3: ")
    assert exc.value.hint and "leak:PATTERN" in exc.value.hint
    assert "\n" not in str(exc.value)


def test_load_file_and_missing_file(tmp_path):
    path = tmp_path / "leaks.supp"
    path.write_text("leak:leaky\nbogus\n")
    with pytest.raises(QemuleakError, match=r"leaks\.supp:2: "):
        Suppressions.load(path)
    path.write_text("leak:leaky\n")
    assert Suppressions.load(path).patterns == ["leaky"]
    with pytest.raises(QemuleakError, match="cannot read suppressions file .*nope.supp"):
        Suppressions.load(tmp_path / "nope.supp")
    with pytest.raises(QemuleakError):
        Suppressions.load(tmp_path)       # a directory


# --------------------------------------------------------------------------
# filter_leaks


def test_filter_leaks():
    other = (KMALLOC, INITCALL)
    young = leak(0x1000, age_s=1.0)
    old = leak(0x2000, age_s=10.0)
    kernel_only = leak(0x3000, age_s=10.0, backtrace=other)
    everything = [young, old, kernel_only]
    assert filter_leaks(everything) == (everything, 0)
    assert filter_leaks(everything, module="leaky") == ([young, old], 0)
    assert filter_leaks(everything, min_age=10.0) == ([old, kernel_only], 0)
    supp = Suppressions.parse("leak:__kmalloc\n")
    assert filter_leaks(everything, suppressions=supp) == ([young, old], 1)
    # leaks the other filters drop are not counted as suppressed, nor as hits
    supp = Suppressions.parse("leak:do_one_initcall\n")
    assert filter_leaks(everything, suppressions=supp, module="leaky", min_age=5) == ([], 1)
    assert supp.hits == {"do_one_initcall": 1}


def test_kernel_not_leaks_are_suppressed():
    """What the kernel marks kmemleak_not_leak() at boot (sysctl headers) is
    suppressed and counted; the same helper called from elsewhere is not."""
    def frame(name, module=None):
        return Frame(0xFFFFFFFF81000000, f"{name}+0x10/0x40", name, module)
    boot = leak(0x1000, backtrace=(KMALLOC, frame("__register_sysctl_table"),
                                   frame("__register_sysctl_base"), INITCALL))
    mount_point = leak(0x2000, backtrace=(KMALLOC, frame("__register_sysctl_table"),
                                          frame("register_sysctl_mount_point"),
                                          frame("mymod_init", "mymod")))
    assert filter_leaks([boot, mount_point]) == ([mount_point], 1)
    assert filter_leaks([boot, mount_point], kernel_not_leaks=False) == ([boot, mount_point], 0)


# --------------------------------------------------------------------------
# Reporter


def test_reporter_reports_once_and_clear():
    r = Reporter()
    a, b = leak(0x1000, seq=1), leak(0x2000, seq=2)
    assert r.new([b, a]) == [b, a]
    assert r.new([a, b]) == []
    reused = leak(0x1000, seq=9)               # same address, new allocation
    c = leak(0x3000, seq=3)
    assert r.new([c, a, reused, c]) == [c, reused]
    assert r.reported == {(0x1000, 1), (0x2000, 2), (0x3000, 3), (0x1000, 9)}
    assert r.clear() == r.reported
    assert r.cleared == r.reported
    assert r.new([a, b, c, reused]) == []
    d = leak(0x4000, seq=4)
    assert r.new([d]) == [d]
    assert (0x4000, 4) not in r.cleared
    r.reported.clear()                          # a copy: the reporter's state is unchanged
    assert r.new([a]) == []
