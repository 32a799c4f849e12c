"""qemuleak: find kernel memory leaks in a QEMU guest from the host."""

__version__ = "0.1.0"
