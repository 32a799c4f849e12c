"""Symbol tables (System.map, vmlinux, kallsyms) on the real guest kernels, and the
kallsyms decoder on synthetic blobs built the way scripts/kallsyms.c builds them."""

from __future__ import annotations

import random
import struct
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuleak.errors import GuestMemoryError, ImageError, SymbolError
from qemuleak.images import GuestImage, find_image
from qemuleak.kernel import kallsyms
from qemuleak.kernel.kallsyms import KallsymsData, decode_kallsyms, find_kallsyms
from qemuleak.kernel.symbols import Symbol, SymbolTable
from tests.conftest import ARCHES, missing

IMPORTANT = ["linux_banner", "_stext", "_text", "_sdata", "_edata", "__bss_start",
             "__bss_stop", "__start_ro_after_init", "__end_ro_after_init", "__per_cpu_start",
             "__per_cpu_end", "__start_BTF", "__stop_BTF"]
KALLSYMS_LABELS = ["kallsyms_offsets", "kallsyms_relative_base", "kallsyms_num_syms",
                   "kallsyms_names", "kallsyms_markers", "kallsyms_token_table",
                   "kallsyms_token_index"]


# --------------------------------------------------------------------------
# Kernel memory as the vmlinux describes it


class ElfMemory:
    """read(vaddr, size) over a vmlinux's PT_LOAD segments, as the kernel sees
    itself after relocating by `slide`: the arm64 image applies its own
    R_AARCH64_RELATIVE relocations (the file holds 0 there); for x86 the words
    in `patch` get the slide added (x86 relocates from a table not in the ELF)."""

    def __init__(self, path: Path, slide: int = 0, patch: tuple[int, ...] = ()):
        self.slide = slide
        self.calls = 0
        self.bytes = 0
        self.segments: list[tuple[int, bytearray]] = []
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD":
                    continue
                f.seek(seg["p_offset"])
                data = bytearray(f.read(seg["p_filesz"]))
                data += bytes(seg["p_memsz"] - seg["p_filesz"])
                self.segments.append((seg["p_vaddr"], data))
            rela = elf.get_section_by_name(".rela.dyn")
            relocs = None
            if rela is not None:
                f.seek(rela["sh_offset"])
                relocs = np.frombuffer(f.read(rela["sh_size"]),
                                       [("off", "<u8"), ("info", "<u8"), ("add", "<i8")])
                relocs = relocs[(relocs["info"] & 0xFFFFFFFF) == 1027]   # R_AARCH64_RELATIVE
        for base, data in self.segments:
            if relocs is not None:
                inside = (relocs["off"] >= base) & (relocs["off"] + 8 <= base + len(data))
                for off, add in zip(relocs["off"][inside].tolist(), relocs["add"][inside].tolist()):
                    data[off - base:off - base + 8] = ((add + slide) % 2**64).to_bytes(8, "little")
            for addr in patch:
                if base <= addr < base + len(data):
                    value = int.from_bytes(data[addr - base:addr - base + 8], "little")
                    value = (value + slide) % 2**64
                    data[addr - base:addr - base + 8] = value.to_bytes(8, "little")

    def read(self, vaddr: int, size: int) -> bytes:
        self.calls += 1
        self.bytes += size
        a = vaddr - self.slide
        for base, data in self.segments:
            if base <= a and a + size <= base + len(data):
                return bytes(data[a - base:a - base + size])
        raise GuestMemoryError(f"unmapped {vaddr:#x}+{size:#x}")


@dataclass
class Kernel:
    arch: str
    image: GuestImage
    smap: SymbolTable
    vml: SymbolTable
    mem: ElfMemory
    kallsyms_all: bool
    timings: dict


def _system_map_lines(path: Path) -> list[tuple[int, str, str]]:
    """System.map parsed the plain way, independent of the code under test."""
    out = []
    for line in path.read_text(encoding="latin-1").splitlines():
        a, t, n = line.split(" ")
        out.append((int(a, 16), t, n))
    return out


@pytest.fixture(scope="module", params=ARCHES)
def kernel(request) -> Kernel:
    """Tables built once per arch; the build times are kept for the report."""
    try:
        image = find_image(request.param)
    except ImageError as e:
        missing(str(e))
    timings = {}
    t = time.perf_counter()
    smap = SymbolTable.from_system_map(image.system_map)
    timings["system_map"] = time.perf_counter() - t
    t = time.perf_counter()
    vml = SymbolTable.from_vmlinux(image.vmlinux)
    timings["vmlinux"] = time.perf_counter() - t
    all_syms = "CONFIG_KALLSYMS_ALL=y" in image.config.read_text().splitlines()
    return Kernel(request.param, image, smap, vml, ElfMemory(image.vmlinux), all_syms, timings)


@pytest.fixture(scope="module")
def found(kernel) -> KallsymsData:
    """kallsyms found by searching the image with no symbols at all."""
    kernel.mem.calls = 0
    t = time.perf_counter()
    data = find_kallsyms(kernel.mem.read, (kernel.smap.address_of("_text"), kallsyms.DEFAULT_SPAN))
    kernel.timings["kallsyms_search"] = time.perf_counter() - t
    kernel.timings["kallsyms_calls"] = kernel.mem.calls
    return data


