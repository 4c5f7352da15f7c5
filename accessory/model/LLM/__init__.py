"""Architectures, one module per ``llama_type``; each defines ``ModelArgs`` and ``Transformer``.

Types outside this package (tests, plugins) can be added with :func:`register_llama_type`.
"""

import importlib
import pkgutil
from types import ModuleType
from typing import Dict, List

from ...errors import ConfigError

_registered: Dict[str, ModuleType] = {}


def register_llama_type(name: str, module: ModuleType) -> None:
    """Make ``module`` (with ``ModelArgs`` and ``Transformer``, see docs/architecture.md) loadable
    as ``llama_type=name`` in this process, e.g. a test-only or third-party architecture."""
    for attr in ("ModelArgs", "Transformer"):
        if not hasattr(module, attr):
            raise ValueError(f"cannot register {module.__name__} as llama_type {name!r}: it has no {attr}")
    if name in _builtin_llama_types():
        raise ValueError(f"llama_type {name!r} is built in; register the module under another name")
    _registered[name] = module


def unregister_llama_type(name: str) -> None:
    """Forget a type added with :func:`register_llama_type` (no error when it is not registered)."""
    _registered.pop(name, None)


def _builtin_llama_types() -> List[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def known_llama_types() -> List[str]:
    """Names of every architecture module shipped in this package, plus registered ones."""
    return sorted(set(_builtin_llama_types()) | set(_registered))


def load_llama_type(llama_type: str) -> ModuleType:
    """The module implementing ``llama_type``, or a ConfigError listing the known ones."""
    if llama_type in _registered:
        return _registered[llama_type]
    known = known_llama_types()
    if llama_type not in known:
        raise ConfigError(
            f"unknown llama_type {llama_type!r}; known types: {', '.join(known)}. "
            f"Check meta.json or the llama_type argument.")
    return importlib.import_module(f"{__name__}.{llama_type}")
