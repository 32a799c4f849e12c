"""Physical pages, from the `struct page` array: which RAM the page allocator holds
free, and which pages are slabs of which cache."""

import numpy as np

from ..errors import QemuleakError

PAGE = 4096


def vmemmap(kernel) -> int:
    """Address of the `struct page` of page frame 0 (SPARSEMEM_VMEMMAP)."""
    base = kernel.guest.arch.vmemmap(kernel)
    if base is None:
        raise QemuleakError("cannot find the kernel's struct page array (vmemmap)",
                            "pass --vmlinux or --system-map")
    return base


class Pages:
    """The struct pages of every RAM page, read in one go per RAM range."""

    def __init__(self, kernel, ranges):
        t = kernel.types
        self.kernel = kernel
        self.ranges = ranges
        self.size = t.sizeof("struct page")
        self.base = vmemmap(kernel)
        self.raw = [kernel.guest.array(self.base + (r.gpa // PAGE) * self.size,
                                       r.size // PAGE * self.size).reshape(-1, self.size)
                    for r in ranges]
        self.ref_offset = t.offsetof("struct page", "_refcount")
        self.head_offset = t.offsetof("struct page", "compound_head") \
            if t.has_member("struct page", "compound_head") else None
        slab = "struct slab" if t.has_type("struct slab") else "struct page"
        self.cache_offset = t.offsetof(slab, "slab_cache")
        self._free = None

    def field(self, pages: np.ndarray, off: int, dtype: str) -> np.ndarray:
        """One field (at byte `off`, of numpy `dtype`) of each struct page in `pages`."""
        width = np.dtype(dtype).itemsize
        return pages[:, off:off + width].view(dtype)[:, 0]      # a strided view, no copy

    def heads(self, r, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For struct pages `pages` of RAM range `r`: (tail, head, ok): which are
        tail pages of a compound page, the index in `r` of each tail's head page,
        and whether that head lies in `r`."""
        if self.head_offset is None:
            return np.zeros(len(pages), bool), np.zeros(0, np.int64), np.zeros(0, bool)
        compound = self.field(pages, self.head_offset, "<u8")
        tail = (compound & np.uint64(1)) == 1
        head = ((compound[tail] - np.uint64(1) - np.uint64(self.base)) // np.uint64(self.size)
                - np.uint64(r.gpa // PAGE)).astype(np.int64)
        return tail, head, (head >= 0) & (head < r.size // PAGE)

    def free(self) -> list[np.ndarray]:
        """Per RAM range, a bool per page: free in the page allocator. Buddy and
        per-CPU list pages have a zero _refcount; so do the tail pages of a
        compound page, told apart by compound_head bit 0."""
        if self._free is None:
            self._free = self._find_free()
        return self._free

    def free_at(self, gpas: np.ndarray) -> np.ndarray:
        """Whether the page of each guest-physical address is free (False outside RAM)."""
        gpas = np.asarray(gpas, np.uint64)
        out = np.zeros(len(gpas), bool)
        free = self.free()
        for i, inside, index in self._in_ranges(gpas):
            out[inside] = free[i][index]
        return out

    def _in_ranges(self, gpas: np.ndarray):
        """Per RAM range holding any of `gpas`: (its index, which gpas it holds,
        their page numbers in it)."""
        for i, r in enumerate(self.ranges):
            inside = (gpas >= np.uint64(r.gpa)) & (gpas < np.uint64(r.end))
            if inside.any():
                yield i, inside, ((gpas[inside] - np.uint64(r.gpa)) // np.uint64(PAGE)).astype(np.int64)

    def _find_free(self) -> list[np.ndarray]:
        out = []
        for pages in self.raw:
            free = self.field(pages, self.ref_offset, "<i4") == 0
            if self.head_offset is not None:
                free &= (self.field(pages, self.head_offset, "<u8") & np.uint64(1)) == 0
            out.append(free)
        return out

    def slab_cache(self, gpas: np.ndarray) -> np.ndarray:
        """The kmem_cache of the slab holding each guest-physical address, 0 where
        the page is no slab (or not RAM)."""
        gpas = np.asarray(gpas, np.uint64)
        out = np.zeros(len(gpas), np.uint64)
        for i, inside, index in self._in_ranges(gpas):
            r, pages = self.ranges[i], self.raw[i]
            sel = pages[index]
            tail, hidx, ok = self.heads(r, sel)
            if tail.any():                              # a tail page: ask its head
                fixed = sel[tail].copy()
                fixed[ok] = pages[hidx[ok]]
                sel = sel.copy()
                sel[tail] = fixed
            cache = self.field(sel, self.cache_offset, "<u8")
            out[inside] = np.where(cache >> np.uint64(63) == 1, cache, np.uint64(0))
        return out