# --------------------------------------------------------------------------
# System.map and vmlinux tables on the real kernels


def test_load_times(kernel):
    # The budget from the spec: System.map well under 1 s; the vmlinux similar.
    assert kernel.timings["system_map"] < 1.0, kernel.timings
    assert kernel.timings["vmlinux"] < 2.0, kernel.timings
    print(f"\n{kernel.arch}: System.map {kernel.timings['system_map']:.3f}s "
          f"({len(kernel.smap)} symbols), vmlinux {kernel.timings['vmlinux']:.3f}s "
          f"({len(kernel.vml)} symbols)")


def test_important_symbols(kernel):
    lines = {(n, a) for a, _, n in _system_map_lines(kernel.image.system_map)}
    for name in IMPORTANT:
        address = kernel.smap.address_of(name)
        assert kernel.vml.address_of(name) == address, name
        assert (name, address) in lines, name
    s = kernel.smap.address_of
    assert s("_text") <= s("_stext") < s("__start_ro_after_init") < s("__end_ro_after_init")
    assert s("_sdata") < s("_edata") <= s("__bss_start") < s("__bss_stop") <= s("_end")
    assert s("__start_BTF") < s("__stop_BTF") and s("__per_cpu_start") < s("__per_cpu_end")
    # The address really holds the banner.
    assert kernel.mem.read(s("linux_banner"), 14) == b"Linux version "
    assert kernel.smap.get("no_such_symbol_anywhere") is None


def test_unknown_name_is_symbol_error(kernel):
    with pytest.raises(SymbolError) as e:
        kernel.smap.address_of("no_such_symbol_anywhere")
    assert "no symbol 'no_such_symbol_anywhere'" == e.value.message


def test_functions_agree(kernel):
    lines = _system_map_lines(kernel.image.system_map)
    # (arm64 nVHE hypervisor mapping symbols and local labels are skipped as junk)
    funcs = [(n, a) for a, t, n in lines
             if t in "Tt" and not n.startswith(("__kvm_nvhe_.L", "__kvm_nvhe_$"))]
    picked = random.Random(1).sample(funcs, 3000)
    vml = kernel.vml
    pairs = set(zip(vml.names, vml.addresses.tolist()))
    assert all(p in pairs for p in picked), [p for p in picked if p not in pairs][:5]
    smap_pairs = set(zip(kernel.smap.names, kernel.smap.addresses.tolist()))
    assert all(p in smap_pairs for p in picked)
    # Functions are sized as kallsyms sizes them (to the next symbol), so %pS
    # text is the same from either table.
    for name, address in picked[:500]:
        a = vml.lookup(address)
        b = kernel.smap.lookup(address)
        assert a.address == b.address == address and a.size == b.size > 0, (a, b)
        # (aliases at one address may be named differently: compare +off/size)
        assert vml.format(address + 1).split("+")[1] == kernel.smap.format(address + 1).split("+")[1]


def test_format_do_one_initcall(kernel):
    lines = _system_map_lines(kernel.image.system_map)
    i = next(i for i, (_, _, n) in enumerate(lines) if n == "do_one_initcall")
    start = lines[i][0]
    size = next(a for a, _, _ in lines[i + 1:] if a > start) - start
    assert 0x40 < size < 0x1000
    assert kernel.smap.format(start + 0x36) == f"do_one_initcall+0x36/{size:#x}"
    assert kernel.smap.format(start) == f"do_one_initcall+0x0/{size:#x}"
    assert kernel.smap.lookup(start + 0x36) == Symbol("do_one_initcall", start, size, None, "T")
    with open(kernel.image.vmlinux, "rb") as f:
        st_size = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(
            "do_one_initcall")[0]["st_size"]
    # %pS sizes: the function reaches the next symbol, its alignment padding
    # (past st_size) included
    assert st_size <= size
    assert kernel.vml.format(start + 0x36) == f"do_one_initcall+0x36/{size:#x}"
    assert kernel.vml.format(start + size - 1) == f"do_one_initcall+{size - 1:#x}/{size:#x}"


def test_outside_symbols(kernel):
    t = kernel.smap
    assert t.lookup(0x1000) is None and t.format(0x1000) == "0x1000"   # not a per-CPU symbol
    end = t.address_of("_end")
    last = max(int(a) + int(s) for a, s in zip(t.addresses, t.sizes))
    assert t.lookup(last) is None and t.format(last) == f"{last:#x}"
    assert t.lookup(last + 0x100000) is None and t.lookup(end - 1).name != "_end"
    assert t.lookup(2**64 - 1) is None and t.lookup(-1) is None


