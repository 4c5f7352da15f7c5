"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Only small C files live here (no torch headers, so a build takes about a second); ``common.h``
holds the helpers they share.
Every kernel has a plain-torch fallback: when there is no compiler, the CPU lacks AVX2/FMA, or
``ACCESSORY_NATIVE_KERNELS=0`` is set, callers get ``None`` and use torch.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).resolve().parent
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_libraries = {}


def cache_dir() -> Path:
    root = os.environ.get("ACCESSORY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "accessory")
    return Path(root) / "kernels"


def cpu_supports_avx2() -> bool:
    """AVX2 + FMA, read from /proc/cpuinfo on Linux (torch's capability check as a fallback)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
        return "avx2" in flags and "fma" in flags and "f16c" in flags
    except (OSError, IndexError):
        import torch
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def native_kernels_enabled() -> bool:
    return os.environ.get("ACCESSORY_NATIVE_KERNELS", "1") not in ("0", "false", "no") and \
        sys.platform.startswith("linux") and cpu_supports_avx2()


def load_library(name: str) -> Optional[ctypes.CDLL]:
    """Compile ``<name>.c`` (once per source version) and load it; None when not possible."""
    with _lock:
        if name in _libraries:
            return _libraries[name]
        library = None
        if native_kernels_enabled():
            try:
                library = _build_and_load(name)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("native kernel %s unavailable, using torch: %s", name, exc)
        _libraries[name] = library
        return library


def _build_and_load(name: str) -> ctypes.CDLL:
    # libgomp must be the one torch already loaded, so both share one OpenMP thread pool
    __import__("torch")  # loads torch's libgomp first

    source = _SOURCE_DIR / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    headers = b"".join(h.read_bytes() for h in sorted(_SOURCE_DIR.glob("*.h")))  # included by every source
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *_FLAGS, "-o", str(built), str(source)],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise OSError(f"compiling {source.name} failed: {result.stderr.strip()[:500]}")
            os.replace(built, target)  # atomic: concurrent builders never see a partial file
    return ctypes.CDLL(str(target))


_scratch_state = threading.local()


def scratch_floats(n_floats: int):
    """A per-thread float32 buffer of at least ``n_floats`` (kernels' activation staging area),
    grown as needed and reused across calls."""
    import torch
    buffer = getattr(_scratch_state, "buffer", None)
    if buffer is None or buffer.numel() < n_floats:
        buffer = _scratch_state.buffer = torch.empty(max(n_floats, 1 << 16), dtype=torch.float32)
    return buffer
