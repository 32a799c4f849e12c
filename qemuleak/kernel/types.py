"""Kernel structure layouts behind one interface: sizes, member offsets, presence.

`KernelTypes` answers "size of struct X", "offset of member a.b in struct X" and
"does struct X have member f" the same way whether the answer comes from BTF
(`BtfTypes`, our own parser) or DWARF (`DwarfTypes`, via drgn). Member paths use
dots and optional indexes ("se.exec_start", "comm[3]"); members of anonymous
structs and unions are found by their own name. Answers are cached, so callers
may ask the same thing in hot paths. Layout variants are told apart by asking
whether a member exists, never by the kernel version.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import KernelTypeError
from .btf import Btf, BtfKind

_STEP = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")
_HINT_MEMBER = ("the guest kernel lays this structure out differently from what "
                "qemuleak expects; please report the kernel version")


class Member(NamedTuple):
    """Where a member lives: `bit_size` is 0 unless it is a bitfield."""

    bit_offset: int
    bit_size: int
    type: Any           # backend handle of the member's type


class KernelTypes(ABC):
    """Structure layouts of one kernel. Subclasses supply the five primitives below;
    every public method is answered from them and cached."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    # -- backend primitives -----------------------------------------------------

    @abstractmethod
    def _find(self, type_name: str) -> Any:
        """A handle for the type called `type_name`; KernelTypeError if unknown."""

    @abstractmethod
    def _size(self, handle: Any) -> int:
        """Size in bytes of `handle`; KernelTypeError if it has none."""

    @abstractmethod
    def _name(self, handle: Any) -> str:
        """C spelling of `handle` ("struct list_head *", "char [16]")."""

    @abstractmethod
    def _member(self, handle: Any, name: str) -> Member | None:
        """Member `name` of a struct/union (typedefs resolved, anonymous members
        searched), None if absent; _Missing if `handle` is not a struct/union."""

    @abstractmethod
    def _array(self, handle: Any) -> tuple[Any, int | None] | None:
        """(element handle, length or None if unknown) if `handle` is an array."""

    # -- public interface ---------------------------------------------------------

    def _cached(self, key: tuple, compute) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = compute()
            return value

    def has_type(self, type_name: str) -> bool:
        """Does the kernel define `type_name`?"""
        def compute() -> bool:
            try:
                self._find(type_name)
            except KernelTypeError:
                return False
            return True
        return self._cached(("has_type", type_name), compute)

    def sizeof(self, type_name: str) -> int:
        """Size in bytes of `type_name` ("struct task_struct", "unsigned long", "pgd_t")."""
        return self._cached(("sizeof", type_name),
                            lambda: self._size(self._find_or_raise(type_name)))

    def has_member(self, type_name: str, member: str) -> bool:
        """Does `type_name` have member path `member` (bitfields included)? The type
        itself must exist."""
        def compute() -> bool:
            try:
                self._walk(type_name, member)
            except _Missing:
                return False
            return True
        return self._cached(("has_member", type_name, member), compute)

    def offsetof(self, type_name: str, member: str) -> int:
        """Byte offset of member path `member` in `type_name`; KernelTypeError if the
        member is missing or is a bitfield."""
        def compute() -> int:
            m = self._walk_or_raise(type_name, member)
            if m.bit_size or m.bit_offset % 8:
                raise KernelTypeError(
                    f"{type_name}.{member} is a bitfield (bits {m.bit_offset}.."
                    f"{m.bit_offset + max(m.bit_size, 1) - 1}) and has no byte offset",
                    "read the containing word and use member_bits() to extract it")
            return m.bit_offset // 8
        return self._cached(("offsetof", type_name, member), compute)

    def member_bits(self, type_name: str, member: str) -> tuple[int, int]:
        """(bit offset, width in bits) of member path `member`; works for bitfields."""
        def compute() -> tuple[int, int]:
            m = self._walk_or_raise(type_name, member)
            return m.bit_offset, m.bit_size or self._size(m.type) * 8
        return self._cached(("member_bits", type_name, member), compute)

    def member_type_name(self, type_name: str, member: str) -> str:
        """C spelling of the type of member path `member` ("struct list_head", "char [16]")."""
        return self._cached(("member_type_name", type_name, member),
                            lambda: self._name(self._walk_or_raise(type_name, member).type))

    def member_size(self, type_name: str, member: str) -> int:
        """Size in bytes of the type of member path `member`."""
        return self._cached(("member_size", type_name, member),
                            lambda: self._size(self._walk_or_raise(type_name, member).type))

    def enumerator(self, type_name: str, name: str) -> int | None:
        """The value of enumerator `name` of enum `type_name`, None if it has none."""
        return self._cached(("enumerator", type_name, name),
                            lambda: self._enumerators(self._find_or_raise(type_name)).get(name))

    @abstractmethod
    def _enumerators(self, handle: Any) -> dict[str, int]:
        """Enumerator names and values of an enum type."""

    def layout(self, type_name: str, members: list[str]) -> dict[str, int]:
        """Byte offsets of several members at once; one KernelTypeError names every
        member that is missing or a bitfield."""
        out: dict[str, int] = {}
        missing: list[str] = []
        bitfields: list[str] = []
        self._find_or_raise(type_name)
        for member in members:
            try:
                m = self._walk(type_name, member)
            except _Missing:
                missing.append(member)
                continue
            if m.bit_size or m.bit_offset % 8:
                bitfields.append(member)
            else:
                out[member] = m.bit_offset // 8
        if missing or bitfields:
            problems = []
            if missing:
                problems.append(f"no member {', '.join(missing)}")
            if bitfields:
                problems.append(f"bitfield {', '.join(bitfields)} (no byte offset)")
            raise KernelTypeError(f"{type_name}: {'; '.join(problems)}", _HINT_MEMBER)
        return out

    # -- path walking ---------------------------------------------------------

    def _find_or_raise(self, type_name: str) -> Any:
        return self._cached(("find", type_name), lambda: self._find(type_name))

    def _walk_or_raise(self, type_name: str, path: str) -> Member:
        try:
            return self._walk(type_name, path)
        except _Missing as e:
            raise KernelTypeError(e.message, _HINT_MEMBER) from None

    def _walk(self, type_name: str, path: str) -> Member:
        """Follow member path `path` from `type_name`: _Missing if a step is absent."""
        key = ("walk", type_name, path)
        if key in self._cache:
            return self._cache[key]
        handle = self._find_or_raise(type_name)
        bit_offset, bit_size = 0, 0
        done = ""
        for step in path.split("."):
            m = _STEP.match(step.strip())
            if not m:
                raise KernelTypeError(f"bad member path {path!r} for {type_name}",
                                      "use names, dots and [N] indexes: 'se.exec_start'")
            name, indexes = m.group(1), m.group(2)
            where = f"{type_name}.{done}" if done else type_name
            if bit_size:
                raise _Missing(f"{where} is a bitfield; it has no member {name!r}")
            member = self._member(handle, name)
            if member is None:
                raise _Missing(f"{where} has no member {name!r}")
            done = f"{done}.{name}" if done else name
            bit_offset += member.bit_offset
            bit_size, handle = member.bit_size, member.type
            for index in map(int, _INDEX.findall(indexes)):
                array = self._array(handle)
                if array is None:
                    raise _Missing(f"{type_name}.{done} is {self._name(handle)}, not an array")
                elem, length = array
                if length and index >= length:
                    raise _Missing(f"{type_name}.{done}[{index}] is out of bounds "
                                   f"({self._name(handle)})")
                bit_offset += index * self._size(elem) * 8
                handle = elem
                done += f"[{index}]"
        result = self._cache[key] = Member(bit_offset, bit_size, handle)
        return result


