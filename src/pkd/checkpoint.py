"""Checkpoints of distillation runs and exported students: atomic saves, safe loads, clear errors.

A pkd checkpoint is a plain dict written with :func:`torch.save` and read back with
``torch.load(weights_only=True)``, so it holds only tensors and plain Python values (dicts,
lists, tuples, strings, numbers, ``None``) and loading one never runs code from the file::

    {
        "format": "pkd", "version": 1, "kind": "run" | "export",
        "model": <the student's plain torchvision state_dict>,      # "state_dict" when kind == "export"
        "meta": {
            "detector": "fcos_resnet50_fpn",   # torchvision builder name
            "num_classes": 81,
            "build": {...},                    # keyword arguments the detector was built with
            "label_map": {1: 1, 90: 80, ...},  # COCO category id -> contiguous label
            "class_names": {1: "person", ...}, # contiguous label -> name
        },
        # run checkpoints only, all optional:
        "optimizer": ..., "scheduler": ..., "scaler": ...,  # state dicts
        "state": {"step": 1200, "epoch": 3, "best_metric": 0.31, ...},  # TrainState.state_dict()
        "rng": pkd.rng.rng_state(), "config": {...}, "metrics": {"mAP": 0.31},
        "connectors": {...},  # a distillation run's connector weights
    }

A run checkpoint is what training resumes from; its ``"model"`` is already the bare student
(the distiller never puts the teacher or the connectors there). :func:`export_student` keeps
only the student's weights and ``meta``, which anyone can load without pkd::

    state_dict = torch.load("student.pt", weights_only=True)["state_dict"]
    detector.load_state_dict(state_dict)

Every file is written atomically (:func:`pkd.io.atomic_path`), so a crash or a ``kill -9`` at
any moment leaves either the previous complete file or the new one. Only one process should
write a given path: under DDP, save on the main process only. Reading weights pkd did not
write (state_dicts, torchvision's and Ultralytics' files) is :mod:`pkd.weights`.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pkd.io import atomic_link, atomic_path

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "PickledFileError",
    "check_checkpoint",
    "checkpoint_summary",
    "export_student",
    "latest_checkpoint",
    "load_checkpoint",
    "load_exported",
    "resume_checkpoint",
    "save_checkpoint",
    "save_run_checkpoint",
    "torch_load",
]

CHECKPOINT_FORMAT = "pkd"
CHECKPOINT_VERSION = 1

LAST_NAME = "last.pt"
BEST_NAME = "best.pt"

# Types that torch.load(weights_only=True) rebuilds (its allowlist in torch 2.4+; Counter is what
# MultiStepLR keeps its milestones in). Anything else --
# numpy scalars and arrays, enums, defaultdicts, dataclasses -- saves fine but then refuses to
# load, which would only show up when a run is resumed, so saving rejects it up front.
_PLAIN_TYPES = (
    *(dict, collections.OrderedDict, collections.Counter, list, tuple, set, str, bytes, bytearray),
    *(int, float, bool, complex, type(None)),
    *(torch.Size, torch.dtype, torch.device, torch.layout, torch.Tensor, torch.nn.Parameter),
)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, not a pkd checkpoint, or of another model."""


class PickledFileError(CheckpointError):
    """The file holds pickled Python objects (a whole model, numpy arrays): not loadable with ``weights_only``."""


# ---------------------------------------------------------------------------------------------
# Validation


def _check_plain(value: Any, where: str) -> None:
    """Raises if ``value`` holds anything that torch.load(weights_only=True) would refuse."""
    if type(value) not in _PLAIN_TYPES:
        hint = (
            " (convert numpy values with float()/int() or torch.from_numpy())"
            if type(value).__module__ == "numpy"
            else ""
        )
        raise CheckpointError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which torch.load(weights_only=True) "
            f"cannot load{hint}; a checkpoint holds only tensors, dicts, lists, tuples, strings, numbers and None"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"a key of {where}")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple | set) and not isinstance(value, torch.Size):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")


def _check_state_dict(state_dict: Any, where: str) -> None:
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise CheckpointError(f"{where} must be a state_dict (a dict of parameter name -> tensor)")


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}['meta'] must be a dict, got {type(meta).__name__}")
    missing = [key for key in ("detector", "num_classes", "build", "label_map", "class_names") if key not in meta]
    if missing:
        raise CheckpointError(f"{where}['meta'] lacks {missing}")
    if not isinstance(meta["detector"], str) or not meta["detector"]:
        raise CheckpointError(
            f"{where}['meta']['detector'] must be a torchvision builder name, got {meta['detector']!r}"
        )
    if type(meta["num_classes"]) is not int or meta["num_classes"] < 1:
        raise CheckpointError(f"{where}['meta']['num_classes'] must be a positive int, got {meta['num_classes']!r}")
    if not isinstance(meta["build"], dict):
        raise CheckpointError(f"{where}['meta']['build'] must be a dict of builder keyword arguments")
    # JSON turns int keys into strings; catching that here keeps label lookups from silently missing.
    for name, value_type in (("label_map", int), ("class_names", str)):
        mapping = meta[name]
        if not isinstance(mapping, dict) or not all(
            type(key) is int and isinstance(value, value_type) for key, value in mapping.items()
        ):
            raise CheckpointError(
                f"{where}['meta']['{name}'] must be a dict of int -> {value_type.__name__}, got {mapping!r:.200}"
            )


