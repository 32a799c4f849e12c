"""Helpers shared by the guest tests."""

from qemuleak.errors import ProtocolError
from qemuleak.guest import Guest


def qemu_virtual_read(guest: Guest, va: int, size: int) -> bytes:
    """QEMU's own translation: `m` in virtual mode, on the page tables of a vCPU.

    A vCPU caught on the arm64 KPTI trampoline maps almost nothing: try the next."""
    guest.rsp.set_physical_mode(False)
    for thread in guest.cpus():
        guest.rsp.select_thread(thread)
        try:
            return guest.rsp.read_memory(va, size)
        except ProtocolError:
            continue
    raise AssertionError(f"no vCPU of the guest maps {va:#x}")
