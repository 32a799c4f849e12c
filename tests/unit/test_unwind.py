"""Unwinders on synthetic stacks and unwind tables: ORC (x86_64) and frame records
(arm64), end markers, truncated snapshots, loops and bad data."""

import random
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from qemuleak.errors import QemuleakError
from qemuleak.kernel.vmcoreinfo import VmcoreInfo
from qemuleak.unwind import (KIND_CALL, KIND_END, KIND_REGS, KIND_REGS_PARTIAL, KIND_UNDEFINED,
                             ORC_REG_BP, ORC_REG_BP_INDIRECT, ORC_REG_PREV_SP, ORC_REG_R10,
                             ORC_REG_SP, ORC_REG_SP_INDIRECT, ORC_REG_UNDEFINED,
                             FrameRecordUnwinder, ModuleText, OrcLayout, OrcTable, OrcUnwinder,
                             unwinder_for)

TEXT = 0xFFFFFFFF81000000
IP_TABLE = 0xFFFFFFFF82000000
STACK = 0xFFFFC90000010000          # where the snapshot starts (the stopped SP)

CALL, REGS, PARTIAL = 0, 1, 2       # 6.1 ORC types

# Functions of the synthetic kernel text.
F_ALLOC = TEXT + 0x100              # the allocator: the breakpoint is on its first byte
F_CALLER = TEXT + 0x200             # a 32-byte frame after +0x20
F_BPFUNC = TEXT + 0x300             # rbp-based frame after +0x8
F_TOP = TEXT + 0x400                # a 16-byte frame after +0x10
F_END = TEXT + 0x500                # like ret_from_fork: end of stack
F_ENTRY = TEXT + 0x600              # entry code: pt_regs at sp
F_IRET = TEXT + 0x640               # entry code: iret frame at sp + 8
F_SPIND = TEXT + 0x680              # previous sp stored at (%rsp)
F_BPIND = TEXT + 0x6C0              # previous sp stored at (%rbp - 8)
F_R10 = TEXT + 0x700                # previous sp in r10
F_UNDEF = TEXT + 0x740              # no unwind data (UNDEFINED, not end)
ETEXT = TEXT + 0x800


def entry(sp_reg=ORC_REG_SP, sp_off=8, bp_reg=ORC_REG_UNDEFINED, bp_off=0, typ=CALL, end=0):
    return (sp_reg, sp_off, bp_reg, bp_off, typ, end)


ROWS = [
    (TEXT, entry()),
    (F_ALLOC, entry()),
    (F_ALLOC + 0x10, entry(sp_off=16, bp_reg=ORC_REG_PREV_SP, bp_off=-16)),
    (F_CALLER, entry()),
    (F_CALLER + 0x20, entry(sp_off=40)),
    (F_BPFUNC, entry()),
    (F_BPFUNC + 0x8, entry(sp_reg=ORC_REG_BP, sp_off=16, bp_reg=ORC_REG_PREV_SP, bp_off=-16)),
    (F_TOP, entry()),
    (F_TOP + 0x10, entry(sp_off=24)),
    (F_END, entry(sp_reg=ORC_REG_UNDEFINED, sp_off=0, end=1)),
    (F_ENTRY, entry(sp_off=0, typ=REGS)),
    (F_IRET, entry(sp_off=8, typ=PARTIAL)),
    (F_SPIND, entry(sp_reg=ORC_REG_SP_INDIRECT, sp_off=8)),
    (F_BPIND, entry(sp_reg=ORC_REG_BP_INDIRECT, sp_off=-8)),
    (F_R10, entry(sp_reg=ORC_REG_R10, sp_off=0)),
    (F_UNDEF, entry(sp_reg=ORC_REG_UNDEFINED, sp_off=0, end=0)),
    (ETEXT, entry(sp_reg=ORC_REG_UNDEFINED, sp_off=0, end=0)),   # section terminator
]


def pack_61(e) -> bytes:
    sp_reg, sp_off, bp_reg, bp_off, typ, end = e
    return struct.pack("<hhH", sp_off, bp_off, sp_reg | bp_reg << 4 | typ << 8 | end << 10)


def relative(ips, base=IP_TABLE) -> bytes:
    return b"".join(struct.pack("<i", ip - (base + 4 * i)) for i, ip in enumerate(ips))


def table(rows=ROWS, lookup=True, pack=pack_61, layout=OrcLayout()) -> OrcTable:
    return OrcTable.from_relative(IP_TABLE, relative([ip for ip, _ in rows]),
                                  b"".join(pack(e) for _, e in rows), layout,
                                  (TEXT, ETEXT) if lookup else None)