class _Missing(Exception):
    """A member path step that does not exist (becomes False or KernelTypeError)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------------
# BTF backend

_TYPE_NAME = re.compile(r"^(?P<base>[A-Za-z_][\w ]*?)\s*(?P<stars>(?:\*\s*(?:const\s*)?)*)"
                        r"(?P<dims>(?:\[\d*\]\s*)*)$")


class _Derived(NamedTuple):
    """A pointer or array type spelled by the caller, which BTF need not contain."""

    size: int
    name: str


class BtfTypes(KernelTypes):
    """Layouts from a BTF blob (the vmlinux `.BTF` section, or guest memory between
    `__start_BTF` and `__stop_BTF`).

    Two things BTF cannot say, so answers differ from DWARF there: pahole flattens
    multi-dimensional arrays ("u64 [7][3][2]" becomes "u64 [42]", so "x[1]" indexes
    the flat array), and "x[0]" and "x[]" are both spelled "x[]" with size 0.
    Sizes and member offsets are identical."""

    def __init__(self, blob: bytes | bytearray | memoryview | Btf):
        super().__init__()
        self.btf = blob if isinstance(blob, Btf) else Btf(blob)

    def _find(self, type_name: str) -> Any:
        m = _TYPE_NAME.match(type_name.strip())
        if not m:
            raise KernelTypeError(f"cannot parse type name {type_name!r}",
                                  "use C spellings like 'struct task_struct *' or 'char [16]'")
        words = [w for w in m.group("base").split() if w not in ("const", "volatile")]
        stars = m.group("stars").count("*")
        dims = [int(d) if d else 0 for d in re.findall(r"\[(\d*)\]", m.group("dims"))]
        base = " ".join(words)
        tid = 0 if base == "void" else self.btf.find(base)
        if not stars and not dims:
            return tid
        # Spelled pointers and arrays: only their size and name are ever needed.
        size = self.btf.pointer_size() if stars else self.btf.sizeof(tid)
        for d in dims:
            size *= d
        return _Derived(size, " ".join(type_name.split()))

    def _size(self, handle: Any) -> int:
        if isinstance(handle, _Derived):
            return handle.size
        return self.btf.sizeof(handle)

    def _name(self, handle: Any) -> str:
        return handle.name if isinstance(handle, _Derived) else self.btf.type_name(handle)

    def _member(self, handle: Any, name: str) -> Member | None:
        if isinstance(handle, _Derived) or \
                self.btf.kind(self.btf.resolve(handle)) not in (BtfKind.STRUCT, BtfKind.UNION):
            raise _Missing(f"{self._name(handle)} is not a struct or union; "
                           f"it has no member {name!r}")
        m = self.btf.member(handle, name)
        return None if m is None else Member(m.bit_offset, m.bit_size, m.type_id)

    def _enumerators(self, handle: Any) -> dict[str, int]:
        if isinstance(handle, _Derived):
            raise KernelTypeError(f"{handle.name} is not an enum", "ask for an enum type")
        return self.btf.enum_values(self.btf.resolve(handle))

    def _array(self, handle: Any) -> tuple[Any, int | None] | None:
        if isinstance(handle, _Derived):
            return None
        info = self.btf.array_info(handle)
        return None if info is None else (info[0], info[1] or None)


def btf_from_vmlinux(path: Path | str) -> bytes:
    """The `.BTF` section of a vmlinux (the bytes the kernel keeps at `__start_BTF`)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    hint = "pass the vmlinux of the guest kernel, built with CONFIG_DEBUG_INFO_BTF=y"
    try:
        with open(path, "rb") as f:
            section = ELFFile(f).get_section_by_name(".BTF")
            if section is None:
                raise KernelTypeError(f"{path} has no .BTF section", hint)
            return section.data()
    except OSError as e:
        raise KernelTypeError(f"cannot read {path}: {e.strerror}", hint) from None
    except ELFError as e:
        raise KernelTypeError(f"{path} is not an ELF file: {e}", hint) from None


