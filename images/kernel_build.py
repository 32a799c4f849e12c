"""The no-ftrace test kernel (series "6.1-tiny"), built from Debian's linux-source-6.1.

The kernel's own defconfigs and buildroot's QEMU kernels have no FUNCTION_TRACER;
this guest is one of them: `make tinyconfig`, then images/noftrace/qemuleak-tiny.config
and the arch's fragment (images/noftrace/<arch>.config) merged by kconfig's
merge_config.sh, then `make olddefconfig`. The source tarball comes from the
linux-source-6.1 package (`make setup` installs it) and is unpacked into the cache,
${QEMULEAK_CACHE:-~/.cache/qemuleak}/noftrace/linux-source-6.1, with one out-of-tree
build directory per arch beside it (build-<arch>); the modules are built against that
tree. The image lands where the other series' do: images/<arch>/<release>/, release
6.1.N-qemuleak-tiny. Each step is skipped when its output is there and its inputs
(package version, fragments) are unchanged.

images/build.py calls build() for this series with itself as `b` (its helpers:
run, log, BuildError, build_busybox, build_modules).
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from qemuleak.arch import Arch
from qemuleak.images import GuestImage, arch_dir, cache_root, current_file, write_manifest

SERIES = "6.1-tiny"
SOURCE_PACKAGE = "linux-source-6.1"
TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENTS = Path(__file__).resolve().parent / "noftrace"
COMMON_FRAGMENT = FRAGMENTS / "qemuleak-tiny.config"
BOOT_IMAGE = {"x86_64": "arch/x86/boot/bzImage", "arm64": "arch/arm64/boot/Image"}
KERNEL_ARCH = {"x86_64": "x86_64", "arm64": "arm64"}
# Options that must come out of olddefconfig as written (y, or unset when None).
MUST = {"CONFIG_FUNCTION_TRACER": None, "CONFIG_DEBUG_KMEMLEAK": None, "CONFIG_SLUB": "y",
        "CONFIG_SLUB_DEBUG": "y", "CONFIG_STACKDEPOT": "y", "CONFIG_DEBUG_INFO": "y",
        "CONFIG_KALLSYMS_ALL": "y", "CONFIG_MODULES": "y", "CONFIG_SMP": "y",
        "CONFIG_CRASH_CORE": "y", "CONFIG_SPARSEMEM_VMEMMAP": "y",
        "CONFIG_DEBUG_INFO_BTF": "y"}   # BTF: pahole (dwarves)


def work_root() -> Path:
    return cache_root() / "noftrace"


def source_version(b) -> str:
    """The Debian version of the installed linux-source-6.1."""
    try:
        out = b.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE])
    except b.BuildError:
        out = ""
    if not out.strip() or not TARBALL.is_file():
        raise b.BuildError(f"{SOURCE_PACKAGE} is not installed ({TARBALL} missing); "
                           "run `make setup`")
    return out.strip()


def source_tree(b, version: str) -> Path:
    """The unpacked source, unpacked again when the package was upgraded."""
    tree = work_root() / SOURCE_PACKAGE
    stamp = tree / ".qemuleak-version"
    if stamp.is_file() and stamp.read_text() == version and (tree / "Makefile").is_file():
        return tree
    b.log(f"unpacking {TARBALL.name} {version} (~30 s)")
    work_root().mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tree, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=work_root()) as tmp:
        b.run(["nice", "-n", "10", "tar", "-xf", str(TARBALL), "-C", tmp])
        os.replace(Path(tmp) / SOURCE_PACKAGE, tree)
    stamp.write_text(version)
    # build trees made from the old source are stale
    for old in work_root().glob("build-*"):
        shutil.rmtree(old, ignore_errors=True)
    return tree


def make_args(arch: Arch, build: Path) -> list[str]:
    return [f"O={build}", f"ARCH={KERNEL_ARCH[arch.name]}",
            *[a for a in arch.kbuild_args if a.startswith("CROSS_COMPILE=")]]


def fragments(arch: Arch) -> list[Path]:
    return [COMMON_FRAGMENT, FRAGMENTS / f"{arch.name}.config"]


def inputs_digest(arch: Arch, version: str) -> str:
    h = hashlib.sha256(version.encode() + b"\0")
    for f in fragments(arch):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def configure(b, arch: Arch, src: Path, build: Path) -> None:
    """tinyconfig + the fragments + olddefconfig; checks what must (not) be set."""
    args = make_args(arch, build)
    b.run(["make", "-s", "-C", str(src), *args, "tinyconfig"])
    b.run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(build),
           str(build / ".config"), *map(str, fragments(arch))], cwd=src)
    b.run(["make", "-s", "-C", str(src), *args, "olddefconfig"])
    config = dict(line.split("=", 1) for line in (build / ".config").read_text().splitlines()
                  if line.startswith("CONFIG_"))
    wrong = [f"{k}={config.get(k, 'unset')}" for k, want in MUST.items()
             if config.get(k) != want]
    if wrong:
        raise b.BuildError(f"{arch.name} no-ftrace config came out wrong: {' '.join(wrong)}")


def build_kernel(b, arch: Arch, src: Path, build: Path, digest: str) -> None:
    """Configure and build in `build` unless it holds a kernel of these inputs."""
    stamp = build / ".qemuleak-inputs"
    done = stamp.is_file() and stamp.read_text() == digest and \
        (build / BOOT_IMAGE[arch.name]).is_file() and (build / "vmlinux").is_file()
    if done:
        return
    build.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    configure(b, arch, src, build)
    jobs = os.cpu_count() or 2
    b.log(f"{arch.name}: building the no-ftrace kernel (make -j{jobs}, a few minutes)")
    # nice: the build must not starve guests that run beside it
    b.run(["nice", "-n", "10", "make", "-s", "-C", str(src), *make_args(arch, build),
           f"-j{jobs}"])
    stamp.write_text(digest)


def build(b, arch: Arch, force: bool) -> GuestImage:
    version = source_version(b)
    src = source_tree(b, version)
    tree = work_root() / f"build-{arch.name}"
    digest = inputs_digest(arch, version)
    build_kernel(b, arch, src, tree, digest)
    release = b.run(["make", "-s", "-C", str(src), *make_args(arch, tree),
                     "kernelrelease"]).strip().splitlines()[-1]
    out = arch_dir(arch.name) / release
    out.mkdir(parents=True, exist_ok=True)
    b.log(f"{arch.name}: kernel series {SERIES}: {release} ({SOURCE_PACKAGE} {version}) in {out}")
    stamp = out / "kernel.src"
    fresh = not (stamp.is_file() and stamp.read_text() == digest and
                 all((out / n).is_file() for n in ("kernel", "vmlinux", "System.map", "config")))
    if fresh:
        for src_name, name in ((BOOT_IMAGE[arch.name], "kernel"), ("vmlinux", "vmlinux"),
                               ("System.map", "System.map"), (".config", "config")):
            shutil.copy2(tree / src_name, out / (name + ".tmp"))
            os.replace(out / (name + ".tmp"), out / name)
        stamp.write_text(digest)
    base = b.build_busybox(arch, out)
    # modules of a rebuilt kernel are rebuilt too (its Module.symvers changed)
    modules = b.build_modules(arch, out, tree, force or fresh)
    image = GuestImage(arch=arch.name, release=release, version=version,
                       kernel=out / "kernel", vmlinux=out / "vmlinux",
                       system_map=out / "System.map", config=out / "config",
                       busybox=out / "busybox", base_initramfs=base, modules=modules,
                       series=SERIES)
    write_manifest(out, image)
    current_file(arch.name, SERIES).write_text(release + "\n")
    return image