def test_relocated(kernel):
    slide = 0x2e00000 if kernel.arch == "x86_64" else 0x1_2345_0000
    base = kernel.smap
    moved = base.relocated(slide)
    assert moved.slide == slide and base.slide == 0
    rng = random.Random(2)
    absolute = set(np.flatnonzero(base.absolute).tolist())
    for i in rng.sample(range(len(base)), 2000):
        shift = 0 if i in absolute else slide
        assert int(moved.addresses[i]) == int(base.addresses[i]) + shift
    f = base.address_of("do_one_initcall")
    assert moved.format(f + slide + 0x36) == base.format(f + 0x36)
    assert moved.lookup(f + 0x36) != base.lookup(f + 0x36)
    if kernel.arch == "x86_64":      # per-CPU offsets do not move
        assert moved.address_of("__per_cpu_start") == 0
        assert moved.address_of("__per_cpu_end") == 0x34000
    else:
        assert moved.address_of("__per_cpu_start") == base.address_of("__per_cpu_start") + slide
    back = moved.relocated(0)
    assert np.array_equal(back.addresses, base.addresses) and back.slide == 0
    assert np.array_equal(moved.relocated(slide).addresses, moved.addresses)


def test_lookup_many_equals_lookup(kernel):
    t = kernel.smap.relocated(0x40000000)
    lo, hi = t.address_of("_text") - 0x1000, t.address_of("_end") + 0x1000
    rng = np.random.default_rng(3)
    addrs = np.concatenate([rng.integers(lo, hi, 9000, dtype=np.uint64, endpoint=True),
                            t.addresses[rng.integers(0, len(t), 900)],
                            np.array([0, 1, 0x34000, 2**64 - 1] * 25, np.uint64)])
    t0 = time.perf_counter()
    index, offset = t.lookup_many(addrs)
    elapsed = time.perf_counter() - t0
    hits = 0
    for a, i, off in zip(addrs.tolist(), index.tolist(), offset.tolist()):
        sym = t.lookup(a)
        if sym is None:
            assert i == -1
        else:
            hits += 1
            assert t.symbol(i) == sym and off == a - sym.address and 0 <= off < sym.size
    assert hits > 9000
    assert t.format_many(addrs[:2000]) == [t.format(a) for a in addrs[:2000].tolist()]
    assert elapsed < 0.5


def test_module_symbols(kernel):
    kern = kernel.smap.relocated(0x200000)
    base = 0xffffffffc0a00000 if kernel.arch == "x86_64" else 0xffff800001200000
    leaky = SymbolTable.from_arrays(
        [base + 0x20, base, base + 0x80, base + 0x2000, base + 0x2000],
        [0x60, 0x20, 0, 0x40, 0], ["leaky_init", "leak_one", "do_one_initcall", "leaky_buf",
                                  "$d"],
        module="leaky", types="tttbd", ranges=[(base, 0x1000), (base + 0x2000, 0x1000)])
    other = SymbolTable.from_arrays([base + 0x10000], None, ["other_fn"], module="other",
                                    ranges=[(base + 0x10000, 0x100)])
    merged = SymbolTable.merge([kern, leaky, other])
    assert len(merged) == len(kern) + 5
    assert merged.format(base + 0x20 + 0x36) == "leaky_init+0x36/0x60 [leaky]"
    assert merged.format(base) == "leak_one+0x0/0x20 [leaky]"
    # No size: up to the end of the module area, not into the next area.
    assert merged.format(base + 0x85) == "do_one_initcall+0x5/0xf80 [leaky]"
    assert merged.format(base + 0x2010) == "leaky_buf+0x10/0x40 [leaky]"
    assert merged.format(base + 0x10001) == "other_fn+0x1/0x100 [other]"
    assert merged.format(base + 0x10100) == f"{base + 0x10100:#x}"
    k = kern.address_of("do_one_initcall")
    assert merged.format(k + 0x36) == kern.format(k + 0x36)
    # Names: the kernel's first, "module:name" for a module's own.
    assert merged.address_of("do_one_initcall") == k
    assert merged.address_of("leaky:do_one_initcall") == base + 0x80
    assert merged.address_of("leaky_init") == base + 0x20
    assert merged.get("$d") is None and merged.get("other:leaky_init") is None
    index, offset = merged.lookup_many([base + 0x21, k + 1, 0])
    assert index[2] == -1 and merged.symbol(int(index[0])).module == "leaky"
    assert offset.tolist()[:2] == [1, 1]
    # KASLR moves the kernel only.
    again = merged.relocated(0x400000)
    assert again.format(base + 0x56) == "leaky_init+0x36/0x60 [leaky]"
    assert again.address_of("do_one_initcall") == k + 0x200000


def test_kernel_order_of_aliases(kernel):
    """At one address the name %pS prints is the one kallsyms sorts first."""
    t = kernel.smap
    if kernel.arch == "x86_64":
        # startup_64, _stext and _text share the first address: the kernel prints startup_64.
        assert t.lookup(t.address_of("_text")).name == "startup_64"
    else:
        # _stext shares its address with the first function, which wins.
        assert t.lookup(t.address_of("_stext")).name not in ("_stext", "__irqentry_text_start")


# --------------------------------------------------------------------------
# Broken System.map and vmlinux files


