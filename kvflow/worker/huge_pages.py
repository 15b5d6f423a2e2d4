"""Weights and the KV cache on 2 MiB pages (Linux transparent huge pages).

A decode step streams every weight once. On 4 KiB pages that is a TLB miss every 64 cache
lines, and in a virtual machine each miss walks two page tables (the guest's and the
host's). On a 2-core Zen 4 KVM guest, the bf16 GEMV read 20-24 GB/s over weights on 4 KiB
pages and 30-32 GB/s over the same weights on 2 MiB ones; llama.cpp's weights, mapped from
a file whose page cache sits in large folios, had the larger pages already.

Linux's default (`enabled` = madvise) gives huge pages only to memory that asks for them,
and PyTorch's allocator does not ask. So kvflow asks, for the tensors it keeps: `gather`
moves a model's parameters into one block advised before they are loaded (the pages fault
in huge, and small weights share them), `advise` asks for a tensor not yet written (the KV
cache), and `collapse` moves a written one (MADV_COLLAPSE, Linux 6.1 and later, copies it
into huge pages in place: about a second per GiB, once, at load). Only the 2 MiB-aligned
interior of each storage is asked for, so no page is shared with memory kvflow does not
own. Where the kernel refuses (THP `never`, an older kernel, another OS) the tensors stay on
small pages and everything runs as before. KVFLOW_NO_HUGE_PAGES=1 turns this off, to
measure the difference."""
from __future__ import annotations

import ctypes
import errno as errno_codes
import functools
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # bytes; a cache line, and every dtype's size divides it
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The system's transparent huge page setting (always, madvise or never); None where
    there is none (not Linux)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return None


def enabled() -> bool:
    return (sys.platform == "linux" and not os.environ.get("KVFLOW_NO_HUGE_PAGES")
            and thp_mode() in ("always", "madvise"))


