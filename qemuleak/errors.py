"""Error classes. Every error a user can cause is a QemuleakError: the CLI prints
its one-line message (and hint) and exits 2; tracebacks only with --debug."""


class QemuleakError(Exception):
    """Base class: `message` says what went wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ImageError(QemuleakError):
    """A guest image (kernel, initrd, module) is missing or unusable."""


class LaunchError(QemuleakError):
    """QEMU could not be started, or the guest died or timed out."""


class GuestConnectionError(QemuleakError):
    """Nothing to talk to: refused, not a gdbstub, or the guest went away."""


class ProtocolError(QemuleakError):
    """The gdbstub answered something we cannot make sense of."""


class GuestMemoryError(QemuleakError):
    """Guest memory could not be read: unmapped address, no backend, short read."""


class SymbolError(QemuleakError):
    """No usable symbols: missing or truncated System.map, vmlinux of another kernel."""


class KernelTypeError(QemuleakError):
    """A kernel structure or field we need is not described by the available type info."""