def _write(tmp_path: Path, data: bytes, name="System.map") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_system_map_truncated(kernel, tmp_path):
    data = kernel.image.system_map.read_bytes()
    half = len(data) // 2
    mid = data.index(b"\n", half) + 9                    # inside the next line's address
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_system_map(_write(tmp_path, data[:mid]))
    line = data[:mid].count(b"\n") + 1
    assert "truncated" in e.value.message and f"line {line}" in e.value.message
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_system_map(_write(tmp_path, data[:data.index(b"\n", half) + 1]))
    assert "has no _end symbol" in e.value.message and "truncated" in e.value.message
    assert e.value.hint


def test_system_map_malformed(kernel, tmp_path):
    lines = kernel.image.system_map.read_bytes().splitlines(keepends=True)
    bad = lines[:100] + [b"ffffffff81000000 T two words\n"] + lines[100:]
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_system_map(_write(tmp_path, b"".join(bad)))
    assert "malformed" in e.value.message and "line 101" in e.value.message
    swapped = lines[:]
    swapped[5000], swapped[6000] = swapped[6000], swapped[5000]
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_system_map(_write(tmp_path, b"".join(swapped)))
    assert "line 5002 is out of address order" in e.value.message   # below line 5001 (was 6001)
    short = lines[:10] + [lines[10][8:]] + lines[11:]     # an 8-digit address among 16-digit ones
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_system_map(_write(tmp_path, b"".join(short)))
    assert "line 11" in e.value.message
    no_text = [x for x in lines if not x.endswith((b" _text\n", b" _stext\n"))]
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_system_map(_write(tmp_path, b"".join(no_text)))
    assert "no _text/_stext" in e.value.message


def test_system_map_empty_or_missing(tmp_path):
    for content in (b"", b"\n\n  \n"):
        with pytest.raises(SymbolError) as e:
            SymbolTable.from_system_map(_write(tmp_path, content))
        assert e.value.message.endswith("is empty")
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_system_map(tmp_path / "nope")
    assert "cannot read System.map" in e.value.message


def test_small_system_map(tmp_path):
    text = ("0000000000000000 D __per_cpu_start\n"
            "0000000000001000 D cpu_number\n"
            "0000000000002000 D __per_cpu_end\n"
            "00000000000001ea A kexec_control_code_size\n"
            "ffffffff81000000 T _text\n"
            "ffffffff81000000 T startup_64\n"
            "ffffffff81000040 t $x\n"
            "ffffffff81000100 W weak_fn\n"
            "ffffffff81000100 T strong_fn\n"
            "ffffffff81000180 t local_fn\n"
            "ffffffff81000180 t local_fn\n"
            "ffffffff82000000 B _end\n")
    # (the A line is out of order on purpose: nm -n sorts it, so this is malformed)
    with pytest.raises(SymbolError):
        SymbolTable.from_system_map(_write(tmp_path, text.encode()))
    lines = text.splitlines(keepends=True)
    t = SymbolTable.from_system_map(_write(tmp_path, "".join(lines[:3] + lines[4:]).encode()))
    assert len(t) == 10                                   # $x skipped
    assert t.format(0xffffffff81000010) == "startup_64+0x10/0x100"
    assert t.format(0xffffffff81000100) == "strong_fn+0x0/0x80"     # non-weak alias first
    assert t.format(0xffffffff81000200) == "local_fn+0x80/0xfffe80"
    assert t.lookup(0x1000) is None and t.address_of("cpu_number") == 0x1000
    assert t.relocated(0x1000000).address_of("cpu_number") == 0x1000
    assert t.relocated(0x1000000).address_of("weak_fn") == 0xffffffff82000100
    assert t.lookup(0xffffffff82000000) is None                       # _end has size 0


def test_vmlinux_errors(kernel, tmp_path):
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_vmlinux(_write(tmp_path, b"\x7fELF" + bytes(100), "vmlinux"))
    assert "not a usable ELF" in e.value.message
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_vmlinux(tmp_path / "missing")
    assert "cannot read" in e.value.message
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_vmlinux(kernel.image.module("leaky"))
    assert "not a kernel image" in e.value.message
    # An ELF whose symbol table runs past the end of the file.
    ko = bytearray(kernel.image.module("leaky").read_bytes())
    with open(kernel.image.module("leaky"), "rb") as f:
        elf = ELFFile(f)
        index = next(i for i, sec in enumerate(elf.iter_sections()) if sec.name == ".symtab")
        entry = elf["e_shoff"] + index * elf["e_shentsize"]
    struct.pack_into("<Q", ko, entry + 0x20, len(ko) * 24)          # sh_size
    with pytest.raises(SymbolError) as e:
        SymbolTable.from_vmlinux(_write(tmp_path, bytes(ko), "vmlinux"))
    assert "is truncated: its symbol table is cut short" in e.value.message


# --------------------------------------------------------------------------
# kallsyms decoded from the real images