def describe() -> str:
    """What kvflow's weights and KV cache sit on here, for `kvflow env`."""
    mode = thp_mode()
    if sys.platform != "linux" or mode is None:
        return "the system's default (no transparent huge pages to ask for)"
    if os.environ.get("KVFLOW_NO_HUGE_PAGES"):
        return f"4 KiB (KVFLOW_NO_HUGE_PAGES; transparent huge pages: {mode})"
    if mode == "never":
        return "4 KiB (transparent huge pages: never)"
    return f"2 MiB for weights and the KV cache (transparent huge pages: {mode})"


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _within(start: int, end: int, unit: int) -> tuple[int, int]:
    """The first and last multiples of unit in [start, end] (first > last where none)."""
    return -(-start // unit) * unit, end // unit * unit


def _interiors(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned (start, length) inside each distinct CPU storage among tensors
    that spans at least one huge page."""
    seen: set[int] = set()
    ranges = []
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            continue  # oneDNN's prepacked weights keep their memory to themselves
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        if not start or start in seen:
            continue
        seen.add(start)
        first, last = _within(start, start + storage.nbytes(), HUGE_PAGE)
        if last > first:
            ranges.append((first, last - first))
    return ranges


def _advise_ranges(ranges: list[tuple[int, int]], advice: int) -> tuple[int, int | None]:
    """(bytes the kernel accepted the advice for, the errno of the first refusal)."""
    madvise = _madvise()
    if madvise is None:
        return 0, None
    done, error = 0, None
    for start, length in ranges:
        if madvise(start, length, advice) == 0:
            done += length
        elif error is None:
            error = ctypes.get_errno()
    return done, error


def advise(tensors: Iterable[torch.Tensor]) -> int:
    """Ask for huge pages for tensors not yet written: their pages then fault in 2 MiB at a
    time. The bytes asked for."""
    if not enabled():
        return 0
    return _advise_ranges(_interiors(tensors), MADV_HUGEPAGE)[0]


def gather(params: Iterable[torch.nn.Parameter]) -> int:
    """Move the parameters into one block of memory on huge pages, each at a 64-byte
    boundary, before they are loaded: the loader then writes into pages that fault in
    2 MiB at a time. A tensor smaller than a huge page (a 0.5B model's int4 q/k/v and
    output projections: 0.4-0.5 MB) gets none of its own; packed among the others, the
    int4 GEMV read those at 25 GB/s where apart they read at 21-22 (a 2-core Zen 4).
    Each keeps its values (a norm's ones, say; one never written is not copied) and its
    Parameter object, whose storage is swapped, so whatever holds the parameter sees the
    new one. The bytes moved."""
    if not enabled():
        return 0
    unique = list({id(p): p for p in params if p.device.type == "cpu"
                   and p.layout == torch.strided and p.is_contiguous()}.values())
    sizes = [p.numel() * p.element_size() for p in unique]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // ALIGNMENT) * ALIGNMENT
    if total < HUGE_PAGE:
        return 0
    memory = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    skip = -memory.data_ptr() % HUGE_PAGE
    block = memory[skip:skip + total]
    advise([block])
    for param, offset, size in zip(unique, offsets, sizes):
        moved = block[offset:offset + size].view(param.dtype).view(param.shape)
        if written(param):
            moved.copy_(param.data)
        param.data = moved
    return total


PAGEMAP = Path("/proc/self/pagemap")
PAGE = 4096


def written(tensor: torch.Tensor) -> bool:
    """Whether a CPU tensor's memory was ever touched, judged by the pages wholly inside it
    (present or swapped, by /proc/self/pagemap: an allocator's own header may share the
    first page); True for a tensor of fewer than three pages, or where that cannot be read.
    A parameter made by torch.empty and not yet loaded has none, and reads as zeros, as
    the block's fresh pages do: gather skips copying it (copying a model's untouched
    parameters took 0.2-1.6 s a GiB)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = _within(start, end, PAGE)  # the pages wholly inside
    pages = (last - first) // PAGE
    if pages < 1 or end - start < 3 * PAGE:
        return True
    try:
        with PAGEMAP.open("rb", buffering=0) as pagemap:
            entries = os.pread(pagemap.fileno(), 8 * pages, 8 * (first // PAGE))
    except OSError:
        return True
    flags = np.frombuffer(entries, dtype=np.uint64) >> np.uint64(62)  # swapped, present
    return len(flags) != pages or bool(flags.any())


@dataclass(frozen=True)
class Collapsed:
    """What collapse did: bytes now on huge pages of those it was asked for."""

    huge: int
    asked: int
    seconds: float
    error: str | None = None  # why the rest stayed on small pages

    def describe(self) -> str:
        text = (f"{self.huge / 2**30:.2f} of {self.asked / 2**30:.2f} GiB on 2 MiB pages "
                f"({self.seconds:.1f} s)")
        return f"{text}; the rest stays on 4 KiB pages: {self.error}" if self.error else text


def collapse(tensors: Iterable[torch.Tensor]) -> Collapsed:
    """Move written tensors onto huge pages in place (their addresses do not change), and
    keep them there (khugepaged and later faults honour the advice)."""
    started = time.perf_counter()
    if not enabled():
        return Collapsed(0, 0, 0.0, None if sys.platform != "linux" else
                         f"transparent huge pages are {thp_mode() or 'absent'}"
                         + (" (KVFLOW_NO_HUGE_PAGES)" if os.environ.get("KVFLOW_NO_HUGE_PAGES")
                            else ""))
    ranges = _interiors(tensors)
    asked = sum(length for _, length in ranges)
    _advise_ranges(ranges, MADV_HUGEPAGE)
    huge, errno = _advise_ranges(ranges, MADV_COLLAPSE)
    error = None if errno is None else f"MADV_COLLAPSE: {os.strerror(errno)}"
    if errno == errno_codes.EINVAL and _kernel_version() < (6, 1):
        error += f" (Linux {platform.release()}; it came in 6.1)"
    return Collapsed(huge, asked, time.perf_counter() - started, error)


def _kernel_version() -> tuple[int, int]:
    numbers = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(numbers[1]), int(numbers[2])) if numbers else (0, 0)


def tensors_of(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a model keeps: parameters, buffers, and those its modules hold in other
    attributes (kernel plans' weight copies, a tied head's weight), through dataclasses,
    tuples and lists."""
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        for name, value in vars(module).items():
            if not name.startswith("_"):
                yield from tensors_in(value)


def tensors_in(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif is_dataclass(value) and not isinstance(value, type):
        for field in fields(value):
            yield from tensors_in(getattr(value, field.name))


def collapse_logged(tensors: Iterable[torch.Tensor], what: str) -> Collapsed:
    result = collapse(tensors)
    if result.asked or result.error:
        logger.info("%s: %s", what, result.describe())
    return result
