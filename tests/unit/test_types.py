"""Structure layouts: our BTF parser on synthetic blobs, and BtfTypes vs DwarfTypes on
the real guest vmlinux files (both must give the same answers)."""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuleak.errors import ImageError, KernelTypeError
from qemuleak.images import GuestImage, find_image
from qemuleak.kernel.btf import Btf, BtfKind, canonical_int_name, find_btf
from qemuleak.kernel.types import BtfTypes, DwarfTypes, KernelTypes, btf_from_vmlinux
from tests.conftest import ARCHES, missing

# --------------------------------------------------------------------------
# A small BTF writer for synthetic blobs


@dataclass
class BtfWriter:
    """Builds BTF blobs type by type; each add_* returns the new type id."""

    # (name offset, kind, vlen, kind_flag, size or type, extra words)
    records: list[tuple] = field(default_factory=list)
    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))

    def _str(self, s: str) -> int:
        if not s:
            return 0
        off = len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def add(self, kind: BtfKind, name: str = "", vlen: int = 0, kflag: int = 0,
            size_or_type: int = 0, extra: list[int] | None = None) -> int:
        self.records.append((self._str(name), kind, vlen, kflag, size_or_type, extra or []))
        return len(self.records)

    def int(self, name: str, size: int, bits: int | None = None, offset: int = 0,
            signed: bool = False) -> int:
        enc = (1 if signed else 0) << 24 | offset << 16 | (size * 8 if bits is None else bits)
        return self.add(BtfKind.INT, name, size_or_type=size, extra=[enc])

    def ref(self, kind: BtfKind, target: int, name: str = "") -> int:
        return self.add(kind, name, size_or_type=target)

    def array(self, elem: int, nelems: int, index: int = 0) -> int:
        return self.add(BtfKind.ARRAY, extra=[elem, index, nelems])

    def struct(self, name: str, size: int, members: list[tuple[str, int, int, int]],
               union: bool = False, kflag: int = 0) -> int:
        """members: (name, type id, bit offset, bitfield size)."""
        extra = []
        for mname, mtype, bit_off, bit_size in members:
            extra += [self._str(mname), mtype, (bit_size << 24 | bit_off) if kflag else bit_off]
        return self.add(BtfKind.UNION if union else BtfKind.STRUCT, name, len(members),
                        kflag, size, extra)

    def enum(self, name: str, values: dict[str, int], size: int = 4) -> int:
        extra = []
        for n, v in values.items():
            extra += [self._str(n), v & 0xFFFFFFFF]
        return self.add(BtfKind.ENUM, name, len(values), 0, size, extra)

    def func_proto(self, ret: int, params: list[int]) -> int:
        extra = []
        for p in params:
            extra += [0, p]
        return self.add(BtfKind.FUNC_PROTO, vlen=len(params), size_or_type=ret, extra=extra)

    def blob(self, endian: str = "<") -> bytes:
        types = bytearray()
        for name_off, kind, vlen, kflag, sot, extra in self.records:
            info = kflag << 31 | kind << 24 | vlen
            types += struct.pack(f"{endian}III{len(extra)}I", name_off, info, sot, *extra)
        header = struct.pack(f"{endian}HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types),
                             len(types), len(self.strings))
        return header + bytes(types) + bytes(self.strings)


