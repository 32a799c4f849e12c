"""A parser for the kernel's BTF type format (include/uapi/linux/btf.h).

`Btf(blob)` indexes the type section in one pass over 32-bit words (every BTF
record is a whole number of words) and decodes names, members and sizes lazily,
so loading a vmlinux blob of ~100k types takes tens of milliseconds. Corrupt or
truncated input raises KernelTypeError, never IndexError or struct.error.

`find_btf(buf)` locates a blob with a sane header inside a larger buffer, e.g.
guest memory read from `__start_BTF`.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from ..errors import KernelTypeError

MAGIC = 0xEB9F
VERSION = 1
HEADER_LEN = 24
_MAX_HEADER_LEN = 256       # the kernel accepts longer headers if the tail is zero
_MAX_DEPTH = 64             # reference chains / nesting deeper than this mean a cycle
_MAX_WORK = 20_000          # steps per flatten/type_name: a DAG could blow up exponentially

_HINT = "the BTF data is corrupt or truncated; use the vmlinux's DWARF instead"


class BtfKind(IntEnum):
    VOID = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


K = BtfKind
# Words following the 3-word header: (fixed, per vlen entry).
_EXTRA = {
    K.INT: (1, 0), K.PTR: (0, 0), K.ARRAY: (3, 0), K.STRUCT: (0, 3), K.UNION: (0, 3),
    K.ENUM: (0, 2), K.FWD: (0, 0), K.TYPEDEF: (0, 0), K.VOLATILE: (0, 0),
    K.CONST: (0, 0), K.RESTRICT: (0, 0), K.FUNC: (0, 0), K.FUNC_PROTO: (0, 2),
    K.VAR: (1, 0), K.DATASEC: (0, 3), K.FLOAT: (0, 0), K.DECL_TAG: (1, 0),
    K.TYPE_TAG: (0, 0), K.ENUM64: (0, 3),
}
# Indexed by kind number, for the hot loop.
_FIXED = [0] * 20
_PER_VLEN = [0] * 20
for _k, (_f, _v) in _EXTRA.items():
    _FIXED[_k], _PER_VLEN[_k] = _f, _v

_MODIFIERS = frozenset({K.TYPEDEF, K.VOLATILE, K.CONST, K.RESTRICT, K.TYPE_TAG})
_QUALIFIERS = {K.CONST: "const", K.VOLATILE: "volatile", K.RESTRICT: "restrict"}
_INT_WORDS = frozenset({"signed", "unsigned", "short", "long", "int", "char"})


def canonical_int_name(name: str) -> str:
    """The C spelling drgn uses for an integer type: "long unsigned int" -> "unsigned long"."""
    words = name.split()
    if not words or any(w not in _INT_WORDS for w in words):
        return " ".join(words)
    unsigned = "unsigned" in words
    if "char" in words:
        return "unsigned char" if unsigned else "signed char" if "signed" in words else "char"
    longs = words.count("long")
    base = ("short" if "short" in words else "long long" if longs >= 2
            else "long" if longs else "int")
    return f"unsigned {base}" if unsigned else base


@dataclass(frozen=True, slots=True)
class BtfMember:
    """A struct/union member; `bit_size` is 0 unless the member is a bitfield."""

    name: str
    type_id: int
    bit_offset: int
    bit_size: int


def _bad(message: str) -> KernelTypeError:
    return KernelTypeError(message, _HINT)


def _parse_header(buf, offset: int) -> tuple[bool, int, int, int, int, int]:
    """(little_endian, hdr_len, type_off, type_len, str_off, str_len) of the header at
    `offset`, or KernelTypeError saying what is wrong with it."""
    if len(buf) - offset < HEADER_LEN:
        raise _bad(f"BTF header truncated: {len(buf) - offset} bytes, need {HEADER_LEN}")
    magic = bytes(buf[offset:offset + 2])
    if magic == b"\x9f\xeb":
        end = "<"
    elif magic == b"\xeb\x9f":
        end = ">"
    else:
        raise _bad(f"no BTF magic at offset {offset:#x} (found {magic.hex()})")
    _, version, flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from(end + "HBBIIIII", buf, offset)
    if version != VERSION:
        raise _bad(f"unsupported BTF version {version}")
    if flags:
        raise _bad(f"unsupported BTF header flags {flags:#x}")
    if not HEADER_LEN <= hdr_len <= _MAX_HEADER_LEN or hdr_len % 4:
        raise _bad(f"bad BTF header length {hdr_len}")
    total = len(buf) - offset
    if hdr_len > total or any(bytes(buf[offset + HEADER_LEN:offset + hdr_len])):
        raise _bad(f"bad BTF header length {hdr_len}")
    if type_off % 4 or type_len % 4:
        raise _bad(f"BTF type section misaligned (offset {type_off}, length {type_len})")
    if type_off + type_len > str_off:
        raise _bad("BTF type section overlaps or follows the string section")
    if str_len == 0 or hdr_len + str_off + str_len > total:
        raise _bad(f"BTF string section out of bounds (offset {str_off}, length {str_len}, "
                   f"blob {total} bytes)")
    s0 = offset + hdr_len + str_off
    if buf[s0] != 0 or buf[s0 + str_len - 1] != 0:
        raise _bad("BTF string section does not start and end with NUL")
    return end == "<", hdr_len, type_off, type_len, str_off, str_len


def find_btf(buf: bytes | bytearray | memoryview, start: int = 0) -> tuple[int, int]:
    """(offset, length) of the first BTF blob in `buf` at or after `start` whose header
    is sane and whose sections lie inside `buf`; KernelTypeError if there is none."""
    if isinstance(buf, memoryview):
        buf = buf.tobytes()
    candidates = []
    for magic in (b"\x9f\xeb\x01", b"\xeb\x9f\x01"):
        pos = buf.find(magic, start)
        while pos >= 0:
            candidates.append(pos)
            pos = buf.find(magic, pos + 1)
    for pos in sorted(candidates):
        try:
            _, hdr_len, type_off, type_len, str_off, str_len = _parse_header(buf, pos)
            # The first type record must be one we know how to read.
            if type_len >= 12:
                info_at = pos + hdr_len + type_off + 4
                info = buf[info_at:info_at + 4]
                kind = (info[3] if buf[pos] == 0x9F else info[0]) & 0x1F
                if not K.INT <= kind <= K.ENUM64:
                    continue
        except KernelTypeError:
            continue
        return pos, hdr_len + max(type_off + type_len, str_off + str_len)
    raise KernelTypeError("no valid BTF blob found in the buffer",
                          "the kernel may lack CONFIG_DEBUG_INFO_BTF; use the vmlinux's DWARF")


class Btf:
    """Types from one BTF blob. Type ids run from 1 to `max_id`; id 0 is void."""

    def __init__(self, blob: bytes | bytearray | memoryview):
        blob = bytes(blob)
        le, hdr_len, type_off, type_len, str_off, str_len = _parse_header(blob, 0)
        self.little_endian = le
        t0 = hdr_len + type_off
        words = array("I", blob[t0:t0 + type_len])
        if words.itemsize != 4:     # pragma: no cover - every Linux/CPython has 4-byte 'I'
            words = array("L", blob[t0:t0 + type_len])
        if le != (sys.byteorder == "little"):
            words.byteswap()
        s0 = hdr_len + str_off
        self._strings = blob[s0:s0 + str_len]
        self._words = words
        self._offsets = self._index(words)
        self.max_id = len(self._offsets) - 1
        self._names: dict[str, list[int]] | None = None
        self._members: dict[int, tuple[BtfMember, ...]] = {}
        self._flat: dict[int, dict[str, BtfMember]] = {}
        self._ptr_size: int | None = None

    @staticmethod
    def _index(words: array) -> array:
        """Word offset of every type record (slot 0 stands for void)."""
        offsets = array("I", [0])
        append = offsets.append
        fixed, per_vlen = _FIXED, _PER_VLEN
        n = len(words)
        pos = 0
        while pos < n:
            if pos + 3 > n:
                raise _bad(f"BTF type record {len(offsets)} truncated")
            info = words[pos + 1]
            kind = (info >> 24) & 0x1F
            if not 1 <= kind <= 19:
                raise _bad(f"BTF type {len(offsets)} has unknown kind {kind}")
            append(pos)
            # FUNC's vlen is its linkage, not a count of trailing entries.
            pos += 3 + fixed[kind] + per_vlen[kind] * (info & 0xFFFF)
        if pos != n:
            raise _bad(f"BTF type record {len(offsets) - 1} runs past the type section")
        return offsets

    # -- raw access -------------------------------------------------------

    def _check_id(self, tid: int) -> int:
        if not 0 <= tid <= self.max_id:
            raise _bad(f"BTF type id {tid} out of range (max {self.max_id})")
        return self._offsets[tid]

    def _info(self, tid: int) -> tuple[int, int, int, int, int]:
        """(word offset, kind, vlen, kind_flag, size_or_type) of type `tid`."""
        if tid == 0:
            return 0, 0, 0, 0, 0
        pos = self._check_id(tid)
        info = self._words[pos + 1]
        return pos, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, self._words[pos + 2]

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        if off >= len(self._strings) or end < 0:
            raise _bad(f"BTF string offset {off} out of range")
        return self._strings[off:end].decode("utf-8", "replace")

    def kind(self, tid: int) -> BtfKind:
        return BtfKind(self._info(tid)[1])

    def name(self, tid: int) -> str:
        """The type's own name ("" for anonymous types and void)."""
        return "" if tid == 0 else self._str(self._words[self._check_id(tid)])

    def ref(self, tid: int) -> int:
        """The type a PTR/TYPEDEF/qualifier/VAR/FUNC refers to."""
        _, kind, _, _, ref = self._info(tid)
        if kind not in _MODIFIERS and kind not in (K.PTR, K.VAR, K.FUNC, K.FUNC_PROTO):
            raise KernelTypeError(f"BTF type {tid} ({BtfKind(kind).name}) refers to no type")
        self._check_id(ref)
        return ref

    # -- names ------------------------------------------------------------

    def _lookup_key(self, tid: int) -> str | None:
        pos, kind, _, kflag, _ = self._info(tid)
        name_off = self._words[pos]
        if not name_off:
            return None
        if kind in (K.STRUCT, K.UNION, K.ENUM, K.ENUM64, K.FWD):
            tag = {K.STRUCT: "struct", K.UNION: "union", K.ENUM: "enum", K.ENUM64: "enum",
                   K.FWD: "union" if kflag else "struct"}[kind]
            return f"{tag} {self._str(name_off)}"
        if kind == K.INT:
            return canonical_int_name(self._str(name_off))
        if kind in (K.TYPEDEF, K.FLOAT):
            return self._str(name_off)
        return None

    def _name_index(self) -> dict[str, list[int]]:
        if self._names is None:
            names: dict[str, list[int]] = {}
            words, offsets = self._words, self._offsets
            wanted = {K.INT, K.STRUCT, K.UNION, K.ENUM, K.FWD, K.TYPEDEF, K.FLOAT, K.ENUM64}
            for tid in range(1, self.max_id + 1):
                pos = offsets[tid]
                if words[pos] and (words[pos + 1] >> 24) & 0x1F in wanted:
                    names.setdefault(self._lookup_key(tid), []).append(tid)
            self._names = names
        return self._names

    def find_all(self, name: str) -> list[int]:
        """Every type id called `name` ("struct task_struct", "unsigned long", "pgd_t"),
        complete definitions before forward declarations."""
        key = " ".join(name.split())
        first = key.split(" ", 1)[0]
        if first not in ("struct", "union", "enum") and all(w in _INT_WORDS for w in key.split()):
            key = canonical_int_name(key)
        ids = self._name_index().get(key, [])
        return sorted(ids, key=lambda t: self.kind(t) == K.FWD)

    def find(self, name: str) -> int:
        """The type id called `name`; KernelTypeError if there is none."""
        ids = self.find_all(name)
        if not ids:
            raise KernelTypeError(f"no type {name!r} in the kernel's BTF",
                                  "the kernel does not define it; check the name")
        return ids[0]

    def names(self) -> Iterator[str]:
        """Every lookup name in the blob ("struct x", "union y", typedef and base names)."""
        return iter(self._name_index())

    # -- structure ----------------------------------------------------------

    def resolve(self, tid: int) -> int:
        """`tid` with typedefs, qualifiers and type tags stripped."""
        for _ in range(_MAX_DEPTH):
            _, kind, _, _, ref = self._info(tid)
            if kind not in _MODIFIERS:
                return tid
            self._check_id(ref)
            tid = ref
        raise _bad(f"BTF reference chain too deep at type {tid} (a cycle?)")

    def pointer_size(self) -> int:
        """Bytes in a pointer: BTF does not record it, but `long` has the same size on
        every Linux ABI."""
        if self._ptr_size is None:
            ids = self.find_all("long")
            self._ptr_size = self._info(ids[0])[4] if ids else 8
        return self._ptr_size

    def sizeof(self, tid: int, _depth: int = 0) -> int:
        """Size in bytes; KernelTypeError for void, functions and forward declarations."""
        if _depth > _MAX_DEPTH:
            raise _bad(f"BTF type {tid} nests too deep (a cycle?)")
        tid = self.resolve(tid)
        pos, kind, _, _, size = self._info(tid)
        if kind in (K.INT, K.STRUCT, K.UNION, K.ENUM, K.ENUM64, K.FLOAT, K.DATASEC):
            return size
        if kind == K.PTR:
            return self.pointer_size()
        if kind == K.ARRAY:
            return self.sizeof(self._words[pos + 3], _depth + 1) * self._words[pos + 5]
        if kind == K.VAR:
            return self.sizeof(size, _depth + 1)
        what = "void" if kind == 0 else self.type_name(tid)
        raise KernelTypeError(f"type {what} has no size", "ask for a complete type")

    def array_info(self, tid: int) -> tuple[int, int] | None:
        """(element type id, number of elements) if `tid` resolves to an array."""
        pos, kind, _, _, _ = self._info(self.resolve(tid))
        if kind != K.ARRAY:
            return None
        elem = self._words[pos + 3]
        self._check_id(elem)
        return elem, self._words[pos + 5]

    def members(self, tid: int) -> tuple[BtfMember, ...]:
        """The direct members of struct/union `tid` (after resolving typedefs)."""
        tid = self.resolve(tid)
        cached = self._members.get(tid)
        if cached is not None:
            return cached
        pos, kind, vlen, kflag, _ = self._info(tid)
        if kind not in (K.STRUCT, K.UNION):
            raise KernelTypeError(f"{self.type_name(tid)} is not a struct or union",
                                  "members exist only in structs and unions")
        w = self._words
        out = []
        for i in range(pos + 3, pos + 3 + 3 * vlen, 3):
            name, mtype, off = self._str(w[i]), w[i + 1], w[i + 2]
            self._check_id(mtype)
            if kflag:
                bit_size, off = off >> 24, off & 0xFFFFFF
            else:
                bit_size, off = self._legacy_bitfield(mtype, off)
            out.append(BtfMember(name, mtype, off, bit_size))
        self._members[tid] = result = tuple(out)
        return result

    def _legacy_bitfield(self, mtype: int, off: int) -> tuple[int, int]:
        """Without kind_flag a bitfield is an INT whose bit count or offset is odd."""
        pos, kind, _, _, size = self._info(self.resolve(mtype))
        if kind != K.INT:
            return 0, off
        enc = self._words[pos + 3]
        bits, int_off = enc & 0xFF, (enc >> 16) & 0xFF
        if bits == size * 8 and not int_off:
            return 0, off
        return bits, off + int_off

    def member(self, tid: int, name: str) -> BtfMember | None:
        """Member `name` of struct/union `tid`, also searched inside anonymous members;
        its bit offset is relative to `tid`."""
        tid = self.resolve(tid)
        flat = self._flat.get(tid)
        if flat is None:
            flat = {}
            self._flatten(tid, 0, flat, 0, [_MAX_WORK])
            self._flat[tid] = flat
        return flat.get(name)

    def _flatten(self, tid: int, base: int, out: dict[str, BtfMember], depth: int,
                 budget: list[int]) -> None:
        if depth > _MAX_DEPTH:
            raise _bad(f"BTF anonymous members nest too deep at type {tid} (a cycle?)")
        members = self.members(tid)
        budget[0] -= len(members) + 1
        if budget[0] < 0:
            raise _bad(f"BTF anonymous members of type {tid} expand without end")
        for m in members:
            if m.name:
                out.setdefault(m.name, BtfMember(m.name, m.type_id, base + m.bit_offset,
                                                 m.bit_size))
            elif self.kind(self.resolve(m.type_id)) in (K.STRUCT, K.UNION):
                self._flatten(m.type_id, base + m.bit_offset, out, depth + 1, budget)

    def enum_values(self, tid: int) -> dict[str, int]:
        """Enumerator names and values of enum `tid`."""
        tid = self.resolve(tid)
        pos, kind, vlen, kflag, _ = self._info(tid)
        w = self._words
        if kind == K.ENUM:
            vals = ((w[i], w[i + 1]) for i in range(pos + 3, pos + 3 + 2 * vlen, 2))
            # kind_flag set means the values are unsigned
            return {self._str(n): v if kflag or v < 1 << 31 else v - (1 << 32) for n, v in vals}
        if kind == K.ENUM64:
            out = {}
            for i in range(pos + 3, pos + 3 + 3 * vlen, 3):
                v = w[i + 1] | w[i + 2] << 32
                out[self._str(w[i])] = v if kflag or v < 1 << 63 else v - (1 << 64)
            return out
        raise KernelTypeError(f"{self.type_name(tid)} is not an enum", "ask for an enum type")

    # -- C spelling ---------------------------------------------------------

    def type_name(self, tid: int) -> str:
        """The C spelling of a type, as drgn writes it: "struct list_head *", "char [16]",
        "void (*)(struct rcu_head *)"."""
        return self._declare(tid, "", 0, [_MAX_WORK])

    def _declare(self, tid: int, declarator: str, depth: int, budget: list[int]) -> str:
        budget[0] -= 1
        if depth > _MAX_DEPTH or budget[0] < 0:
            raise _bad(f"BTF type {tid} nests too deep (a cycle?)")
        quals: list[str] = []
        for _ in range(_MAX_DEPTH):
            pos, kind, vlen, kflag, ref = self._info(tid)
            if kind in _QUALIFIERS:
                quals.insert(0, _QUALIFIERS[kind])
            elif kind != K.TYPE_TAG:
                break
            self._check_id(ref)
            tid = ref
        else:
            raise _bad(f"BTF qualifier chain too deep at type {tid} (a cycle?)")
        q = " ".join(quals)
        if kind == K.PTR:
            inner = "*" + (f" {q}" if q else "") + (f" {declarator}" if q and declarator
                                                   else declarator)
            self._check_id(ref)
            return self._declare(ref, inner, depth + 1, budget)
        if kind == K.ARRAY:
            elem, nelems = self._words[pos + 3], self._words[pos + 5]
            self._check_id(elem)
            d = f"({declarator})" if declarator.startswith("*") else declarator
            return self._declare(elem, f"{d}[{nelems if nelems else ''}]", depth + 1, budget)
        if kind == K.FUNC_PROTO:
            params = []
            for i in range(pos + 3, pos + 3 + 2 * vlen, 2):
                ptype = self._words[i + 1]
                params.append(self._declare(ptype, "", depth + 1, budget) if ptype else "...")
            d = f"({declarator})" if declarator.startswith("*") else declarator
            self._check_id(ref)
            return self._declare(ref, f"{d}({', '.join(params) or 'void'})", depth + 1, budget)
        base = self._base_name(tid, kind, kflag)
        if q:
            base = f"{q} {base}"
        return f"{base} {declarator}" if declarator else base

    def _base_name(self, tid: int, kind: int, kflag: int) -> str:
        if kind == 0:
            return "void"
        name = self.name(tid)
        if kind in (K.STRUCT, K.UNION, K.ENUM, K.ENUM64, K.FWD):
            tag = {K.STRUCT: "struct", K.UNION: "union", K.ENUM: "enum", K.ENUM64: "enum",
                   K.FWD: "union" if kflag else "struct"}[kind]
            return f"{tag} {name or '<anonymous>'}"
        if kind == K.INT:
            return canonical_int_name(name)
        return name or f"<{BtfKind(kind).name.lower()} {tid}>"