def orc(rows=ROWS, **kw) -> OrcUnwinder:
    return OrcUnwinder(table(rows, **kw), [(TEXT, ETEXT)])


class Stack:
    """A snapshot under construction: 64-bit words at addresses from STACK."""

    def __init__(self, size=1024):
        self.data = bytearray(size)

    def put(self, address: int, *words: int) -> "Stack":
        for i, w in enumerate(words):
            struct.pack_into("<Q", self.data, address - STACK + 8 * i, w & (2**64 - 1))
        return self

    def bytes(self) -> bytes:
        return bytes(self.data)


def sp_chain():
    """F_ALLOC (entry) <- F_CALLER+0x30 <- F_TOP+0x18 <- F_END+0x8 (end of stack)."""
    s = Stack()
    s.put(STACK, F_CALLER + 0x30)              # pushed by the call to F_ALLOC
    s.put(STACK + 8 + 32, F_TOP + 0x18)        # F_CALLER: 40-byte CFA
    s.put(STACK + 48 + 16, F_END + 0x8)        # F_TOP: 24-byte CFA
    return {"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, s.bytes()


SP_CHAIN_PCS = [F_ALLOC, F_CALLER + 0x30, F_TOP + 0x18, F_END + 0x8]


# ---------------------------------------------------------------------------
# ORC tables


def test_entries_decode_like_the_kernel():
    t = table()
    i = t.find(F_ALLOC + 0x10)
    assert (t.sp_reg[i], t.sp_off[i], t.bp_reg[i], t.bp_off[i], t.kind[i]) == \
        (ORC_REG_SP, 16, ORC_REG_PREV_SP, -16, KIND_CALL)
    assert t.kind[t.find(F_END)] == KIND_END
    assert t.kind[t.find(F_UNDEF + 3)] == KIND_UNDEFINED
    assert t.kind[t.find(F_ENTRY)] == KIND_REGS and t.signal[t.find(F_ENTRY)]
    assert t.kind[t.find(F_IRET)] == KIND_REGS_PARTIAL
    assert t.ips[0] == TEXT and t.ips[-1] == ETEXT


def test_find_takes_the_last_entry_at_or_below():
    t = table()
    assert t.find(TEXT - 1) == -1
    assert t.find(F_ALLOC) == 1
    assert t.find(F_ALLOC + 0xF) == 1
    assert t.find(F_ALLOC + 0x10) == 2
    assert t.find(F_CALLER - 1) == 2


def test_fast_lookup_agrees_with_a_full_search():
    rng = random.Random(5)
    ips = sorted({TEXT + rng.randrange(0, 0x40000) for _ in range(3000)} | {TEXT})
    rows = [(ip, entry(sp_off=8 * (i % 7 + 1))) for i, ip in enumerate(ips)]
    slow = table(rows, lookup=False)
    fast = OrcTable.from_relative(IP_TABLE, relative(ips), b"".join(pack_61(e) for _, e in rows),
                                  OrcLayout(), (TEXT, TEXT + 0x40000))
    assert len(fast.lookup) > 1000
    probes = [TEXT + rng.randrange(0, 0x40000) for _ in range(5000)] + ips + [ip - 1 for ip in ips[1:]]
    assert [fast.find(p) for p in probes] == [slow.find(p) for p in probes]


def test_unsorted_tables_are_sorted_with_terminators_first():
    # A weak terminator at the same address as a real entry must lose the lookup.
    rows = [r for r in ROWS] + [(F_TOP + 0x10, entry(sp_reg=ORC_REG_UNDEFINED, sp_off=0))]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    t = table(shuffled)
    assert list(t.ips) == sorted(t.ips)
    i = t.find(F_TOP + 0x17)
    assert t.kind[i] == KIND_CALL and t.sp_off[i] == 24
    regs, stack = sp_chain()
    assert OrcUnwinder(t, [(TEXT, ETEXT)]).unwind(regs, STACK, stack) == SP_CHAIN_PCS


def test_6_4_layout_with_signal_bit_and_new_type_numbers():
    # 6.4+: type:3 (UNDEFINED 0, END_OF_STACK 1, CALL 2, REGS 3, REGS_PARTIAL 4), signal:1
    new = OrcLayout(type=(8, 3), end=None, signal=(11, 1))
    kinds = {CALL: 2, REGS: 3, PARTIAL: 4}

    def pack_64(e):
        sp_reg, sp_off, bp_reg, bp_off, typ, end = e
        if sp_reg == ORC_REG_UNDEFINED:
            t = 1 if end else 0
        else:
            t = kinds[typ]
        return struct.pack("<hhH", sp_off, bp_off, sp_reg | bp_reg << 4 | t << 8)
    old, t = table(), table(pack=pack_64, layout=new)
    assert list(t.kind) == list(old.kind)
    regs, stack = sp_chain()
    assert OrcUnwinder(t, [(TEXT, ETEXT)], layout=new).unwind(regs, STACK, stack) == SP_CHAIN_PCS


def test_layout_from_kernel_types():
    class Types:
        bits = {"sp_offset": (0, 16), "bp_offset": (16, 16), "sp_reg": (32, 4),
                "bp_reg": (36, 4), "type": (40, 3), "signal": (43, 1)}

        def has_type(self, name):
            return name == "struct orc_entry"

        def has_member(self, name, member):
            return member in self.bits

        def member_bits(self, name, member):
            return self.bits[member]

        def sizeof(self, name):
            return 6
    layout = OrcLayout.from_types(Types())
    assert layout == OrcLayout(type=(8, 3), end=None, signal=(11, 1))
    assert OrcLayout.from_types(SimpleNamespace(has_type=lambda n: False)) == OrcLayout()


# ---------------------------------------------------------------------------
# The ORC state machine


def test_sp_based_frames_to_the_end_of_the_stack():
    regs, stack = sp_chain()
    assert orc().unwind(regs, STACK, stack) == SP_CHAIN_PCS


def test_first_frame_inside_a_function():
    # Stopped at F_ALLOC+0x10, after `push %rbp`: the return address is one up.
    s = Stack()
    s.put(STACK, 0x1111, F_CALLER + 0x30)
    s.put(STACK + 16 + 32, F_TOP + 0x18)
    s.put(STACK + 56 + 16, F_END + 0x8)
    got = orc().unwind({"rip": F_ALLOC + 0x10, "rsp": STACK, "rbp": 7}, STACK, s.bytes())
    assert got == [F_ALLOC + 0x10, F_CALLER + 0x30, F_TOP + 0x18, F_END + 0x8]


def test_bp_based_frames():
    # F_BPFUNC+0x20 twice (recursion), each frame found from rbp.
    s = Stack()
    s.put(STACK, F_BPFUNC + 0x20)                      # return address of F_ALLOC
    s.put(STACK + 0x40, STACK + 0x80, F_BPFUNC + 0x20)  # saved rbp, return address
    s.put(STACK + 0x80, STACK + 0xC0, F_END + 0x8)
    regs = {"rip": F_ALLOC, "rsp": STACK, "rbp": STACK + 0x40}
    assert orc().unwind(regs, STACK, s.bytes()) == \
        [F_ALLOC, F_BPFUNC + 0x20, F_BPFUNC + 0x20, F_END + 0x8]


def test_bp_restored_from_the_frame_feeds_the_next_bp_frame():
    # F_ALLOC+0x10 saved the caller's rbp at CFA-16 (bp_reg PREV_SP): the
    # F_BPFUNC frame must use that value, not the register's.
    s = Stack()
    s.put(STACK, STACK + 0x40, F_BPFUNC + 0x20)         # push %rbp; return address
    s.put(STACK + 0x40, STACK + 0x80, F_END + 0x8)
    regs = {"rip": F_ALLOC + 0x10, "rsp": STACK, "rbp": 0xDEAD}
    assert orc().unwind(regs, STACK, s.bytes()) == [F_ALLOC + 0x10, F_BPFUNC + 0x20, F_END + 0x8]


def test_bp_frame_without_rbp_stops():
    s = Stack().put(STACK, F_BPFUNC + 0x20)
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK}, STACK, s.bytes()) == [F_ALLOC, F_BPFUNC + 0x20]