def sample_writer() -> BtfWriter:
    """A little kernel-like type graph exercising every lookup feature."""
    w = BtfWriter()
    u32 = w.int("unsigned int", 4)                          # 1
    long_ = w.int("long int", 8, signed=True)               # 2
    w.int("long unsigned int", 8)                           # 3
    char = w.int("char", 1, signed=True)                    # 4
    list_head = w.add(BtfKind.STRUCT, "list_head")          # 5, filled below
    lh_ptr = w.ref(BtfKind.PTR, list_head)                  # 6
    w.records[list_head - 1] = (w._str("list_head"), BtfKind.STRUCT, 2, 0, 16,
                                [w._str("next"), lh_ptr, 0, w._str("prev"), lh_ptr, 64])
    comm = w.array(char, 16)                                # 7
    inner = w.struct("", 4, [("z", u32, 0, 0)])             # 8: anonymous struct
    anon = w.struct("", 8, [("y", long_, 0, 0), ("", inner, 0, 0)], union=True)   # 9
    bits = w.struct("bits", 8, [("a", u32, 0, 3), ("b", u32, 3, 5), ("c", u32, 32, 0)],
                    kflag=1)                                # 10
    td1 = w.ref(BtfKind.TYPEDEF, bits, "bits_t")            # 11
    cst = w.ref(BtfKind.CONST, td1)                         # 12
    vol = w.ref(BtfKind.VOLATILE, cst)                      # 13
    td2 = w.ref(BtfKind.TYPEDEF, vol, "bits2_t")            # 14
    fwd = w.add(BtfKind.FWD, "opaque")                      # 15
    fptr = w.ref(BtfKind.PTR, w.func_proto(char, [lh_ptr, 0]))    # 16, 17
    ctd_ptr = w.ref(BtfKind.PTR, cst)                       # 18
    grid = w.array(w.array(u32, 3), 2)                      # 19, 20
    state = w.enum("state", {"LIVE": 0, "GOING": 2, "NEG": -1})   # 21
    fwd_ptr = w.ref(BtfKind.PTR, fwd)                       # 22
    w.struct("task", 96, [
        ("tasks", list_head, 0, 0), ("", anon, 128, 0), ("comm", comm, 192, 0),
        ("flags", td2, 320, 0), ("fn", fptr, 384, 0), ("cbits", ctd_ptr, 448, 0),
        ("grid", grid, 512, 0), ("state", state, 704, 0), ("opaque", fwd_ptr, 768, 0)])   # 23
    w.int("unused", 1, bits=3, offset=0)                    # 24
    return w


@pytest.fixture(scope="module")
def sample() -> BtfTypes:
    return BtfTypes(sample_writer().blob())


# --------------------------------------------------------------------------
# BTF parser on synthetic blobs


def test_synthetic_sizes_and_offsets(sample):
    assert sample.sizeof("struct list_head") == 16
    assert sample.offsetof("struct list_head", "prev") == 8
    assert sample.sizeof("struct task") == 96
    assert sample.offsetof("struct task", "comm") == 24
    assert sample.offsetof("struct task", "comm[5]") == 29
    assert sample.offsetof("struct task", "tasks.prev") == 8
    assert sample.offsetof("struct task", "grid[1]") == 64 + 12
    assert sample.offsetof("struct task", "grid[1][2]") == 64 + 12 + 8
    assert sample.member_size("struct task", "grid[1]") == 12
    assert sample.sizeof("unsigned long") == sample.sizeof("long unsigned int") == 8
    assert sample.sizeof("long") == 8
    assert sample.sizeof("char [16]") == 16
    assert sample.sizeof("struct list_head *") == 8
    assert sample.sizeof("struct list_head *[3]") == 24
    assert sample.sizeof("void *") == 8
    assert sample.sizeof("const char *") == 8


def test_synthetic_anonymous_members_are_found_by_name(sample):
    assert sample.offsetof("struct task", "y") == 16
    assert sample.offsetof("struct task", "z") == 16
    assert sample.member_type_name("struct task", "z") == "unsigned int"
    assert sample.has_member("struct task", "z")
    with pytest.raises(KernelTypeError, match="bad member path"):
        sample.has_member("struct task", "")


def test_synthetic_bitfields_with_kind_flag(sample):
    for name in ("bits", "task"):
        path = "" if name == "bits" else "flags."
        assert sample.has_member(f"struct {name}", path + "a")
        with pytest.raises(KernelTypeError, match="bitfield"):
            sample.offsetof(f"struct {name}", path + "b")
    assert sample.member_bits("struct bits", "a") == (0, 3)
    assert sample.member_bits("struct bits", "b") == (3, 5)
    assert sample.member_bits("struct bits", "c") == (32, 32)
    assert sample.offsetof("struct bits", "c") == 4
    assert sample.member_bits("struct task", "flags.b") == (320 + 3, 5)


