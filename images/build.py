#!/usr/bin/env python3
"""Build and cache the test guests: Debian cloud kernel, debug vmlinux, System.map,
config, busybox initramfs base, our test modules, and a disk-root guest (a busybox
rootfs.ext2 made with mke2fs -d, no root rights needed, and a loader initrd with the
kernel's own virtio_blk module and what it depends on), per architecture.

    python images/build.py [--arch x86_64|arm64|all] [--series 6.1|6.12|all] [--force]

Kernel series (qemuleak.images.SERIES): 6.1 is Debian 12's own cloud kernel (the
default guest), 6.12 its LTS backport (linux-image-6.12-cloud-<arch>). The kernel ABI
of each is resolved from the series' metapackage (it changes with every security
update). Everything comes from Debian's archive through apt;
headers are unpacked into the cache (not installed), so the arm64 ones can be used
with the cross compiler without pulling arm64 gcc into the host. Each step is
skipped when its output is already there: a second run takes seconds.
"""

import argparse
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from qemuleak.arch import Arch, all_arches, get_arch  # noqa: E402
from qemuleak.images import (DEFAULT_SERIES, SERIES, GuestImage, arch_dir, cache_root,  # noqa: E402
                             current_file, write_manifest)
from qemuleak import initramfs  # noqa: E402
from qemuleak.initramfs import build_base  # noqa: E402

MODULES = ("leaky", "allocstorm")
# What the loader initrd loads (with their dependencies) unless built in: the virtio
# PCI transport, the disk driver, and ext4 (which mounts ext2 on Debian's kernels).
LOADER_DRIVERS = ("virtio_pci", "virtio_blk", "ext4")
ROOTFS_MIB = 16


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[images] {msg}", flush=True)


def run(cmd: list[str], **kw) -> str:
    try:
        res = subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} not found; run `make setup`") from None
    except subprocess.CalledProcessError as e:
        tail = "\n".join((e.stdout + e.stderr).splitlines()[-25:])
        raise BuildError(f"{' '.join(cmd)} failed:\n{tail}") from None
    return res.stdout


def pkg(name: str, arch: Arch) -> str:
    return f"{name}:{arch.debian_arch}"


def resolve_kernel(arch: Arch, series: str = DEFAULT_SERIES) -> tuple[str, str]:
    """(release, version) of the kernel that the series' metapackage depends on."""
    meta = pkg(SERIES[series].format(arch=arch.debian_arch), arch)
    try:
        out = run(["apt-cache", "show", "--no-all-versions", meta])
    except BuildError:
        out = ""
    m = re.search(r"^Depends: linux-image-(\S+-cloud-\S+) \(= (\S+)\)", out, re.M)
    if not m:
        raise BuildError(f"apt does not know {meta}: run `make setup` "
                         f"(it enables the {arch.debian_arch} architecture and runs apt-get update)")
    return m.group(1), m.group(2)


def download(names: list[str]) -> dict[str, Path]:
    """apt-get download each package spec (name[:arch][=version]); name -> .deb path."""
    debs = cache_root() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing = []
    for spec in names:
        name, _, version = spec.partition("=")
        base, _, darch = name.partition(":")
        pattern = f"{base}_{version.replace(':', '%3a') or '*'}_{darch or '*'}.deb"
        hits = sorted(debs.glob(pattern)) if version else []
        if hits:
            found[spec] = hits[-1]
        else:
            missing.append(spec)
    if missing:
        log("downloading " + " ".join(missing))
        run(["apt-get", "download", "-q", *missing], cwd=debs)
        for spec in missing:
            name, _, version = spec.partition("=")
            base, _, darch = name.partition(":")
            hits = sorted(debs.glob(f"{base}_{version.replace(':', '%3a') or '*'}_{darch or '*'}.deb"),
                          key=lambda p: p.stat().st_mtime)
            if not hits:
                raise BuildError(f"apt-get download {spec} gave no .deb")
            found[spec] = hits[-1]
    return found