def test_sp_indirect_and_bp_indirect():
    # F_SPIND: CFA = (%rsp) + 8; F_BPIND: CFA = (%rbp - 8).
    s = Stack()
    s.put(STACK, F_SPIND + 0x10)                # F_ALLOC's return address
    s.put(STACK + 8, STACK + 0x100)             # (%rsp) of F_SPIND: the old stack
    s.put(STACK + 0x100, F_BPIND + 0x4)         # return address at CFA - 8
    s.put(STACK + 0x1F8, STACK + 0x208)         # (%rbp - 8): the CFA
    s.put(STACK + 0x200, F_END + 0x8)
    regs = {"rip": F_ALLOC, "rsp": STACK, "rbp": STACK + 0x200}
    assert orc().unwind(regs, STACK, s.bytes()) == \
        [F_ALLOC, F_SPIND + 0x10, F_BPIND + 0x4, F_END + 0x8]


def test_register_based_cfa_needs_the_register():
    s = Stack().put(STACK, F_R10 + 0x4).put(STACK + 0x38, F_END + 0x8)
    regs = {"rip": F_ALLOC, "rsp": STACK, "rbp": 0, "r10": STACK + 0x40}
    # The stopped vCPU's r10 is the first frame's; F_R10 is the second, whose
    # r10 is unknown (it was no pt_regs): stop there.
    assert orc().unwind(regs, STACK, s.bytes()) == [F_ALLOC, F_R10 + 0x4]
    # As the first frame, with r10 in the registers, it unwinds.
    got = orc().unwind({**regs, "rip": F_R10 + 0x4}, STACK, s.bytes())
    assert got == [F_R10 + 0x4, F_END + 0x8]


