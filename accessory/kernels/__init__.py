"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Only small C files live here (no torch headers, so a build takes about a second); ``common.h``
holds the helpers they share.
Every kernel has a plain-torch fallback: when there is no compiler, the CPU lacks AVX2/FMA, or
``ACCESSORY_NATIVE_KERNELS=0`` is set, callers get ``None`` and use torch.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

log = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).resolve().parent
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# sources that need more than AVX2 (loaded only where cpu_flags() has them) and the sources they
# include besides the headers (in the build hash, so a change there rebuilds them)
_EXTRA_FLAGS = {"gemv_bf16_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
                "gemv_bf16_panels": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
                "gemv_quant_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]}
_INCLUDED_SOURCES = {"gemv_quant_avx512": ["gemv_quant.c"]}
_lock = threading.Lock()
_libraries = {}


def cache_dir() -> Path:
    root = os.environ.get("ACCESSORY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "accessory")
    return Path(root) / "kernels"


@functools.lru_cache(maxsize=None)
def cpu_flags() -> Optional[frozenset]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return None


def cpu_supports_avx2() -> bool:
    """AVX2 + FMA, read from /proc/cpuinfo on Linux (torch's capability check as a fallback)."""
    flags = cpu_flags()
    if flags is None:
        import torch
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return {"avx2", "fma", "f16c"} <= flags


def cpu_supports_avx512_bf16() -> bool:
    """AVX-512 with its bf16 dot products (Zen 4 and later, Cooper Lake, Sapphire Rapids and later)."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= (cpu_flags() or frozenset())


def cpu_supports_avx512_vnni() -> bool:
    """AVX-512 with its int8 dot products (VNNI: Cascade Lake, Ice Lake, Zen 4 and later)."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= (cpu_flags() or frozenset())


def _kernel_choice(variable: str, base: str, supported: bool) -> str:
    """``base`` (the AVX2 source) or ``base + "_avx512"`` as ``variable`` says (auto: the AVX-512
    one where ``supported``); any other value is refused, naming the choices."""
    choice = os.environ.get(variable, "auto").strip().lower()
    if choice not in ("auto", "avx2", "avx512"):
        raise ValueError(f"{variable}={choice!r}: use auto, avx2 or avx512")
    if choice == "avx2" or (choice == "auto" and not supported):
        return base
    return base + "_avx512"


def bf16_kernel_name() -> str:
    """The source of the bf16 products for this CPU: ``gemv_bf16_avx512`` where it has AVX512-BF16,
    else ``gemv_bf16`` (AVX2); ``ACCESSORY_BF16_KERNEL=avx2`` keeps the AVX2 one anywhere."""
    return _kernel_choice("ACCESSORY_BF16_KERNEL", "gemv_bf16", cpu_supports_avx512_bf16())


def quant_kernel_name() -> str:
    """The source of the int8 / int4 products for this CPU: ``gemv_quant_avx512`` where it has
    AVX512-VNNI, else ``gemv_quant`` (AVX2); ``ACCESSORY_QUANT_KERNEL=avx2`` keeps the AVX2 one."""
    return _kernel_choice("ACCESSORY_QUANT_KERNEL", "gemv_quant", cpu_supports_avx512_vnni())


def switched_off(variable: str) -> bool:
    """Whether the environment turns an on-by-default setting off: ``variable`` set to 0, false,
    no or off (any case, spaces around ignored)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def switched_on(variable: str) -> bool:
    """Whether the environment turns a setting on: ``variable`` set to 1, true, yes or on (any
    case, spaces around ignored)."""
    return os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")


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


def _library_or_avx2(name: str, base: str) -> Tuple[str, Optional[ctypes.CDLL]]:
    library = load_library(name)
    if library is None and name != base:
        name, library = base, load_library(base)
    return name, library


def bf16_library() -> Tuple[str, Optional[ctypes.CDLL]]:
    """``(name, library)`` of the bf16 products for this CPU (:func:`bf16_kernel_name`), the AVX2
    one where the other cannot be built (a compiler without AVX512-BF16); library None when none can."""
    return _library_or_avx2(bf16_kernel_name(), "gemv_bf16")


def quant_library() -> Tuple[str, Optional[ctypes.CDLL]]:
    """``(name, library)`` of the int8 / int4 / nf4 products for this CPU (:func:`quant_kernel_name`),
    the AVX2 one where the other cannot be built; library None when none can."""
    return _library_or_avx2(quant_kernel_name(), "gemv_quant")


def _build_and_load(name: str) -> ctypes.CDLL:
    # libgomp must be the one torch already loaded, so both share one OpenMP thread pool
    __import__("torch")  # loads torch's libgomp first

    source = _SOURCE_DIR / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    flags = _FLAGS + _EXTRA_FLAGS.get(name, [])
    headers = b"".join(h.read_bytes() for h in sorted(_SOURCE_DIR.glob("*.h")))  # included by every source
    included = b"".join((_SOURCE_DIR / other).read_bytes() for other in _INCLUDED_SOURCES.get(name, []))
    digest = hashlib.sha256(source.read_bytes() + headers + included + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, "-o", str(built), str(source)],
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
