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
"""

from dataclasses import dataclass

import numpy as np

U64 = np.uint64
_CLUSTER_GAP = 1 << 30        # objects further apart than this get separate bitmaps
_BITMAP_LIMIT = 1 << 28       # pages per bitmap (256 MiB of bools at most)
_CHUNK_WORDS = 1 << 23        # words compared per step (64 MiB)
_SLICE_WORDS = 1 << 16        # segments at least this long are scanned in place


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


class Matcher:
    """Which object, if any, each word points into."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        self.starts = np.asarray(starts, U64)
        self.ends = np.asarray(ends, U64)
        if len(self.starts) > 1 and np.any(self.starts[1:] < self.starts[:-1]):
            raise ValueError("objects must be in address order")
        # Cheap first filter: per cluster of nearby objects, a bitmap of the pages
        # they touch; only words landing on such a page reach the binary search.
        self.clusters: list[tuple[int, int, np.ndarray | None]] = []
        n = len(self.starts)
        if not n:
            return
        reach = np.maximum.accumulate(np.maximum(self.ends, self.starts + U64(1)))
        cuts = np.flatnonzero(self.starts[1:] - reach[:-1] > U64(_CLUSTER_GAP)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):
            base = int(self.starts[a]) & ~0xFFF
            top = int(reach[b - 1])
            pages = (top - base + 0xFFF) >> 12
            bitmap = None
            if pages <= _BITMAP_LIMIT:
                first = (self.starts[a:b] - U64(base)) >> U64(12)
                last = (np.maximum(self.ends[a:b], self.starts[a:b] + U64(1)) - U64(base + 1)) >> U64(12)
                marks = np.zeros(pages + 1, np.int32)
                np.add.at(marks, first.astype(np.int64), 1)
                np.add.at(marks, last.astype(np.int64) + 1, -1)
                bitmap = np.cumsum(marks[:-1]) > 0
            self.clusters.append((base, top - base, bitmap))

    def match(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `words`, object indices) of the words inside an object."""
        if not self.clusters or not len(words):
            z = np.zeros(0, np.int64)
            return z, z.copy()
        found = []
        for base, span, bitmap in self.clusters:
            d = words - U64(base)
            pos = np.flatnonzero(d < U64(span))
            if bitmap is not None and len(pos):
                pos = pos[bitmap[(d[pos] >> U64(12)).astype(np.int64)]]
            found.append(pos)
        pos = np.concatenate(found) if len(found) > 1 else found[0]
        if not len(pos):
            return pos.astype(np.int64), pos.astype(np.int64)
        w = words[pos]
        k = np.searchsorted(self.starts, w, side="right").astype(np.int64) - 1
        kc = np.maximum(k, 0)
        ok = (k >= 0) & (w < self.ends[kc])
        return pos[ok].astype(np.int64), k[ok]


def _words(ram64: np.ndarray, segments: Segments):
    """Yield (words, owners) in chunks for the aligned words of `segments`."""
    first = (segments.offset + 7) >> 3
    last = (segments.offset + segments.length) >> 3
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


@dataclass
class Result:
    counts: np.ndarray        # references found per object (capped at nothing)
    gray: np.ndarray          # bool per object: reached
    bytes_scanned: int
    waves: int


def reachability(ram: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 min_count: np.ndarray, contents: Segments, roots: Segments,
                 root_words: np.ndarray = np.zeros(0, U64), untag=None,
                 scan_contents: np.ndarray | None = None) -> Result:
    """Run the gray-list scan. `ram` is the RAM copy (uint8, 8-aligned length
    not required); `contents` give each object's bytes in it; `roots` the root
    segments (their owners are ignored); `root_words` extra root values;
    `untag(words) -> words` strips pointer tags (arm64); `scan_contents[i]` False
    for objects whose bytes are never scanned (kmemleak_no_scan)."""
    n = len(starts)
    matcher = Matcher(starts, ends)
    ram64 = ram[:len(ram) // 8 * 8].view("<u8")
    counts = np.zeros(n, np.int64)
    untag = untag or (lambda w: w)
    # Words that belong to an object are not roots: find them by position.
    own = contents.select(contents.length > 0)
    order = np.argsort(own.offset, kind="stable")
    own_lo, own_hi = own.offset[order], (own.offset + own.length)[order]
    own_hi = np.maximum.accumulate(own_hi) if len(own_hi) else own_hi
    scanned = 0

    def add(hits: np.ndarray) -> None:
        if len(hits):
            counts[:] += np.bincount(hits, minlength=n)

    for words, _, where in _words(ram64, roots):
        scanned += len(words) * 8
        pos, obj = matcher.match(untag(words))
        if not len(pos):
            continue
        at = (where + pos if isinstance(where, int) else where[pos]) * 8
        k = np.searchsorted(own_lo, at, side="right") - 1
        inside = (k >= 0) & (at < own_hi[np.maximum(k, 0)])
        add(obj[~inside])
    if len(root_words):
        add(matcher.match(untag(np.asarray(root_words, U64)))[1])

    min_count = np.asarray(min_count, np.int64)
    gray = (min_count == 0) | (counts >= min_count) & (min_count > 0)
    frontier = gray.copy()
    scan_ok = np.ones(n, bool) if scan_contents is None else np.asarray(scan_contents, bool)
    waves = 0
    while frontier.any():
        waves += 1
        part = contents.select(frontier[contents.owner] & scan_ok[contents.owner])
        for words, owners, _ in _words(ram64, part):
            scanned += len(words) * 8
            pos, obj = matcher.match(untag(words))
            add(obj[owners[pos] != obj])
        newly = ~gray & (counts >= min_count) & (min_count > 0)
        gray |= newly
        frontier = newly
    return Result(counts, gray, scanned, waves)


def leak_edges(ram: np.ndarray, starts, ends, contents: Segments, white: np.ndarray,
               untag=None) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) object pairs where a white object points into another."""
    matcher = Matcher(starts, ends)
    ram64 = ram[:len(ram) // 8 * 8].view("<u8")
    untag = untag or (lambda w: w)
    src, dst = [], []
    for words, owners, _ in _words(ram64, contents.select(white[contents.owner])):
        pos, obj = matcher.match(untag(words))
        keep = (owners[pos] != obj) & white[obj]
        src.append(owners[pos][keep])
        dst.append(obj[keep])
    if not src:
        z = np.zeros(0, np.int64)
        return z, z.copy()
    return np.concatenate(src), np.concatenate(dst)


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
