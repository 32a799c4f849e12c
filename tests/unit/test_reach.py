"""Unit tests for qemuleak.reach: kmemleak's gray-list scan over a synthetic RAM copy.

A `Heap` is a numpy uint8 "RAM" with a root area at offset 0 followed by objects;
object i lives at RAM offset `offsets[i]` and at kernel address DIRECT + that offset
(like the direct map), so pointers are easy to write and to read back.
"""

from __future__ import annotations

import bisect
import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemuleak import reach
from qemuleak.reach import Matcher, Segments

DIRECT = 0xFFFF888000000000
VMALLOC = 0xFFFFC90000000000
PERCPU = 0x3C890                    # per-CPU "addresses" are small offsets (cookies)
TOP = 1 << 64
TAG = 0xF2 << 56                    # an arm64 KASAN-style tag in the top byte


def u64(*values) -> np.ndarray:
    return np.array([v % TOP for v in values], np.uint64)


# --------------------------------------------------------------------------
# builders


class Heap:
    """Synthetic RAM: `root_bytes` of root area at offset 0, then one object per
    size, `pad` bytes apart (16-aligned unless `skew` moves an object's start)."""

    def __init__(self, *sizes: int, root_bytes: int = 64, pad: int = 16,
                 skew: dict[int, int] | None = None):
        skew = skew or {}
        self.root_bytes = root_bytes
        self.sizes = list(sizes)
        self.offsets = []
        off = _align(root_bytes + pad, 16)
        for i, size in enumerate(sizes):
            self.offsets.append(off + skew.get(i, 0))
            off = _align(self.offsets[-1] + size + pad, 16)
        self.ram = np.zeros(off + pad, np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def addr(self, i: int, delta: int = 0) -> int:
        return DIRECT + self.offsets[i] + delta

    @property
    def starts(self) -> np.ndarray:
        return u64(*(self.addr(i) for i in range(len(self))))

    @property
    def ends(self) -> np.ndarray:
        return u64(*(self.addr(i, self.sizes[i]) for i in range(len(self))))

    def poke(self, ram_offset: int, value: int) -> None:
        self.ram[ram_offset:ram_offset + 8] = np.frombuffer((value % TOP).to_bytes(8, "little"),
                                                            np.uint8)

    def put(self, i: int, field: int, value: int) -> None:
        """Write a u64 at byte `field` of object i (need not be aligned)."""
        self.poke(self.offsets[i] + field, value)

    def link(self, src: int, dst: int, field: int = 0, delta: int = 0) -> None:
        """Object src points (at `field`) to byte `delta` of object dst."""
        self.put(src, field, self.addr(dst, delta))

    def root(self, slot: int, value: int) -> None:
        assert slot * 8 < self.root_bytes
        self.poke(slot * 8, value)

    def contents(self) -> Segments:
        return Segments.of(np.arange(len(self)), self.offsets, self.sizes)

    def roots(self) -> Segments:
        return Segments.of(-1, 0, self.root_bytes)

    def whole_ram(self) -> Segments:
        """One root segment over all of RAM, objects included (conservative mode)."""
        return Segments.of(-1, 0, len(self.ram))

    def scan(self, min_count=None, roots: Segments | None = None, **kw) -> reach.Result:
        mc = np.ones(len(self), np.int64) if min_count is None else np.asarray(min_count)
        return reach.reachability(self.ram, self.starts, self.ends, mc, self.contents(),
                                  self.roots() if roots is None else roots, **kw)

    def leaks(self, order=None, **kw) -> tuple[set[int], set[int], set[tuple[int, int]]]:
        """Scan, then (direct, indirect, edges) as sets of object indices."""
        white = ~self.scan(**kw).gray
        untag = kw.get("untag")
        src, dst = reach.leak_edges(self.ram, self.starts, self.ends, self.contents(), white,
                                    untag)
        order = np.arange(len(self)) if order is None else np.asarray(order)
        direct = reach.classify(white, src, dst, order)
        return (set(np.flatnonzero(white & direct).tolist()),
                set(np.flatnonzero(white & ~direct).tolist()),
                set(zip(src.tolist(), dst.tolist())))


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def gray_set(result: reach.Result) -> set[int]:
    return set(np.flatnonzero(result.gray).tolist())


def matched(m: Matcher, *words: int) -> list[tuple[int, int]]:
    """(word position, object) pairs, sorted."""
    pos, obj = m.match(u64(*words))
    return sorted(zip(pos.tolist(), obj.tolist()))


def brute_match(starts, ends, words) -> list[tuple[int, int]]:
    return sorted((p, i) for p, w in enumerate(words)
                  for i, (s, e) in enumerate(zip(starts, ends)) if s <= w < e)


@contextlib.contextmanager
def constants(**values):
    """Temporarily set reach's module constants (_CHUNK_WORDS=..., ...)."""
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(mock.patch.object(reach, name, value))
        yield


# --------------------------------------------------------------------------
# Matcher


def test_match_start_interior_and_last_byte_but_not_end_or_before_start():
    s, e = DIRECT + 0x1000, DIRECT + 0x1040
    m = Matcher(u64(DIRECT + 0x100, s), u64(DIRECT + 0x140, e))
    assert matched(m, s, s + 8, s + 0x23, e - 1) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert matched(m, e, s - 1, e + 0x1000, 0, TOP - 1) == []


def test_match_adjacent_objects_split_at_the_boundary():
    a, b = DIRECT + 0x1000, DIRECT + 0x1040
    m = Matcher(u64(a, b), u64(b, b + 0x40))
    assert matched(m, b - 1, b, b + 0x3F, b + 0x40) == [(0, 0), (1, 1), (2, 1)]


def test_zero_size_objects_never_match():
    z = DIRECT + 0x2000
    m = Matcher(u64(DIRECT + 0x1000, z, z + 1), u64(DIRECT + 0x1000, z, z + 0x10))
    assert matched(m, DIRECT + 0x1000, z - 1, z, z + 1) == [(3, 2)]
    only_zero = Matcher(u64(z), u64(z))
    assert matched(only_zero, z, z - 1, z + 1) == []


def test_objects_in_far_apart_clusters_all_match():
    starts = u64(PERCPU, PERCPU + 0x40, DIRECT + 0x1000, DIRECT + 0x7FF000, VMALLOC + 0x5000,
                 VMALLOC + 0x3000_0000_0000)
    ends = starts + u64(*([0x20] * len(starts)))
    m = Matcher(starts, ends)
    assert len(m.clusters) == 4                 # the two vmalloc ones are 48 TiB apart
    words = [int(s) + 0x10 for s in starts]
    assert matched(m, *words) == [(i, i) for i in range(len(starts))]
    between = [PERCPU + 0x30, PERCPU + 0x1000, DIRECT, DIRECT + 0x400000, VMALLOC,
               VMALLOC + 0x1000_0000_0000, 0xFFFFFFFF81000000]
    assert matched(m, *between) == []


def test_matcher_rejects_unsorted_objects_and_handles_empty_input():
    with pytest.raises(ValueError):
        Matcher(u64(DIRECT + 0x100, DIRECT), u64(DIRECT + 0x110, DIRECT + 0x10))
    assert matched(Matcher(u64(), u64()), DIRECT) == []
    assert matched(Matcher(u64(DIRECT), u64(DIRECT + 8))) == []


GAPS = st.one_of(st.integers(0, 64), st.integers(0, 1 << 14), st.integers(1 << 29, 1 << 31))
SIZES = st.one_of(st.just(0), st.integers(1, 64), st.integers(1, 1 << 14))


@st.composite
def object_layouts(draw) -> tuple[list[int], list[int]]:
    """Sorted, non-overlapping objects (a zero-size object occupies its first byte,
    as in ObjectTable) spread over per-CPU, direct map and vmalloc regions."""
    starts, ends = [], []
    regions = draw(st.lists(st.sampled_from([PERCPU, DIRECT, VMALLOC]), min_size=1,
                            max_size=3, unique=True))
    for base in sorted(regions):
        at = base + draw(st.integers(0, 1 << 16))
        for gap, size in draw(st.lists(st.tuples(GAPS, SIZES), max_size=20)):
            at += gap
            starts.append(at)
            ends.append(at + size)
            at += max(size, 1)
    return starts, ends


@settings(max_examples=300, deadline=None)
@given(layout=object_layouts(), data=st.data(),
       limits=st.sampled_from([{}, {"_BITMAP_LIMIT": 0}, {"_BITMAP_LIMIT": 3},
                               {"_CLUSTER_GAP": 1 << 12}]))
def test_match_agrees_with_brute_force(layout, data, limits):
    starts, ends = layout
    near = sorted({(b + d) % TOP for b in starts + ends for d in (-9, -8, -1, 0, 1, 7, 8)})
    lo, hi = (min(starts), max(ends)) if starts else (0, TOP - 1)
    word = st.one_of(st.integers(0, TOP - 1), st.integers(lo, hi),
                     *([st.sampled_from(near)] if near else []))
    words = data.draw(st.lists(word, max_size=60))
    with constants(**limits):
        m = Matcher(u64(*starts), u64(*ends))
    pos, obj = m.match(u64(*words))
    assert len(set(pos.tolist())) == len(pos)          # a word counts once, at most
    assert sorted(zip(pos.tolist(), obj.tolist())) == brute_match(starts, ends, words)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), limits=st.sampled_from([{}, {"_TABLE_LIMIT": 0}, {"_CLUSTER_GAP": 1 << 12}]))