def test_synthetic_legacy_bitfield_without_kind_flag():
    w = BtfWriter()
    u32 = w.int("unsigned int", 4)
    b5 = w.int("unsigned int", 4, bits=5, offset=2)
    w.struct("legacy", 4, [("plain", u32, 0, 0), ("small", b5, 8, 0)])
    t = BtfTypes(w.blob())
    assert t.member_bits("struct legacy", "small") == (10, 5)
    assert t.offsetof("struct legacy", "plain") == 0
    with pytest.raises(KernelTypeError, match="bitfield"):
        t.offsetof("struct legacy", "small")


def test_synthetic_typedef_chains(sample):
    assert sample.sizeof("bits_t") == sample.sizeof("bits2_t") == 8
    assert sample.offsetof("bits2_t", "c") == 4
    assert sample.member_type_name("struct task", "flags") == "bits2_t"
    assert sample.member_type_name("struct task", "cbits") == "const bits_t *"
    btf = sample.btf
    assert btf.resolve(btf.find("bits2_t")) == btf.find("struct bits")
    assert btf.kind(btf.find("bits2_t")) == BtfKind.TYPEDEF


def test_synthetic_type_names(sample):
    expect = {"tasks": "struct list_head", "comm": "char [16]", "grid": "unsigned int [2][3]",
              "fn": "char (*)(struct list_head *, ...)", "state": "enum state",
              "opaque": "struct opaque *", "tasks.next": "struct list_head *",
              "grid[1]": "unsigned int [3]"}
    for member, name in expect.items():
        assert sample.member_type_name("struct task", member) == name


def test_synthetic_enums_and_forward_declarations(sample):
    btf = sample.btf
    assert btf.enum_values(btf.find("enum state")) == {"LIVE": 0, "GOING": 2, "NEG": -1}
    assert sample.sizeof("enum state") == 4
    with pytest.raises(KernelTypeError, match="struct opaque has no size"):
        sample.sizeof("struct opaque")


def test_big_endian_blob_parses_the_same():
    little = BtfTypes(sample_writer().blob("<"))
    big = BtfTypes(sample_writer().blob(">"))
    assert not big.btf.little_endian and little.btf.little_endian
    for member in ("tasks.prev", "comm[3]", "y", "z", "cbits", "state"):
        assert big.offsetof("struct task", member) == little.offsetof("struct task", member)
        assert big.member_type_name("struct task", member) == \
            little.member_type_name("struct task", member)
    assert big.member_bits("struct bits", "b") == (3, 5)


def test_truncated_blob_raises_kernel_type_error():
    blob = sample_writer().blob()
    for n in range(len(blob)):
        with pytest.raises(KernelTypeError):
            Btf(blob[:n])


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b"\x00\x00" + b[2:], "no BTF magic"),
    (lambda b: b[:2] + b"\x02" + b[3:], "version"),
    (lambda b: b[:3] + b"\x01" + b[4:], "flags"),
    (lambda b: b[:4] + struct.pack("<I", 20) + b[8:], "header length"),
    (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "misaligned"),
    (lambda b: b[:-1] + b"x", "NUL"),
])
def test_bad_headers(mutate, match):
    with pytest.raises(KernelTypeError, match=match):
        Btf(mutate(sample_writer().blob()))


def test_bad_references_raise_kernel_type_error():
    w = BtfWriter()
    w.struct("s", 4, [("m", 99, 0, 0)])           # member type out of range
    td = w.ref(BtfKind.TYPEDEF, 3, "loop")        # 2 -> 3 -> 2
    w.ref(BtfKind.TYPEDEF, td, "loop2")
    w.add(BtfKind.PTR, "", size_or_type=1000)     # 4: dangling pointer
    t = BtfTypes(w.blob())
    with pytest.raises(KernelTypeError, match="out of range"):
        t.offsetof("struct s", "m")
    with pytest.raises(KernelTypeError, match="cycle"):
        t.sizeof("loop")
    with pytest.raises(KernelTypeError, match="out of range"):
        t.btf.type_name(4)