def extract(deb: Path, dest: Path, members: list[str] | None = None) -> None:
    """Unpack `deb` (all of it, or the wildcard `members`) under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = ["tar", "-x", "-C", str(dest)]
    if members:
        tar += ["--wildcards", *members]
    p1 = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    p2 = subprocess.run(tar, stdin=p1.stdout, capture_output=True, text=True)
    p1.stdout.close()
    if p1.wait() != 0 or p2.returncode != 0:
        raise BuildError(f"could not unpack {deb.name}: {p2.stderr.strip()}")


def source_hash(*dirs: Path) -> str:
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file() and (f.suffix in (".c", ".h") or f.name in ("Kbuild", "Makefile")):
                h.update(f.relative_to(d.parent).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def build_kernel(arch: Arch, out: Path, release: str, version: str) -> None:
    want = [out / n for n in ("kernel", "vmlinux", "System.map", "config")]
    if all(p.is_file() for p in want):
        return
    debs = download([f"{pkg('linux-image-' + release, arch)}={version}",
                     f"{pkg('linux-image-' + release + '-dbg', arch)}={version}"])
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        t = Path(tmp)
        image_deb, dbg_deb = debs.values()
        log(f"{arch.name}: unpacking kernel {release}")
        extract(image_deb, t, ["./boot/vmlinuz-*", "./boot/config-*"])
        log(f"{arch.name}: unpacking vmlinux and System.map (~10 s)")
        extract(dbg_deb, t, ["./usr/lib/debug/boot/*"])
        os.replace(t / "usr/lib/debug/boot" / f"vmlinux-{release}", out / "vmlinux")
        os.replace(t / "usr/lib/debug/boot" / f"System.map-{release}", out / "System.map")
        os.replace(t / "boot" / f"config-{release}", out / "config")
        os.replace(t / "boot" / f"vmlinuz-{release}", out / "kernel")
    dbg_deb.unlink()   # ~280 MB that is never needed again


def build_headers(arch: Arch, out: Path, release: str, version: str) -> Path:
    """Unpack the kernel headers, the common headers and the host's kbuild tools."""
    root = out / "headers"
    tree = root / "usr/src" / f"linux-headers-{release}"
    if (tree / "Makefile").is_file() and (tree / "scripts/basic/fixdep").exists():
        return tree
    common = re.sub(r"-cloud-.*$", "-common", release)
    kbuild = kbuild_package(arch, release, version)
    debs = download([f"{pkg('linux-headers-' + release, arch)}={version}",
                     f"linux-headers-{common}={version}",
                     f"{kbuild}={version}"])   # host arch: its tools run here
    log(f"{arch.name}: unpacking headers {release}")
    shutil.rmtree(root, ignore_errors=True)
    for deb in debs.values():
        extract(deb, root)
    # The arch tree's Makefile includes the common one by absolute path: point it here.
    makefile = tree / "Makefile"
    makefile.write_text(makefile.read_text().replace("/usr/src/", f"{root}/usr/src/"))
    if not (tree / "scripts/basic/fixdep").exists():
        raise BuildError(f"headers for {release} unpacked but {tree}/scripts is not usable")
    return tree


def kbuild_package(arch: Arch, release: str, version: str) -> str:
    """The linux-kbuild package the headers depend on: linux-kbuild-6.1 for 6.1,
    linux-kbuild-6.12.118+deb12 (the full ABI) for the 6.12 backports."""
    out = run(["apt-cache", "show", f"{pkg('linux-headers-' + release, arch)}={version}"])
    m = re.search(r"^Depends:.*?\b(linux-kbuild-[^\s,]+)", out, re.M)
    if not m:
        raise BuildError(f"linux-headers-{release} names no linux-kbuild package")
    return m.group(1)


