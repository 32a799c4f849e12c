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


class Links:
    """list_nodes' `next_of` for nodes inside structs read whole: their next
    pointers, noted as the structs were read (`known[node] = next`), cost no read."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.known: dict[int, int] = {}

    def __call__(self, node: int) -> int:
        known = self.known.get(node)
        return known if known is not None else self.kernel.read_u64(node)
