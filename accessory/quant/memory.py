"""The CPU memory a model lives in (Linux; plain allocations and no-ops elsewhere): keeping a
quantizing process near the packed model's size, and putting the weights and the KV cache that
every decode step reads in 2 MiB pages."""

import ctypes
import mmap
import sys

import torch

from ..kernels import switched_off

_MADV_DONTNEED = 4
_MADV_POPULATE_WRITE = 23  # Linux 5.14; not in Python 3.11's mmap module
HUGE_PAGE = 2 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def return_freed_heap(min_free_bytes: int = 256 << 20) -> bool:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``) once more than
    ``min_free_bytes`` of it lies free (glibc's ``mallinfo2``; trimmed every time without it).

    Packing a matrix allocates float32 temporaries of tens of MB, and fusing packed q/k/v or w1/w3
    frees the separate matrices for one larger copy; glibc keeps those holes inside its heap, where
    what comes next does not fit them all: a 7B int4 load peaked at 5403 MiB without this, 4719
    with it (packing trims past 256 MB free, fusing always). The threshold keeps the cost down:
    memory handed back is faulted in again when next used (trimming after every packed weight made
    a 1.1B load 1.6x slower). Returns whether it trimmed."""
    global _malloc_trim, _mallinfo2
    if _malloc_trim is None:
        _malloc_trim = _mallinfo2 = False
        try:
            libc = ctypes.CDLL(None)
            _malloc_trim = libc.malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            _mallinfo2 = libc.mallinfo2  # glibc 2.33 and later
            _mallinfo2.argtypes, _mallinfo2.restype = [], _MallInfo2
        except (OSError, AttributeError):
            pass
    if not _malloc_trim:
        return False
    if _mallinfo2 and _mallinfo2().fordblks < min_free_bytes:
        return False
    _malloc_trim(0)
    return True


_mallinfo2 = None
_malloc_trim = None


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Drop this process's pages of ``tensor`` when it is a read-only view of a memory-mapped
    checkpoint file (the loader's zero-copy case), so a weight read only to be packed does not stay
    resident; the file is untouched and the pages would simply be read again if used. Tensors in
    ordinary (anonymous) memory are never touched. Returns whether pages were released."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux") or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(v, 16) for v in fields[0].split("-"))
                if low <= start and end <= high:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    # a file mapping (the loader never writes into it, so its pages are the file's)
                    if not path.startswith("/") or path.endswith(" (deleted)"):
                        return False
                    break
            else:
                return False
    except OSError:
        return False
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(first, last - first, _MADV_DONTNEED) == 0


def huge_pages_available() -> bool:
    """Whether :func:`zeros_in_huge_pages` can ask for 2 MiB pages: Linux with transparent huge
    pages not set to ``never``, and ``ACCESSORY_HUGE_PAGES`` not switched off."""
    if switched_off("ACCESSORY_HUGE_PAGES") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def in_huge_pages(size: int) -> bool:
    """Whether :func:`zeros_in_huge_pages` puts ``size`` bytes in 2 MiB pages: at least one page's
    worth, where :func:`huge_pages_available`."""
    return size >= HUGE_PAGE and huge_pages_available()


def zeros_in_huge_pages(numel: int, dtype: torch.dtype, populate: bool = True) -> torch.Tensor:
    """A 1-D CPU tensor of ``numel`` zeros whose memory the kernel backs with 2 MiB pages where it
    can (:func:`in_huge_pages`), else ``torch.zeros``.

    Memory read once per decode step, the weights and the KV cache, is read far beyond what the
    TLB covers in 4 KiB pages (3072 entries: 12 MiB); each new page is a page-table walk. Both in
    2 MiB pages made a 768-wide, 12-layer model's decode step 1.2-1.5x faster here at one row and
    1.06-1.13x at 16 (benchmarks/README.md, session 16). The memory is a private anonymous mapping
    aligned to 2 MiB (a C heap block is neither aligned nor necessarily fresh, and pages already
    touched stay small): its unaligned head is never touched, so never resident; the rest is made
    resident at once, or with ``populate=False`` page by page as it is first written (for a copy
    that frees its source as it goes, so that both are never whole at once). The tensor keeps the
    mapping alive; it goes with the last tensor viewing it."""
    size = numel * dtype.itemsize
    if not in_huge_pages(size):
        return torch.zeros(numel, dtype=dtype)
    span = -(-size // HUGE_PAGE) * HUGE_PAGE
    mapping = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference to the mapping
    start = -whole.data_ptr() % HUGE_PAGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, span)
    except OSError:  # refused (a kernel without THP for anonymous memory): small pages, still zeros
        return whole[start:start + size].view(dtype)
    try:
        # resident now rather than page by page later, while a prompt's forward writes the cache:
        # its faults there made XS's 128-token prefill 3-7% slower (engine runs, alternating)
        if populate:
            mapping.madvise(_MADV_POPULATE_WRITE, start, span)
    except OSError:  # before Linux 5.14: faulted in on first use instead
        pass
    return whole[start:start + size].view(dtype)
