"""Keeping a quantizing process's memory near the packed model's size (Linux; no-ops elsewhere)."""

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4


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
