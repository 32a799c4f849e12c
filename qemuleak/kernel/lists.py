"""Walking the kernel's circular `struct list_head` lists."""

from ..errors import QemuleakError


def list_nodes(kernel, head: int, limit: int = 1 << 20, next_of=None):
    """Yield the address of every `struct list_head` on the list at `head` (not the
    head itself). Stops after `limit` nodes: a list being changed, or read at the
    wrong address, can loop forever. `next_of(node)` reads a node's next pointer
    (default: kernel.read_u64)."""
    next_of = next_of or kernel.read_u64
    node = next_of(head)
    seen = 0
    while node != head:
        if seen >= limit or node == 0:
            raise QemuleakError(f"the kernel list at {head:#x} does not come back to its head "
                                f"({'a NULL link' if node == 0 else f'over {limit} nodes'})",
                                "the guest may have been stopped mid-update: try again")
        yield node
        node = next_of(node)
        seen += 1