def test_match_with_overlapping_objects_takes_the_last_one_starting_before(data, limits):
    """Not what object tables hold, but defined: equal starts, objects inside
    others. A word belongs to the last object starting at or before it, if it is
    before that one's end."""
    base = data.draw(st.sampled_from([PERCPU, DIRECT, VMALLOC]))
    starts = sorted(base + x for x in data.draw(st.lists(st.integers(0, 1 << 13), max_size=12)))
    ends = [s + data.draw(st.integers(0, 1 << 13)) for s in starts]
    words = data.draw(st.lists(st.integers(base - 16, base + (1 << 14)), max_size=60))
    with constants(**limits):
        m = Matcher(u64(*starts), u64(*ends))
    pos, obj = m.match(u64(*words))
    want = []
    for p, w in enumerate(words):
        k = bisect.bisect_right(starts, w) - 1
        if k >= 0 and w < ends[k]:
            want.append((p, k))
    assert sorted(zip(pos.tolist(), obj.tolist())) == want


def test_match_dense_page_with_equal_starts():
    """A page with many objects, two starting at the same byte: no granule size
    separates those, the page needs the binary search."""
    starts = sorted([DIRECT + i for i in range(600)] + [DIRECT + 100])
    ends = [s + 1 + (s == DIRECT + 100) * 2 for s in starts]   # the second of the pair: 3 bytes
    m = Matcher(u64(*starts), u64(*ends))
    words = list(range(DIRECT - 2, DIRECT + 610))
    want = [(p, k) for p, w in enumerate(words)
            for k in [bisect.bisect_right(starts, w) - 1] if k >= 0 and w < ends[k]]
    assert matched(m, *words) == want


