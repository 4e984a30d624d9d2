"""A restricted unpickler for data files that come as Python pickles (the CIFAR python batches).

Only the globals needed to rebuild plain numpy arrays, numpy scalars and bytes are allowed; any
other global (a function or class that unpickling would call) is refused before it is imported,
so a malicious file cannot run code.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Any

from robustlab.errors import RobustlabError

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        # numpy arrays: protocol <= 4 (_reconstruct + ndarray + dtype), protocol 5 (_frombuffer)
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # bytes written by Python 3 with protocol 2
        ("_codecs", "encode"),
        # harmless builtin containers (Python 2 pickles name the module __builtin__)
        ("builtins", "bytearray"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "bytearray"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :data:`ALLOWED_GLOBALS` and refuses everything else."""

    def __init__(self, file: Any, source: str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RobustlabError(
                f"{self.source}: refusing to unpickle {module}.{name}; this file should hold only numpy "
                "arrays, lists and strings, and robustlab loads nothing else from a pickle"
            )
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 moved it; skip the deprecation shim
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise RobustlabError(f"{self.source}: refusing a pickle with persistent references")


def load_restricted_pickle(path: Path, encoding: str = "bytes") -> Any:
    """Unpickle ``path`` allowing only plain data (see module docstring). ``encoding="bytes"`` reads
    Python 2 strings as bytes, as the CIFAR batches need."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, source, encoding=encoding).load()
    except RobustlabError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as err:
        raise RobustlabError(f"{source}: not a readable pickle data file ({type(err).__name__}: {err})") from None