def check_checkpoint(checkpoint: Any, where: str) -> None:
    """Validates the layout described in the module docstring; ``where`` names it in errors.

    Raises:
        CheckpointError: what does not fit, under ``where``.
    """
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} has format {checkpoint.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    version = checkpoint.get("version")
    if version != CHECKPOINT_VERSION:
        newer = (
            " (written by a newer pkd; upgrade pkd)" if type(version) is int and version > CHECKPOINT_VERSION else ""
        )
        raise CheckpointError(
            f"{where} has unsupported checkpoint version {version!r}{newer}; "
            f"this pkd reads version {CHECKPOINT_VERSION}"
        )
    kind = checkpoint.get("kind")
    if kind not in ("run", "export"):
        raise CheckpointError(f"{where} has kind {kind!r}, expected 'run' or 'export'")
    weights_key = "model" if kind == "run" else "state_dict"
    if weights_key not in checkpoint:
        raise CheckpointError(f"{where} is a {kind} checkpoint without {weights_key!r}")
    _check_state_dict(checkpoint[weights_key], f"{where}[{weights_key!r}]")
    _check_meta(checkpoint.get("meta"), where)
    state = checkpoint.get("state", {})
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}['state'] must be a dict, got {type(state).__name__}")
    for key in ("epoch", "step"):
        if key in state and type(state[key]) is not int:
            raise CheckpointError(f"{where}['state'][{key!r}] must be an int, got {state[key]!r}")
    best = state.get("best_metric")
    if best is not None and type(best) not in (int, float):
        raise CheckpointError(f"{where}['state']['best_metric'] must be a float or None, got {best!r}")
    metrics = checkpoint.get("metrics", {})
    if not isinstance(metrics, dict) or not all(type(value) in (int, float) for value in metrics.values()):
        raise CheckpointError(f"{where}['metrics'] must be a dict of floats, got {metrics!r:.200}")
    for key in ("optimizer", "scheduler", "scaler", "rng", "config", "connectors"):
        if key in checkpoint and checkpoint[key] is not None and not isinstance(checkpoint[key], dict):
            raise CheckpointError(f"{where}[{key!r}] must be a dict, got {type(checkpoint[key]).__name__}")


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_checkpoint(path: str | os.PathLike, checkpoint: Mapping[str, Any]) -> Path:
    """Writes a pkd checkpoint atomically.

    The dict is validated first (layout, and only types that ``torch.load(weights_only=True)``
    reads back), so a checkpoint that could not be resumed from is never written. It is then
    saved to a temporary file next to ``path``, flushed and fsynced, and renamed onto ``path``:
    at any moment of a crash ``path`` holds the previous complete file or the new one.
    Temporary files left by a crashed save are removed by the next save of the same path.

    Args:
        path: Destination file; its folder is created if needed.
        checkpoint: The checkpoint dict (see the module docstring). ``"format"`` and
            ``"version"`` are filled in, and ``"kind"`` defaults to ``"run"``.

    Returns:
        The path written.

    Raises:
        CheckpointError: If the dict does not have the pkd layout or holds values (numpy
            scalars, arbitrary objects) that a weights-only load refuses.
    """
    path = Path(path)
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "run", **checkpoint}
    where = f"checkpoint for {path}"
    _check_plain(checkpoint, where)
    check_checkpoint(checkpoint, where)
    with atomic_path(path) as temp:
        torch.save(checkpoint, temp)
    return path


def _not_pkd_message(path: Path, content: str) -> str:
    return (
        f"{path} is not a pkd checkpoint: it {content}. pkd checkpoints are written by `pkd train` "
        "(run checkpoints) and `pkd export` (exported students); other weights (a state_dict, an "
        "Ultralytics .pt) are a model's weights: `pkd eval CONFIG --set model.weights=PATH`, or "
        "build_detector(..., weights=PATH)"
    )


