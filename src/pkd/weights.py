"""Reading weights pkd did not write: state_dicts, and pickled models loaded without running code.

Two readers, both on ``torch.load(weights_only=True)``, so no file given to pkd runs code:

- :func:`read_weights` reads what is given as ``weights`` anywhere in pkd: a pkd checkpoint or
  export, a plain ``state_dict`` (timm, torchvision references), a dict holding one under
  ``"model"`` or ``"state_dict"``.
- :func:`load_pickled_modules` reads files of whole pickled ``nn.Module`` objects, such as an
  Ultralytics ``.pt``, with an allowlist: ``torch.nn`` modules, the modules of the libraries a
  family names (``ultralytics.nn``), the few plain classes it names, NumPy scalars. Before
  anything is unpickled, the file's globals are listed
  (:func:`torch.serialization.get_unsafe_globals_in_checkpoint`) and a file that names anything
  else is refused by name. Module classes may only be *instantiated* the way ``torch.save``
  writes modules, never *called*: calling a model class runs its constructor with arguments
  from the file. :func:`module_state_dict` then reads the weights out of the loaded objects
  without calling any of their methods.
"""

from __future__ import annotations

import importlib
import os
import pickletools
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pkd.checkpoint import CHECKPOINT_FORMAT, CheckpointError, check_checkpoint, torch_load

__all__ = ["UnsafePickleError", "load_pickled_modules", "module_state_dict", "read_weights"]


class UnsafePickleError(CheckpointError):
    """A pickled file names Python objects outside the allowlist; nothing of it was unpickled."""


def read_weights(
    path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The weights in a file given as ``weights`` anywhere in pkd, read with ``weights_only=True``.

    This is the one place pkd reads a state_dict file it did not just write: a teacher's or a
    student's ``weights``, ``pkd eval`` and ``pkd export`` all come here (through
    :func:`~pkd.checkpoint.load_checkpoint` for the last two).

    Args:
        path: a pkd run checkpoint or exported student, a plain ``state_dict``, or a dict
            holding one under ``"model"`` or ``"state_dict"`` (torchvision's references save
            that way).
        map_location: Where tensors are loaded (as in :func:`torch.load`).

    Returns:
        ``(state_dict, meta)``; ``meta`` is the pkd checkpoint's (detector name, classes,
        build arguments) or ``None`` for a plain state_dict.

    Raises:
        PickledFileError: the file holds pickled objects (e.g. a whole model saved with
            ``torch.save(model)``, or an Ultralytics ``.pt``): a family that reads such files
            does so with :func:`load_pickled_modules`.
        CheckpointError: the file is missing, damaged, or holds no state_dict.
    """
    path = Path(path)
    stored = torch_load(path, map_location)
    if isinstance(stored, dict) and stored.get("format") == CHECKPOINT_FORMAT:
        check_checkpoint(stored, f"checkpoint {path}")
        return stored["model" if stored["kind"] == "run" else "state_dict"], stored["meta"]
    state_dict = stored
    for key in ("model", "state_dict"):
        if isinstance(stored, dict) and isinstance(stored.get(key), dict):
            state_dict = stored[key]
            break
    if isinstance(state_dict, dict) and state_dict and all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return state_dict, None
    content = (
        f"is a dict with keys {sorted(map(str, stored))[:8]}"
        if isinstance(stored, dict)
        else f"holds a {type(stored).__name__}"
    )
    raise CheckpointError(
        f"{path} holds no state_dict pkd can read: it {content}. Give a pkd checkpoint (`pkd train`, "
        "`pkd export`) or a plain state_dict (a dict of tensors, torch.save(model.state_dict()))"
    )


# NumPy values a training library stores among its metrics: rebuilt by calling these, which is safe.
_NUMPY_CALLABLE = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype"}


def _numpy_global(name: str) -> Any:
    if name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
        return (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2 renamed core
    if name == "numpy.dtype":
        return np.dtype
    if name.startswith("numpy.dtypes."):
        found = getattr(np.dtypes, name.removeprefix("numpy.dtypes."), None)
        return found if isinstance(found, type) and issubclass(found, np.dtype) else None
    return None


def _module_class(name: str, packages: Iterable[str]) -> type | None:
    """The ``nn.Module`` subclass ``name`` names, if it is defined under one of ``packages``."""
    module_name, _, attribute = name.rpartition(".")
    if not any(module_name == package or module_name.startswith(f"{package}.") for package in packages):
        return None
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError):  # a name the file made up, or a module whose own imports are missing
        return None
    found = getattr(module, attribute, None)
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def _pickle_of(path: Path) -> bytes:
    """The pickle inside a ``torch.save`` zip archive, as torch's reader finds it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # torch reads "<folder of the first entry>/data.pkl"; a second entry of that name
            # could differ from the one checked here, so such an archive is refused.
            record = f"{names[0].split('/', 1)[0]}/data.pkl" if names else ""
            if names.count(record) != 1:
                raise CheckpointError(f"{path} is not a torch.save archive (no single data.pkl)")
            return archive.read(record)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: {error})") from error


