"""Per-CPU memory: which CPUs may exist, and where each one's static area lies."""

from ..errors import QemuleakError


def possible_cpus(kernel) -> list[int]:
    """CPU numbers in `__cpu_possible_mask`; without that symbol (kallsyms of text
    only), the vCPUs QEMU has."""
    mask = kernel.symbols.get("__cpu_possible_mask")
    if mask is None:
        return list(range(len(kernel.guest.cpus())))
    ids = kernel.symbols.get("nr_cpu_ids")
    n = kernel.read_u32(ids) if ids is not None else 64
    bits = int.from_bytes(kernel.read(mask, (n + 63) // 64 * 8), "little")
    return [cpu for cpu in range(n) if bits >> cpu & 1]


def static_areas(kernel) -> list[tuple[int, int]]:
    """(start, size) of the kernel's static per-CPU section, once per possible CPU:
    the copies of every DEFINE_PER_CPU variable (modules' ones live in the first
    chunk's reserved part, reached through `struct module`)."""
    start, end = kernel.symbols.get("__per_cpu_start"), kernel.symbols.get("__per_cpu_end")
    if start is None or end is None:
        raise QemuleakError("the per-CPU section is unknown: no __per_cpu_start/__per_cpu_end",
                            "pass --vmlinux or --system-map")
    return [((start + kernel.percpu_offset(cpu)) & (2**64 - 1), end - start)
            for cpu in possible_cpus(kernel)]
