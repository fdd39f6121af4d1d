"""Program packages: the user's DSPy code ships with the workers, is imported at start, and is named by producers.

``FLAGSHIP_PROGRAMS`` (comma-separated module names) and the pool table's
``programs`` list name the packages a worker imports before it consumes; every
submodule of a listed package is imported too, so a module that fails stops the
worker at start (:func:`load_catalog` raises, the start-up hook refuses the pool)
instead of failing some calls later. A producer then names a program, tool or
metric as ``"package.module:Name"``; :class:`ProgramCatalog` resolves it from the
modules already imported, never importing anything new, and only to objects
defined in those modules (a name a program module merely imported, such as
``os.system``, is refused). Anything else is :class:`~routing.errors.UnknownProgram`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import dspy

from routing.errors import UnknownProgram

#: Environment variable listing program packages (comma-separated importable module names).
PROGRAMS_ENV = "FLAGSHIP_PROGRAMS"
#: ``"package.module:Name"``.
_PATH = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<name>[A-Za-z_]\w*)")


class ProgramImportFailed(Exception):
    """A listed program module could not be imported (the worker refuses to start)."""

    def __init__(self, module: str, error: BaseException) -> None:
        super().__init__(module, error)
        self.module, self.error = module, error

    def __str__(self) -> str:
        detail = " ".join(f"{type(self.error).__name__}: {self.error}".split())
        return f"program module {self.module!r} failed to import ({detail})"


def configured_packages(env: Mapping[str, str], pool_programs: Iterable[str] = ()) -> tuple[str, ...]:
    """The packages a worker loads: ``FLAGSHIP_PROGRAMS``, then its pool's ``programs``, each once."""
    listed = [name.strip() for name in (env.get(PROGRAMS_ENV) or "").split(",") if name.strip()]
    packages: dict[str, None] = dict.fromkeys([*listed, *pool_programs])
    for name in packages:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ProgramImportFailed(name, ValueError(f"{PROGRAMS_ENV} lists {name!r}, not a module name"))
    return tuple(packages)


def split_path(path: Any) -> tuple[str, str]:
    """``"package.module:Name"`` as (module, name); anything else is ``UnknownProgram``."""
    match = _PATH.fullmatch(path) if isinstance(path, str) and len(path) <= 300 else None
    if match is None:
        raise UnknownProgram(str(path)[:300], "expected 'package.module:Name' (or 'dspy:Module')")
    return match["module"], match["name"]


@dataclass(frozen=True)
class ProgramCatalog:
    """The program modules this worker imported at start, and lookups limited to them."""

    packages: tuple[str, ...]
    #: Every module imported for the packages (listed ones and their submodules), by name.
    modules: Mapping[str, ModuleType]

    def module_names(self) -> list[str]:
        return sorted(self.modules)

    def _lookup(self, path: Any) -> tuple[str, Any]:
        module_name, name = split_path(path)
        module = self.modules.get(module_name)
        if module is None:
            listed = ", ".join(self.packages) or "nothing"
            raise UnknownProgram(path, f"module {module_name!r} is not a program module of this worker "
                                       f"({PROGRAMS_ENV} lists {listed})")
        obj = module.__dict__.get(name)
        if obj is None:
            raise UnknownProgram(path, f"{module_name} defines no {name!r}")
        defined_in = getattr(getattr(obj, "func", obj), "__module__", None)  # a dspy.Tool: its function's
        if defined_in not in self.modules:
            raise UnknownProgram(path, f"{name!r} is not defined in a program module (it comes from {defined_in})")
        return name, obj

    def program(self, path: Any) -> Any:
        """A ``dspy.Module`` subclass, or a function returning a module (called when the program is built)."""
        name, obj = self._lookup(path)
        if isinstance(obj, type) and issubclass(obj, dspy.Module):
            return obj
        if inspect.isfunction(obj):
            return obj
        raise UnknownProgram(path, f"{name!r} is a {type(obj).__name__}, not a dspy.Module subclass or a "
                                   "function returning one")

    def function(self, path: Any) -> Any:
        """A plain function (a tool, a metric, a reward function), or a ``dspy.Tool`` built from one."""
        name, obj = self._lookup(path)
        if inspect.isfunction(obj) or isinstance(obj, dspy.Tool):
            return obj
        raise UnknownProgram(path, f"{name!r} is a {type(obj).__name__}, not a function")


def load_catalog(packages: Iterable[str]) -> ProgramCatalog:
    """Import every listed package and all its submodules; the first failure raises ``ProgramImportFailed``."""
    packages = tuple(packages)
    modules: dict[str, ModuleType] = {}
    for package in packages:
        try:
            root = importlib.import_module(package)
        except BaseException as exc:  # SyntaxError, SystemExit from a module body ...: refuse, do not crash
            raise ProgramImportFailed(package, exc) from exc
        modules[package] = root
        for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{package}.",
                                          onerror=_walk_failed):
            try:
                modules[info.name] = importlib.import_module(info.name)
            except BaseException as exc:
                raise ProgramImportFailed(info.name, exc) from exc
    return ProgramCatalog(packages, modules)


def _walk_failed(name: str) -> None:
    error = sys.exc_info()[1] or ImportError(name)
    raise ProgramImportFailed(name, error)