# ---------------------------------------------------------------------------------
# DWARF backend (drgn)

class DwarfTypes(KernelTypes):
    """Layouts from a vmlinux's DWARF, through drgn. Type lookups need no memory: the
    vmlinux is loaded as an extra module of a program without a core."""

    def __init__(self, vmlinux: Path | str | None = None, *, program: Any = None):
        super().__init__()
        if program is None:
            if vmlinux is None:
                raise TypeError("DwarfTypes needs a vmlinux path or a drgn.Program")
            program = self._load(Path(vmlinux))
        self.program = program

    @classmethod
    def from_program(cls, program: Any) -> DwarfTypes:
        """Use a drgn.Program that already has the kernel's debug info loaded."""
        return cls(program=program)

    @staticmethod
    def _load(vmlinux: Path) -> Any:
        import drgn
        hint = "pass the guest's debug vmlinux (run `make images`), or use BTF instead"
        if not vmlinux.is_file():
            raise KernelTypeError(f"vmlinux {vmlinux} does not exist", hint)
        prog = drgn.Program()    # platform comes from the file, so arm64 works on x86 hosts
        prog.set_enabled_debug_info_finders([])     # never search the host's debug files
        # An extra module takes the file as-is; a main module would want a memory image.
        module = prog.extra_module(str(vmlinux), create=True)
        try:
            module.try_file(str(vmlinux), force=True)
        except (OSError, drgn.BadDataError, ValueError) as e:
            raise KernelTypeError(f"cannot load {vmlinux}: {e}", hint) from None
        if module.debug_file_status != drgn.ModuleFileStatus.HAVE:
            raise KernelTypeError(f"{vmlinux} has no DWARF debug info",
                                  "use BtfTypes(btf_from_vmlinux(path)) instead")
        return prog

    def _find(self, type_name: str) -> Any:
        try:
            return self.program.type(type_name)
        except LookupError:
            raise KernelTypeError(f"no type {type_name!r} in the kernel's debug info",
                                  "the kernel does not define it; check the name") from None
        except (SyntaxError, ValueError) as e:
            raise KernelTypeError(f"cannot parse type name {type_name!r}: {e}",
                                  "use C spellings like 'struct task_struct *'") from None

    def _size(self, handle: Any) -> int:
        import drgn
        try:
            return drgn.sizeof(handle)
        except TypeError:
            raise KernelTypeError(f"type {handle.type_name()} has no size",
                                  "ask for a complete type") from None

    def _name(self, handle: Any) -> str:
        return handle.type_name()

    def _member(self, handle: Any, name: str) -> Member | None:
        import drgn
        t = handle.unaliased()
        if t.kind not in (drgn.TypeKind.STRUCT, drgn.TypeKind.UNION, drgn.TypeKind.CLASS):
            raise _Missing(f"{handle.type_name()} is not a struct or union; "
                           f"it has no member {name!r}")
        if not t.has_member(name):
            return None
        m = t.member(name)
        return Member(m.bit_offset, m.bit_field_size or 0, m.type)

    def _enumerators(self, handle: Any) -> dict[str, int]:
        import drgn
        t = handle.unaliased()
        if t.kind != drgn.TypeKind.ENUM:
            raise KernelTypeError(f"{handle.type_name()} is not an enum", "ask for an enum type")
        return {e.name: e.value for e in t.enumerators or ()}

    def _array(self, handle: Any) -> tuple[Any, int | None] | None:
        import drgn
        t = handle.unaliased()
        if t.kind != drgn.TypeKind.ARRAY:
            return None
        return t.type, t.length or None