def test_find_kallsyms(kernel, found):
    smap = kernel.smap
    # Found where System.map says the tables are.
    for label in KALLSYMS_LABELS:
        assert found.tables[label] == smap.address_of(label), label
    count = struct.unpack("<I", kernel.mem.read(smap.address_of("kallsyms_num_syms"), 4))[0]
    assert len(found) == count == len(found.addresses) == len(found.types)
    assert found.relative_base == struct.unpack(
        "<Q", kernel.mem.read(smap.address_of("kallsyms_relative_base"), 8))[0]
    # Symbols System.map has that kallsyms includes: everything for KALLSYMS_ALL,
    # else text only (both kernels: check the image's config).
    types = "TtDdBbRr" if kernel.kallsyms_all else "Tt"
    have = set(zip(found.names, found.addresses.tolist()))
    want = {(n, a) for a, t, n in _system_map_lines(kernel.image.system_map) if t in types}
    both = want & have
    assert len(both) > 0.95 * len(want), (len(both), len(want))
    assert len(want) > 40000
    # Nothing kallsyms has is unknown to System.map.
    smap_pairs = {(n, a) for a, _, n in _system_map_lines(kernel.image.system_map)}
    assert have <= smap_pairs
    kinds = Counter(found.types.decode())
    assert kinds["T"] > 20000 and kinds["t"] > 20000
    assert (kinds["d"] > 20000) == kernel.kallsyms_all
    assert kernel.timings["kallsyms_calls"] <= kallsyms.DEFAULT_SPAN // kallsyms.CHUNK
    print(f"\n{kernel.arch}: kallsyms search+decode {kernel.timings['kallsyms_search']:.3f}s, "
          f"{len(found)} symbols, {kernel.timings['kallsyms_calls']} reads")


def test_decode_kallsyms_known_addresses(kernel, found):
    kernel.mem.calls = 0
    data = decode_kallsyms(kernel.mem.read, {n: kernel.smap.address_of(n) for n in KALLSYMS_LABELS})
    assert kernel.mem.calls == 2
    again = decode_kallsyms(kernel.mem.read, kernel.smap)      # a SymbolTable works as well
    assert again.names == data.names and np.array_equal(again.addresses, data.addresses)
    assert data.names == found.names and data.types == found.types
    assert np.array_equal(data.addresses, found.addresses)
    assert np.array_equal(data.absolute, found.absolute)
    if kernel.arch == "x86_64":
        # CONFIG_KALLSYMS_ABSOLUTE_PERCPU: per-CPU symbols are absolute offsets.
        i = data.names.index("cpu_number")
        assert data.absolute[i] and data.addresses[i] == kernel.smap.address_of("cpu_number")
        assert data.absolute.sum() > 100
    else:
        assert not data.absolute.any()


def test_kallsyms_after_kaslr(kernel, found):
    slide = 0x1c00000 if kernel.arch == "x86_64" else 0x7_7650_0000
    patch = (kernel.smap.address_of("kallsyms_relative_base"),) if kernel.arch == "x86_64" else ()
    mem = ElfMemory(kernel.image.vmlinux, slide, patch)
    data = find_kallsyms(mem.read, (kernel.smap.address_of("_text") + slide, kallsyms.DEFAULT_SPAN))
    moved = found.addresses + np.where(found.absolute, 0, slide).astype(np.uint64)
    assert np.array_equal(data.addresses, moved) and data.names == found.names
    token_table = kernel.smap.address_of("kallsyms_token_table")
    assert data.tables["kallsyms_token_table"] == token_table + slide
    table = SymbolTable.from_kallsyms(data)
    f = kernel.smap.address_of("do_one_initcall")
    assert table.format(f + slide + 0x36) == kernel.smap.format(f + 0x36)
    assert table.address_of("do_one_initcall") == f + slide


def test_kallsyms_table_matches_system_map(kernel, found):
    table = SymbolTable.from_kallsyms(found)
    smap = kernel.smap
    for name in ["do_one_initcall", "_stext", "schedule", "kfree", "vfs_read"]:
        assert table.address_of(name) == smap.address_of(name), name
    assert len(table) == len(found)
    # The alias %pS picks at each function address is the same as the System.map
    # table's (they differ only where System.map has aliases kallsyms leaves out,
    # e.g. arm64 __efistub_*).
    addrs = np.unique(table.addresses[np.isin(table.types, list(b"Tt"))])
    ours, theirs = table.format_many(addrs + 1), smap.format_many(addrs + 1)
    differ = [(a, b) for a, b in zip(ours, theirs) if a != b]
    assert len(addrs) > 40000 and len(differ) <= len(addrs) // 1000, differ[:10]


# --------------------------------------------------------------------------
# Synthetic kallsyms: scripts/kallsyms.c's output, built here