# --------------------------------------------------------------------------
# reachability


def test_referenced_object_is_gray_and_unreferenced_is_white():
    h = Heap(64, 64)
    h.root(0, h.addr(0))
    r = h.scan()
    assert gray_set(r) == {0}
    assert r.counts.tolist() == [1, 0]


def test_chain_from_root_turns_gray_in_waves():
    h = Heap(32, 32, 32, 32)                     # A, B, C and an unrelated D
    h.root(3, h.addr(0))
    h.link(0, 1, field=8)
    h.link(1, 2, field=24)
    r = h.scan()
    assert gray_set(r) == {0, 1, 2}
    assert r.waves == 3                          # scans A, then B, then C (finds nothing)
    assert r.counts.tolist() == [1, 1, 1, 0]


def test_nothing_gray_means_no_waves():
    h = Heap(32, 32)
    h.link(0, 1)
    r = h.scan()
    assert gray_set(r) == set() and r.waves == 0


def test_self_reference_does_not_keep_an_object_alive():
    h = Heap(64)
    h.link(0, 0, field=0)
    h.link(0, 0, field=8, delta=16)
    r = h.scan(min_count=[1])
    assert gray_set(r) == set()
    assert r.counts.tolist() == [0]
    # ... nor does it count once the object is gray for another reason
    h.root(0, h.addr(0))
    assert h.scan().counts.tolist() == [1]


def test_unrooted_cycle_stays_white():
    h = Heap(32, 32)
    h.link(0, 1)
    h.link(1, 0)
    r = h.scan()
    assert gray_set(r) == set() and r.counts.tolist() == [0, 0]


def test_interior_pointer_counts():
    h = Heap(64, 64)
    h.root(0, h.addr(0, 40))
    h.link(0, 1, delta=63)                       # last byte of B
    assert gray_set(h.scan()) == {0, 1}


def test_pointer_just_past_the_end_does_not_count():
    h = Heap(64, 64, pad=64)
    h.root(0, h.addr(0, 64))                     # end of A: in the padding, no object
    assert gray_set(h.scan()) == set()


def test_conservative_root_over_all_ram_skips_words_inside_objects():
    h = Heap(32, 32, 32, 32)
    h.link(0, 1)                                 # white A -> B: A's words are no roots
    h.link(2, 2, field=8)                        # self reference in C
    h.root(1, h.addr(3))                         # a real root word, outside any object
    h.poke(h.offsets[0] + 32, h.addr(2))         # in the padding after A: a root too
    r = h.scan(roots=h.whole_ram())
    assert gray_set(r) == {2, 3}
    assert r.counts.tolist() == [0, 0, 1, 1]


def test_conservative_root_still_scans_gray_objects():
    h = Heap(32, 32)
    h.root(0, h.addr(0))
    h.link(0, 1, field=16)
    r = h.scan(roots=h.whole_ram())
    assert gray_set(r) == {0, 1}
    assert r.counts.tolist() == [1, 1]           # B's pointer counted once, from A's scan