def test_exponential_fan_out_is_cut_short():
    """Each anonymous member type holds two of the next: 2**40 paths, few types."""
    w = BtfWriter()
    prev = w.struct("", 4, [("leaf", w.int("int", 4, signed=True), 0, 0)])
    for _ in range(40):
        prev = w.struct("", 4, [("", prev, 0, 0), ("", prev, 0, 0)])
    proto = w.func_proto(0, [])
    for _ in range(40):
        proto = w.func_proto(0, [w.ref(BtfKind.PTR, proto)] * 2)
    w.struct("top", 4, [("", prev, 0, 0), ("f", w.ref(BtfKind.PTR, proto), 0, 0)])
    t = BtfTypes(w.blob())
    start = time.perf_counter()
    with pytest.raises(KernelTypeError):
        t.has_member("struct top", "leaf")
    with pytest.raises(KernelTypeError):
        t.member_type_name("struct top", "f")
    assert time.perf_counter() - start < 5


def test_unknown_kind_raises():
    w = sample_writer()
    w.add(25, "weird")
    with pytest.raises(KernelTypeError, match="unknown kind 25"):
        Btf(w.blob())


def test_canonical_int_names():
    assert canonical_int_name("long unsigned int") == "unsigned long"
    assert canonical_int_name("long long int") == "long long"
    assert canonical_int_name("short unsigned int") == "unsigned short"
    assert canonical_int_name("signed char") == "signed char"
    assert canonical_int_name("char") == "char"
    assert canonical_int_name("unsigned") == "unsigned int"
    assert canonical_int_name("_Bool") == "_Bool"
    assert canonical_int_name("__int128 unsigned") == "__int128 unsigned"


# --------------------------------------------------------------------------
# find_btf


def test_find_btf_at_odd_offset_after_fake_magic():
    blob = sample_writer().blob()
    fake = b"\x9f\xeb\x01\x00" + struct.pack("<IIIII", 24, 0, 8, 8, 1 << 30)   # str out of bounds
    fake2 = b"\x9f\xeb\x01\x00" + struct.pack("<IIIII", 17, 0, 0, 0, 1)         # bad hdr_len
    buf = b"\xaa" * 7 + fake + b"\x55" * 3 + fake2 + b"\x9f\xeb\x00" + blob + b"\x00" * 33
    offset, length = find_btf(buf)
    assert offset == 7 + len(fake) + 3 + len(fake2) + 3
    assert offset % 2 == 1
    assert length == len(blob)
    assert buf[offset:offset + length] == blob
    assert find_btf(memoryview(buf)) == (offset, length)
    assert BtfTypes(buf[offset:offset + length]).sizeof("struct list_head") == 16
    assert BtfTypes(buf[offset:]).sizeof("struct list_head") == 16   # trailing bytes ignored


def test_find_btf_big_endian_and_start():
    blob = sample_writer().blob(">")
    buf = blob + b"\x01" + blob
    assert find_btf(buf) == (0, len(blob))
    assert find_btf(buf, start=1) == (len(blob) + 1, len(blob))


def test_find_btf_rejects_truncated_and_garbage():
    blob = sample_writer().blob()
    with pytest.raises(KernelTypeError, match="no valid BTF"):
        find_btf(b"junk" + blob[:-1])
    with pytest.raises(KernelTypeError, match="no valid BTF"):
        find_btf(b"\x9f\xeb\x01\x00" * 50)
    with pytest.raises(KernelTypeError, match="no valid BTF"):
        find_btf(b"")


# --------------------------------------------------------------------------
# Fuzzing: only KernelTypeError may escape, and nothing may hang