def build_kallsyms(syms: list[tuple[int, str, str, bool]], *, layout: str = "6.1",
                   seqs: bool = True, align: int = 8) -> tuple[bytes, dict[str, int]]:
    """Tables for (address, type, name, absolute) sorted by address; returns the
    blob and each label's offset in it. Tokens: one per printable character
    plus common pairs, like the real compressor's result."""
    absolute_percpu = any(s[3] for s in syms)
    relbase = min(a for a, _, _, ab in syms if not ab)
    strings = [t + n for _, t, n, _ in syms]
    pairs = Counter(s[i:i + 2] for s in strings for i in range(len(s) - 1))
    free = [c for c in range(256) if not 0x21 <= c < 0x7F]
    tokens = [bytes([c]) if 0x21 <= c < 0x7F else b"" for c in range(256)]
    pair_code = {}
    for (pair, _), code in zip(pairs.most_common(len(free)), free):
        tokens[code] = pair.encode()
        pair_code[pair] = code
    for code in free:
        tokens[code] = tokens[code] or b"qz"
    names = bytearray()
    markers = []
    for i, s in enumerate(strings):
        if i % 256 == 0:
            markers.append(len(names))
        enc, j = bytearray(), 0
        while j < len(s):
            if s[j:j + 2] in pair_code:
                enc.append(pair_code[s[j:j + 2]])
                j += 2
            else:
                enc.append(ord(s[j]))
                j += 1
        n = len(enc)
        names += bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])
        names += enc
    if absolute_percpu:
        offsets = [a if ab else relbase - a - 1 for a, _, _, ab in syms]
    else:
        offsets = [a - relbase for a, _, _, _ in syms]
    order = sorted(range(len(syms)), key=lambda i: syms[i][2])
    parts = {
        "kallsyms_offsets": struct.pack(f"<{len(syms)}i", *[o if o < 2**31 else o - 2**32
                                                            for o in offsets]),
        "kallsyms_relative_base": struct.pack("<Q", relbase),
        "kallsyms_num_syms": struct.pack("<I", len(syms)),
        "kallsyms_names": bytes(names),
        "kallsyms_markers": struct.pack(f"<{len(markers)}I", *markers),
        "kallsyms_seqs_of_names": b"".join(i.to_bytes(3, "big") for i in order),
        "kallsyms_token_table": b"".join(t + b"\0" for t in tokens),
        "kallsyms_token_index": struct.pack(
            "<256H", *np.cumsum([0] + [len(t) + 1 for t in tokens[:-1]]).tolist()),
    }
    parts["kallsyms_addresses"] = struct.pack(f"<{len(syms)}Q", *[a for a, _, _, _ in syms])
    if layout == "addresses":         # without CONFIG_KALLSYMS_BASE_RELATIVE
        labels = ["kallsyms_addresses", "kallsyms_num_syms", "kallsyms_names",
                  "kallsyms_markers", "kallsyms_token_table", "kallsyms_token_index"]
    elif layout == "6.1":
        labels = ["kallsyms_offsets", "kallsyms_relative_base", "kallsyms_num_syms",
                  "kallsyms_names", "kallsyms_markers", "kallsyms_seqs_of_names",
                  "kallsyms_token_table", "kallsyms_token_index"]
    else:
        labels = ["kallsyms_num_syms", "kallsyms_names", "kallsyms_markers",
                  "kallsyms_token_table", "kallsyms_token_index", "kallsyms_offsets",
                  "kallsyms_relative_base", "kallsyms_seqs_of_names"]
    if not seqs and "kallsyms_seqs_of_names" in labels:
        labels.remove("kallsyms_seqs_of_names")
    blob, at = bytearray(), {}
    for label in labels:
        blob += bytes(-len(blob) % align)
        at[label] = len(blob)
        blob += parts[label]
    blob += bytes(-len(blob) % align)
    return bytes(blob), at