def test_root_words_count():
    h = Heap(32, 32, 32)
    h.link(1, 2)
    r = h.scan(root_words=u64(0, 12345, h.addr(1, 8), h.addr(0, 32)))
    assert gray_set(r) == {1, 2}


def test_min_count_zero_is_gray_from_the_start_and_scanned():
    h = Heap(32, 32, 32)
    h.link(0, 1)
    r = h.scan(min_count=[0, 1, 1])
    assert gray_set(r) == {0, 1}
    assert r.waves == 2


def test_min_count_two_needs_two_references():
    h = Heap(32, 32, 32)                         # A, B: gray holders; T: min_count 2
    h.root(0, h.addr(0))
    h.link(0, 2)
    assert gray_set(h.scan(min_count=[1, 1, 2])) == {0}
    h.root(1, h.addr(1))
    h.link(1, 2, delta=8)
    r = h.scan(min_count=[1, 1, 2])
    assert gray_set(r) == {0, 1, 2}
    assert r.counts[2] == 2


def test_min_count_two_from_root_and_gray_object():
    h = Heap(32, 32)
    h.root(0, h.addr(0))
    h.root(1, h.addr(1))
    h.link(0, 1)
    r = h.scan(min_count=[1, 2])
    assert gray_set(r) == {0, 1} and r.waves == 2


def test_scan_contents_false_reported_if_unreferenced_and_never_scanned():
    h = Heap(32, 32, 32, 32)                     # N0 no-scan white, N1 no-scan gray
    h.link(0, 2)
    h.root(0, h.addr(1))
    h.link(1, 3)
    r = h.scan(scan_contents=[False, False, True, True])
    assert gray_set(r) == {1}                    # N0 reported; neither target reached
    assert r.counts.tolist() == [0, 1, 0, 0]
    assert gray_set(h.scan()) == {1, 3}          # with scanning, N1's target is gray


def test_untag_applied_to_roots_contents_and_root_words():
    h = Heap(32, 32, 32)
    h.root(0, h.addr(0) & ~(0xFF << 56) | TAG)
    h.put(0, 8, h.addr(1, 4) & ~(0xFF << 56) | TAG)
    untag = lambda w: w | np.uint64(0xFF << 56)
    assert gray_set(h.scan()) == set()           # tagged pointers match nothing as is
    assert gray_set(h.scan(untag=untag)) == {0, 1}
    words = u64(h.addr(2) & ~(0xFF << 56) | TAG)
    assert gray_set(h.scan(untag=untag, root_words=words)) == {0, 1, 2}


def test_unaligned_object_scans_only_the_aligned_words_inside():
    h = Heap(24, 32, 32, 32, 32, skew={0: 4}, pad=32)
    assert h.offsets[0] % 8 == 4
    h.root(0, h.addr(0))
    h.put(0, 0, h.addr(2))                       # unaligned: never read as a word
    h.put(0, 12, h.addr(1))                      # aligned (RAM offset % 8 == 0)
    h.put(0, 20, h.addr(3))                      # aligned, but runs past A's end
    r = h.scan()
    assert gray_set(r) == {0, 1}
    assert r.bytes_scanned == 64 + 16 + 32       # roots + A's 2 inner words + B


def test_bytes_scanned_is_roots_plus_gray_objects():
    h = Heap(64, 32, 128, 40)
    h.root(0, h.addr(0))
    h.link(0, 1)
    r = h.scan(min_count=[1, 1, 1, 0])          # D gray from the start (40 bytes)
    assert gray_set(r) == {0, 1, 3}
    assert r.bytes_scanned == 64 + 64 + 32 + 40
    r = h.scan(min_count=[1, 1, 1, 0], roots=Segments.of([-1, -1, -1], [3, 16, 40], [21, 0, 7]))
    assert r.bytes_scanned == 16 + 40            # root words at 8 and 16 only; then D
    r = h.scan(min_count=[1, 1, 1, 0], scan_contents=[True, True, True, False])
    assert r.bytes_scanned == 64 + 64 + 32       # no-scan D costs nothing


def test_empty_inputs():
    h = Heap()
    r = h.scan()
    assert r.counts.tolist() == [] and r.waves == 0 and r.bytes_scanned == 64
    h = Heap(32)
    r = h.scan(roots=Segments.empty())
    assert gray_set(r) == set() and r.bytes_scanned == 0


# --------------------------------------------------------------------------
# _words chunking


def naive_words(ram64: np.ndarray, seg: Segments) -> list[tuple[int, int]]:
    """(word index, owner) of every aligned word of every segment."""
    out = []
    for o, off, n in zip(seg.owner.tolist(), seg.offset.tolist(), seg.length.tolist()):
        out += [(w, o) for w in range((off + 7) // 8, (off + n) // 8)]
    return sorted(out)


@settings(max_examples=200, deadline=None)
@given(segs=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 300)), max_size=25),
       slice_words=st.integers(1, 40), chunk_words=st.integers(1, 40))
