"""Finding built guest images in the cache."""

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
