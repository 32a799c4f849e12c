"""Finding built guest images in the cache, and what images/build.py decides."""

import dataclasses
import importlib.util
import lzma
from pathlib import Path

import pytest

from qemuleak.errors import ImageError
from qemuleak.images import GuestImage, arch_dir, find_image, write_manifest


def make_image(root: Path, arch="x86_64", release="6.1.0-1-cloud-amd64") -> GuestImage:
    d = arch_dir(arch) / release
    d.mkdir(parents=True)
    paths = {}
    for name in ("kernel", "vmlinux", "system_map", "config", "busybox", "base_initramfs", "leaky"):
        paths[name] = d / name
        paths[name].write_text(name)
    image = GuestImage(arch=arch, release=release, version="6.1.1-1",
                       modules={"leaky": paths.pop("leaky")}, **paths)
    write_manifest(d, image)
    (arch_dir(arch) / "current").write_text(release + "\n")
    return image


def test_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMULEAK_CACHE", str(tmp_path))
    image = make_image(tmp_path)
    assert find_image("x86_64") == image
    assert find_image("amd64").module("leaky") == image.modules["leaky"]
    with pytest.raises(ImageError):
        image.module("allocstorm")


def test_nothing_built(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMULEAK_CACHE", str(tmp_path))
    with pytest.raises(ImageError) as e:
        find_image("arm64")
    assert "no arm64 guest image" in e.value.message and "make images" in e.value.hint


def test_incomplete_image(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMULEAK_CACHE", str(tmp_path))
    image = make_image(tmp_path)
    image.vmlinux.unlink()
    with pytest.raises(ImageError) as e:
        find_image("x86_64")
    assert "incomplete" in e.value.message and str(image.vmlinux) in e.value.message


def test_disk_root_files_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMULEAK_CACHE", str(tmp_path))
    image = make_image(tmp_path)
    assert image.rootfs is None and find_image("x86_64").rootfs is None   # older manifests
    d = image.kernel.parent
    (d / "rootfs.ext2").write_bytes(b"ext2")
    (d / "loader.gz").write_bytes(b"cpio")
    with_root = dataclasses.replace(image, rootfs=d / "rootfs.ext2", loader_initrd=d / "loader.gz")
    write_manifest(d, with_root)
    assert find_image("x86_64") == with_root
    (d / "rootfs.ext2").unlink()
    with pytest.raises(ImageError) as e:
        find_image("x86_64")
    assert "incomplete" in e.value.message and "rootfs.ext2" in e.value.message


def load_build_script():
    spec = importlib.util.spec_from_file_location(
        "images_build", Path(__file__).resolve().parents[2] / "images/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_ko(name: str, depends: str) -> bytes:
    return b"\x7fELF" + f"\0license=GPL\0depends={depends}\0name={name}\0".encode()


def test_loader_modules_dependencies_first(tmp_path):
    build = load_build_script()
    moddir = tmp_path / "lib/modules/6.1.0-1-cloud-amd64"
    (moddir / "kernel/drivers/virtio").mkdir(parents=True)
    (moddir / "kernel/drivers/block").mkdir(parents=True)
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/lib/crc16.ko\n")
    kos = {"virtio": "", "virtio_ring": "", "virtio_pci_modern_dev": "",
           "virtio_pci": "virtio_ring,virtio,virtio_pci_modern_dev",
           "virtio_blk": "virtio_ring,virtio,crc16"}
    for name, deps in kos.items():
        d = "block" if name == "virtio_blk" else "virtio"
        data = fake_ko(name, deps)
        if name == "virtio_pci_modern_dev":       # Debian may compress them
            ko = moddir / f"kernel/drivers/{d}/virtio-pci-modern-dev.ko.xz"
            ko.write_bytes(lzma.compress(data))
        else:
            (moddir / f"kernel/drivers/{d}/{name}.ko").write_bytes(data)
    got = build.loader_modules(moddir, ("virtio_pci", "virtio_blk", "ext4"))
    names = [n for n, _ in got]
    assert sorted(names) == sorted(kos)                       # ext4, crc16: built in
    for name, deps in kos.items():
        assert all(names.index(dep) < names.index(name) for dep in deps.split(",") if dep in kos)
    assert dict(got)["virtio_pci_modern_dev"] == fake_ko("virtio_pci_modern_dev", "")
    with pytest.raises(build.BuildError, match="virtio_net"):
        build.loader_modules(moddir, ("virtio_net",))


def test_series_each_have_their_current(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMULEAK_CACHE", str(tmp_path))
    monkeypatch.delenv("QEMULEAK_SERIES", raising=False)
    old = make_image(tmp_path)                                # writes the plain `current`
    assert find_image("x86_64") == old == find_image("x86_64", "6.1")
    with pytest.raises(ImageError) as e:                      # none of 6.12 built yet
        find_image("x86_64", "6.12")
    assert "series 6.12" in e.value.message and "--series 6.12" in e.value.hint
    new = make_image(tmp_path, release="6.12.118+deb12-cloud-amd64")
    # make_image moved the plain `current`; the series file says which is which
    (arch_dir("x86_64") / "current").write_text(old.release + "\n")
    (arch_dir("x86_64") / "current-6.12").write_text(new.release + "\n")
    assert find_image("x86_64", "6.12").release == new.release
    assert find_image("x86_64").release == old.release
    monkeypatch.setenv("QEMULEAK_SERIES", "6.12")
    assert find_image("x86_64").release == new.release
    (arch_dir("x86_64") / "current-6.1").write_text(new.release + "\n")   # wins over `current`
    assert find_image("x86_64", "6.1").release == new.release
    with pytest.raises(ImageError, match="unknown kernel series"):
        find_image("x86_64", "5.10")


def test_build_series_metapackages():
    from qemuleak.images import SERIES
    assert SERIES["6.1"].format(arch="amd64") == "linux-image-cloud-amd64"
    assert SERIES["6.12"].format(arch="arm64") == "linux-image-6.12-cloud-arm64"
    assert load_build_script().DEFAULT_SERIES == "6.1"
