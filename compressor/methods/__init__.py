"""The decomposition methods `--method` accepts: one module each, found here at import.

Every method is an SVD of a weighted matrix W S with the weighting folded back into a factor (core/decompose.py);
a method is the choice of S, plus what that choice needs (base.Method). A module of this package that defines
`METHOD = Method(...)` is a method: adding one touches that one file. The modules import torch only inside their
functions, so listing the methods (`lowrank compress --help`) stays fast.
"""

import importlib
import pkgutil

from ..errors import UsageError
from .base import Method


def _discover() -> dict[str, Method]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    return {method.name: method for method in sorted(found, key=lambda method: method.order)}


METHODS = _discover()


def get_method(name: str) -> Method:
    """The method called `name`, or a usage error that lists the choices."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