def build_busybox(arch: Arch, out: Path) -> Path:
    busybox = out / "busybox"
    if not busybox.is_file():
        deb = download([pkg("busybox-static", arch)])[pkg("busybox-static", arch)]
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            extract(deb, Path(tmp), ["./bin/busybox"])
            os.replace(Path(tmp) / "bin/busybox", busybox)
    base = out / "initramfs-base.cpio.gz"
    if not base.is_file() or base.stat().st_mtime < busybox.stat().st_mtime:
        log(f"{arch.name}: base initramfs")
        build_base(busybox, base)
    return base


def build_modules(arch: Arch, out: Path, tree: Path, force: bool) -> dict[str, Path]:
    built = {}
    for name in MODULES:
        src = HERE / "modules" / name
        stamp = out / "modules" / f"{name}.src"
        ko = out / "modules" / f"{name}.ko"
        digest = source_hash(src)
        if not force and ko.is_file() and stamp.is_file() and stamp.read_text() == digest:
            built[name] = ko
            continue
        log(f"{arch.name}: building module {name}")
        work = out / "build" / name
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        # No module BTF: the 6.12 headers ship a BTF-only vmlinux, so kbuild would run
        # pahole (not installed; the 6.1 headers have no vmlinux and skip it anyway).
        run(["make", "-C", str(tree), f"M={work}", *arch.kbuild_args,
             "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"])
        ko.parent.mkdir(exist_ok=True)
        shutil.copy2(work / f"{name}.ko", ko)
        stamp.write_text(digest)
        built[name] = ko
    return built


def build_disk_root(arch: Arch, out: Path, release: str, version: str,
                    busybox: Path) -> tuple[Path, Path]:
    """(rootfs.ext2, loader initrd): a buildroot-like guest whose root is a disk.

    The rootfs is a busybox tree with the base initramfs's init as /sbin/init, made
    into ext2 by `mke2fs -d` and given /dev/console by debugfs (no root rights). The
    loader initrd holds the kernel's own modules that the disk root needs, from the
    linux-image .deb, decompressed, dependencies first."""
    rootfs, loader = out / "rootfs.ext2", out / "loader-initrd.cpio.gz"
    stamp = out / "disk-root.src"
    h = hashlib.sha256(busybox.read_bytes())
    for part in (initramfs.INIT_SCRIPT, initramfs.PROFILE, initramfs.LOADER_INIT, version,
                 *initramfs.ROOT_DIRS, *LOADER_DRIVERS, str(ROOTFS_MIB)):
        h.update(part.encode() + b"\0")
    digest = h.hexdigest()[:16]
    if rootfs.is_file() and loader.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return rootfs, loader
    log(f"{arch.name}: disk-root guest (rootfs.ext2, loader initrd)")
    (image_deb,) = download([f"{pkg('linux-image-' + release, arch)}={version}"]).values()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        t = Path(tmp)
        tree = t / "root"
        for d in initramfs.ROOT_DIRS:
            (tree / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, tree / "bin/busybox")
        (tree / "bin/sh").symlink_to("busybox")
        (tree / "sbin/init").write_text(initramfs.INIT_SCRIPT)
        (tree / "etc/profile").write_text(initramfs.PROFILE)
        for f, mode in (("bin/busybox", 0o755), ("sbin/init", 0o755), ("etc/profile", 0o644)):
            (tree / f).chmod(mode)
        image = t / "rootfs.ext2"
        run([sbin_tool("mke2fs"), "-q", "-F", "-t", "ext2", "-L", "qemuleak-root",
             "-E", "root_owner=0:0", "-d", str(tree), str(image), f"{ROOTFS_MIB}M"])
        # device nodes need root rights on the host, not in an image
        (t / "debugfs.cmd").write_text("cd /dev\nmknod console c 5 1\nsif console mode 020600\n"
                                      "mknod null c 1 3\nsif null mode 020666\n")
        run([sbin_tool("debugfs"), "-w", "-f", str(t / "debugfs.cmd"), str(image)])
        extract(image_deb, t / "deb", [f"./lib/modules/{release}/*"])
        modules = loader_modules(t / "deb/lib/modules" / release, LOADER_DRIVERS)
        log(f"{arch.name}: loader modules: {' '.join(name for name, _ in modules) or 'none'}")
        initramfs.build_loader(busybox, modules, loader)
        os.replace(image, rootfs)
    stamp.write_text(digest)
    return rootfs, loader


