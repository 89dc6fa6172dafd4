"""``class_path`` strings, the Lightning CLI convention for naming your own model in a run file:
``"package.module:Name"`` (imported from sys.path) or ``"path/to/file.py:Name"`` (imported by
path under a stable name, see unison.modelfiles), with keyword arguments from ``init_args``.

Every failure is a ConfigError naming the field and what it accepts, raised on the driver
before any worker starts.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from . import modelfiles
from .errors import ConfigError

FORMS = "'package.module:Name' or 'path/to/file.py:Name'"


def split(field: str, class_path: Any) -> tuple[str, str]:
    """(module or file, attribute) of a class_path; ConfigError unless it has that form."""
    if isinstance(class_path, str):
        where, colon, name = class_path.rpartition(":")
        if colon and where and name and all(part.isidentifier() for part in name.split(".")):
            return where, name
    raise ConfigError(f"{field}={class_path!r} is not accepted; expected {FORMS}")


def is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def absolute(field: str, class_path: Any, base: str | Path | None) -> str:
    """``class_path`` with a relative file resolved against ``base`` (default: the current
    folder); a module path is returned as it is."""
    where, name = split(field, class_path)
    if not is_file(where):
        return class_path
    path = Path(where).expanduser()
    if not path.is_absolute():
        path = Path(base or ".") / path
    return f"{path.resolve()}:{name}"


def load(field: str, class_path: str) -> Callable[..., Any]:
    """The class or factory that ``class_path`` names, imported now."""
    where, name = split(field, class_path)
    if is_file(where):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"{field}={class_path!r}: file {str(path)!r} does not exist; expected {FORMS}")
        module_name = modelfiles.module_name(path)
    else:
        module_name = where
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if is_file(where) or not _is_prefix(exc.name, module_name):
            raise ConfigError(f"{field}={class_path!r}: importing {where!r} raised "
                              f"ModuleNotFoundError: {exc}") from None
        raise ConfigError(f"{field}={class_path!r}: no module named {where!r} (on sys.path); expected "
                          f"{FORMS}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module: whatever it raises is its failure
        raise ConfigError(f"{field}={class_path!r}: importing {where!r} raised {type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            found = _modules_in(module)
            raise ConfigError(f"{field}={class_path!r}: {where!r} has no attribute {name!r}; it defines "
                              f"{', '.join(found) if found else 'no nn.Module subclass'}")
        target = getattr(target, part)
    if inspect.isclass(target) and not issubclass(target, nn.Module):
        raise ConfigError(f"{field}={class_path!r}: {name} is a class but not an nn.Module subclass; expected "
                          "an nn.Module subclass or a function returning an nn.Module")
    if not callable(target):
        raise ConfigError(f"{field}={class_path!r}: {name} is a {type(target).__name__}, not callable; "
                          "expected an nn.Module subclass or a function returning an nn.Module")
    return target


def check_args(field: str, class_path: str, target: Callable[..., Any], init_args: Mapping[str, Any]) -> None:
    """Refuse ``init_args`` that ``target``'s signature cannot take, naming the parameters it takes."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: the call will tell
        return
    try:
        signature.bind(**init_args)
    except TypeError as exc:
        raise ConfigError(f"{field}={dict(init_args)!r} is not accepted by {class_path}: {exc}; it takes "
                          f"({_parameters(signature)})") from None


def build(field: str, class_path: str, target: Callable[..., Any], init_args: Mapping[str, Any]) -> Any:
    """``target(**init_args)``; a TypeError from the call names the arguments."""
    try:
        return target(**init_args)
    except TypeError as exc:
        raise ConfigError(f"{field}={dict(init_args)!r}: calling {class_path} with them raised TypeError: "
                          f"{exc}") from None


def _is_prefix(missing: str | None, module_name: str) -> bool:
    """Whether the module that was not found is ``module_name`` or one of its parents."""
    return missing is not None and (module_name == missing or module_name.startswith(missing + "."))


def _modules_in(module: Any) -> list[str]:
    return sorted(name for name, value in vars(module).items()
                  if inspect.isclass(value) and issubclass(value, nn.Module)
                  and getattr(value, "__module__", None) == module.__name__)


def _parameters(signature: inspect.Signature) -> str:
    return ", ".join(str(p) for p in signature.parameters.values()) or "no arguments"
