"""Launcher decisions that need no guest: QEMU's command line and input checks."""

from pathlib import Path

import pytest

from qemuleak.errors import LaunchError
from qemuleak.launch import VM, VMConfig


def argv(**kw) -> list[str]:
    return VM(VMConfig(kernel=Path("/k"), **kw)).command_line()


def option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_x86_64_defaults():
    a = argv()
    assert a[0] == "qemu-system-x86_64"
    assert option(a, "-accel") == ["tcg,thread=multi"]
    assert option(a, "-cpu") == ["max,la57=off"]
    assert option(a, "-m") == ["512M"] and option(a, "-smp") == ["1"]
    assert option(a, "-object") == ["memory-backend-memfd,id=ram0,size=512M,share=on"]
    assert "memory-backend=ram0" in option(a, "-machine")
    assert option(a, "-append") == ["console=ttyS0 panic=-1"]
    assert "-no-reboot" in a and option(a, "-serial") == ["stdio"]


def test_arm64_machine_and_options():
    a = argv(arch="arm64", memory_mib=2048, smp=2, kaslr=False, append="slub_debug=U",
             initrd=Path("/i"), drive=Path("/d.ext2"))
    assert a[0] == "qemu-system-aarch64"
    assert option(a, "-M") == ["virt"] and option(a, "-cpu") == ["cortex-a57"]
    assert option(a, "-m") == ["2048M"] and option(a, "-smp") == ["2"]
    assert option(a, "-append") == ["console=ttyAMA0 panic=-1 nokaslr root=/dev/vda rw slub_debug=U"]
    assert option(a, "-initrd") == ["/i"]
    assert option(a, "-drive") == ["file=/d.ext2,format=raw,if=virtio,snapshot=on"]


@pytest.mark.parametrize("append, expect", [
    ("", "root=/dev/vda rw"),
    ("quiet", "root=/dev/vda rw quiet"),
    ("root=/dev/vda1", "rw root=/dev/vda1"),               # the user's root= wins
    ("root=PARTUUID=1234-01 ro", "root=PARTUUID=1234-01 ro"),
    ("ro init=/sbin/x", "root=/dev/vda ro init=/sbin/x"),
    ("myroot=/dev/sda", "root=/dev/vda rw myroot=/dev/sda"),  # not a root= word
])
def test_drive_root_on_the_command_line(append, expect):
    a = argv(drive=Path("/d.ext2"), append=append)
    assert option(a, "-append") == ["console=ttyS0 panic=-1 " + expect]


def test_drive_is_vda_then_read_only_disks():
    a = argv(drive=Path("/r,1.ext2"), ro_drives=(Path("/files.tar"),))
    # the root disk first (vda), never written (snapshot); QEMU's commas doubled
    assert option(a, "-drive") == ["file=/r,,1.ext2,format=raw,if=virtio,snapshot=on",
                                   "file=/files.tar,format=raw,if=virtio,readonly=on"]
    assert option(argv(), "-drive") == []
    assert "root=" not in option(argv(ro_drives=(Path("/f"),)), "-append")[0]


def test_kvm_only_when_asked():
    assert option(argv(accel="kvm"), "-accel") == ["kvm"]


def test_never_listens_on_all_interfaces():
    assert "0.0.0.0" not in " ".join(argv())


@pytest.mark.parametrize("field", ["kernel", "initrd", "drive", "ro_drives"])
def test_missing_inputs_are_one_line(tmp_path, field):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"x")
    cfg = VMConfig(kernel=kernel)
    missing = tmp_path / "missing"
    setattr(cfg, field, (missing,) if field == "ro_drives" else missing)
    with pytest.raises(LaunchError) as e:
        VM(cfg).start()
    assert str(e.value).splitlines() == [str(e.value)]
    assert str(tmp_path / "missing") in str(e.value)


def test_missing_qemu_binary(tmp_path, monkeypatch):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"x")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError) as e:
        VM(VMConfig(kernel=kernel)).start()
    assert e.value.message == "qemu-system-x86_64 not found"