def pt_regs(ip, sp, cs=0x10, bp=0) -> list[int]:
    words = [0] * 21
    words[4], words[16], words[17], words[19], words[20] = bp, ip, cs, sp, 0x18
    return words


def test_through_an_interrupt_frame():
    # F_ENTRY holds a pt_regs at its sp; the interrupted IP starts F_TOP exactly:
    # as a signal frame it is looked up as is (ip - 1 would land in F_BPFUNC).
    s = Stack()
    s.put(STACK, F_ENTRY + 0x8)                               # return address of F_ALLOC
    s.put(STACK + 8, *pt_regs(F_TOP, STACK + 0x200, bp=0x5555))
    s.put(STACK + 0x200, F_END + 0x8)                         # F_TOP's return address
    regs = {"rip": F_ALLOC, "rsp": STACK, "rbp": 0}
    assert orc().unwind(regs, STACK, s.bytes()) == [F_ALLOC, F_ENTRY + 0x8, F_TOP, F_END + 0x8]


def test_interrupt_frame_restores_rbp_for_a_bp_based_frame():
    # The interrupted function is rbp-based: its CFA comes from the pt_regs' rbp.
    s = Stack()
    s.put(STACK, F_ENTRY + 0x8)
    s.put(STACK + 8, *pt_regs(F_BPFUNC + 0x20, STACK + 0x200, bp=STACK + 0x300))
    s.put(STACK + 0x300, 0, F_END + 0x8)
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": STACK + 0x100}, STACK, s.bytes()) == \
        [F_ALLOC, F_ENTRY + 0x8, F_BPFUNC + 0x20, F_END + 0x8]


def test_interrupt_frame_from_user_mode_ends_the_trace():
    s = Stack()
    s.put(STACK, F_ENTRY + 0x8)
    s.put(STACK + 8, *pt_regs(0x401000, 0x7FFF0000, cs=0x33))
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, STACK, s.bytes()) == \
        [F_ALLOC, F_ENTRY + 0x8]
    # User mode ends it even when the (user) IP happens to look like kernel text.
    s.put(STACK + 8, *pt_regs(F_TOP, STACK + 0x200, cs=0x33))
    s.put(STACK + 0x200, F_END + 0x8)
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, STACK, s.bytes()) == \
        [F_ALLOC, F_ENTRY + 0x8]


def test_pt_regs_beyond_the_snapshot_ends_the_trace():
    s = Stack(size=64).put(STACK, F_ENTRY + 0x8)
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, STACK, s.bytes()) == \
        [F_ALLOC, F_ENTRY + 0x8]


def test_through_an_iret_frame():
    s = Stack()
    s.put(STACK, F_IRET + 0x8)
    s.put(STACK + 16, F_TOP, 0x10, 0x246, STACK + 0x200, 0x18)   # ip cs flags sp ss at sp+8
    s.put(STACK + 0x200, F_END + 0x8)
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, STACK, s.bytes()) == \
        [F_ALLOC, F_IRET + 0x8, F_TOP, F_END + 0x8]
    s.put(STACK + 24, 0x33)                                       # user cs: the end
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, STACK, s.bytes()) == \
        [F_ALLOC, F_IRET + 0x8]


def test_undefined_entry_stops():
    s = Stack().put(STACK, F_UNDEF + 0x8).put(STACK + 8, F_TOP + 0x18)
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, STACK, s.bytes()) == \
        [F_ALLOC, F_UNDEF + 0x8]


def test_address_outside_the_text_stops():
    s = Stack().put(STACK, F_CALLER + 0x30).put(STACK + 40, 0xFFFFFFFF90000000)
    assert orc().unwind({"rip": F_ALLOC, "rsp": STACK, "rbp": 0}, STACK, s.bytes()) == \
        [F_ALLOC, F_CALLER + 0x30]
    # A stop PC we know nothing about: just itself.
    assert orc().unwind({"rip": 0x401000, "rsp": STACK}, STACK, s.bytes()) == [0x401000]


