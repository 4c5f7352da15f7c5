"""Keeping a quantizing process's memory near the packed model's size (Linux; no-ops elsewhere)."""

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4


def return_freed_heap() -> bool:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``).

    Packing a matrix allocates float32 temporaries of tens of MB, and fusing packed q/k/v or w1/w3
    frees the separate matrices for one larger copy; glibc keeps those holes inside its heap, where
    what comes next does not fit them all. Without this, a 1.1B model's int4 load held 340 MB
    above what it held after a final trim.
    Returns whether anything could be asked (False off glibc)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


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