def synthetic_symbols(count: int, seed: int = 0, percpu: int = 0,
                      long_name: bool = False) -> list[tuple[int, str, str, bool]]:
    rng = random.Random(seed)
    out = [(i * 0x40, "A", f"percpu_var{i}", True) for i in range(percpu)]
    address = 0xffffffff81000000
    words = ["sched", "kmalloc", "tcp", "init", "exit", "do", "get", "put", "irq", "ext4",
             "trace", "event", "_", "__", "lock", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    seen = set()
    for i in range(count):
        name = "_".join(rng.choice(words) for _ in range(rng.randint(1, 5))) + str(i)
        if name in seen:
            continue
        seen.add(name)
        out.append((address, rng.choice("TtDdrRbBW"), name, False))
        address += rng.choice([0, 0x10, 0x40, 0x100, 0x1234])
    if long_name:
        name = "a" + "".join(rng.choice("xyzw") for _ in range(300))
        out.append((address + 0x10, "T", name, False))
    return out


class Memory:
    """read() over a few byte ranges; GuestMemoryError elsewhere; counts calls."""

    def __init__(self, ranges: dict[int, bytes], holes: tuple[tuple[int, int], ...] = ()):
        self.ranges = ranges
        self.holes = holes
        self.calls = 0

    def read(self, address: int, size: int) -> bytes:
        self.calls += 1
        for lo, hi in self.holes:
            if address < hi and lo < address + size:
                raise GuestMemoryError(f"hole at {lo:#x}")
        for base, data in self.ranges.items():
            if base <= address and address + size <= base + len(data):
                return data[address - base:address - base + size]
        raise GuestMemoryError(f"unmapped {address:#x}")


BASE = 0xffffffff81000000


def place(blob: bytes, junk: int = 0x30000, seed: int = 0) -> tuple[Memory, int, bytes]:
    """`blob` after `junk` random bytes (with a decoy digits string) at BASE."""
    rng = random.Random(seed)
    prefix = bytearray(rng.randbytes(junk))
    decoy = b"".join(b"%d\0" % d for d in range(10))
    prefix[0x1000:0x1000 + len(decoy)] = decoy                 # not a token table
    prefix[0x8000:0x8000 + 40] = bytes(40)
    data = bytes(prefix) + blob + rng.randbytes(0x2000)
    return Memory({BASE: data}), BASE + junk, data


def check_decoded(data: KallsymsData, syms) -> None:
    assert data.names == [n for _, _, n, _ in syms]
    assert data.types.decode() == "".join(t for _, t, _, _ in syms)
    assert data.addresses.tolist() == [a for a, _, _, _ in syms]
    assert data.absolute.tolist() == [ab for _, _, _, ab in syms]


@pytest.mark.parametrize("layout", ["6.1", "6.4"])
@pytest.mark.parametrize("seqs", [True, False])
@pytest.mark.parametrize("align", [8, 4])
@pytest.mark.parametrize("percpu", [0, 7])
def test_synthetic_round_trip(layout, seqs, align, percpu):
    syms = synthetic_symbols(700, seed=percpu + align, percpu=percpu, long_name=True)
    blob, at = build_kallsyms(syms, layout=layout, seqs=seqs, align=align)
    mem, where, _ = place(blob)
    data = find_kallsyms(mem.read, (BASE, 0x100000), chunk_size=0x10000)
    check_decoded(data, syms)
    # (6.4 puts seqs_of_names last, where the search has no need to look)
    expect = KALLSYMS_LABELS + (["kallsyms_seqs_of_names"] if seqs and layout == "6.1" else [])
    assert sorted(data.tables) == sorted(expect)
    for label in expect:
        assert data.tables[label] == where + at[label], label
    assert data.relative_base == 0xffffffff81000000
    table = SymbolTable.from_kallsyms(data)
    a = syms[-2][0]                           # size: up to the long-named last symbol
    name = next(n for x, _, n, _ in syms if x == a)   # aliases: kallsyms order, first wins
    assert table.format(a + 3) == f"{name}+0x3/{syms[-1][0] - a:#x}"
    assert table.lookup(syms[-1][0] + 3) is None                       # last: size 0
    again = decode_kallsyms(mem.read, {k: where + v for k, v in at.items()})
    check_decoded(again, syms)


def test_synthetic_big_symbol_length():
    syms = synthetic_symbols(10, long_name=True)
    blob, at = build_kallsyms(syms)
    names = blob[at["kallsyms_names"]:at["kallsyms_markers"]]
    assert any(b & 0x80 for b in names)      # the 300-char name took a 2-byte length
    mem, where, _ = place(blob)
    check_decoded(find_kallsyms(mem.read, [(BASE, 0x40000)]), syms)


def test_search_reads_in_chunks_and_skips_holes():
    syms = synthetic_symbols(3000, seed=5)
    blob, at = build_kallsyms(syms)
    mem, where, data = place(blob, junk=0x300000)
    mem.holes = ((BASE + 0x100000, BASE + 0x100800),)         # unreadable page(s) before
    found = find_kallsyms(mem.read, (BASE, 0x4000000), chunk_size=0x100000)
    check_decoded(found, syms)
    # 1 chunk, 1 failing + 16 pieces (+ bisecting 1), 1 more chunk, the tables' chunk
    # (which ends in unreadable memory: 1 + 16 + bisecting) and no more.
    assert mem.calls <= 1 + (1 + 16 + 8) + 1 + (1 + 16 + 8), mem.calls
    mem.calls = 0
    check_decoded(find_kallsyms(mem.read, (BASE, 0x4000000)), syms)
    # One 8 MiB read fails: 16 pieces, bisecting the two where readable memory ends.
    assert mem.calls <= 1 + 16 + 2 * 8, mem.calls


def test_search_tables_across_a_hole_fail():
    syms = synthetic_symbols(1000, seed=6)
    blob, at = build_kallsyms(syms)
    mem, where, _ = place(blob)
    names = where + at["kallsyms_names"] + 0x100
    mem.holes = ((names, names + 1),)
    with pytest.raises(SymbolError) as e:
        find_kallsyms(mem.read, (BASE, 0x100000), chunk_size=0x10000)
    assert "no kallsyms tables found" in e.value.message and e.value.hint


def test_search_nothing_there():
    mem = Memory({BASE: random.Random(7).randbytes(0x80000)})
    with pytest.raises(SymbolError) as e:
        find_kallsyms(mem.read, (BASE, 0x80000))
    assert e.value.message == "no kallsyms tables found in 0xffffffff81000000+0x80000"
    with pytest.raises(SymbolError):
        find_kallsyms(Memory({}).read, [(BASE, 0x100000), (BASE + 0x200000, 0x1000)])


@pytest.mark.parametrize("field,offset,value,words", [
    ("kallsyms_markers", 4, 0x1234567, "kallsyms_markers"),
    ("kallsyms_token_index", 2 * 0x41, 0, "kallsyms_token_index"),
    ("kallsyms_num_syms", 0, 901, "symbol 900 has length 0"),     # padding behind names
    ("kallsyms_offsets", 4 * 300, 0x7fffffff, "not sorted"),
])
def test_corrupt_tables(field, offset, value, words):
    syms = synthetic_symbols(900, seed=8)
    blob, at = build_kallsyms(syms)
    bad = bytearray(blob)
    size = 2 if field == "kallsyms_token_index" else 4
    bad[at[field] + offset:at[field] + offset + size] = value.to_bytes(size, "little")
    mem, where, _ = place(bytes(bad))
    with pytest.raises(SymbolError) as e:
        decode_kallsyms(mem.read, {k: where + v for k, v in at.items()})
    assert words in e.value.message
    with pytest.raises(SymbolError):
        find_kallsyms(mem.read, (BASE, 0x100000))


def test_absolute_addresses_table():
    """Without CONFIG_KALLSYMS_BASE_RELATIVE: kallsyms_addresses, known addresses only."""
    syms = synthetic_symbols(600, seed=10)
    blob, at = build_kallsyms(syms, layout="addresses", seqs=False)
    mem, where, _ = place(blob)
    data = decode_kallsyms(mem.read, {k: where + v for k, v in at.items()})
    check_decoded(data, syms)
    assert data.relative_base is None
    with pytest.raises(SymbolError):
        find_kallsyms(mem.read, (BASE, 0x100000))


def test_decode_needs_the_labels():
    with pytest.raises(SymbolError) as e:
        decode_kallsyms(Memory({}).read, {"kallsyms_names": BASE})
    assert "no address for kallsyms_num_syms" in e.value.message
    with pytest.raises(SymbolError) as e:
        decode_kallsyms(Memory({}).read, {n: BASE for n in KALLSYMS_LABELS})
    assert "cannot read kallsyms_num_syms" in e.value.message


# --------------------------------------------------------------------------
# Fuzzing: only SymbolError may escape, and quickly


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.tuples(st.integers(0, 2**64 - 1), st.sampled_from("TtDdAaBbUw?x"),
              st.text("abc_$.0\x02 \t", min_size=0, max_size=8)).map(
        lambda t: f"{t[0]:016x} {t[1]} {t[2]}".encode()),
    st.just(b"ffffffff81000000 T _text"), st.just(b"ffffffff82000000 B _end")),
    max_size=30), st.booleans())