def test_words_yields_every_aligned_word_once(segs, slice_words, chunk_words):
    ram64 = np.arange(600, dtype=np.uint64)    # 4800 bytes, every word distinct
    seg = Segments.of(np.arange(len(segs)), [o for o, _ in segs], [n for _, n in segs])
    got = []
    with constants(_SLICE_WORDS=slice_words, _CHUNK_WORDS=chunk_words):
        for words, owners, where in reach._words(ram64, seg):
            index = where + np.arange(len(words)) if isinstance(where, int) else where
            assert len(words) == len(owners) == len(index) > 0
            assert np.array_equal(words, ram64[index])
            if slice_words <= chunk_words:
                assert len(words) <= chunk_words
            got += zip(index.tolist(), owners.tolist())
    assert sorted(got) == naive_words(ram64, seg)


def random_heap(seed: int) -> Heap:
    """Objects full of pointers (to objects, interior, self, junk), a few roots."""
    rng = np.random.default_rng(seed)
    sizes = (rng.integers(0, 25, 60) * 8).tolist()
    h = Heap(*sizes, root_bytes=256, skew={i: 4 for i in range(0, 60, 7)})
    for i in range(len(h)):
        for field in range(0, h.sizes[i] - 7, 8):
            j = int(rng.integers(len(h)))
            roll = rng.random()
            if roll < 0.04:
                h.link(i, j, field, int(rng.integers(0, max(h.sizes[j], 1))))
            elif roll < 0.5:
                h.put(i, field, int(rng.integers(0, TOP, dtype=np.uint64)))
    for slot in range(0, 32, 5):
        h.root(slot, h.addr(int(rng.integers(len(h)))))
    return h


@settings(max_examples=200, deadline=None)
@given(segs=st.lists(st.tuples(st.integers(0, 4000), st.integers(-8, 300)), max_size=25),
       copy_words=st.integers(1, 40), chunk_words=st.integers(1, 40))
def test_chunks_yield_every_aligned_word_once(segs, copy_words, chunk_words):
    ram64 = np.arange(600, dtype=np.uint64)    # 4800 bytes, every word distinct
    seg = Segments.of(np.arange(len(segs)), [o for o, _ in segs], [n for _, n in segs])
    first, last = reach._word_range(seg)
    got = []
    with constants(_COPY_WORDS=copy_words, _CHUNK_WORDS=chunk_words):
        for words, owners in reach._chunks(ram64, first, last, seg.owner):
            assert 0 < len(words) <= chunk_words
            if isinstance(owners, int):
                owners = [owners] * len(words)
            got += zip(words.tolist(), list(owners))   # word value == word index
    assert sorted(got) == naive_words(ram64, seg)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("copy_words,chunk_words", [(1, 1), (4, 3), (2, 7), (100, 5), (3, 50)])
def test_chunked_scan_matches_unchunked(seed, copy_words, chunk_words):
    h = random_heap(seed)
    min_count = np.random.default_rng(seed).integers(0, 3, len(h))
    for roots in (h.roots(), h.whole_ram()):
        kw = dict(min_count=min_count, roots=roots, root_words=u64(h.addr(5)))
        want = h.scan(**kw)
        with constants(_COPY_WORDS=copy_words, _CHUNK_WORDS=chunk_words):
            got = h.scan(**kw)
        assert want.gray.any() and not want.gray.all()     # a non-trivial graph
        assert np.array_equal(got.counts, want.counts)
        assert np.array_equal(got.gray, want.gray)
        assert (got.waves, got.bytes_scanned) == (want.waves, want.bytes_scanned)


@pytest.mark.parametrize("cpus, loadavg, threads", [
    (2, "0.50 0.40 0.30 1/120 999", 2),       # only the scan runs: both CPUs
    (2, "2.10 2.00 1.90 3/120 999", 1),       # two busy vCPU threads beside it
    (2, "2.10 2.00 1.90 9/120 999", 1),
    (8, "2.10 2.00 1.90 3/120 999", 4),       # at most 4
    (8, "7.00 7.00 7.00 7/120 999", 2),
    (8, "garbled", 4),                        # unreadable: half the CPUs
    (1, "garbled", 1),
])
def test_threads_follow_idle_cpus(cpus, loadavg, threads):
    assert reach._idle_cpus(cpus, loadavg) == threads


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_scan(seed, threads):
    """Roots and objects matched in shares on several threads (small chunks, so
    that each share has many): the same counts, gray set, waves and edges."""
    h = random_heap(seed)
    min_count = np.random.default_rng(seed).integers(0, 3, len(h))
    for roots in (h.roots(), h.whole_ram()):
        kw = dict(min_count=min_count, roots=roots, root_words=u64(h.addr(5)))
        with constants(THREADS=1, _COPY_WORDS=4, _CHUNK_WORDS=7):
            want = h.scan(**kw)
        with constants(THREADS=threads, _COPY_WORDS=4, _CHUNK_WORDS=7):
            got = h.scan(**kw)
        assert np.array_equal(got.counts, want.counts)
        assert np.array_equal(got.gray, want.gray)
        assert (got.waves, got.bytes_scanned) == (want.waves, want.bytes_scanned)
        assert np.array_equal(got.src, want.src) and np.array_equal(got.dst, want.dst)