def test_return_address_after_a_call_at_the_end_of_a_region():
    # Not at an entry, the PC is a return address: its call (pc - 1) decides.
    # F_TOP is right after F_BPFUNC; a noreturn call ending F_BPFUNC "returns"
    # to F_TOP. At entry (exact pc) F_TOP's own entry applies.
    s = Stack()
    s.put(STACK, STACK + 0x40, F_END + 0x8)
    s.put(STACK + 0x40, 0, F_END + 0x10)
    regs = {"rip": F_TOP, "rsp": STACK + 8, "rbp": STACK + 0x40}
    assert orc().unwind(regs, STACK + 8, s.bytes()[8:], at_entry=False) == [F_TOP, F_END + 0x10]
    assert orc().unwind(regs, STACK + 8, s.bytes()[8:], at_entry=True) == [F_TOP, F_END + 0x8]


def test_truncated_snapshots_give_prefixes():
    regs, stack = sp_chain()
    full = orc().unwind(regs, STACK, stack)
    lengths = set()
    for n in range(0, 80):
        got = orc().unwind(regs, STACK, stack[:n])
        assert got == full[:len(got)]
        lengths.add(len(got))
    assert lengths == {1, 2, 3, 4}


def test_max_frames_and_loops():
    regs, stack = sp_chain()
    assert orc().unwind(regs, STACK, stack, max_frames=2) == SP_CHAIN_PCS[:2]
    assert orc().unwind(regs, STACK, stack, max_frames=1) == SP_CHAIN_PCS[:1]
    # A frame whose CFA does not move the stack up (its return address below
    # the SP, here pointing back at itself) is bad data: no loop, stop.
    rows = ROWS + [(TEXT + 0x780, entry(sp_off=0)), (TEXT + 0x790, entry())]
    s = Stack().put(STACK, TEXT + 0x784).put(STACK + 8, TEXT + 0x784)
    got = orc(rows).unwind({"rip": TEXT + 0x784, "rsp": STACK + 8, "rbp": 0}, STACK, s.bytes(), 64)
    assert got == [TEXT + 0x784]


def test_random_garbage_never_raises():
    rng = random.Random(7)
    u = orc()
    for _ in range(2000):
        words = [rng.choice([rng.getrandbits(64), TEXT + rng.randrange(0x800),
                             STACK + 8 * rng.randrange(64), 0]) for _ in range(64)]
        stack = struct.pack("<64Q", *words)
        regs = {"rip": TEXT + rng.randrange(0x800), "rsp": STACK + 8 * rng.randrange(64),
                "rbp": rng.choice([STACK + 8 * rng.randrange(64), rng.getrandbits(64)]),
                "r10": STACK + 8 * rng.randrange(64)}
        got = u.unwind(regs, STACK, stack, at_entry=rng.random() < 0.5)
        assert 1 <= len(got) <= 16 and got[0] == regs["rip"]


def test_module_tables():
    mod = 0xFFFFFFFFC0001000
    mod_ip_table = 0xFFFFFFFFC0008000
    rows = [(mod, entry()), (mod + 0x10, entry(sp_off=16)), (mod + 0x100, entry(sp_reg=0))]
    mtab = OrcTable.from_relative(mod_ip_table, relative([ip for ip, _ in rows], mod_ip_table),
                                  b"".join(pack_61(e) for _, e in rows))
    u = orc()
    s = Stack().put(STACK, mod + 0x20).put(STACK + 16, F_TOP + 0x18).put(STACK + 40, F_END + 0x8)
    regs = {"rip": F_ALLOC, "rsp": STACK, "rbp": 0}
    assert u.unwind(regs, STACK, s.bytes()) == [F_ALLOC]          # module unknown
    u.set_modules([(ModuleText("m", ((mod, mod + 0x100),)), mtab)])
    assert u.covers(mod + 0x20) and not u.covers(mod + 0x100)
    assert u.unwind(regs, STACK, s.bytes()) == [F_ALLOC, mod + 0x20, F_TOP + 0x18, F_END + 0x8]
    # The module went away: kept for saved traces until new code overlaps it.
    u.set_modules([])
    assert u.module_names == ["m"]
    assert u.unwind(regs, STACK, s.bytes())[:2] == [F_ALLOC, mod + 0x20]
    u.set_modules([(ModuleText("n", ((mod + 0x80, mod + 0x200),)), mtab)])
    assert u.module_names == ["n"]


# ---------------------------------------------------------------------------
# arm64 frame records

KTEXT = 0xFFFF800008010000
KSTACK = 0xFFFF80000A000000
A_ALLOC, A_F1, A_F2, A_F3 = KTEXT + 0x100, KTEXT + 0x200, KTEXT + 0x300, KTEXT + 0x400


