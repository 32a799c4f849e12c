"""The kernel's own symbol table (kallsyms), decoded from kernel memory.

For when there is neither a vmlinux nor a System.map. scripts/kallsyms.c links
these arrays into .rodata (6.1 order; 6.4+ moves offsets and relative base
behind the token index, both are handled):

    kallsyms_offsets        int32[num_syms]     (CONFIG_KALLSYMS_BASE_RELATIVE)
    kallsyms_relative_base  u64
    kallsyms_num_syms       u32
    kallsyms_names          per symbol: length (1 byte, or 2 if >= 0x80: ULEB128),
                            then that many token indices; expanded, the first
                            char is the symbol type
    kallsyms_markers        u32[(num_syms + 255) / 256]: offset of every 256th name
    kallsyms_seqs_of_names  3 bytes per symbol (present in some kernels only)
    kallsyms_token_table    256 NUL-terminated tokens
    kallsyms_token_index    u16[256]: offset of each token in the table

each label aligned to 8 (or 4) bytes. `find_kallsyms` locates them without any
symbol by searching for the token table (its single-character tokens "0".."9"
appear in order), checks it against the token index behind it, then finds
num_syms/names/markers whose sizes all agree with where the token table is.
`decode_kallsyms` is the shortcut when the kallsyms_* addresses are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np

from ..errors import QemuleakError, SymbolError

ReadFn = Callable[[int, int], bytes]

DEFAULT_SPAN = 64 << 20          # how far past the kernel's start to search
CHUNK = 8 << 20                  # bytes per read() call while searching
PAGE = 4096
MAX_SYMS = 1 << 24               # seqs_of_names stores indices in 3 bytes
MAX_NAME = 512                   # longest expanded "type + name" we accept
_DIGITS = b"".join(b"%d\0" % d for d in range(10))
_HINT = "pass a vmlinux or System.map of the guest's kernel instead"
U64 = np.uint64
# Every kallsyms_* symbol decode_kallsyms() may use.
LABELS = ("kallsyms_offsets", "kallsyms_relative_base", "kallsyms_addresses",
          "kallsyms_num_syms", "kallsyms_names", "kallsyms_markers",
          "kallsyms_token_table", "kallsyms_token_index")


class SupportsGet(Protocol):
    def get(self, name: str) -> int | None: ...


@dataclass(frozen=True)
class KallsymsData:
    """Decoded kallsyms, in the kernel's order (ascending address)."""

    addresses: np.ndarray            # uint64, as they are in memory (relocated)
    types: bytes                     # one nm type letter per symbol
    names: list[str]
    absolute: np.ndarray             # bool: per-CPU offsets, not addresses
    relative_base: int | None        # None without CONFIG_KALLSYMS_BASE_RELATIVE
    tables: dict[str, int] = field(default_factory=dict)   # kallsyms_* -> address

    def __len__(self) -> int:
        return len(self.names)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class _Buf:
    """Bytes of kernel memory starting at virtual address `base`."""

    def __init__(self, base: int, data: bytes | bytearray):
        self.base = base
        self.data = data

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def has(self, address: int, size: int) -> bool:
        return self.base <= address and address + size <= self.end and size >= 0

    def get(self, address: int, size: int) -> bytes:
        if not self.has(address, size):
            raise SymbolError(f"kallsyms data at {address:#x} (+{size:#x}) is outside the "
                              "memory read", _HINT)
        off = address - self.base
        return bytes(self.data[off:off + size])

    def array(self, address: int, dtype: str, count: int) -> np.ndarray:
        return np.frombuffer(self.get(address, np.dtype(dtype).itemsize * count), dtype)

    def u64(self, address: int) -> int:
        return int(self.array(address, "<u8", 1)[0])


def _read(read: ReadFn, address: int, size: int) -> bytes | None:
    """read(), or None if that memory cannot be read (or came back short)."""
    try:
        data = read(address, size)
    except QemuleakError:
        return None
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != size:
        return None
    return bytes(data)


def _must_read(read: ReadFn, address: int, size: int, what: str) -> bytes:
    data = _read(read, address, size)
    if data is None:
        raise SymbolError(f"cannot read {what} at {address:#x} (+{size:#x})", _HINT)
    return data


