"""Process-wide settings for speed. A library must not change its host process behind its back, so nothing here
runs on import: the `hierax` command applies them (it owns its process), and Python users may call them."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt(3) parameters and the values set; mallopt takes a C int, so 2**31 - 1 is the largest.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1


def has_glibc_malloc() -> bool:
    """Whether this process allocates through glibc's malloc (Linux with glibc), whose mallopt we can call."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _user_tuned_malloc() -> bool:
    """Whether the user already chose how malloc behaves (HIERAX_KEEP_FREED_MEMORY=0, glibc tunables, MALLOC_*_
    variables, a preloaded allocator such as jemalloc or tcmalloc): then their choice stands."""
    env = os.environ
    return (
        env.get("HIERAX_KEEP_FREED_MEMORY", "1") == "0"
        or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
        or any(key.startswith("MALLOC_") and key.endswith("_") for key in env)
        or "malloc" in env.get("LD_PRELOAD", "")
    )


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks above a threshold (that adapts up to 32 MiB) with fresh mmap pages and trims
    the heap after large frees, so every forward pass touches new pages again, at about 3.8 us a page fault in
    a VM. For hieradet_d_small (2 threads, Zen 3) that is 33,000-38,000 faults a pass at 224 px, batch 8, and
    0.7-1.0 million at 384 px, batch 16. Serving blocks up to 1 GiB from the heap and never trimming it, repeated
    passes reuse their pages: no faults, 1.16x the images/s at 224 px batch 8 and 1.20-1.28x at 384 px batch 16
    (none at batch 1, which faults little anyway); the price is peak memory, 12% higher at 384 px batch 8 and
    27% at batch 16, held rather than returned. Returns whether it was applied: glibc (Linux) only, and not where
    the user tuned malloc already or set HIERAX_KEEP_FREED_MEMORY=0."""
    if not has_glibc_malloc() or _user_tuned_malloc():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the running process's own glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    logger.debug("malloc keeps freed memory: %s", applied)
    return applied