def arm(**kw) -> FrameRecordUnwinder:
    return FrameRecordUnwinder([(KTEXT, KTEXT + 0x1000)], **kw)


def records():
    """x29 -> A_F2's record -> A_F3's record -> the final {0, 0} record."""
    s = bytearray(512)
    struct.pack_into("<QQ", s, 0x40, KSTACK + 0x80, A_F2 + 0x14)
    struct.pack_into("<QQ", s, 0x80, KSTACK + 0x100, A_F3 + 0x18)
    struct.pack_into("<QQ", s, 0x100, 0, 0)
    return {"pc": A_ALLOC, "sp": KSTACK, "x29": KSTACK + 0x40, "x30": A_F1 + 0x10}, bytes(s)


def test_arm64_at_entry_takes_the_link_register_first():
    regs, stack = records()
    assert arm().unwind(regs, KSTACK, stack) == [A_ALLOC, A_F1 + 0x10, A_F2 + 0x14, A_F3 + 0x18]


def test_arm64_blocked_task_context():
    regs, stack = records()
    got = arm().unwind({"pc": A_F1 + 0x40, "sp": KSTACK, "x29": KSTACK + 0x40}, KSTACK, stack,
                       at_entry=False)
    assert got == [A_F1 + 0x40, A_F2 + 0x14, A_F3 + 0x18]


def test_arm64_pointer_authentication_bits_are_stripped():
    regs, stack = records()
    s = bytearray(stack)
    signed = (A_F2 + 0x14) & ~(0x7F << 48) | (0x2A << 48)   # PAC in bits 48-54, bit 55 kept
    struct.pack_into("<Q", s, 0x48, signed)
    regs["x30"] = (A_F1 + 0x10) & ~(0xFF << 48) | (0x5B << 48) | 1 << 55
    u = arm()
    assert u.strip(signed) == A_F2 + 0x14
    assert u.strip(0x0000_7FFF_1234_5678 | 0x12 << 48) == 0x0000_7FFF_1234_5678 & ((1 << 48) - 1)
    assert u.unwind(regs, KSTACK, bytes(s)) == [A_ALLOC, A_F1 + 0x10, A_F2 + 0x14, A_F3 + 0x18]
    # Without stripping (a mask of nothing) those are not kernel text.
    assert arm(pac_mask=0).unwind(regs, KSTACK, bytes(s)) == [A_ALLOC]


def test_arm64_cycles_stop():
    s = bytearray(256)
    struct.pack_into("<QQ", s, 0x40, KSTACK + 0x40, A_F2 + 0x14)          # points at itself
    regs = {"pc": A_ALLOC, "sp": KSTACK, "x29": KSTACK + 0x40, "x30": A_F1 + 0x10}
    assert arm().unwind(regs, KSTACK, bytes(s), max_frames=1000) == [A_ALLOC, A_F1 + 0x10, A_F2 + 0x14]
    struct.pack_into("<QQ", s, 0x40, KSTACK + 0x80, A_F2 + 0x14)          # A -> B -> A
    struct.pack_into("<QQ", s, 0x80, KSTACK + 0x40, A_F3 + 0x18)
    assert arm().unwind(regs, KSTACK, bytes(s), max_frames=1000) == \
        [A_ALLOC, A_F1 + 0x10, A_F2 + 0x14, A_F3 + 0x18]


def test_arm64_misaligned_or_outside_frame_pointers_stop():
    regs, stack = records()
    s = bytearray(stack)
    struct.pack_into("<Q", s, 0x40, KSTACK + 0x84)                        # misaligned next fp
    assert arm().unwind(regs, KSTACK, bytes(s)) == [A_ALLOC, A_F1 + 0x10, A_F2 + 0x14]
    assert arm().unwind({**regs, "x29": KSTACK + 0x44}, KSTACK, stack) == [A_ALLOC, A_F1 + 0x10]
    assert arm().unwind({**regs, "x29": KSTACK - 0x40}, KSTACK, stack) == [A_ALLOC, A_F1 + 0x10]
    assert arm().unwind({**regs, "x30": 0x400000}, KSTACK, stack) == [A_ALLOC]
    del regs["x29"]
    assert arm().unwind(regs, KSTACK, stack) == [A_ALLOC, A_F1 + 0x10]


def test_arm64_truncated_snapshots_and_max_frames():
    regs, stack = records()
    full = arm().unwind(regs, KSTACK, stack)
    seen = set()
    for n in range(0, 0x120, 4):
        got = arm().unwind(regs, KSTACK, stack[:n])
        assert got == full[:len(got)]
        seen.add(len(got))
    assert seen == {2, 3, 4}
    assert arm().unwind(regs, KSTACK, stack, max_frames=3) == full[:3]
    assert arm().unwind(regs, KSTACK, stack, max_frames=1) == full[:1]