def test_shares_cover_every_word_once():
    first, last = np.array([0, 10, 40, 41], np.int64), np.array([7, 30, 41, 60], np.int64)
    want = [w for f, l_ in zip(first, last) for w in range(f, l_)]
    for parts in range(1, 9):
        shares = reach._shares(first, last, parts)
        assert len(shares) <= parts
        got = [w for f, l_ in shares for a, b in zip(f, l_) for w in range(a, b)]
        assert got == want
        sizes = [int((l_ - f).sum()) for f, l_ in shares]
        assert max(sizes) - min(sizes) <= 1          # equal shares
    assert reach._shares(first[:0], last[:0], 3) == []


def test_conservative_root_exclusion_works_on_big_root_segments():
    h = Heap(32, 32, 32, 32)
    h.link(0, 1)
    h.root(1, h.addr(3))
    with constants(_COPY_WORDS=4, _CHUNK_WORDS=5):   # whole RAM: big, several chunks
        r = h.scan(roots=h.whole_ram())
    assert gray_set(r) == {3}


# --------------------------------------------------------------------------
# reachability against a plain Python gray list


def untag_arm64(words: np.ndarray) -> np.ndarray:
    """Like qemuleak.arch.arm64: bit 55 says which half, the top byte follows it."""
    top = np.uint64(0xFF << 56)
    return np.where(words >> np.uint64(55) & np.uint64(1), words | top, words & ~top)


