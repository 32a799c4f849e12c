"""kmemleak's gray-list algorithm over a RAM copy, vectorized with numpy.

Objects are [start, end) ranges of kernel addresses; what they contain is given as
segments (owner, offset, length) into the RAM copy, found by the caller. Roots are
segments too (kernel data, stacks, ...) plus loose words (vCPU registers). Every
8-byte-aligned word is compared against all objects at once: a word pointing
anywhere inside an object (interior pointers count) adds one reference; an object
with `min_count` references turns gray, and gray objects are scanned in turn, in
waves, until none turns gray. What stays white is unreferenced.

Root words that lie inside an object's own contents are not roots (they are scanned
when, and if, their object turns gray), and a word never references its own object.

Speed (a scan is mostly memory traffic): words are taken in chunks that fit in the
caches; per chunk, a range check or two keep the few words that may point into an
object, and per-page tables (Matcher) find their objects without binary search.
Root segments are cut around object contents beforehand. All objects' words are
matched in one pass, over long runs of RAM rather than object by object, into a
graph of references; the waves follow the graph instead of reading RAM again.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

U64 = np.uint64
_CLUSTER_GAP = 1 << 30        # objects further apart than this get separate page maps
_BITMAP_LIMIT = 1 << 28       # pages per page map (more: binary search only)
_TABLE_LIMIT = 1 << 24        # pages per granule table (more: page map + binary search)
_CHUNK_WORDS = 1 << 18        # words compared per step: 2 MiB, temporaries stay in cache
_COPY_WORDS = 1 << 9          # shorter ranges are gathered word by word, longer copied
_SLICE_WORDS = 1 << 16        # _words: segments at least this long are scanned in place
_GAP_WORDS = 1 << 9          # _edges: objects this close are scanned as one run
_SEARCH = 13                  # page code: objects too close together, binary search
_FEW = 16                     # waves from this few objects go element by element


@dataclass
class Segments:
    """Pieces of the RAM copy: `length` bytes at `offset`, belonging to `owner`
    (an object index, or -1 for roots)."""

    owner: np.ndarray     # int64
    offset: np.ndarray    # int64
    length: np.ndarray    # int64

    @classmethod
    def empty(cls) -> "Segments":
        z = np.zeros(0, np.int64)
        return cls(z, z.copy(), z.copy())

    @classmethod
    def of(cls, owner, offset, length) -> "Segments":
        return cls(*(np.asarray(a, np.int64).reshape(-1) for a in (owner, offset, length)))

    @classmethod
    def concat(cls, parts: list["Segments"]) -> "Segments":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("owner", "offset", "length")))

    def __len__(self) -> int:
        return len(self.owner)

    def select(self, mask: np.ndarray) -> "Segments":
        return Segments(self.owner[mask], self.offset[mask], self.length[mask])

    @property
    def bytes(self) -> int:
        return int(self.length.sum())


class _Cluster:
    """Objects a..b-1, all inside [base, base + span) (base page-aligned), and a
    lookup of the object a word points into without binary search.

    Each page some object overlaps is cut into equal power-of-two granules, small
    enough that at most one object starts in each. A granule's record names the
    last object starting before it and where the one starting in it, if any,
    starts: a word from there on can only be in that one, a word before it only in
    the earlier one, and the object's end decides. A word costs a random access to
    a byte-a-page table (most stop there: no object on the page), then one each to
    the page table, the granule table and the objects' ends."""

    def __init__(self, m: "Matcher", a: int, b: int, base: int, span: int):
        self.low, self.high = base, base + span
        self.base, self.span = U64(base), U64(span)
        self.used = None      # bool per page, and False for any page beyond: any object
        # int64 per page: an offset << 6 | its granules' log2 size, such that a word's
        # granule is (word as int64 >> size) + offset (_SEARCH: binary search)
        self.page = None
        # int64 per granule: (index + 1 of the last object starting before it) << 13
        # | offset in the page of the object starting in it (4096: none)
        self.granule = None
        self.search = False   # any _SEARCH page
        pages = (span + 0xFFF) >> 12
        if pages > _BITMAP_LIMIT:
            return
        s = m.starts[a:b] - self.base
        page = (s >> U64(12)).astype(np.int64)
        last_page = ((np.maximum(m.ends[a:b], m.starts[a:b] + U64(1)) - self.base - U64(1))
                     >> U64(12)).astype(np.int64)
        # pages some object overlaps: merge the objects' page ranges, mark their edges
        reach = np.maximum.accumulate(last_page)
        new = np.ones(len(page), bool)
        new[1:] = page[1:] > reach[:-1] + 1
        edges = np.zeros(pages + 1, np.int8)
        edges[page[new]] = 1
        edges[reach[np.append(np.flatnonzero(new)[1:] - 1, len(page) - 1)] + 1] = -1
        touched = np.cumsum(edges[:-1], dtype=np.int8) > 0
        del edges
        self.used = np.append(touched, False)
        if pages > _TABLE_LIMIT:                       # binary search only
            self.search = True
            return
        # per page: log2 of its granule size (12: one granule), _SEARCH, or -1: no
        # object. Pages with object starts: the closest two starts' distance,
        # rounded down to a power of two; pages that would need many more granules
        # than they have objects (or hold equal starts) take the binary search.
        code = np.where(touched, 12, -1)
        new = np.ones(len(page), bool)
        new[1:] = page[1:] != page[:-1]
        group = np.flatnonzero(new)
        gap = np.full(len(page), 4096, np.int64)
        gap[1:] = np.where(new[1:], 4096, np.diff(s.view(np.int64)))
        gap = np.minimum.reduceat(gap, group)
        count = np.diff(np.append(group, len(page)))
        shift = np.minimum(np.floor(np.log2(np.maximum(gap, 1))), 12).astype(np.int64)
        regular = (gap > 0) & ((4096 >> shift) <= 8 * count + 64)
        code[page[group]] = np.where(regular, shift, _SEARCH)
        tabled = np.flatnonzero((code >= 0) & (code != _SEARCH))
        self.search = len(tabled) < int(touched.sum())
        shift = code.take(tabled)
        sizes = 1 << (12 - shift)                      # granules per page
        offsets = np.cumsum(sizes) - sizes
        total = int(sizes.sum())                       # < 8 * objects + 65 * pages
        # page entries: pages without granules read the spare last granule, which
        # names no object (k = 0); a _SEARCH page's words are then redone
        address = np.arange(pages, dtype=np.int64) << 12
        address += base - (1 << 64) if base >> 63 else base        # as int64
        size = np.where(code == _SEARCH, _SEARCH, 12)
        size[tabled] = shift
        at = np.full(pages, total, np.int64)
        at[tabled] = offsets
        self.page = ((at - (address >> size)) << 6) | size
        # granule records
        before = np.cumsum(np.bincount(page, minlength=pages)) + a   # objects up to each page
        before = np.concatenate(([a], before[:-1]))
        code = code.take(page)
        mine = np.flatnonzero((code >= 0) & (code != _SEARCH))      # objects on tabled pages
        inpage = (s.take(mine) & U64(0xFFF)).astype(np.int64)
        start_at = at.take(page.take(mine)) + (inpage >> code.take(mine))
        has = np.zeros(total, np.int64)
        has[start_at] = 1
        seen = np.cumsum(has)                          # starts in the page up to each granule
        seen -= np.repeat(seen.take(offsets) - has.take(offsets), sizes)
        seen -= has
        seen += np.repeat(before.take(tabled), sizes)  # objects starting before each granule
        self.granule = np.full(total + 1, 4096, np.int64)
        record = self.granule[:total]
        record[start_at] = inpage
        record |= seen << 13

    def lookup(self, m: "Matcher", w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices in `w`, object indices) of the words `w` inside an object."""
        d = w - self.base
        if self.used is None:
            sel = (d < self.span).nonzero()[0]
            hit, obj = m.bisect(w.take(sel))
            return sel.take(hit), obj
        # most words point to pages without objects: a byte a page tells, and is
        # more likely in cache than the page table (words beyond the cluster read the
        # byte after its last page)
        page = (d >> U64(12)).view(np.int64)
        sel = self.used.take(page, mode="clip").nonzero()[0]
        if not len(sel) or self.page is None:
            hit, obj = m.bisect(w.take(sel))
            return sel.take(hit), obj
        w = w.take(sel)
        entry = self.page.take(page.take(sel))
        size = entry & 63
        signed = w.view(np.int64)
        record = self.granule.take((signed >> size) + (entry >> 6))
        k = record >> 13                           # the last object starting before + 1
        k += (signed & 0xFFF) >= (record & 0x1FFF)    # or the one starting in the granule
        hit = (w < m.ends1.take(k)).nonzero()[0]
        found, obj = sel.take(hit), k.take(hit) - 1
        if self.search:
            redo = (size == _SEARCH).nonzero()[0]      # their records name no object
            if len(redo):
                hit, o = m.bisect(w.take(redo))
                found = np.concatenate((found, sel.take(redo.take(hit))))
                obj = np.concatenate((obj, o))
        return found, obj


class Matcher:
    """Which object, if any, each word points into: the last object starting at
    or before the word, if the word is before its end."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        self.starts = np.asarray(starts, U64)
        self.ends = np.asarray(ends, U64)
        if len(self.starts) > 1 and np.any(self.starts[1:] < self.starts[:-1]):
            raise ValueError("objects must be in address order")
        self._bounds = None   # see check
        self.ends1 = np.concatenate((np.zeros(1, U64), self.ends))   # [k]: object k - 1's end
        self.clusters: list[_Cluster] = []
        # neighbouring clusters in the same half of the address space share one range
        # check (what lies between them, kernel text or vmemmap, is rare): [low,
        # high) and its clusters
        self.ranges: list[tuple[int, int, list[_Cluster]]] = []
        self._scratch = threading.local()    # per thread: buffers for match
        n = len(self.starts)
        if not n:
            return
        reach = np.maximum.accumulate(np.maximum(self.ends, self.starts + U64(1)))
        # at least a page apart, so that the clusters' page-aligned ranges are disjoint
        gap = U64(max(_CLUSTER_GAP, 1 << 12))
        after = self.starts[1:] > reach[:-1]
        cuts = np.flatnonzero(after & (self.starts[1:] - reach[:-1] > gap)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):
            base = int(self.starts[a]) & ~0xFFF
            top = int(reach[b - 1])
            c = _Cluster(self, a, b, base, top - base)
            self.clusters.append(c)
            if self.ranges and self.ranges[-1][0] >> 48 == (top - 1) >> 48:
                self.ranges[-1] = (self.ranges[-1][0], top, self.ranges[-1][2] + [c])
            else:
                self.ranges.append((base, top, [c]))
        self._checks = [(U64(lo), U64(hi - lo), cs) for lo, hi, cs in self.ranges]

    def search(self, w: np.ndarray) -> np.ndarray:
        """How many objects start at or before each word (binary search)."""
        if len(w) < 64:
            return np.searchsorted(self.starts, w, "right")
        # sorted keys search much faster: each starts where the last one ended
        order = np.argsort(w)
        k = np.empty(len(w), np.int64)
        k[order] = np.searchsorted(self.starts, w.take(order), "right")
        return k

    def bisect(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices in `w`, object indices) of the words inside an object, by
        binary search."""
        return self.check(w, self.search(w))

    def check(self, w: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices in `w`, object indices) of the words inside an object, given
        `k` >= how many objects start at or before each, and at most one more."""
        if self._bounds is None:
            # per object k + 1: its start, its end and the end of object k - 1;
            # row 0 is "no object", so k needs no bounds check (a row: one cache miss)
            bounds = np.zeros((len(self.starts) + 1, 3), U64)
            bounds[1:, 0] = self.starts
            bounds[1:, 1] = self.ends
            bounds[1:, 2] = bounds[:-1, 1]
            self._bounds = bounds           # whole, for threads that look meanwhile
        row = self._bounds.take(k, axis=0)
        back = row[:, 0] > w                      # counted one too many
        hit = (w < np.where(back, row[:, 2], row[:, 1])).nonzero()[0]
        return hit, k.take(hit) - back.take(hit) - 1

    def match(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `words`, object indices) of the words inside an object."""
        if not self.clusters or not len(words):
            z = np.zeros(0, np.int64)
            return z, z.copy()
        n = len(words)
        buffers = getattr(self._scratch, "buffers", None)
        if buffers is None or len(buffers[0]) < n:
            buffers = self._scratch.buffers = np.empty(n, U64), np.empty(n, bool)
        diff, mask = buffers[0][:n], buffers[1][:n]
        found_pos, found_obj = [], []
        for low, span, clusters in self._checks:
            np.subtract(words, low, out=diff)
            np.less(diff, span, out=mask)
            if not mask.any():                  # most chunks have no per-CPU words
                continue
            pos = mask.nonzero()[0]
            w = words.take(pos)
            if len(clusters) > 1:                # skip clusters no word is near
                least, most = int(w.min()), int(w.max())
                clusters = [c for c in clusters if c.low <= most and least < c.high]
            for c in clusters:
                sel, obj = c.lookup(self, w)
                found_pos.append(pos.take(sel))
                found_obj.append(obj)
        if len(found_pos) == 1:
            return found_pos[0], found_obj[0].astype(np.int64)
        if not found_pos:
            z = np.zeros(0, np.int64)
            return z, z.copy()
        return np.concatenate(found_pos), np.concatenate(found_obj).astype(np.int64)


def _word_range(segments: Segments) -> tuple[np.ndarray, np.ndarray]:
    """[first, last) word indices of the aligned words of each segment."""
    return (segments.offset + 7) >> 3, (segments.offset + segments.length) >> 3


def _chunks(ram64: np.ndarray, first: np.ndarray, last: np.ndarray, owner: np.ndarray | None):
    """Yield (words, owners) for the words [first, last) of each range, in chunks of
    at most _CHUNK_WORDS: whole chunks of long ranges as slices of the RAM copy
    (`owners` is then that range's owner), the rest packed together, so that each
    step has plenty of words (`owners` per word). Without `owner`, owners are None."""
    count = np.maximum(last - first, 0)
    whole = count // _CHUNK_WORDS
    for i in np.flatnonzero(whole).tolist():
        o = None if owner is None else int(owner[i])
        lo = int(first[i])
        for lo in range(lo, lo + int(whole[i]) * _CHUNK_WORDS, _CHUNK_WORDS):
            yield ram64[lo:lo + _CHUNK_WORDS], o
    first = first + whole * _CHUNK_WORDS
    count = count - whole * _CHUNK_WORDS
    rest = np.flatnonzero(count)
    if not len(rest):
        return
    first, count = first[rest], count[rest]
    owner = None if owner is None else owner[rest]
    cum = np.cumsum(count)
    step = np.arange(min(_CHUNK_WORDS, int(cum[-1])))   # word n of a pack of ranges: step[n]
    start = 0
    while start < len(rest):
        stop = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + _CHUNK_WORDS, "right"))
        yield _pack(ram64, first[start:stop], count[start:stop],
                    None if owner is None else owner[start:stop], step)
        start = stop


def _pack(ram64: np.ndarray, f: np.ndarray, n: np.ndarray, owner: np.ndarray | None,
          step: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The words of ranges [f, f + n) one after the other, and their owners."""
    # long ranges copied slice by slice, short ones gathered with an index
    copy = n >= _COPY_WORDS
    if copy.all():
        parts = [ram64[lo:hi] for lo, hi in zip(f.tolist(), (f + n).tolist())]
        words = np.concatenate(parts) if len(parts) > 1 else parts[0]
    elif not copy.any():
        index = np.repeat(f - (np.cumsum(n) - n), n)
        index += step[:len(index)]
        words = ram64.take(index)
    else:
        parts = [ram64[lo:hi] for lo, hi in zip(f[copy].tolist(), (f + n)[copy].tolist())]
        fs, ns = f[~copy], n[~copy]
        index = np.repeat(fs - (np.cumsum(ns) - ns), ns)
        index += step[:len(index)]
        words = np.concatenate(parts + [ram64.take(index)])
        if owner is not None:
            owner = np.concatenate((owner[copy], owner[~copy]))
            n = np.concatenate((n[copy], ns))
    return words, None if owner is None else np.repeat(owner, n)


def _words(ram64: np.ndarray, segments: Segments):
    """Yield (words, owners, where) in chunks for the aligned words of `segments`:
    owners per word; `where` the first word's index (an int) for a slice of RAM,
    else the word indices."""
    first, last = _word_range(segments)
    count = np.maximum(last - first, 0)
    big = count >= _SLICE_WORDS
    for i in np.flatnonzero(big).tolist():
        for lo in range(int(first[i]), int(last[i]), _CHUNK_WORDS):
            hi = min(lo + _CHUNK_WORDS, int(last[i]))
            yield ram64[lo:hi], np.full(hi - lo, segments.owner[i], np.int64), lo
    small = np.flatnonzero(~big & (count > 0))
    if not len(small):
        return
    cum = np.cumsum(count[small])
    start = 0
    while start < len(small):
        stop = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + _CHUNK_WORDS, "right"))
        stop = max(stop, start + 1)
        sel = small[start:stop]
        n = count[sel]
        total = int(n.sum())
        base = np.repeat(first[sel] - np.concatenate(([0], np.cumsum(n)[:-1])), n)
        index = base + np.arange(total, dtype=np.int64)
        yield ram64[index], np.repeat(segments.owner[sel], n), index
        start = stop