def test_arm64_random_garbage_never_raises():
    rng = random.Random(3)
    u = arm()
    for _ in range(2000):
        words = [rng.choice([rng.getrandbits(64), KTEXT + rng.randrange(0x1000),
                             KSTACK + 8 * rng.randrange(64), 0]) for _ in range(64)]
        regs = {"pc": KTEXT, "sp": KSTACK, "x29": KSTACK + 8 * rng.randrange(-4, 68),
                "x30": rng.choice([KTEXT + 0x10, 0])}
        got = u.unwind(regs, KSTACK, struct.pack("<64Q", *words), at_entry=rng.random() < 0.5)
        assert 1 <= len(got) <= 16


# ---------------------------------------------------------------------------
# The factory, over a fake kernel


class FakeTypes:
    OFFSETS = {("struct module", "list"): 0, ("struct module", "name"): 16,
               ("struct module", "percpu"): 80, ("struct module", "percpu_size"): 88,
               ("struct module", "core_layout"): 96, ("struct module", "init_layout"): 160,
               ("struct module_layout", "base"): 0, ("struct module_layout", "text_size"): 12,
               ("struct module_layout", "size"): 8,
               ("struct module", "arch.num_orcs"): 224, ("struct module", "arch.orc_unwind_ip"): 232,
               ("struct module", "arch.orc_unwind"): 240}

    def has_type(self, name):
        return False

    def has_member(self, name, member):
        return (name, member) in self.OFFSETS

    def offsetof(self, name, member):
        return self.OFFSETS[(name, member)]

    def member_size(self, name, member):
        return 56


class FakeKernel:
    """Symbols, types and little-endian memory made of (address, bytes) pieces."""

    def __init__(self, arch, symbols, memory, info=None):
        self.guest = SimpleNamespace(arch=SimpleNamespace(name=arch))
        self.symbols = SimpleNamespace(get=symbols.get)
        self.types = FakeTypes()
        self.memory = memory
        self.vmlinux = None
        self.slide = 0
        self.info = info

    def read(self, address, size):
        for start, data in self.memory:
            if start <= address and address + size <= start + len(data):
                return data[address - start:address - start + size]
        raise QemuleakError(f"unmapped {address:#x}")

    def read_u64(self, address):
        return int.from_bytes(self.read(address, 8), "little")

    def read_u32(self, address):
        return int.from_bytes(self.read(address, 4), "little")

    def vmcoreinfo(self):
        if self.info is None:
            raise QemuleakError("no vmcoreinfo")
        return self.info


MODULES_HEAD = 0xFFFFFFFF83000000


def fake_x86_kernel():
    """ORC tables of the kernel in (fake) guest memory, one module with its own."""
    ips = [ip for ip, _ in ROWS]
    kernel_orc = b"".join(pack_61(e) for _, e in ROWS)
    mod_base, mod_struct = 0xFFFFFFFFC0001000, 0xFFFFFFFFC0100000
    mod_ips_at, mod_orc_at = 0xFFFFFFFFC0008000, 0xFFFFFFFFC0009000
    mrows = [(mod_base, entry()), (mod_base + 0x10, entry(sp_off=16)),
             (mod_base + 0x100, entry(sp_reg=0))]
    module = bytearray(256)
    struct.pack_into("<QQ", module, 0, MODULES_HEAD, MODULES_HEAD)       # list
    module[16:20] = b"modx"
    struct.pack_into("<QII", module, 96, mod_base, 0x4000, 0x100)        # core_layout
    struct.pack_into("<I", module, 224, len(mrows))
    struct.pack_into("<QQ", module, 232, mod_ips_at, mod_orc_at)
    memory = [
        (IP_TABLE, relative(ips) + kernel_orc),
        (MODULES_HEAD, struct.pack("<QQ", mod_struct, mod_struct)),
        (mod_struct, bytes(module)),
        (mod_ips_at, relative([ip for ip, _ in mrows], mod_ips_at)),
        (mod_orc_at, b"".join(pack_61(e) for _, e in mrows)),
    ]
    symbols = {"_stext": TEXT, "_etext": ETEXT, "modules": MODULES_HEAD,
               "__start_orc_unwind_ip": IP_TABLE, "__stop_orc_unwind_ip": IP_TABLE + 4 * len(ips),
               "__start_orc_unwind": IP_TABLE + 4 * len(ips)}
    return FakeKernel("x86_64", symbols, memory), mod_base


