"""Process-wide settings for speed. A library must not change its host process behind its back, so nothing here
runs on import: the `hierax` command applies them (it owns its process), and Python users may call them."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# mallopt(3) parameters and the values set; mallopt takes a C int, so 2**31 - 1 is the largest.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1

# PyTorch's CPU allocator backs blocks of 2 MiB and more with transparent huge pages when this is "1"; it reads it
# once, at the process's first tensor allocation.
_TORCH_THP = "THP_MEM_ALLOC_ENABLE"
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# virtio devices of a VM: the balloon's device id, and the bit of its features string (one character per feature
# bit) that says it reports free guest memory to the host.
_VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
_VIRTIO_BALLOON_ID = 5
_BALLOON_F_REPORTING = 5


def has_glibc_malloc() -> bool:
    """Whether this process allocates through glibc's malloc (Linux with glibc), whose mallopt we can call."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def has_transparent_huge_pages(setting: Path = _THP_SETTING) -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks for them ([always] or [madvise])."""
    try:
        text = setting.read_text()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def has_free_page_reporting(devices: Path = _VIRTIO_DEVICES) -> bool:
    """Whether this is a VM whose balloon device reports free guest memory to the host (virtio-balloon free page
    reporting), which takes it back: reported blocks are 2 MiB and larger, so a freed huge page soon goes to the
    host, and the next fault on it waits for the host to back it again."""
    for device in devices.glob("*"):
        try:
            kind = int((device / "device").read_text().strip(), 16)
            features = (device / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == _VIRTIO_BALLOON_ID and features[_BALLOON_F_REPORTING : _BALLOON_F_REPORTING + 1] == "1":
            return True
    return False


def _user_tuned_malloc() -> bool:
    """Whether the user already chose how memory is allocated (HIERAX_KEEP_FREED_MEMORY=0, THP_MEM_ALLOC_ENABLE,
    glibc tunables, MALLOC_*_ variables, a preloaded allocator such as jemalloc or tcmalloc): then their choice
    stands."""
    env = os.environ
    return (
        env.get("HIERAX_KEEP_FREED_MEMORY", "1") == "0"
        or _TORCH_THP in env
        or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
        or any(key.startswith("MALLOC_") and key.endswith("_") for key in env)
        or "malloc" in env.get("LD_PRELOAD", "")
    )


def fast_page_faults() -> str:
    """Make the page faults of large tensors cheap, choosing how by what this process, kernel and VM allow; returns
    the choice: "huge pages", "kept" or "" (nothing applied).

    A forward pass allocates its large activations afresh; by default each comes from fresh mmap pages, faulted in
    4 KiB at a time (hieradet_d_small at 384 px, batch 8: about 190,000 faults a pass). "huge pages": while torch
    has not been imported yet, have PyTorch back its blocks of 2 MiB and more with transparent huge pages (one fault
    per 2 MiB), where the kernel offers them; freed blocks still go back to the system, so peak memory stays that of
    the live tensors. Otherwise "kept": glibc keeps freed memory for reuse (`keep_freed_memory`), which is as fast
    but holds the heap's high-water mark, fragmentation included. Nothing in a VM with free page reporting
    (`has_free_page_reporting`): there the host takes back freed huge pages and every new one waits for it, so
    huge pages run slower than glibc's default, and kept memory gains a little for much more peak memory.
    Nothing either where the user tuned the allocator or set HIERAX_KEEP_FREED_MEMORY=0. Measured figures:
    benchmarks/README.md (issue 18)."""
    if _user_tuned_malloc():
        return ""
    if has_free_page_reporting():
        logger.debug("free page reporting: glibc's default allocator settings stay")
        return ""
    if "torch" not in sys.modules and has_transparent_huge_pages():
        os.environ[_TORCH_THP] = "1"
        logger.debug("torch allocates large blocks in transparent huge pages")
        return "huge pages"
    return "kept" if keep_freed_memory() else ""


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks above a threshold (that adapts up to 32 MiB) with fresh mmap pages and trims
    the heap after large frees, so every forward pass touches new pages again, at about 3.8 us a page fault in
    a VM. Serving blocks up to 1 GiB from the heap and never trimming it, repeated passes reuse their pages: no
    faults, 1.16x the images/s at 224 px batch 8 and 1.20-1.28x at 384 px batch 16 (Zen 3); the price is peak
    memory, held rather than returned, 12-27% higher (fragmentation of the heap), which is why `fast_page_faults`
    prefers huge pages. Returns whether it was applied: glibc (Linux) only, and not where the user tuned malloc
    already or set HIERAX_KEEP_FREED_MEMORY=0."""
    if not has_glibc_malloc() or _user_tuned_malloc():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the running process's own glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    logger.debug("malloc keeps freed memory: %s", applied)
    return applied