def exercise(blob: bytes) -> None:
    """Parse `blob` and touch every lookup the rest of qemuleak can make."""
    try:
        t = BtfTypes(blob)
    except KernelTypeError:
        return
    btf = t.btf
    for tid in range(min(btf.max_id, 200) + 1):
        for call in (btf.sizeof, btf.type_name, btf.members, btf.enum_values, btf.array_info,
                     btf.resolve, btf.kind, btf.name, btf.ref):
            try:
                call(tid)
            except KernelTypeError:
                pass
    try:
        names = list(btf.names())[:50]
    except KernelTypeError:
        return
    for name in names:
        for call in (t.sizeof, lambda n: t.offsetof(n, "tasks.prev"),
                     lambda n: t.has_member(n, "z"), lambda n: t.member_type_name(n, "comm[2]"),
                     lambda n: t.layout(n, ["y", "z", "a"]), lambda n: t.member_bits(n, "b")):
            try:
                call(name)
            except KernelTypeError:
                pass


SAMPLE_BLOB = sample_writer().blob()


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    exercise(data)
    exercise(SAMPLE_BLOB[:24] + data)
    try:
        find_btf(data)
    except KernelTypeError:
        pass


@settings(max_examples=500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SAMPLE_BLOB) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_fuzz_mutated_blob(edits):
    blob = bytearray(SAMPLE_BLOB)
    for pos, value in edits:
        blob[pos] = value
    exercise(bytes(blob))
    try:
        find_btf(bytes(blob))
    except KernelTypeError:
        pass


# --------------------------------------------------------------------------
# Real kernels: BTF and DWARF must agree


@dataclass
class Kernel:
    arch: str
    image: GuestImage
    btf: BtfTypes
    dwarf: DwarfTypes

    def both(self) -> Iterator[KernelTypes]:
        yield self.btf
        yield self.dwarf


def image_for(arch: str) -> GuestImage:
    # Type tests need only the vmlinux, not QEMU, so skip on the image alone.
    try:
        return find_image(arch)
    except ImageError as e:
        missing(str(e))


@pytest.fixture(scope="module", params=ARCHES)
def kernel(request) -> Kernel:
    """One BTF parse and one DWARF load per arch for the whole module."""
    image = image_for(request.param)
    return Kernel(request.param, image, BtfTypes(btf_from_vmlinux(image.vmlinux)),
                  DwarfTypes(image.vmlinux))


# Fields the project reads: every one must exist, with the same offset in both backends.
REQUIRED = {
    "struct task_struct": ["comm", "pid", "tgid", "tasks", "tasks.next", "stack", "mm",
                           "se", "se.exec_start", "thread_info", "thread_info.flags"],
    "struct list_head": ["next", "prev"],
    "struct module": ["name", "list", "state", "percpu", "percpu_size", "syms", "num_syms",
                      "kallsyms"],
    "struct kmem_cache": ["name", "size", "object_size", "offset", "list", "cpu_slab", "node",
                          "random", "red_left_pad", "min_partial", "flags", "inuse", "align"],
    "struct kmem_cache_cpu": ["freelist", "partial"],
    "struct slab": ["slab_cache", "freelist", "slab_list"],
    "struct page": ["flags", "compound_head", "lru", "mapping"],
    "struct vm_struct": ["next", "addr", "size", "flags", "pages", "nr_pages", "caller"],
    "struct vmap_area": ["va_start", "va_end", "rb_node", "list", "vm"],
    "struct kmem_cache_node": ["partial", "nr_partial"],
    "struct pcpu_chunk": ["list", "free_bytes", "base_addr", "start_offset", "end_offset",
                          "nr_pages", "nr_populated", "populated", "data"],
    "struct new_utsname": ["sysname", "nodename", "release", "version", "machine",
                           "domainname"],
    "struct uts_namespace": ["name", "name.release"],
    "struct mod_kallsyms": ["symtab", "num_symtab", "strtab"],
}
# Layout variants: whichever exists must exist in both, at the same place.
VARIANTS = {
    "struct module": ["mem", "core_layout", "core_layout.base", "core_layout.size",
                      "init_layout", "init_layout.base", "init_layout.size"],
    "struct kmem_cache_cpu": ["slab", "page"],
    "struct slab": ["slabs", "counters"],
    "struct page": ["slab_cache", "freelist", "pp_magic", "_mapcount", "page_type"],
}
BITFIELDS = {"struct slab": ["inuse", "objects", "frozen"]}


