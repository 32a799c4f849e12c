#!/usr/bin/env bash
# Install the host packages qemuleak needs, only those missing: QEMU for both arches,
# cpio, make, the arm64 cross compiler, kbuild's build tools, and e2fsprogs (mke2fs
# -d makes the test guests' rootfs.ext2 without root rights), and linux-source-6.1
# and dwarves (pahole: BTF) for the no-ftrace test kernel images/kernel_build.py
# builds. Enables Debian's
# arm64 architecture so images/build.py can download arm64 kernels, headers and
# busybox (they are unpacked into the cache, never installed). Fast when all is there.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PKGS=(qemu-system-x86 qemu-system-arm cpio make gcc gcc-12
      gcc-aarch64-linux-gnu gcc-12-aarch64-linux-gnu libc6-dev-arm64-cross
      bc flex bison libelf-dev libssl-dev dpkg-dev xz-utils python3-venv gdb e2fsprogs
      linux-source-6.1 dwarves)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

need_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "[setup] enabling the arm64 architecture for kernel and busybox downloads"
    $SUDO dpkg --add-architecture arm64
    need_update=1
fi
# Package lists that do not know the arm64 cloud kernel, or are older than a day,
# would resolve an ABI that has left the mirror.
if [ -z "$(apt-cache policy linux-image-cloud-arm64:arm64 2>/dev/null | grep 'Candidate:' | grep -v none)" ] ||
   [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    need_update=1
fi
if [ "${#missing[@]}" -gt 0 ] || [ "$need_update" -eq 1 ]; then
    echo "[setup] apt-get update"
    $SUDO apt-get update -q >/dev/null
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "[setup] installing: ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "[setup] host packages ready"
