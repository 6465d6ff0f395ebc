"""A run's ``metrics.jsonl``: one JSON record per line, written by the engine, read by everyone else.

Record types: ``{"type": "train", "step", "epoch", "lr", "loss", "loss_<component>", ...}``,
``{"type": "val" | "test", "step", "epoch", "mAP", "AP50", ...}``. This module is the one place
that writes (:func:`append_record`, :func:`keep_records_until`) and parses
(:func:`load_metrics`) the file.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pkd.io import atomic_write_text

__all__ = ["METRICS_FILE", "RunMetrics", "append_record", "keep_records_until", "load_metrics", "validation_curve"]

METRICS_FILE = "metrics.jsonl"


def append_record(path: Path, record: dict) -> None:
    """Appends one record and flushes, so a killed run loses at most the line being written."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()


def keep_records_until(path: Path, step: int) -> None:
    """Drops the records after ``step`` (what a killed run wrote after the checkpoint it resumes from)."""
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    # Atomic: a crash while rewriting must not lose the records that are kept.
    atomic_write_text(path, "".join(line + "\n" for line in kept))


@dataclass
class RunMetrics:
    """The records of one run's ``metrics.jsonl``, by type, each sorted by step.

    When a step appears more than once (a run resumed from an earlier checkpoint logs it again)
    the last record wins. Records without an integer ``step`` are dropped.

    Attributes:
        train: ``{"type": "train", "step", "epoch", "lr", "loss", "loss_<component>", ...}``.
        val: ``{"type": "val", "step", "epoch", "mAP", "AP50", ...}``.
        test: final test-split evaluations, same keys as ``val``.
    """

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)


def load_metrics(path: str | Path) -> RunMetrics:
    """Reads a run's ``metrics.jsonl`` (one JSON object per line).

    A last line that is not valid JSON is ignored: the run was killed, or is still running,
    mid-write. Blank lines and records of other types are skipped.

    Args:
        path: the run folder, or the ``metrics.jsonl`` file itself.

    Returns:
        The run's records by type.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` there.
        ValueError: a line other than the last is not a JSON object.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} at {path}: is this a run folder written by the engine?")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    by_type: dict[str, dict[int, dict]] = {"train": {}, "val": {}, "test": {}}
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{number}: expected a JSON object, got {line[:80]!r}")
        step = record.get("step")
        if record.get("type") in by_type and isinstance(step, int) and not isinstance(step, bool):
            by_type[record["type"]][step] = record
    return RunMetrics(**{kind: [records[step] for step in sorted(records)] for kind, records in by_type.items()})


def validation_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """``(step, validation mAP)`` of every evaluation a run logged, by step."""
    return [(record["step"], record["mAP"]) for record in load_metrics(run_dir).val]