def test_list_head_and_basic_sizes(kernel):
    for t in kernel.both():
        assert t.sizeof("struct list_head") == 16
        assert t.offsetof("struct list_head", "next") == 0
        assert t.offsetof("struct list_head", "prev") == 8
        assert t.member_type_name("struct list_head", "next") == "struct list_head *"
        assert t.sizeof("unsigned long") == 8
        assert t.sizeof("long unsigned int") == 8
        assert t.sizeof("int") == 4
        assert t.sizeof("pgd_t") == 8
        assert t.sizeof("char [16]") == 16
        assert t.sizeof("struct kmem_cache *") == 8
        assert t.sizeof("struct new_utsname") == 6 * 65
        assert t.member_type_name("struct task_struct", "comm") == "char [16]"
        assert t.member_type_name("struct task_struct", "tasks") == "struct list_head"
        assert t.member_type_name("struct kmem_cache_node", "partial") == "struct list_head"
        assert t.member_type_name("struct uts_namespace", "name") == "struct new_utsname"
        assert t.member_type_name("struct new_utsname", "release") == "char [65]"
        # CONFIG_THREAD_INFO_IN_TASK on both arches: thread_info opens task_struct.
        assert t.offsetof("struct task_struct", "thread_info") == 0


@pytest.mark.parametrize("type_name", sorted(REQUIRED))
def test_required_fields_agree(kernel, type_name):
    members = REQUIRED[type_name]
    btf = kernel.btf.layout(type_name, members)
    dwarf = kernel.dwarf.layout(type_name, members)
    assert btf == dwarf
    assert list(btf) == members
    assert kernel.btf.sizeof(type_name) == kernel.dwarf.sizeof(type_name) > 0
    assert len(kernel.btf.btf.find_all(type_name)) == 1, "ambiguous name in BTF"
    for m in members:
        assert kernel.btf.member_type_name(type_name, m) == \
            kernel.dwarf.member_type_name(type_name, m)
        size = kernel.btf.member_size(type_name, m)
        try:
            assert size == kernel.dwarf.member_size(type_name, m)
        except KernelTypeError:
            assert size == 0        # a flexible array: BTF says 0 elements, DWARF none
        assert btf[m] + size <= kernel.btf.sizeof(type_name)


def test_nested_offsets_add_up(kernel):
    for t in kernel.both():
        assert t.offsetof("struct task_struct", "se.exec_start") == \
            t.offsetof("struct task_struct", "se") + t.offsetof("struct sched_entity", "exec_start")
        assert t.offsetof("struct task_struct", "comm[3]") == \
            t.offsetof("struct task_struct", "comm") + 3
        assert t.offsetof("struct uts_namespace", "name.release") == \
            t.offsetof("struct new_utsname", "release")


@pytest.mark.parametrize("type_name", sorted(VARIANTS))
def test_layout_variants_agree(kernel, type_name):
    present = 0
    for m in VARIANTS[type_name]:
        has = kernel.btf.has_member(type_name, m)
        assert has == kernel.dwarf.has_member(type_name, m), m
        if has:
            present += 1
            assert kernel.btf.offsetof(type_name, m) == kernel.dwarf.offsetof(type_name, m)
            assert kernel.btf.member_type_name(type_name, m) == \
                kernel.dwarf.member_type_name(type_name, m)
    assert present >= 1, f"{type_name}: none of {VARIANTS[type_name]}"
    # The module layout is either the 6.4+ mem[] array or the older core/init layouts.
    if type_name == "struct module":
        assert kernel.btf.has_member(type_name, "mem") != \
            kernel.btf.has_member(type_name, "core_layout.base")