class Scenario:
    """Random inputs for reachability: direct-map objects laid out in RAM after a
    root area (any alignment, zero-size ones included), vmalloc-like and per-CPU
    objects whose contents are elsewhere in RAM (per-CPU ones twice), words that
    point into objects (interior, past the end, themselves, tagged) or not, roots
    over any part of RAM (objects included, overlapping each other)."""

    def __init__(self, data):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        draw = data.draw
        self.tagged = draw(st.booleans(), label="tagged")
        at = draw(st.integers(0, 160), label="root area")
        objects = []                                     # (address, size, [(offset, length)])
        for _ in range(draw(st.integers(0, 12), label="direct objects")):
            at += draw(st.integers(0, 24))
            size = draw(st.sampled_from([0, 1, 7, 8, 16, 24, 40, 64]) | st.integers(0, 80))
            objects.append((DIRECT + at, size, [(at, size)]))
            at += max(size, 1)
        far = []
        for base in draw(st.lists(st.sampled_from([VMALLOC, VMALLOC + (3 << 40), PERCPU]),
                                  max_size=3, unique=True), label="far regions"):
            addr = base
            for _ in range(draw(st.integers(1, 3))):
                addr += draw(st.integers(0, 300))
                far.append((addr, draw(st.integers(0, 64)), base == PERCPU))
                addr += max(far[-1][1], 1)
        for addr, size, percpu in far:                  # their bytes after the direct map
            places = []
            for _ in range(2 if percpu else draw(st.integers(1, 2))):
                at += draw(st.integers(0, 16))
                places.append((at, size))
                at += size
            objects.append((addr, size, places))
        objects.sort(key=lambda o: o[0])
        self.starts = u64(*(a for a, _, _ in objects))
        self.ends = u64(*(a + n for a, n, _ in objects))
        self.ram = np.zeros((at + 64) // 8 * 8 + draw(st.sampled_from([0, 3])), np.uint8)
        n = len(objects)
        seg = [(i, off, length) for i, (_, _, places) in enumerate(objects)
               for off, length in places]
        seg += [(int(rng.integers(n)), int(rng.integers(len(self.ram))), 0)
                for _ in range(draw(st.integers(0, 2)) if n else 0)]     # empty ones
        if seg and draw(st.booleans()):
            seg.append(seg[int(rng.integers(len(seg)))])                 # a duplicate
        order = rng.permutation(len(seg))
        self.contents = Segments.of([seg[i][0] for i in order], [seg[i][1] for i in order],
                                    [seg[i][2] for i in order])
        words = self.ram[:len(self.ram) // 8 * 8].view(np.uint64)
        for i in range(len(words)):
            words[i] = self.value(rng, objects)
        self.root_words = u64(*(self.value(rng, objects) for _ in range(draw(st.integers(0, 4)))))
        roots = []
        for _ in range(draw(st.integers(0, 3), label="root segments")):
            lo = int(rng.integers(0, len(self.ram) + 1))
            roots.append((lo, int(rng.integers(-4, len(self.ram) - lo + 1))))
        if draw(st.booleans(), label="whole RAM root"):
            roots.append((0, len(self.ram)))
        self.roots = Segments.of([-1] * len(roots), [r[0] for r in roots], [r[1] for r in roots])
        self.min_count = np.array(draw(st.lists(st.sampled_from([0, 1, 1, 1, 2]), min_size=n,
                                                max_size=n), label="min_count"), np.int64)
        self.scan_ok = np.array(draw(st.lists(st.booleans() | st.just(True), min_size=n,
                                              max_size=n), label="scan_ok"), bool)
        self.untag = untag_arm64 if self.tagged else None

    def value(self, rng, objects) -> int:
        roll = rng.random()
        if roll < 0.2 or not objects:
            return 0 if roll < 0.1 else int(rng.integers(0, TOP, dtype=np.uint64))
        addr, size, _ = objects[int(rng.integers(len(objects)))]
        v = addr + int(rng.integers(-2, size + 3))       # interior, before, at or past the end
        if self.tagged and rng.random() < 0.5:
            v = v & ~(0xFF << 56) | (int(rng.integers(0, 256)) << 56)
        return v % TOP

    def run(self, **kw):
        return reach.reachability(self.ram, self.starts, self.ends, self.min_count, self.contents,
                                  self.roots, self.root_words, self.untag, self.scan_ok, **kw)


def reference_reachability(s: Scenario):
    """kmemleak's gray list, word by word: (counts, gray, bytes scanned, waves)."""
    starts, ends = s.starts.tolist(), s.ends.tolist()
    n = len(starts)
    data = s.ram.tobytes()
    untag = s.untag or (lambda w: w)

    def target(value: int) -> int | None:
        value = int(untag(np.array([value], np.uint64))[0])
        k = bisect.bisect_right(starts, value) - 1        # the last object starting before
        return k if k >= 0 and value < ends[k] else None

    def words(offset: int, length: int):
        for at in range((offset + 7) // 8 * 8, (offset + length) // 8 * 8, 8):
            yield at, int.from_bytes(data[at:at + 8], "little")

    segs = list(zip(s.contents.owner.tolist(), s.contents.offset.tolist(),
                    s.contents.length.tolist()))
    owned = {b for _, off, length in segs for b in range(off, off + length)}
    counts, scanned = [0] * n, 0
    for off, length in zip(s.roots.offset.tolist(), s.roots.length.tolist()):
        for at, value in words(off, length):
            scanned += 8
            k = target(value)
            if k is not None and at not in owned:
                counts[k] += 1
    for value in s.root_words.tolist():
        k = target(value)
        if k is not None:
            counts[k] += 1
    min_count = s.min_count.tolist()
    gray = [m == 0 or 0 < m <= c for m, c in zip(min_count, counts)]
    frontier, waves = list(gray), 0
    while any(frontier):
        waves += 1
        for owner, off, length in segs:
            if frontier[owner] and s.scan_ok[owner]:
                for at, value in words(off, length):
                    scanned += 8
                    k = target(value)
                    if k is not None and k != owner:
                        counts[k] += 1
        frontier = [not g and 0 < m <= c for g, m, c in zip(gray, min_count, counts)]
        gray = [g or f for g, f in zip(gray, frontier)]
    return counts, gray, scanned, waves


LIMITS = st.sampled_from([{}, {"_CHUNK_WORDS": 3, "_COPY_WORDS": 2}, {"_CHUNK_WORDS": 7},
                          {"_CHUNK_WORDS": 1}, {"_TABLE_LIMIT": 0}, {"_BITMAP_LIMIT": 0},
                          {"_CLUSTER_GAP": 1 << 12}])


@settings(max_examples=400, deadline=None)
@given(data=st.data(), limits=LIMITS)
def test_reachability_agrees_with_reference(data, limits):
    s = Scenario(data)
    with constants(**limits):
        got = s.run()
    counts, gray, scanned, waves = reference_reachability(s)
    assert got.counts.tolist() == counts
    assert got.gray.tolist() == gray
    assert (got.bytes_scanned, got.waves) == (scanned, waves)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), limits=LIMITS)
def test_leak_edges_agree_with_reference(data, limits):
    s = Scenario(data)
    white = ~s.run().gray
    with constants(**limits):
        src, dst = reach.leak_edges(s.ram, s.starts, s.ends, s.contents, white, s.untag)
    starts, ends = s.starts.tolist(), s.ends.tolist()
    untag = s.untag or (lambda w: w)
    want = []
    for owner, off, length in zip(s.contents.owner.tolist(), s.contents.offset.tolist(),
                                  s.contents.length.tolist()):
        if not white[owner]:
            continue
        for at in range((off + 7) // 8 * 8, (off + length) // 8 * 8, 8):
            value = int(untag(s.ram[at:at + 8].view(np.uint64))[0])
            k = bisect.bisect_right(starts, value) - 1
            if k >= 0 and value < ends[k] and k != owner and white[k]:
                want.append((owner, k))
    assert sorted(zip(src.tolist(), dst.tolist())) == sorted(want)


# --------------------------------------------------------------------------
# leak_edges and classify


def circular_list(h: Heap, nodes: list[int]) -> None:
    """A doubly linked kernel list: list_head {next, prev} at offset 0 of each node."""
    for a, b in zip(nodes, nodes[1:] + nodes[:1]):
        h.link(a, b, field=0)                    # a->next = b
        h.link(b, a, field=8)                    # b->prev = a


def test_circular_list_head_is_direct_rest_indirect():
    h = Heap(32, 32, 32, 32)                     # head, n1, n2, n3
    circular_list(h, [0, 1, 2, 3])
    direct, indirect, edges = h.leaks(order=[10, 11, 12, 13])
    assert direct == {0} and indirect == {1, 2, 3}
    assert {(0, 1), (1, 2), (2, 3), (3, 0)} <= edges and (1, 0) in edges
    direct, indirect, _ = h.leaks(order=[10, 11, 5, 13])   # oldest in the cycle wins
    assert direct == {2} and indirect == {0, 1, 3}


def test_singly_linked_chain_head_is_direct_whatever_its_age():
    h = Heap(32, 32, 32)
    h.link(0, 1)
    h.link(1, 2)
    direct, indirect, edges = h.leaks(order=[9, 8, 7])
    assert direct == {0} and indirect == {1, 2}
    assert edges == {(0, 1), (1, 2)}


def test_two_independent_leaks_are_both_direct():
    h = Heap(32, 32, 32, 32)
    h.link(0, 1)
    h.link(2, 3)
    direct, indirect, _ = h.leaks()
    assert direct == {0, 2} and indirect == {1, 3}


def test_cycle_reachable_from_another_leaked_cycle_has_no_direct_leak():
    h = Heap(32, 32, 32, 32)
    circular_list(h, [0, 1])                     # the older cycle ...
    circular_list(h, [2, 3])
    h.link(2, 0, field=16)                       # ... is reachable from the newer one
    direct, indirect, _ = h.leaks(order=[0, 1, 2, 3])
    assert direct == {2} and indirect == {0, 1, 3}


def test_leak_pointed_to_by_gray_object_is_not_white():
    h = Heap(32, 32, 32)
    h.root(0, h.addr(0))
    h.link(0, 1)                                 # gray A -> B: B is referenced
    h.link(2, 1, field=8)                        # white C -> B too
    direct, indirect, edges = h.leaks()
    assert direct == {2} and indirect == set()
    assert edges == set()                        # edges only between white objects


def test_leak_edges_use_untag_and_skip_self_references():
    h = Heap(32, 32)
    h.put(0, 0, h.addr(1) & ~(0xFF << 56) | TAG)
    h.link(0, 0, field=8)
    untag = lambda w: w | np.uint64(0xFF << 56)
    assert h.leaks(untag=untag)[2] == {(0, 1)}
    assert h.leaks()[2] == set()


def test_classify_without_leaks():
    white = np.zeros(3, bool)
    z = np.zeros(0, np.int64)
    assert not reach.classify(white, z, z, np.arange(3)).any()


def reference_direct(n: int, edges: list[tuple[int, int]], order: list[int]) -> set[int]:
    """One direct leak per leak cycle (strongly connected component) that no other
    leak reaches: its oldest member."""
    reach_from = [{i} for i in range(n)]
    changed = True
    while changed:                               # transitive closure, tiny graphs only
        changed = False
        for s, d in edges:
            if not reach_from[d] <= reach_from[s]:
                reach_from[s] |= reach_from[d]
                changed = True
    direct = set()
    for i in range(n):
        scc = {j for j in reach_from[i] if i in reach_from[j]}
        if not any(x in reach_from[j] for j in range(n) if j not in scc for x in scc):
            direct.add(min(scc, key=lambda j: order[j]))
    return direct


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 9))
def test_classify_agrees_with_scc_reference(data, n):
    edges = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                               max_size=3 * n))
    edges = [(s, d) for s, d in edges if s != d]          # leak_edges drops self references
    order = data.draw(st.permutations(range(n)))
    src = np.array([s for s, _ in edges], np.int64)
    dst = np.array([d for _, d in edges], np.int64)
    direct = reach.classify(np.ones(n, bool), src, dst, np.array(order))
    assert set(np.flatnonzero(direct).tolist()) == reference_direct(n, edges, order)
