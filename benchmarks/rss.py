"""This process's memory, read from /proc/self/status (standard library only: the autofaiss
environment imports it too).

    rss_kib("VmHWM")              # peak RSS of this address space, KiB
    with AnonPeak() as anon:      # sampled peak of anonymous RSS while the block runs
        build()
    anon.peak_kib, anon.start_kib

VmHWM, not `ru_maxrss`: Linux keeps ru_maxrss across fork + execve, so a child started by a
large parent would report the parent's RSS at the fork as its own peak. VmHWM counts file pages
too (library code, a memory-mapped float store); `AnonPeak` samples RssAnon, the memory a
build allocates, which is what `index.max_memory_mb` budgets (clean file pages are page cache
the kernel drops under pressure).
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path

SAMPLE_S = 0.005


def rss_kib(field: str = "VmHWM") -> int:
    """A /proc/self/status field in KiB (VmHWM, VmRSS, RssAnon, ...); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class AnonPeak:
    """Samples RssAnon every SAMPLE_S seconds in a thread while the block runs (a peak shorter
    than that can be missed)."""

    def __init__(self) -> None:
        self.start_kib = self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak_kib = max(self.peak_kib, rss_kib("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self.start_kib = self.peak_kib = rss_kib("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, rss_kib("RssAnon"))