def test_bitfields_agree_and_have_no_byte_offset(kernel):
    for type_name, members in BITFIELDS.items():
        for m in members:
            bits = kernel.btf.member_bits(type_name, m)
            assert bits == kernel.dwarf.member_bits(type_name, m)
            assert 0 < bits[1] < 32
            for t in kernel.both():
                assert t.has_member(type_name, m)
                with pytest.raises(KernelTypeError, match=rf"struct slab\.{m} is a bitfield"):
                    t.offsetof(type_name, m)
        assert kernel.btf.member_bits(type_name, "frozen")[1] == 1
        for t in kernel.both():
            with pytest.raises(KernelTypeError) as e:
                t.layout(type_name, ["slab_cache", *members])
            assert e.value.message == f"{type_name}: bitfield {', '.join(members)} (no byte offset)"


def test_anonymous_members(kernel):
    for t in kernel.both():
        # compound_head lives in an anonymous struct inside an anonymous union.
        assert t.offsetof("struct page", "compound_head") == 8
        assert t.has_member("struct vmap_area", "vm")
        assert t.offsetof("struct vmap_area", "vm") == t.offsetof("struct vmap_area", "list") + 16
    assert kernel.btf.offsetof("struct vmap_area", "subtree_max_size") == \
        kernel.dwarf.offsetof("struct vmap_area", "subtree_max_size")


def test_missing_names_and_fields(kernel):
    for t in kernel.both():
        with pytest.raises(KernelTypeError, match="struct no_such_struct"):
            t.sizeof("struct no_such_struct")
        assert not t.has_type("struct no_such_struct")
        assert t.has_type("struct task_struct")
        with pytest.raises(KernelTypeError, match="struct no_such_struct"):
            t.has_member("struct no_such_struct", "x")
        with pytest.raises(KernelTypeError, match=r"struct task_struct has no member 'nope'"):
            t.offsetof("struct task_struct", "nope")
        with pytest.raises(KernelTypeError,
                           match=r"struct task_struct\.se has no member 'nope'"):
            t.offsetof("struct task_struct", "se.nope")
        assert not t.has_member("struct task_struct", "nope")
        assert not t.has_member("struct task_struct", "mm.pgd")        # through a pointer
        assert not t.has_member("struct task_struct", "comm.x")
        assert not t.has_member("struct task_struct", "comm[16]")      # out of bounds
        assert t.has_member("struct task_struct", "comm[15]")
        with pytest.raises(KernelTypeError, match="bad member path"):
            t.offsetof("struct task_struct", "comm..x")
        with pytest.raises(KernelTypeError) as e:
            t.layout("struct task_struct", ["pid", "nope1", "comm", "nope2"])
        assert e.value.message == "struct task_struct: no member nope1, nope2"
        assert e.value.hint
        assert t.layout("struct task_struct", ["pid", "comm"]) == {
            "pid": t.offsetof("struct task_struct", "pid"),
            "comm": t.offsetof("struct task_struct", "comm")}


def test_enum_values_agree(kernel):
    btf = kernel.btf.btf
    values = btf.enum_values(btf.find("enum module_state"))
    dwarf = {e.name: e.value
             for e in kernel.dwarf.program.type("enum module_state").enumerators}
    assert values == dwarf
    assert values["MODULE_STATE_LIVE"] == 0


def test_results_are_cached(kernel):
    t = BtfTypes(kernel.btf.btf)
    calls = []
    real = t._find
    t._find = lambda name: calls.append(name) or real(name)
    for _ in range(3):
        assert t.offsetof("struct list_head", "prev") == 8
        assert t.sizeof("struct list_head") == 16
        assert t.has_member("struct list_head", "next")
    assert calls == ["struct list_head"]