def _minus(first: np.ndarray, last: np.ndarray, cut: Segments) -> tuple[np.ndarray, np.ndarray]:
    """The word ranges [first, last), each without the words that start inside a
    `cut` segment: as [first, last) of the pieces left, in order."""
    lo, hi = (cut.offset + 7) >> 3, (cut.offset + cut.length + 7) >> 3
    keep = (cut.length > 0) & (hi > lo)
    lo, hi = lo[keep], hi[keep]
    if not len(lo):
        return first, last
    order = np.argsort(lo, kind="stable")
    lo, top = lo[order], np.maximum.accumulate(hi[order])
    new = np.ones(len(lo), bool)
    new[1:] = lo[1:] > top[:-1]
    ends = np.append(np.flatnonzero(new)[1:] - 1, len(lo) - 1)
    lo, hi = lo[new], top[ends]                    # the union, as disjoint sorted ranges
    j0 = np.searchsorted(hi, first, "right")       # first cut ending after `first`
    j1 = np.searchsorted(lo, last, "left")         # cuts before j1 start before `last`
    m = np.maximum(j1 - j0, 0)                     # a range with m cuts has m + 1 pieces
    seg = np.repeat(np.arange(len(first)), m + 1)
    k = np.arange(len(seg)) - np.repeat(np.cumsum(m + 1) - (m + 1), m + 1)
    j = j0[seg] + k
    a = np.where(k == 0, first[seg], hi[np.maximum(j - 1, 0)])
    b = np.where(k == m[seg], last[seg], lo[np.minimum(j, len(lo) - 1)])
    a = np.maximum(a, first[seg])
    b = np.minimum(b, last[seg])
    ok = b > a
    return a[ok], b[ok]