def sbin_tool(name: str) -> str:
    """e2fsprogs' tools live in /sbin, which a user's PATH may lack."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise BuildError(f"{name} not found; run `make setup` (it installs e2fsprogs)")
    return found


def loader_modules(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, .ko contents) of the `wanted` modules and their dependencies (from each
    module's .modinfo depends=), dependencies first; built-in ones left out."""
    def norm(name: str) -> str:
        return name.split(".ko")[0].replace("-", "_")
    builtin = {norm(Path(line).name) for line in
               (moddir / "modules.builtin").read_text().split()}
    files = {norm(f.name): f for f in moddir.rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = norm(name)
        if name in builtin or name in seen:
            return
        if name not in files:
            raise BuildError(f"module {name} is neither built in nor in {moddir}")
        seen.add(name)
        data = ko_bytes(files[name])
        m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            visit(dep)
        order.append((name, data))

    for name in wanted:
        visit(name)
    return order


def ko_bytes(path: Path) -> bytes:
    """A module file's contents, decompressed (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return run_bytes(["zstd", "-dc", str(path)])
    return data


def run_bytes(cmd: list[str]) -> bytes:
    try:
        return subprocess.run(cmd, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"{' '.join(cmd)} failed: {e}") from None


def build(arch: Arch, force: bool, series: str = DEFAULT_SERIES) -> GuestImage:
    if SERIES[series].startswith("linux-source-"):   # built from source, without ftrace
        sys.path.insert(0, str(HERE))
        import kernel_build
        return kernel_build.build(sys.modules[__name__], arch, force)
    release, version = resolve_kernel(arch, series)
    out = arch_dir(arch.name) / release
    out.mkdir(parents=True, exist_ok=True)
    log(f"{arch.name}: kernel series {series}: {release} ({version}) in {out}")
    build_kernel(arch, out, release, version)
    base = build_busybox(arch, out)
    tree = build_headers(arch, out, release, version)
    modules = build_modules(arch, out, tree, force)
    rootfs, loader = build_disk_root(arch, out, release, version, out / "busybox")
    image = GuestImage(arch=arch.name, release=release, version=version,
                       kernel=out / "kernel", vmlinux=out / "vmlinux",
                       system_map=out / "System.map", config=out / "config",
                       busybox=out / "busybox", base_initramfs=base, modules=modules,
                       rootfs=rootfs, loader_initrd=loader, series=series)
    write_manifest(out, image)
    current_file(arch.name, series).write_text(release + "\n")
    if series == DEFAULT_SERIES:   # what builds before kernel series read
        (arch_dir(arch.name) / "current").write_text(release + "\n")
    return image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="all", help="x86_64, arm64 or all (default)")
    ap.add_argument("--series", default="all",
                    help=f"kernel series: {', '.join(SERIES)} or all (default)")
    ap.add_argument("--force", action="store_true", help="rebuild the modules")
    args = ap.parse_args()
    arches = all_arches() if args.arch == "all" else [get_arch(args.arch)]
    if args.series != "all" and args.series not in SERIES:
        ap.error(f"--series: one of {', '.join(SERIES)} or all")
    series_list = list(SERIES) if args.series == "all" else [args.series]
    try:
        for series in series_list:
            for arch in arches:
                image = build(arch, args.force, series)
                log(f"{arch.name}: ready: {image.release}, modules {', '.join(image.modules)}")
    except BuildError as e:
        print(f"images: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