def test_factory_x86_reads_kernel_and_module_orc_from_memory():
    kernel, mod = fake_x86_kernel()
    u = unwinder_for(kernel)
    assert isinstance(u, OrcUnwinder) and u.module_names == ["modx"]
    assert len(u.kernel_table) == len(ROWS) and len(u.kernel_table.lookup) > 0
    regs, stack = sp_chain()
    assert u.unwind(regs, STACK, stack) == SP_CHAIN_PCS
    s = Stack().put(STACK, mod + 0x20).put(STACK + 16, F_END + 0x8)
    assert u.unwind(regs, STACK, s.bytes()) == [F_ALLOC, mod + 0x20, F_END + 0x8]


class MemTypes(FakeTypes):
    """6.4+: struct module has mem[7] of struct module_memory {base, size}."""

    OFFSETS = {("struct module", "mem"): 64, ("struct module_memory", "base"): 0,
               ("struct module_memory", "size"): 8}

    def sizeof(self, name):
        return 16


def test_module_text_ranges_core_and_init():
    from qemuleak.unwind import module_text
    core, init = 0xFFFFFFFFC0001000, 0xFFFFFFFFC0020000
    at = 0xFFFFFFFFC0100000
    m = bytearray(256)
    struct.pack_into("<QII", m, 96, core, 0x4000, 0x300)       # core_layout: base size text_size
    struct.pack_into("<QII", m, 160, init, 0x2000, 0x80)       # init_layout (still loading)
    kernel = FakeKernel("x86_64", {}, [(at, bytes(m))])
    module = SimpleNamespace(name="m", address=at)
    assert module_text(kernel, module).ranges == ((core, core + 0x300), (init, init + 0x80))
    struct.pack_into("<Q", m, 160, 0)                          # init freed
    kernel.memory = [(at, bytes(m))]
    assert module_text(kernel, module).ranges == ((core, core + 0x300),)
    # 6.4+: mem[MOD_TEXT] and mem[MOD_INIT_TEXT]; data and rodata are not code.
    m = bytearray(256)
    for index, (base, size) in enumerate([(core, 0x300), (0xFFFFFFFFC0010000, 0x100),
                                          (0xFFFFFFFFC0011000, 0x100), (0, 0), (init, 0x80)]):
        struct.pack_into("<QI", m, 64 + 16 * index, base, size)
    kernel = FakeKernel("x86_64", {}, [(at, bytes(m))])
    kernel.types = MemTypes()
    assert module_text(kernel, module).ranges == ((core, core + 0x300), (init, init + 0x80))


def test_factory_x86_without_orc_tables():
    kernel, _ = fake_x86_kernel()
    kernel.symbols = SimpleNamespace(get={"_stext": TEXT, "_etext": ETEXT}.get)
    with pytest.raises(QemuleakError, match="no ORC"):
        unwinder_for(kernel)


def test_factory_arm64_and_pac_mask_from_vmcoreinfo():
    info = VmcoreInfo.parse("NUMBER(VA_BITS)=48\nNUMBER(KERNELPACMASK)=0xff7f000000000000\n")
    kernel = FakeKernel("arm64", {"_stext": KTEXT, "_etext": KTEXT + 0x1000,
                                  "modules": MODULES_HEAD},
                        [(MODULES_HEAD, struct.pack("<QQ", MODULES_HEAD, MODULES_HEAD))], info)
    u = unwinder_for(kernel)
    assert isinstance(u, FrameRecordUnwinder)
    assert u.pac_mask == 0xFFFF000000000000
    assert u.module_names == []
    regs, stack = records()
    assert u.unwind(regs, KSTACK, stack) == [A_ALLOC, A_F1 + 0x10, A_F2 + 0x14, A_F3 + 0x18]


def test_factory_unknown_arch():
    with pytest.raises(QemuleakError, match="no stack unwinder for riscv64"):
        unwinder_for(FakeKernel("riscv64", {}, []))


def test_decode_matches_numpy_bit_slicing():
    # Every field combination of the 6.1 word decodes to what was packed.
    rng = np.random.default_rng(0)
    rows = [(TEXT + 16 * i, entry(sp_reg=int(rng.integers(1, 10)), sp_off=int(rng.integers(-300, 300)),
                                   bp_reg=int(rng.integers(0, 5)), bp_off=int(rng.integers(-64, 64)),
                                   typ=int(rng.integers(0, 3))))
            for i in range(200)]
    t = table(rows, lookup=False)
    for i, (_, (sp_reg, sp_off, bp_reg, bp_off, typ, _)) in enumerate(rows):
        assert (t.sp_reg[i], t.sp_off[i], t.bp_reg[i], t.bp_off[i], t.kind[i]) == \
            (sp_reg, sp_off, bp_reg, bp_off, typ + KIND_CALL)