def test_fuzz_system_map(lines, newline):
    data = b"\n".join(lines) + (b"\n" if newline else b"")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "System.map"
        path.write_bytes(data)
        try:
            table = SymbolTable.from_system_map(path)
        except SymbolError as e:
            assert e.message and "\n" not in e.message
            return
    assert table.address_of("_end") == 0xffffffff82000000
    for a in table.addresses[:5].tolist():
        table.format(a)


_FUZZ_SYMS = synthetic_symbols(400, seed=9, percpu=3)
_FUZZ_BLOB, _FUZZ_AT = build_kallsyms(_FUZZ_SYMS)


@settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096), st.integers(0, 64))
def test_fuzz_kallsyms_random_memory(junk, shift):
    # Random bytes around a real token table (so the search gets far), and pure noise.
    mem = Memory({BASE: junk + _FUZZ_BLOB[_FUZZ_AT["kallsyms_token_table"] - shift:] + junk})
    for m in (mem, Memory({BASE: junk * 8})):
        try:
            find_kallsyms(m.read, (BASE, 0x10000), chunk_size=0x10000)
        except SymbolError:
            pass
        try:
            decode_kallsyms(m.read, {n: BASE + (i * 97) % max(1, len(junk))
                                     for i, n in enumerate(KALLSYMS_LABELS)})
        except SymbolError:
            pass


@settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_BLOB) - 1), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_fuzz_kallsyms_corrupted(changes):
    blob = bytearray(_FUZZ_BLOB)
    for offset, value in changes:
        blob[offset] = value
    mem, where, _ = place(bytes(blob), junk=0x2000)
    for decode in (lambda: find_kallsyms(mem.read, (BASE, 0x40000)),
                   lambda: decode_kallsyms(mem.read, {k: where + v for k, v in _FUZZ_AT.items()})):
        try:
            data = decode()
        except SymbolError:
            continue
        # Whatever decodes is self-consistent.
        assert len(data.names) == len(data.addresses) == len(data.types) == len(data.absolute)
        assert all(data.addresses[1:] >= data.addresses[:-1])
        SymbolTable.from_kallsyms(data).format(int(data.addresses[-1]))
