"""Fault in big fresh arrays on another thread, ahead of the code that fills them.

Why: a reload writes ~2 GB of arrays the process never had, and the kernel maps
each page on its first write. On a VM whose host backs guest memory lazily that first
touch costs ~2 s per GB on one thread (docs/benchmarks.md, Index), which was a third
of a 10M-item reload. madvise(MADV_POPULATE_WRITE) maps the pages without writing
them, so it can run while the reader fills the same arrays: no race on the contents,
and the two cores share the faulting. Linux 5.14+; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import threading
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # <linux/mman.h>
_STEP = 64 << 20  # bytes per madvise call: the reader soon finds pages it needs
_MIN_BYTES = 64 << 20  # smaller loads gain nothing worth a thread
# The host's first-touch cost is paid per faulting thread: two threads fault ~2x
# faster than one on the 2-core dev VM (measured; more did not help there).
THREADS = 2

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - not a libc platform
    _libc = None


def _chunks(arrays: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """(address, size) of page-aligned pieces of at most _STEP bytes."""
    page = mmap.PAGESIZE
    out = []
    for a in arrays:
        start = -(-a.ctypes.data // page) * page
        end = (a.ctypes.data + a.nbytes) // page * page
        out += [(at, min(_STEP, end - at)) for at in range(start, end, _STEP)]
    return out


def _populate(chunks: Sequence[tuple[int, int]]) -> None:
    for at, size in chunks:
        if _libc.madvise(at, size, MADV_POPULATE_WRITE) != 0:
            log.debug("MADV_POPULATE_WRITE failed (errno %d)", ctypes.get_errno())
            return


def in_background(
    arrays: Sequence[np.ndarray], threads: int = THREADS
) -> list[threading.Thread]:
    """Start faulting in the arrays' pages on `threads` threads, which take turns
    over pieces in address order; returns them (join to wait): none when there is
    nothing worth doing. The arrays must stay alive until they finish."""
    arrays = [a for a in arrays if a.flags.c_contiguous and a.nbytes]
    if _libc is None or sum(a.nbytes for a in arrays) < _MIN_BYTES:
        return []
    chunks = _chunks(arrays)
    started = []
    for i in range(threads):
        t = threading.Thread(target=_populate, args=(chunks[i::threads],))
        t.start()
        started.append(t)
    return started