def torch_load(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a :class:`CheckpointError` that says what the file is."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # A weights-only load names the first class it refuses; pkd never writes one, so such a
        # file is someone else's (a pickled model, a numpy-laden dict), not a damaged pkd file.
        refused = re.search(r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked", str(error))
        if refused:
            name = refused[1] or refused[2]
            raise PickledFileError(_not_pkd_message(path, f"holds Python objects ({name})")) from None
        # Keep the unpickler's own words, not torch's advice to retry with weights_only=False.
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(error), re.S)
        reason = reason[1] if reason else str(error)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (UnpicklingError: {reason})") from error
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unexpected end of file"
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: {reason})"
        ) from error

    return checkpoint


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device | None = "cpu",
    detector: str | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Loads and validates a pkd checkpoint (a run checkpoint or an exported student).

    The file is read with ``torch.load(weights_only=True)``: it can only contain tensors and
    plain Python values, never code. The student's weights are under ``"model"`` in a run
    checkpoint and under ``"state_dict"`` in an exported one.

    Args:
        path: The checkpoint file.
        map_location: Where tensors are loaded (as in :func:`torch.load`).
        detector: If given, the torchvision builder name the checkpoint must be for.
        num_classes: If given, the number of classes the checkpoint must have.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: If the file is missing, truncated or corrupt, not a pkd checkpoint,
            of an unsupported version, or of a different detector or number of classes.
    """
    path = Path(path)
    checkpoint = torch_load(path, map_location)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(_not_pkd_message(path, f"holds a {type(checkpoint).__name__}"))
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            content = f"is a plain state_dict ({len(checkpoint)} tensors, no pkd metadata)"
        else:
            content = f"is a dict with keys {sorted(map(str, checkpoint))[:8]}"
        raise CheckpointError(_not_pkd_message(path, content))
    check_checkpoint(checkpoint, f"checkpoint {path}")

    meta = checkpoint["meta"]
    if (detector is not None and meta["detector"] != detector) or (
        num_classes is not None and meta["num_classes"] != num_classes
    ):
        expected = f"{detector if detector is not None else meta['detector']!r} with "
        expected += f"{num_classes if num_classes is not None else meta['num_classes']} classes"
        raise CheckpointError(
            f"checkpoint {path} is for another model: it holds {meta['detector']!r} with "
            f"{meta['num_classes']} classes, expected {expected}"
        )
    return checkpoint


def save_run_checkpoint(run_dir: str | os.PathLike, checkpoint: Mapping[str, Any], *, is_best: bool) -> Path:
    """Saves ``run_dir/last.pt`` and, when ``is_best``, ``run_dir/best.pt``, both atomically.

    ``best.pt`` becomes a hard link to the new ``last.pt`` (no second write of the weights),
    put in place by an atomic rename; later saves replace ``last.pt`` by rename too, so they
    never touch the file ``best.pt`` points to. Where hard links are unsupported it is written
    as a second atomic save. Call this on the main process only.

    Args:
        run_dir: The run folder (created if needed).
        checkpoint: A run checkpoint (see :func:`save_checkpoint`).
        is_best: Whether this checkpoint has the best validation metric so far.

    Returns:
        The path of ``last.pt``.
    """
    run_dir = Path(run_dir)
    last = save_checkpoint(run_dir / LAST_NAME, checkpoint)
    if is_best and not atomic_link(last, run_dir / BEST_NAME):
        save_checkpoint(run_dir / BEST_NAME, checkpoint)
    return last


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume ``run_dir`` from (``last.pt``), or None if there is none yet."""
    last = Path(run_dir) / LAST_NAME
    return last if last.is_file() else None