def test_from_program_reuses_drgn_program(kernel):
    t = DwarfTypes.from_program(kernel.dwarf.program)
    assert t.program is kernel.dwarf.program
    assert t.offsetof("struct list_head", "prev") == 8
    assert t.sizeof("struct task_struct") == kernel.btf.sizeof("struct task_struct")


def _flatten_dims(name: str) -> str:
    """How pahole writes DWARF arrays into BTF: one flat dimension, and x[0] as x[]."""
    def flat(m: re.Match) -> str:
        n = 1
        for d in re.findall(r"\d+", m.group(0)):
            n *= int(d)
        return f"[{n}]" if n else "[]"
    return re.sub(r"(\[\d+\])+", flat, name)


def test_every_struct_agrees(kernel):
    """Every named struct/union in BTF that DWARF also knows: same size, and for
    unambiguous names the same members, offsets, bitfields and member type names."""
    btf, prog = kernel.btf.btf, kernel.dwarf.program
    compared = members = 0
    mismatches = []
    for name in btf.names():
        if not name.startswith(("struct ", "union ")):
            continue
        ids = [i for i in btf.find_all(name) if btf.kind(i) != BtfKind.FWD]
        if not ids:
            continue
        try:
            d = prog.type(name)
        except LookupError:
            continue            # defined inside a function: drgn indexes file scope only
        if not d.is_complete():
            continue
        compared += 1
        sizes = {btf.sizeof(i) for i in ids}
        if d.size not in sizes:
            mismatches.append(f"{name}: size BTF {sizes} DWARF {d.size}")
            continue
        if len(ids) > 1:
            continue            # several local definitions share the name; drgn picks one
        bm, dm = btf.members(ids[0]), d.members
        if len(bm) != len(dm):
            mismatches.append(f"{name}: {len(bm)} members in BTF, {len(dm)} in DWARF")
            continue
        for b, m in zip(bm, dm):
            members += 1
            if (b.name or None, b.bit_offset, b.bit_size or None) != \
                    (m.name, m.bit_offset, m.bit_field_size):
                mismatches.append(f"{name}.{b.name}: BTF {b} DWARF {m}")
            bname, dname = btf.type_name(b.type_id), m.type.type_name()
            if bname != dname and bname != _flatten_dims(dname):
                mismatches.append(f"{name}.{b.name}: type {bname!r} vs {dname!r}")
    assert mismatches == []
    assert compared > 5000
    assert members > 30000


def test_btf_loads_fast(kernel):
    blob = btf_from_vmlinux(kernel.image.vmlinux)
    start = time.perf_counter()
    t = BtfTypes(blob)
    assert t.offsetof("struct task_struct", "comm") == \
        kernel.dwarf.offsetof("struct task_struct", "comm")
    assert t.sizeof("struct kmem_cache") == kernel.dwarf.sizeof("struct kmem_cache")
    assert t.has_member("struct page", "compound_head")
    assert time.perf_counter() - start < 1.0
    assert t.btf.max_id > 50000


def test_find_btf_on_real_blob(kernel):
    blob = btf_from_vmlinux(kernel.image.vmlinux)
    buf = b"\x9f\xeb\x01\x00garbage" + blob + b"\xff" * 100
    assert find_btf(buf) == (11, len(blob))


def test_vmlinux_errors(tmp_path):
    not_elf = tmp_path / "vmlinux"
    not_elf.write_bytes(b"this is not an ELF file" * 10)
    with pytest.raises(KernelTypeError, match="not an ELF file"):
        btf_from_vmlinux(not_elf)
    with pytest.raises(KernelTypeError, match="cannot read"):
        btf_from_vmlinux(tmp_path / "absent")
    with pytest.raises(KernelTypeError, match="does not exist"):
        DwarfTypes(tmp_path / "absent")


def test_dwarf_types_on_file_without_debug_info(tmp_path):
    import shutil
    true = shutil.which("true")
    if true is None:
        pytest.skip("no `true` binary to use as a file without DWARF")
    with pytest.raises(KernelTypeError):
        DwarfTypes(true)
