"""How the C allocator serves a CPU step's large tensors (glibc malloc).

A step allocates its activations anew: a 2,048-token prefill of the qwen2.5-0.5b shape
makes a 40 MB gate/up product in each of 24 layers. glibc serves every block above its
mmap threshold (which adapts, but never past 32 MiB) with a fresh mmap and unmaps it on
free, so such a tensor faults all of its pages in again, and the kernel zeroes them, on
every step. In a virtual machine each fault costs more still. On a 2-core Xeon KVM guest,
writing a fresh 40 MB tensor took 8-15 ms against 3 ms for the same tensor reused; with
blocks kept, the 2,048-token prefill step ran 1.23x as fast (1,712 against 1,396 ms), and
`kvflow serve` answered a 2,000-token prompt in 1,268-1,283 ms against 1,644.

`keep_freed_blocks` has malloc serve every block from its heaps and keep freed memory
there, so a step reuses the pages the steps before it faulted in. It also gives every
thread the main arena: a thread's own arena unmaps a heap that it freed whole, whatever
the threshold, and the server steps its engine on a thread. A thread takes its arena at
its first allocation, and the arena count is fixed when the first thread does, so this
must run before the threads start (`kvflow serve` calls it before it starts them). The
cost is that the process holds the peak of its transient memory instead of handing it
back: what a server holds for its KV cache and weights anyway, plus one step's
activations. KVFLOW_MALLOC_UNMAP=1 leaves glibc as it was, to measure the difference."""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# Freed memory at the top of a heap is handed back only past this much (mallopt takes an
# int): far more than a step's activations.
TRIM_THRESHOLD = 2**31 - 1


def glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def describe() -> str:
    """How a CPU engine's large blocks are served here, for `kvflow env`."""
    if not glibc():
        return "the C library's own way (not glibc)"
    if os.environ.get("KVFLOW_MALLOC_UNMAP"):
        return "mapped afresh for each tensor above 32 MiB (KVFLOW_MALLOC_UNMAP)"
    return "kept in glibc's heaps once freed, for the next step (KVFLOW_MALLOC_UNMAP=1: not)"


@functools.cache
def keep_freed_blocks() -> bool:
    """Makes glibc serve large blocks from its heaps and keep them; True once done. False
    where this is not glibc, or KVFLOW_MALLOC_UNMAP is set."""
    if os.environ.get("KVFLOW_MALLOC_UNMAP"):
        logger.info("malloc: large blocks mapped afresh each time (KVFLOW_MALLOC_UNMAP)")
        return False
    if not glibc():
        return False
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = (mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            and mallopt(M_ARENA_MAX, 1) == 1)
    if done:
        logger.debug("malloc: large blocks served from the heap and kept when freed")
    return done