def resume_checkpoint(
    run_dir: str | os.PathLike, resume: bool | str = True, *, map_location: str | torch.device | None = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The run checkpoint a run in ``run_dir`` continues from, loaded, or None to start afresh.

    Args:
        run_dir: The run folder.
        resume: ``True`` or ``"last"``: ``last.pt`` when the folder has one (None for a new run);
            ``"best"``: ``best.pt``, the best validated step, which must exist; ``False``: None.
        map_location: Where tensors are loaded (as in :func:`torch.load`).

    Returns:
        ``(path, checkpoint)``, or None.

    Raises:
        CheckpointError: If the checkpoint cannot be loaded. For a damaged ``last.pt`` the
            message names the ways forward: resuming from ``best.pt`` (when it loads) or
            starting afresh.
    """
    if resume not in (True, False, "last", "best"):
        raise ValueError(f"resume must be True, False, 'last' or 'best', got {resume!r}")
    if resume is False:
        return None
    run_dir = Path(run_dir)
    path = run_dir / (BEST_NAME if resume == "best" else LAST_NAME)
    if resume == "best" and not path.is_file():
        raise CheckpointError(f"{run_dir} has no {BEST_NAME} to resume from; start afresh with --no-resume")
    if not path.is_file():
        return None
    try:
        return path, load_checkpoint(path, map_location=map_location)
    except CheckpointError as error:
        ways = ["start afresh with --no-resume (resume=False; the run folder's checkpoints are replaced)"]
        if resume != "best":
            try:
                best = load_checkpoint(run_dir / BEST_NAME, map_location="cpu")
            except CheckpointError:
                pass  # missing, or the same damaged file (best.pt is a hard link to the last best last.pt)
            else:
                best_step = best.get("state", {}).get("step")
                step = f" (step {best_step})" if best_step is not None else ""
                ways.insert(0, f"resume from {BEST_NAME}{step} with --resume-from best (resume='best')")
        raise CheckpointError(f"{error}. To go on, {', or '.join(ways)}") from error


# ---------------------------------------------------------------------------------------------
# Export


def export_student(checkpoint: Mapping[str, Any], out_path: str | os.PathLike, *, half: bool = False) -> Path:
    """Writes the student alone (weights + meta) for inference, atomically.

    Everything else in a run checkpoint (optimizer, scheduler, RNG, connectors)
    is dropped, and the weights are moved to the CPU so that the file loads anywhere. The file
    needs no pkd to use: for torchvision's own detectors (the ResNet-50 ones, FPN width 256)::

        exported = torch.load(out_path, weights_only=True)
        detector = torchvision.models.get_model(
            exported["meta"]["detector"], weights=None, weights_backbone=None,
            num_classes=exported["meta"]["num_classes"])
        detector.load_state_dict(exported["state_dict"])

    and for the others (another backbone or FPN width), the torchvision classes assembled as
    ``pkd.build_detector(meta["detector"], num_classes=..., **meta["build"])`` does.

    Args:
        checkpoint: A run checkpoint (as saved or loaded) or an exported one.
        out_path: Destination file.
        half: Store floating-point tensors as float16 (half the size; ``load_state_dict``
            converts them back to the model's dtype).

    Returns:
        The path written.

    Raises:
        CheckpointError: If ``checkpoint`` is not a valid pkd checkpoint, or its weights look
            like a distiller's state_dict (teacher/student prefixes) instead of the student's.
    """
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "run", **checkpoint}
    check_checkpoint(checkpoint, "checkpoint to export")
    state_dict = checkpoint["model"] if checkpoint["kind"] == "run" else checkpoint["state_dict"]
    wrapped = sorted({key.split(".", 1)[0] for key in state_dict} & {"teacher", "student", "module"})
    if wrapped:
        raise CheckpointError(
            f"checkpoint to export has weights under {wrapped}: that is a wrapper's state_dict "
            "(Distiller or DDP), not the plain student's; save the student detector's own state_dict"
        )
    weights = collections.OrderedDict(
        (key, value.detach().cpu().half() if half and value.is_floating_point() else value.detach().cpu())
        for key, value in state_dict.items()
    )
    # Module versions (e.g. BatchNorm's) that load_state_dict uses to convert old layouts.
    if hasattr(state_dict, "_metadata"):
        weights._metadata = state_dict._metadata
    exported = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": "export",
        "state_dict": weights,
        "meta": checkpoint["meta"],
    }
    return save_checkpoint(out_path, exported)


def load_exported(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device | None = "cpu",
    detector: str | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Loads a student written by :func:`export_student`.

    Args:
        path: The exported file.
        map_location: Where tensors are loaded (as in :func:`torch.load`).
        detector: If given, the torchvision builder name it must be for.
        num_classes: If given, the number of classes it must have.

    Returns:
        ``{"format", "version", "kind": "export", "state_dict", "meta"}``.

    Raises:
        CheckpointError: As :func:`load_checkpoint`, and for a run checkpoint.
    """
    checkpoint = load_checkpoint(path, map_location=map_location, detector=detector, num_classes=num_classes)
    if checkpoint["kind"] != "export":
        raise CheckpointError(
            f"{path} is a {checkpoint['kind']} checkpoint, not an exported student; "
            "export it first with export_student() (or `pkd export`), or load it with load_checkpoint()"
        )
    return checkpoint


def checkpoint_summary(checkpoint: Mapping[str, Any]) -> str:
    """One line describing a checkpoint for CLI messages.

    Example: ``run checkpoint: fcos_resnet50_fpn, 81 classes, epoch 3, step 1200, best metric 0.3120``.
    """
    meta = checkpoint.get("meta", {})
    kind = checkpoint.get("kind", "run")
    parts = [f"{meta.get('detector', '?')}, {meta.get('num_classes', '?')} classes"]
    if kind == "run":
        state = checkpoint.get("state", {})
        for key in ("epoch", "step"):
            if state.get(key) is not None:
                parts.append(f"{key} {state[key]}")
        best = state.get("best_metric")
        parts.append(f"best metric {best:.4f}" if best is not None else "no best metric yet")
    title = "exported student" if kind == "export" else f"{kind} checkpoint"
    return f"{title}: {', '.join(parts)}"
