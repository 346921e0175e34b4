"""glibc malloc settings for a step's process: keep freed memory for the next iteration instead of returning it.

A training iteration allocates and frees the same large tensors again and again (activations of 0.5-16 MB, the
(images, anchors, queue rows) matrices of stage 1's contrastive term). glibc serves blocks above its mmap
threshold with fresh ``mmap`` pages and gives freed memory at the top of the heap back to the system above its
trim threshold, so each iteration pays page faults and zeroing on memory it just released. Both thresholds start
at 128 KiB and the dynamic one stops at 32 MiB (trim 64 MiB). ``tune_malloc`` fixes them at 32 MiB (mmap) and
256 MiB (trim) in the step's process before it allocates much; the loader worker processes it forks inherit them.
A demo stage-1 job then has 30% of the page faults and half the system time, and stage 1's contrastive term runs
1.4x as fast (56 against 80 ms at 4,096 queue rows; benchmarks/README.md, "Host-side costs of the demo's jobs");
the results are the same bit for bit (where memory comes from does not change any value). The cost is up to
256 MiB of freed memory kept per process.

It changes nothing where it cannot apply or should not: on a C library other than glibc (macOS, musl), or when
the user set either threshold (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES``
naming ``glibc.malloc``): the user's choice wins. ``CPSL_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt(3) parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def wanted(env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Whether ``tune_malloc`` should set the thresholds here, and why not when it should not."""
    env = os.environ if env is None else env
    if env.get("CPSL_MALLOC_TUNING", "1") == "0":
        return False, "CPSL_MALLOC_TUNING=0"
    for key in USER_SETTINGS:
        if key in env:
            return False, f"{key} is set"
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return False, "GLIBC_TUNABLES sets glibc.malloc"
    if not glibc():
        return False, "not glibc"
    return True, ""


def glibc() -> bool:
    """Whether this process runs on glibc (the C library that ``mallopt`` here belongs to)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):   # no os.confstr (Windows), or the name is unknown (musl, macOS)
        return False


def tune_malloc(env: dict[str, str] | None = None) -> bool:
    """Set glibc's mmap and trim thresholds (module docstring); True when both were set."""
    ok, _ = wanted(env)
    if not ok:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
