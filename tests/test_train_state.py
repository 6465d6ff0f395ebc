"""Tests of pkd.train_state."""

import pytest

from pkd.train_state import TrainState


def test_train_state_round_trip():
    state = TrainState(step=7, epoch=2, best_metric=0.25, best_step=6, bad_steps=1, skipped_steps=3)
    state.window["loss"].append(1.0)
    restored = TrainState()
    restored.load_state_dict(state.state_dict())
    assert restored.state_dict() == state.state_dict() and restored.step == 7 and restored.best_step == 6
    assert restored.bad_steps == 0 and not restored.window  # per-run counters are not resumed
    with pytest.raises(ValueError, match="lacks"):
        TrainState().load_state_dict({"step": 1})