# -- the pieces ---------------------------------------------------------------

def _tokens(buf: _Buf, table: int, index: int) -> list[bytes]:
    """The 256 tokens, checked against the token index."""
    idx = buf.array(index, "<u2", 256).astype(np.int64)
    if idx[0] != 0 or (np.diff(idx) <= 0).any():
        raise SymbolError(f"kallsyms_token_index at {index:#x} is not increasing", _HINT)
    last = buf.get(table + int(idx[255]), min(MAX_NAME, buf.end - table - int(idx[255])))
    nul = last.find(b"\0")
    if nul < 0:
        raise SymbolError(f"kallsyms_token_table at {table:#x}: last token has no end", _HINT)
    raw = np.frombuffer(buf.get(table, int(idx[255]) + nul + 1), np.uint8)
    # Exactly one NUL per token, where the index says, and ASCII in between.
    nuls = np.flatnonzero(raw == 0)
    if len(nuls) != 256 or (nuls[:-1] != idx[1:] - 1).any() or (raw >= 0x80).any():
        raise SymbolError(f"kallsyms_token_table at {table:#x} does not match its index", _HINT)
    data = raw.tobytes()
    return [data[idx[i]:nuls[i]] for i in range(256)]


def _parse_names(buf: _Buf, names: int, count: int, limit: int,
                 markers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(data offset, length) of each compressed name and the end address.
    With `markers`, every 256th name must start where its marker says."""
    if not buf.has(names, 0) or limit > buf.end or names > limit:
        raise SymbolError(f"kallsyms_names at {names:#x} is outside the memory read", _HINT)
    data = buf.data
    pos = names - buf.base
    lim = limit - buf.base
    start0 = pos
    starts: list[int] = []
    lens: list[int] = []
    add_s, add_l = starts.append, lens.append
    for i in range(count):
        if markers is not None and not i & 0xFF and pos - start0 != markers[i >> 8]:
            raise SymbolError(f"kallsyms_markers[{i >> 8}] does not match kallsyms_names", _HINT)
        if pos >= lim:
            raise SymbolError(f"kallsyms_names at {names:#x} ends after {i} of {count} symbols",
                              _HINT)
        n = data[pos]
        if n & 0x80:                         # "big" symbol: two-byte ULEB128 length
            if pos + 1 >= lim:
                raise SymbolError("kallsyms_names is cut short", _HINT)
            n = (n & 0x7F) | (data[pos + 1] << 7)
            pos += 2
        else:
            pos += 1
        if n == 0:
            raise SymbolError(f"kallsyms_names: symbol {i} has length 0", _HINT)
        add_s(pos)
        add_l(n)
        pos += n
    if pos > lim:
        raise SymbolError(f"kallsyms_names at {names:#x} runs past {limit:#x}", _HINT)
    return (np.asarray(starts, np.int64) - start0, np.asarray(lens, np.int64), buf.base + pos)


def _expand(blob: bytes, starts: np.ndarray, lens: np.ndarray,
            tokens: list[bytes]) -> tuple[bytes, list[str]]:
    """Expand token-compressed names: (types, names)."""
    if len(starts) == 0:
        return b"", []
    src = np.frombuffer(blob, np.uint8)
    total = int(lens.sum())
    first = np.cumsum(lens) - lens
    pos = np.repeat(starts - first, lens) + np.arange(total)
    codes = src[pos]
    tlen = np.array([len(t) for t in tokens], np.int64)
    tstart = np.cumsum(tlen) - tlen
    flat = np.frombuffer(b"".join(tokens) or b"\0", np.uint8)
    clen = tlen[codes]
    out_total = int(clen.sum())
    cfirst = np.cumsum(clen) - clen
    opos = np.repeat(tstart[codes] - cfirst, clen) + np.arange(out_total)
    out = flat[opos] if out_total else np.zeros(0, np.uint8)
    # Expanded length of each name: sum over its tokens.
    name_len = np.add.reduceat(clen, first) if total else np.zeros(len(lens), np.int64)
    if (name_len < 2).any() or (name_len > MAX_NAME).any():
        raise SymbolError("kallsyms_names holds an empty or overlong name", _HINT)
    nstart = np.cumsum(name_len) - name_len
    type_codes = out[nstart]
    letters = ((type_codes | 0x20) >= ord("a")) & ((type_codes | 0x20) <= ord("z"))
    if not letters.all():
        bad = int(np.flatnonzero(~letters)[0])
        raise SymbolError(f"kallsyms_names: symbol {bad} has type {bytes([type_codes[bad]])!r}",
                          _HINT)
    body = np.ones(out_total, bool)
    body[nstart] = False
    if ((out[body] <= 0x20) | (out[body] >= 0x7F)).any():
        raise SymbolError("kallsyms_names holds names with unprintable characters", _HINT)
    text = out.tobytes().decode("ascii")
    names = [text[s + 1:s + n] for s, n in zip(nstart.tolist(), name_len.tolist())]
    return type_codes.tobytes(), names


def _addresses(offsets: np.ndarray, relative_base: int) -> tuple[np.ndarray, np.ndarray]:
    """kernel/kallsyms.c kallsyms_sym_address() for all symbols.

    With CONFIG_KALLSYMS_ABSOLUTE_PERCPU, offsets >= 0 are absolute values
    (per-CPU symbols) and the rest are relative_base - 1 - offset; otherwise all
    are unsigned offsets from relative_base. The two are told apart by
    presence: only the first layout stores negative offsets (a kernel image is
    far smaller than 2 GiB)."""
    off = offsets.astype(np.int64)
    if (off < 0).any():
        absolute = off >= 0
        rel = U64((relative_base - 1) % (1 << 64)) + (-off).astype(U64)
        addr = np.where(absolute, off.astype(U64), rel)
    else:
        absolute = np.zeros(len(off), bool)
        addr = U64(relative_base % (1 << 64)) + off.astype(U64)
    return addr.astype(U64), absolute


def _check_order(addresses: np.ndarray) -> None:
    if len(addresses) > 1 and (addresses[1:] < addresses[:-1]).any():
        bad = int(np.flatnonzero(addresses[1:] < addresses[:-1])[0]) + 1
        raise SymbolError(f"kallsyms addresses are not sorted (symbol {bad})", _HINT)


def _markers(buf: _Buf, address: int, count: int, names_len: int | None = None) -> np.ndarray:
    m = buf.array(address, "<u4", (count + 255) >> 8).astype(np.int64)
    if len(m) and (m[0] != 0 or (np.diff(m) <= 0).any()):
        raise SymbolError(f"kallsyms_markers at {address:#x} are not increasing from 0", _HINT)
    if names_len is not None and len(m) and m[-1] >= names_len:
        raise SymbolError(f"kallsyms_markers at {address:#x} point past kallsyms_names", _HINT)
    return m


# -- known addresses ------------------------------------------------------------

def decode_kallsyms(read: ReadFn, symbols: Mapping[str, int] | SupportsGet) -> KallsymsData:
    """Decode kallsyms whose kallsyms_* addresses are known: `symbols` is a dict
    or anything with .get(name), e.g. a System.map SymbolTable relocated by the
    KASLR slide. Two read() calls."""
    need = ["kallsyms_num_syms", "kallsyms_names", "kallsyms_markers",
            "kallsyms_token_table", "kallsyms_token_index"]
    known = {n: symbols.get(n) for n in LABELS}
    relative = known["kallsyms_offsets"] is not None and known["kallsyms_relative_base"] is not None
    need += ["kallsyms_offsets", "kallsyms_relative_base"] if relative else ["kallsyms_addresses"]
    missing = [n for n in need if known[n] is None]
    if missing:
        raise SymbolError(f"no address for {', '.join(missing)}",
                          "give the kallsyms_* symbols, or search with find_kallsyms()")
    at = {n: int(known[n]) for n in need}
    if not all(0 <= a < 1 << 64 for a in at.values()):
        raise SymbolError("kallsyms_* addresses out of range", _HINT)
    count = int(np.frombuffer(_must_read(read, at["kallsyms_num_syms"], 4, "kallsyms_num_syms"),
                              "<u4")[0])
    if not 0 < count < MAX_SYMS:
        raise SymbolError(f"kallsyms_num_syms is {count}", _HINT)
    extent = {"kallsyms_num_syms": 4, "kallsyms_token_index": 512,
              "kallsyms_markers": 4 * ((count + 255) >> 8), "kallsyms_relative_base": 8,
              "kallsyms_offsets": 4 * count, "kallsyms_addresses": 8 * count}
    lo = min(at.values())
    hi = max(a + extent.get(n, 0) for n, a in at.items())
    if hi - lo > DEFAULT_SPAN:
        raise SymbolError(f"kallsyms tables span {hi - lo:#x} bytes: addresses inconsistent", _HINT)
    buf = _Buf(lo, _must_read(read, lo, hi - lo, "kallsyms tables"))
    return _decode(buf, at, count)


def _decode(buf: _Buf, at: dict[str, int], count: int,
            markers: np.ndarray | None = None) -> KallsymsData:
    """Decode from memory holding all tables at the addresses in `at`."""
    tokens = _tokens(buf, at["kallsyms_token_table"], at["kallsyms_token_index"])
    names_at, markers_at = at["kallsyms_names"], at["kallsyms_markers"]
    limit = markers_at if markers_at > names_at else buf.end
    if markers is None:
        markers = _markers(buf, markers_at, count, limit - names_at)
    starts, lens, _ = _parse_names(buf, names_at, count, limit, markers)
    types, names = _expand(buf.get(names_at, limit - names_at), starts, lens, tokens)
    if "kallsyms_offsets" in at:
        base = buf.u64(at["kallsyms_relative_base"])
        addresses, absolute = _addresses(buf.array(at["kallsyms_offsets"], "<i4", count), base)
    else:
        base = None
        addresses = buf.array(at["kallsyms_addresses"], "<u8", count).astype(U64)
        absolute = np.zeros(count, bool)
    _check_order(addresses)
    return KallsymsData(addresses, types, names, absolute, base, dict(at))


# -- search ---------------------------------------------------------------------

def find_kallsyms(read: ReadFn, ranges: Iterable[tuple[int, int]] | tuple[int, int], *,
                  chunk_size: int = CHUNK) -> KallsymsData:
    """Find and decode kallsyms in kernel memory with no symbols at all.

    `ranges` are (start, size) areas of kernel virtual memory to search, e.g.
    (_text, DEFAULT_SPAN); they are read front to back in `chunk_size` pieces
    and the search stops at the first table that checks out. Unreadable parts
    are skipped (the tables must lie in one readable stretch)."""
    if isinstance(ranges, tuple) and len(ranges) == 2 and isinstance(ranges[0], int):
        ranges = [ranges]
    ranges = [(int(s), int(z)) for s, z in ranges]
    chunk_size = max(int(chunk_size), 1 << 16)
    tries = 0
    for start, size in ranges:
        seg: _Buf | None = None
        scanned = 0                       # offset in seg up to which we searched
        pending: list[int] = []           # hits waiting for more data behind them
        prev_ok = True
        for off in range(0, size, chunk_size):
            pieces = _read_chunk(read, start + off, min(chunk_size, size - off), prev_ok)
            prev_ok = pieces[-1][1] is not None
            last_chunk = off + chunk_size >= size
            for i, (at, piece) in enumerate(pieces):
                if seg is not None and piece is not None and at == seg.end:
                    seg.data += piece
                    continue
                if seg is not None:       # the stretch ends here: search what is left
                    result, n = _search(read, seg, scanned, pending, final=True)
                    tries += n
                    if result:
                        return result
                seg, scanned, pending = None, 0, []
                if piece is not None:
                    seg = _Buf(at, bytearray(piece))
            if seg is not None:
                result, n = _search(read, seg, scanned, pending, final=last_chunk)
                tries += n
                if result:
                    return result
                scanned = max(0, len(seg.data) - len(_DIGITS) + 1)
    what = ", ".join(f"{s:#x}+{z:#x}" for s, z in ranges)
    detail = f" ({tries} candidate token tables did not check out)" if tries else ""
    raise SymbolError(f"no kallsyms tables found in {what}{detail}", _HINT)


def _read_chunk(read: ReadFn, address: int, size: int,
                prev_ok: bool) -> list[tuple[int, bytes | None]]:
    """Read [address, +size) as (address, bytes or None if unreadable) pieces:
    one read if it works, else 16; where readable memory ends inside a piece,
    the readable pages at its start are found by bisection."""
    data = _read(read, address, size)
    if data is not None or size <= PAGE:
        return [(address, data)]
    step = _align(-(-size // 16), PAGE)
    out: list[tuple[int, bytes | None]] = []
    for at in range(address, address + size, step):
        n = min(step, address + size - at)
        piece = _read(read, at, n)
        if piece is None and prev_ok and n > PAGE:
            lo, hi, best = 0, n // PAGE, b""     # lo pages readable, hi not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                got = _read(read, at, mid * PAGE)
                if got is None:
                    hi = mid
                else:
                    lo, best = mid, got
            if best:
                out.append((at, best))
                at += len(best)
                n -= len(best)
        out.append((at, piece))
        prev_ok = piece is not None
    return out


def _search(read: ReadFn, seg: _Buf, scanned: int, pending: list[int],
            final: bool) -> tuple[KallsymsData | None, int]:
    """Look for the token table in `seg` from offset `scanned`; (result, tries)."""
    data = seg.data
    pos = data.find(_DIGITS, scanned)
    while pos >= 0:
        pending.append(pos)
        pos = data.find(_DIGITS, pos + 1)
    tries = 0
    keep = []
    for hit in pending:
        # Tokens '0'.. to the end plus the index behind them: a few KiB.
        if not final and len(data) - hit < 8192:
            keep.append(hit)
            continue
        tries += 1
        try:
            return _from_token_hit(read, seg, seg.base + hit), tries
        except SymbolError:
            continue
    pending[:] = keep
    return None, tries


def _from_token_hit(read: ReadFn, seg: _Buf, digits: int) -> KallsymsData:
    """Everything, given the address of "0\\0" in a candidate token table."""
    # Token '0' is token 0x30: 0xD0 tokens ('0'..0xff) run from here to the table end.
    end = digits
    for _ in range(256 - 0x30):
        nul = seg.data.find(b"\0", end - seg.base, end - seg.base + MAX_NAME)
        if nul < 0:
            raise SymbolError("no token table here", _HINT)
        end = seg.base + nul + 1
    for align in (2, 4, 8):
        index = _align(end, align)
        if not seg.has(index, 512):
            continue
        idx = seg.array(index, "<u2", 256)
        table = digits - int(idx[0x30])
        if idx[0] != 0 or table % 4 or not seg.has(table, 0):
            continue
        try:
            tokens = _tokens(seg, table, index)
        except SymbolError:
            continue
        if tokens[0x30:0x3A] != [b"%d" % d for d in range(10)]:
            continue
        return _locate(read, seg, table, index, tokens)
    raise SymbolError("no token table here", _HINT)


def _locate(read: ReadFn, seg: _Buf, table: int, index: int,
            tokens: list[bytes]) -> KallsymsData:
    """Find num_syms/names/markers ending right before the token table at
    `table`, then the offsets and relative base; decode.

    Every u32 before the table is a kallsyms_num_syms candidate; its value fixes
    where the markers must start (counting back from the table over markers
    and, if present, seqs_of_names), and marker[0] must be 0 there. Candidates
    are scanned in blocks going back from the table, nearest first."""
    # Positions relative to an 8-aligned origin: they fit int64 and keep alignment.
    origin = seg.base - seg.base % 8
    first = (-seg.base) % 4
    words = np.frombuffer(bytes(seg.data[first:table - seg.base]), "<u4")
    word0 = seg.base + first - origin
    rtable = table - origin
    errors: list[SymbolError] = []
    block = 1 << 18
    for hi in range(len(words), 0, -block):
        lo = max(0, hi - block)
        v = words[lo:hi].astype(np.int64)
        plausible = np.flatnonzero((v > 0) & (v < MAX_SYMS))
        cand_rel = word0 + 4 * (lo + plausible)
        count = v[plausible]
        nmark = (count + 255) >> 8
        for align in (8, 4):
            if table % align:
                continue
            for seqs in (True, False):
                mk = rtable - _alignv(4 * nmark, align) - (_alignv(3 * count, align) if seqs else 0)
                names = _alignv(cand_rel + 4, align)
                ok = (mk - names >= 2 * count) & (mk - names <= count * (MAX_NAME + 2))
                k = (mk - word0) // 4
                ok &= (k >= 0) & (k + nmark <= len(words))
                kk = np.where(ok, k, 0)
                ok &= words[kk] == 0                                 # marker[0] == 0
                last = words[np.where(ok, kk + nmark - 1, 0)]
                ok &= last < mk - names                             # inside names
                second = words[np.where(ok & (nmark > 1), kk + 1, 0)]
                ok &= (nmark == 1) | ((second >= 512) & (second <= 256 * (MAX_NAME + 2)))
                for i in np.flatnonzero(ok)[::-1][:64].tolist():
                    try:
                        return _try_layout(read, seg, table, index, tokens,
                                           origin + int(cand_rel[i]), int(count[i]),
                                           origin + int(mk[i]), align, seqs)
                    except SymbolError as e:
                        errors.append(e)
    raise errors[0] if errors else SymbolError("no kallsyms_names before the token table", _HINT)


def _alignv(x: np.ndarray, a: int) -> np.ndarray:
    return (x + a - 1) // a * a


def _try_layout(read: ReadFn, seg: _Buf, table: int, index: int, tokens: list[bytes],
                num_syms: int, count: int, markers_at: int, align: int,
                seqs: bool) -> KallsymsData:
    names_at = _align(num_syms + 4, align)
    markers = _markers(seg, markers_at, count, markers_at - names_at)
    starts, lens, end = _parse_names(seg, names_at, count, markers_at, markers)
    if _align(end, align) != markers_at or any(seg.get(end, markers_at - end)):
        raise SymbolError("kallsyms_names does not end at kallsyms_markers", _HINT)
    at = {"kallsyms_num_syms": num_syms, "kallsyms_names": names_at,
          "kallsyms_markers": markers_at, "kallsyms_token_table": table,
          "kallsyms_token_index": index}
    if seqs:
        seq_at = _align(markers_at + 4 * len(markers), align)
        raw = np.frombuffer(seg.get(seq_at, 3 * count), np.uint8).reshape(-1, 3).astype(np.int64)
        seq = (raw[:, 0] << 16) | (raw[:, 1] << 8) | raw[:, 2]
        if (seq >= count).any() or not np.bincount(seq, minlength=count).all():
            raise SymbolError("kallsyms_seqs_of_names is not a permutation", _HINT)
        at["kallsyms_seqs_of_names"] = seq_at
    types, names = _expand(seg.get(names_at, markers_at - names_at), starts, lens, tokens)
    # Offsets and relative base: before num_syms (<= 6.3) or after the token index.
    errors = []
    for base_at in (num_syms - 8, None):
        try:
            if base_at is not None:
                offsets_at = base_at - _align(4 * count, align)
                buf = seg
            else:
                offsets_at = _align(index + 512, align)
                base_at = _align(offsets_at + 4 * count, align)
                buf = _extended(read, seg, base_at + 8)
            if base_at % align or not buf.has(offsets_at, 4 * count + 8):
                raise SymbolError("no kallsyms_offsets here", _HINT)
            base = buf.u64(base_at)
            # The tables are in the image, so within 4 GiB above the base.
            if not base <= table < base + (1 << 32):
                raise SymbolError(f"kallsyms_relative_base {base:#x} is not below the tables "
                                  f"at {table:#x}", _HINT)
            addresses, absolute = _addresses(buf.array(offsets_at, "<i4", count), base)
            _check_order(addresses)
        except SymbolError as e:
            errors.append(e)
            continue
        at.update(kallsyms_offsets=offsets_at, kallsyms_relative_base=base_at)
        return KallsymsData(addresses, types, names, absolute, base, at)
    raise errors[0]


def _extended(read: ReadFn, seg: _Buf, end: int) -> _Buf:
    """`seg`, read on to at least `end` if needed (one read)."""
    if end <= seg.end:
        return seg
    if end - seg.end > DEFAULT_SPAN:
        raise SymbolError("kallsyms_offsets would be too far away", _HINT)
    more = _read(read, seg.end, end - seg.end)
    if more is None:
        raise SymbolError("cannot read kallsyms_offsets after the token index", _HINT)
    return _Buf(seg.base, bytes(seg.data) + more)
