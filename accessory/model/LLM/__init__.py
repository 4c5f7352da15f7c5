"""Architectures, one module per ``llama_type``; each defines ``ModelArgs`` and ``Transformer``."""

import importlib
import pkgutil
from types import ModuleType
from typing import List

from ...errors import ConfigError


def known_llama_types() -> List[str]:
    """Names of every architecture module shipped in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_llama_type(llama_type: str) -> ModuleType:
    """The module implementing ``llama_type``, or a ConfigError listing the known ones."""
    known = known_llama_types()
    if llama_type not in known:
        raise ConfigError(
            f"unknown llama_type {llama_type!r}; known types: {', '.join(known)}. "
            f"Check meta.json or the llama_type argument.")
    return importlib.import_module(f"{__name__}.{llama_type}")