@dataclass
class Result:
    counts: np.ndarray        # references found per object (capped at nothing)
    gray: np.ndarray          # bool per object: reached
    bytes_scanned: int
    waves: int
    # every reference between objects: (source, target) object indices, by source
    src: np.ndarray = field(repr=False, default=None)
    dst: np.ndarray = field(repr=False, default=None)
    threads: int = 1          # threads the matching ran on


def _same(words):
    return words


def _references(matcher: Matcher, ram64: np.ndarray, first: np.ndarray, last: np.ndarray,
                owner: np.ndarray, untag):
    """Yield, per chunk, (owner, object) of the words in [first, last) pointing into
    an object other than their owner (owner: an int for a chunk of one range)."""
    for words, owners in _chunks(ram64, first, last, owner):
        pos, obj = matcher.match(untag(words))
        if isinstance(owners, int):
            yield owners, obj.take((obj != owners).nonzero()[0])
        else:
            owners = owners.take(pos)
            keep = (obj != owners).nonzero()[0]
            yield owners.take(keep), obj.take(keep)


def _edges(matcher: Matcher, ram64: np.ndarray, part: Segments, untag) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of every word in `part`'s segments pointing into another
    object, sorted by source."""
    return _sorted_edges([job() for job in _edge_jobs(matcher, ram64, part, untag, 1)])


def _sorted_edges(found: list[tuple[list, list]]) -> tuple[np.ndarray, np.ndarray]:
    src = [a for s_, _ in found for a in s_]
    dst = [a for _, d in found for a in d]
    if not src:
        z = np.zeros(0, np.int64)
        return z, z.copy()
    src, dst = np.concatenate(src), np.concatenate(dst)
    order = np.argsort(src, kind="stable")       # nearly sorted already: cheap
    return src.take(order), dst.take(order)


def _edge_jobs(matcher: Matcher, ram64: np.ndarray, part: Segments, untag, parts: int) -> list:
    """Functions that together find every edge of `_edges`, each returning (source
    arrays, target arrays), about `parts` of them with equal shares of the words.

    Objects lie close together (a slab's objects are adjacent), so the segments
    are scanned as a few long runs of RAM, gaps included, and each hit is given to
    the segment it lies in, if any: slicing RAM costs far less than gathering
    each object's words. Segments that overlap another one (the same RAM seen at
    two addresses) are scanned on their own."""
    first, last = _word_range(part)
    has = last > first
    first, last, owner = first[has], last[has], part.owner[has]
    order = np.argsort(first, kind="stable")
    first, last, owner = first.take(order), last.take(order), owner.take(order)
    top = np.maximum.accumulate(last) if len(last) else last
    alone = np.zeros(len(first), bool)
    alone[1:] = first[1:] < top[:-1]               # starts inside an earlier one
    alone[:-1] |= first[1:] < last[:-1]            # a later one starts inside it
    jobs = []
    if alone.any():
        args = (matcher, ram64, first[alone], last[alone], owner[alone], untag)
        jobs.append(lambda: _alone_edges(*args))
    first, last, owner = first[~alone], last[~alone], owner[~alone]
    if len(first):
        new = np.ones(len(first), bool)
        new[1:] = first[1:] - last[:-1] > _GAP_WORDS
        run_first = first[new]
        run_last = last[np.append(np.flatnonzero(new)[1:] - 1, len(first) - 1)]
        for rf, rl in _shares(run_first, run_last, parts):
            jobs.append(lambda rf=rf, rl=rl: _run_edges(matcher, ram64, rf, rl, first, last,
                                                        owner, untag))
    return jobs


def _shares(first: np.ndarray, last: np.ndarray, parts: int) -> list:
    """Word ranges [first, last) cut into at most `parts` pieces with about equal
    numbers of words, as (first, last) arrays each; a range may be split."""
    count = np.maximum(last - first, 0)
    total = int(count.sum())
    if parts <= 1 or total < parts:
        return [(first, last)] if total else []
    out, cum = [], np.cumsum(count)
    for k in range(parts):
        lo, hi = total * k // parts, total * (k + 1) // parts   # words of this share
        a = int(np.searchsorted(cum, lo, "right"))
        b = min(int(np.searchsorted(cum, hi, "left")) + 1, len(first))
        f, l_ = first[a:b].copy(), last[a:b].copy()
        f[0] += lo - (int(cum[a - 1]) if a else 0)
        l_[-1] -= int(cum[b - 1]) - hi
        keep = l_ > f
        if keep.any():
            out.append((f[keep], l_[keep]))
    return out


def _alone_edges(matcher, ram64, first, last, owner, untag) -> tuple[list, list]:
    src, dst = [], []
    for o, obj in _references(matcher, ram64, first, last, owner, untag):
        src.append(np.full(len(obj), o, np.int64) if isinstance(o, int) else o)
        dst.append(obj)
    return src, dst


def _run_edges(matcher, ram64, run_first, run_last, first, last, owner, untag) -> tuple[list, list]:
    """The edges from the words of runs [run_first, run_last) of RAM words, each
    hit placed in its segment of [first, last) (sorted), owned by `owner`."""
    src, dst = [], []
    for words, starts, firsts in _runs(ram64, run_first, run_last):
        pos, obj = matcher.match(untag(words))
        if len(starts) == 1:
            at = pos + firsts[0]
        else:
            k = np.searchsorted(starts, pos, "right") - 1
            at = pos - starts.take(k) + firsts.take(k)
        # place the hits among the segments of this stretch of RAM only: it starts
        # where a run does, so in or after segment `lo`
        lo = int(np.searchsorted(first, firsts[0], "right")) - 1
        hi = int(np.searchsorted(first, firsts[-1] + len(words) - starts[-1], "left"))
        seg = np.searchsorted(first[lo:hi], at, "right") + (lo - 1)
        o = owner.take(seg)
        keep = ((at < last.take(seg)) & (obj != o)).nonzero()[0]
        src.append(o.take(keep))
        dst.append(obj.take(keep))
    return src, dst


def _runs(ram64: np.ndarray, first: np.ndarray, last: np.ndarray):
    """Yield (words, starts, firsts) for the words [first, last) of the ranges, in
    order, in chunks of at most _CHUNK_WORDS: each chunk is one slice of RAM or
    several joined (a match call costs more than copying a few thousand words);
    its piece i starts at `starts[i]` in `words` and is RAM word `firsts[i]` on."""
    pieces, size = [], 0
    for lo, hi in zip(first.tolist(), last.tolist()):
        for a in range(lo, hi, _CHUNK_WORDS):
            b = min(a + _CHUNK_WORDS, hi)
            if size + b - a > _CHUNK_WORDS and pieces:
                yield _joined(ram64, pieces)
                pieces, size = [], 0
            pieces.append((a, b))
            size += b - a
    if pieces:
        yield _joined(ram64, pieces)


def _joined(ram64: np.ndarray, pieces: list[tuple[int, int]]):
    firsts = np.array([a for a, _ in pieces], np.int64)
    counts = np.array([b - a for a, b in pieces], np.int64)
    words = ram64[pieces[0][0]:pieces[0][1]] if len(pieces) == 1 else \
        np.concatenate([ram64[a:b] for a, b in pieces])
    return words, np.cumsum(counts) - counts, firsts


THREADS = None     # threads for a scan; None: as many as idle CPUs (see _idle_cpus)


def _idle_cpus(cpus: int | None = None, loadavg: str | None = None) -> int:
    """The host's CPUs that nothing else runs on now, 1 to 4: QEMU runs a thread
    per busy vCPU beside the scan (on 2 CPUs with a busy guest a second thread
    made scans slower and erratic; with an idle one, 20% faster). From the
    kernel's count of runnable tasks in /proc/loadavg, this one included."""
    cpus = cpus or len(os.sched_getaffinity(0))
    try:
        if loadavg is None:
            with open("/proc/loadavg") as f:
                loadavg = f.read()
        running = int(loadavg.split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return max(1, min(cpus // 2, 4))
    return max(1, min(cpus - max(running - 1, 0), 4))


def _in_threads(jobs: list, threads: int) -> list:
    """Each job's result, the jobs run on up to `threads` threads."""
    if threads <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda job: job(), jobs))


# glibc's malloc options (malloc.h): sizes from which memory is mapped alone, and
# freed memory at the heap's top from which it goes back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_heap_kept = False


def _keep_freed_memory() -> None:
    """Have malloc keep freed memory for reuse. A scan makes and drops thousands of
    numpy temporaries of 0.1 to 2 MiB; memory handed back to the kernel costs a
    page fault per 4 KiB when used again: 12,000 a scan, a third of the reach
    step, in a process that had not raised glibc's adaptive thresholds."""
    global _heap_kept
    if _heap_kept:
        return
    _heap_kept = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return                                  # no glibc: nothing to tune
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def reachability(ram: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 min_count: np.ndarray, contents: Segments, roots: Segments,
                 root_words: np.ndarray = np.zeros(0, U64), untag=None,
                 scan_contents: np.ndarray | None = None) -> Result:
    """Run the gray-list scan. `ram` is the RAM copy (uint8, 8-aligned length
    not required); `contents` give each object's bytes in it; `roots` the root
    segments (their owners are ignored); `root_words` extra root values;
    `untag(words) -> words` strips pointer tags (arm64); `scan_contents[i]` False
    for objects whose bytes are never scanned (kmemleak_no_scan).

    Every object's contents are matched in one pass first, giving the graph of
    references between objects; the waves then follow it. Waves are as many as the
    longest chain of objects (hundreds, for kernel lists), and scanning each one's
    few objects from RAM cost more than the pass over objects that stay white.
    `bytes_scanned` counts what kmemleak would scan: roots and gray objects."""
    _keep_freed_memory()
    threads = THREADS or _idle_cpus()
    n = len(starts)
    matcher = Matcher(starts, ends)
    ram64 = ram[:len(ram) // 8 * 8].view("<u8")
    untag = untag or _same

    first, last = _word_range(roots)
    scanned = int(np.maximum(last - first, 0).sum()) * 8
    # Words that belong to an object are not roots: leave them out of the ranges
    # (still counted as scanned).
    first, last = _minus(first, last, contents)
    scan_ok = np.ones(n, bool) if scan_contents is None else np.asarray(scan_contents, bool)
    part = contents.select(scan_ok[contents.owner])
    # shares of the roots and of the objects matched side by side (numpy lets go
    # of the interpreter lock while it works); small shares even the threads out
    roots_jobs = [lambda f=f, l_=l_: [matcher.match(untag(words))[1]
                                      for words, _ in _chunks(ram64, f, l_, None)]
                  for f, l_ in _shares(first, last, threads)]
    edge_jobs = _edge_jobs(matcher, ram64, part, untag, 2 * threads)
    done = _in_threads(roots_jobs + edge_jobs, threads)
    hits = [h for found in done[:len(roots_jobs)] for h in found]
    src, dst = _sorted_edges(done[len(roots_jobs):])
    if len(root_words):
        hits.append(matcher.match(untag(np.asarray(root_words, U64)))[1])
    counts = np.bincount(np.concatenate(hits), minlength=n) if hits else np.zeros(n, np.int64)
    first, last = _word_range(part)
    words = np.bincount(part.owner, np.maximum(last - first, 0), minlength=n)
    index = np.arange(n)
    out_lo = np.searchsorted(src, index, "left")
    out_n = np.searchsorted(src, index, "right") - out_lo

    min_count = np.asarray(min_count, np.int64)
    gray = (min_count == 0) | (counts >= min_count) & (min_count > 0)
    frontier = np.flatnonzero(gray)
    slot = np.zeros(n, np.int64)                 # scratch: finds repeats in a wave
    waves = 0
    while len(frontier):
        waves += 1
        if len(frontier) <= _FEW:
            frontier = _few_wave(frontier, out_lo, out_n, dst, counts, min_count, gray)
            continue
        m = out_n.take(frontier)
        sel = np.repeat(out_lo.take(frontier) - (np.cumsum(m) - m), m)
        sel += np.arange(len(sel))
        hit = dst.take(sel)
        if len(hit) > n // 8:
            times = np.bincount(hit, minlength=n)
            counts += times
            hit = np.flatnonzero(times)
        else:
            np.add.at(counts, hit, 1)
        mc = min_count.take(hit)
        frontier = hit[~gray.take(hit) & (counts.take(hit) >= mc) & (mc > 0)]
        # once each (without sorting): the last of equal entries wins the slot
        order = np.arange(len(frontier))
        slot[frontier] = order
        frontier = frontier[slot.take(frontier) == order]
        gray[frontier] = True
    scanned += int(words[gray].sum()) * 8
    return Result(counts, gray, scanned, waves, src, dst, threads)


def _few_wave(frontier: np.ndarray, out_lo, out_n, dst, counts, min_count, gray) -> np.ndarray:
    """One wave from a few objects, element by element: the long tail of waves
    along kernel lists, where each numpy call would cost more than its work."""
    found = []
    for f in frontier.tolist():
        lo = int(out_lo[f])
        for t in dst[lo:lo + int(out_n[f])].tolist():
            c = counts[t] = counts[t] + 1
            m = min_count[t]
            if 0 < m <= c and not gray[t]:
                gray[t] = True
                found.append(t)
    return np.array(found, np.int64)


def leak_edges(ram: np.ndarray, starts, ends, contents: Segments, white: np.ndarray,
               untag=None, result: Result | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) object pairs where a white object points into another;
    from `result`'s reference graph when given, else by scanning the white objects."""
    if result is not None and result.src is not None:
        keep = white[result.src] & white[result.dst]
        return result.src[keep], result.dst[keep]
    matcher = Matcher(starts, ends)
    ram64 = ram[:len(ram) // 8 * 8].view("<u8")
    src, dst = _edges(matcher, ram64, contents.select(white[contents.owner]), untag or _same)
    keep = white[dst]
    return src[keep], dst[keep]


def classify(white: np.ndarray, src: np.ndarray, dst: np.ndarray,
             order: np.ndarray) -> np.ndarray:
    """Direct (True) or indirect (False) for each white object, LeakSanitizer style:
    indirect objects are reachable from other leaks. Leaks that reach each other
    (a cycle) form one group; a group nothing outside it points to has one direct
    leak, its oldest (smallest `order`)."""
    direct = np.zeros(len(white), bool)
    leaks = np.flatnonzero(white).tolist()
    if not leaks:
        return direct
    succ: dict[int, list[int]] = {}
    for s, d in zip(src.tolist(), dst.tolist()):
        if s != d:
            succ.setdefault(s, []).append(d)
    group = _strongly_connected(leaks, succ)
    entered = {group[d] for s, ds in succ.items() for d in ds if group[s] != group[d]}
    oldest: dict[int, int] = {}
    for i in leaks:
        g = group[i]
        if g not in entered and (g not in oldest or order[i] < order[oldest[g]]):
            oldest[g] = i
    direct[list(oldest.values())] = True
    return direct


def _strongly_connected(nodes: list[int], succ: dict[int, list[int]]) -> dict[int, int]:
    """Tarjan's algorithm, iterative: node -> its component's number."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    group: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            out = succ.get(v, ())
            if i < len(out):
                work.append((v, i + 1))
                w = out[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group[w] = v
                    if w == v:
                        break
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return group


def referrers(ram: np.ndarray, start: int, end: int, contents: Segments, roots: Segments,
              root_words: np.ndarray = np.zeros(0, U64), untag=None) -> list[tuple[int, int]]:
    """Every word pointing into [start, end): (owner, byte offset in `ram`) for
    words in objects' contents (owner = object index) and in roots (owner -1),
    and (-2, index) for `root_words`. For explaining why an object is kept."""
    matcher = Matcher(np.array([start], U64), np.array([end], U64))
    ram64 = ram[:len(ram) // 8 * 8].view("<u8")
    untag = untag or (lambda w: w)
    out = set()
    for segments in (contents, roots):
        for words, owners, where in _words(ram64, segments):
            pos, _ = matcher.match(untag(words))
            at = (where + pos if isinstance(where, int) else where[pos]) * 8
            out.update(zip(owners[pos].tolist(), at.tolist()))
    pos, _ = matcher.match(untag(np.asarray(root_words, U64)))
    out.update((-2, p) for p in pos.tolist())
    # a root word inside an object's contents is that object's, not a root
    inside = {at for owner, at in out if owner >= 0}
    return sorted((o, at) for o, at in out if o >= 0 or o == -2 or at not in inside)
