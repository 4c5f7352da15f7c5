"""Shared plumbing of the command-line tools that write a checkpoint (convert, reshard, delta)."""

import sys
import warnings
from typing import Callable, Optional

import torch


def dtype_option(value: Optional[str]) -> Optional[torch.dtype]:
    """``--dtype`` of a writing tool: None or "keep" keeps the source dtype."""
    from ..model.meta import resolve_dtype
    return None if value in (None, "keep") else resolve_dtype(value)


def run_writer(work: Callable[[], object], notes: bool = False) -> int:
    """Run ``work`` (returns the path it wrote) as a CLI step: "wrote PATH" and exit code 0, or
    "error: ..." and 1 for the package's own errors. ``notes``: print warnings as ``note:`` lines."""
    from ..errors import AccessoryError
    try:
        with warnings.catch_warnings(record=notes) as caught:
            if notes:
                warnings.simplefilter("always")
            out = work()
        for warning in caught or ():
            print(f"note: {warning.message}", file=sys.stderr)
    except AccessoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