def _called_globals(data: bytes) -> set[str]:
    """The globals a pickle calls (REDUCE), as opposed to ones it only instantiates (NEWOBJ).

    A symbolic run of the pickle's stack: only global names and strings are tracked, through
    the memo too, which is enough to know what each REDUCE calls.
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    called: set[str] = set()
    for opcode, argument, _ in pickletools.genops(data):
        name = opcode.name
        if name == "MARK":
            marks.append(len(stack))
        elif name == "GLOBAL":
            stack.append(("global", argument.replace(" ", ".")))
        elif name == "STACK_GLOBAL":
            attribute, module = stack.pop(), stack.pop()
            both = isinstance(module, str) and isinstance(attribute, str)
            stack.append(("global", f"{module}.{attribute}") if both else None)
        elif name == "REDUCE":
            stack.pop()
            function = stack.pop()
            called.add(function[1] if isinstance(function, tuple) else "<unknown>")
            stack.append(None)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else argument] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(argument))
        elif name == "DUP":
            stack.append(stack[-1])
        else:
            before = opcode.stack_before
            if pickletools.markobject in before:
                del stack[marks.pop() :]
                count = before.index(pickletools.markobject)
            else:
                count = len(before)
            del stack[len(stack) - count :]
            stack.extend(argument if isinstance(argument, str) else None for _ in opcode.stack_after)
    return called


def load_pickled_modules(
    path: str | os.PathLike,
    *,
    packages: Iterable[str] = (),
    classes: Iterable[type] = (),
    what: str = "a pickled model",
    map_location: str | torch.device | None = "cpu",
) -> Any:
    """Loads a file of whole pickled ``nn.Module`` objects without running code from it.

    Allowed: ``nn.Module`` subclasses defined in ``torch.nn`` or under ``packages``, the
    ``classes`` given, NumPy scalars and dtypes, and what ``torch.load(weights_only=True)``
    allows anyway (tensors, dicts, lists, strings, numbers). Module classes may only be
    instantiated the way ``torch.save`` writes modules (no constructor runs): a model's
    constructor may read files or evaluate strings from its arguments.

    Args:
        path: The file (a ``torch.save`` zip archive).
        packages: Packages whose ``nn.Module`` subclasses the file may hold, e.g.
            ``("ultralytics.nn",)``.
        classes: Other classes it may hold, whose constructors only store their arguments
            (e.g. an argument namespace); pickle may call them.
        what: What the file should be, for error messages ("an Ultralytics checkpoint").
        map_location: Where tensors are loaded (as in :func:`torch.load`).

    Returns:
        The unpickled object. Read weights from its modules with :func:`module_state_dict`
        rather than their methods: the objects' attributes come from the file.

    Raises:
        UnsafePickleError: the file names a global outside the allowlist, or calls a class;
            the message names it. Nothing was unpickled.
        CheckpointError: the file is missing, damaged, or not a ``torch.save`` archive.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    data = _pickle_of(path)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # torch raises ValueError, RuntimeError, ... for other files
        raise CheckpointError(f"{path} is not a torch.save archive ({type(error).__name__}: {error})") from error
    packages = ("torch.nn.modules", *packages)
    extra = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in classes}
    allowed: dict[str, Any] = {}
    for name in needed:
        found = extra.get(name) or _numpy_global(name) or _module_class(name, packages)
        if found is not None:
            allowed[name] = found
    if "numpy.dtype" in allowed:  # dtype(...) returns an instance of its concrete class, built next
        allowed.update({f"numpy.dtypes.{cls.__name__}": cls for cls in vars(np.dtypes).values() if _is_dtype(cls)})
    refused = sorted(set(needed) - set(allowed))
    called = sorted((_called_globals(data) & set(allowed)) - _NUMPY_CALLABLE - set(extra))
    if refused or called:
        problem = (
            f"refers to {', '.join(refused[:5])}{' ...' if len(refused) > 5 else ''}, which {what} does not hold"
            if refused
            else f"calls {', '.join(called[:5])} with arguments from the file, which {what} never does"
        )
        raise UnsafePickleError(
            f"{path} {problem}: pkd refused to unpickle it, since loading it could run code. "
            "Load only files from sources you trust"
        )
    with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
        return torch_load(path, map_location)


def _is_dtype(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, np.dtype)


def module_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` of a module from :func:`load_pickled_modules`, without calling its methods.

    A loaded module's attributes come from the file: an attribute or hook set there could make
    ``state_dict()`` call an allowed class. This reads the parameters and persistent buffers
    from the modules' own dictionaries instead.

    Returns:
        ``{name: tensor}`` with the keys ``state_dict()`` would give.
    """
    state: dict[str, torch.Tensor] = {}

    def visit(current: Any, prefix: str) -> None:
        own = vars(current)
        skipped = own.get("_non_persistent_buffers_set", set())
        for group in ("_parameters", "_buffers"):
            entries = own.get(group, {})
            for name, tensor in entries.items() if isinstance(entries, Mapping) else ():
                if isinstance(tensor, torch.Tensor) and not (group == "_buffers" and name in skipped):
                    state[prefix + name] = tensor
        children = own.get("_modules", {})
        for name, child in children.items() if isinstance(children, Mapping) else ():
            if isinstance(child, nn.Module):
                visit(child, f"{prefix}{name}.")

    visit(module, "")
    return state
