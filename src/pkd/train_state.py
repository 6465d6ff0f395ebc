"""Where training stands: :class:`TrainState`, the counters a run checkpoint keeps."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Where training stands. What a resumed run needs of it is :meth:`state_dict`."""

    step: int = 0
    epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_steps: int = 0  # consecutive non-finite losses
    skipped_steps: int = 0  # non-finite losses in total
    skipped_samples: int = 0  # images that could not be loaded
    window: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    _SAVED = ("step", "epoch", "best_metric", "best_step", "skipped_steps", "skipped_samples")

    def state_dict(self) -> dict[str, Any]:
        """The counters a checkpoint keeps (not the loss window, which restarts with each log line)."""
        return {key: getattr(self, key) for key in self._SAVED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s counters.

        Raises:
            ValueError: ``state`` lacks a counter (a checkpoint from another pkd layout).
        """
        missing = [key for key in self._SAVED if key not in state]
        if missing:
            raise ValueError(f"training state lacks {missing}")
        for key in self._SAVED:
            setattr(self, key, state[key])
