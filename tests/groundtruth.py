"""What the test modules announce on the console: their objects' real addresses."""

import re
from dataclasses import dataclass

OBJ_RE = re.compile(r"\b(\w+): obj (\w+) ([0-9a-f]{16}) (\d+)\s*$", re.M)
REF_RE = re.compile(r"\b(\w+): ref (\w+) ([0-9a-f]{16})\s*$", re.M)
SPINNER_RE = re.compile(r"leaky: spinner cpu=(\d+) reg=(\w+)")

# What leaky allocates at load: name -> requested size (4096-byte pages).
LEAKY_SIZES = {
    "kmalloc_leak": 96, "cache_leak": 200, "vmalloc_leak": 3 * 4096 + 100,
    "list_head": 64, "list_node1": 64, "list_node2": 64, "list_node3": 64, "list_node4": 64,
    "backtrace_leak": 112, "bss_kept": 128, "percpu_kept": 144, "interior_kept": 256,
    "stack_kept": 192, "register_kept": 160, "krealloc_grown": 56, "krealloc_moved": 300,
    "percpu_leak": 48, "softirq_kept": 88, "hardirq_kept": 72, "rcu_freed": 96,
    "kvmalloc_small": 200, "kvmalloc_big": 5 << 20,
}
LEAKY_LEAKS = {"kmalloc_leak", "cache_leak", "vmalloc_leak", "list_head", "list_node1",
               "list_node2", "list_node3", "list_node4", "backtrace_leak",
               "krealloc_grown", "krealloc_moved", "percpu_leak"}
# Handed to kfree_rcu() at load: freed a grace period later.
LEAKY_RCU_FREED = {"rcu_freed"}
# Not addresses but per-CPU pointers (x86_64: offsets into the per-CPU areas).
LEAKY_PERCPU = {"percpu_leak"}


@dataclass(frozen=True)
class Obj:
    module: str
    name: str
    address: int
    size: int


def parse_objects(console: str, module: str = "leaky") -> dict[str, Obj]:
    """Objects `module` announced ("MODULE: obj NAME ADDRESS SIZE"), by name."""
    return {m.group(2): Obj(m.group(1), m.group(2), int(m.group(3), 16), int(m.group(4)))
            for m in OBJ_RE.finditer(console) if m.group(1) == module}


def parse_refs(console: str, module: str = "leaky") -> dict[str, int]:
    return {m.group(2): int(m.group(3), 16)
            for m in REF_RE.finditer(console) if m.group(1) == module}
