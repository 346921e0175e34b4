"""cpsl.malloc: glibc's malloc thresholds for a step's process (kept heap memory instead of fresh mmap pages)."""

import subprocess
import sys
import textwrap

import pytest

from cpsl.malloc import glibc, wanted

# Allocate 8 MiB with libc's malloc in a fresh process, after tune_malloc() or not, and report whether the block
# was mmapped (mallinfo2's count of mmapped blocks grows) and how many free bytes the heap keeps after free().
PROBE = textwrap.dedent("""
    import ctypes, sys
    from cpsl.malloc import tune_malloc
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    tuned = tune_malloc()
    before = libc.mallinfo2().hblks
    block = libc.malloc(8 << 20)
    mmapped = libc.mallinfo2().hblks - before
    libc.free(block)
    print(tuned, mmapped, libc.mallinfo2().fordblks)
""")
GLIBC = glibc()


def probe(**env: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={"PATH": "/usr/bin:/bin", **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_user_settings_and_the_switch_win():
    assert wanted({"CPSL_MALLOC_TUNING": "0"}) == (False, "CPSL_MALLOC_TUNING=0")
    assert wanted({"MALLOC_TRIM_THRESHOLD_": "1000000"}) == (False, "MALLOC_TRIM_THRESHOLD_ is set")
    assert wanted({"MALLOC_MMAP_THRESHOLD_": "1000000"}) == (False, "MALLOC_MMAP_THRESHOLD_ is set")
    assert wanted({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == (False, "GLIBC_TUNABLES sets glibc.malloc")
    assert wanted({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) == (True, "") or not GLIBC


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_tuned_process_keeps_large_blocks_on_the_heap():
    tuned, mmapped, kept = probe()
    assert tuned == "True"
    assert mmapped == 0                  # 8 MiB < the 32 MiB mmap threshold: served from the heap
    assert kept >= 8 << 20               # and kept after free (< the 256 MiB trim threshold)
    off, mmapped_off, kept_off = probe(CPSL_MALLOC_TUNING="0")
    assert off == "False"
    assert mmapped_off == 1 and kept_off < 8 << 20   # glibc's default: a fresh mapping, unmapped at free


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_python_m_cpsl_tunes_its_process():
    # the entry point of every step (python -m cpsl, torchrun -m cpsl) sets the thresholds: run it (--version),
    # then allocate in the same process
    entry = PROBE.replace("tuned = tune_malloc()", textwrap.dedent("""
        import runpy
        sys.argv = ["cpsl", "--version"]
        try:
            runpy.run_module("cpsl", run_name="__main__")
        except SystemExit:
            pass
        tuned = "entry"
    """).strip())
    out = subprocess.run([sys.executable, "-c", entry], env={"PATH": "/usr/bin:/bin"}, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[-3:-1] == ["entry", "0"], out     # the 8 MiB block came from the heap
