"""Where a training run reports: ``metrics.jsonl``, TensorBoard, a progress bar or plain log lines.

:class:`RunLog` is written by :func:`pkd.engine.fit`; only the main process of a DDP run writes,
and the loss window is averaged over ranks first.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from pkd.dist import reduce_mean
from pkd.metrics_log import METRICS_FILE, append_record, keep_records_until
from pkd.train_state import TrainState

__all__ = ["RunLog", "duration"]


def duration(seconds: float) -> str:
    """``"1:02:03"`` or ``"4:05"``; ``"?"`` for an unknown duration."""
    if seconds == float("inf") or seconds != seconds:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunLog:
    """Where a run reports: metrics.jsonl, TensorBoard, a progress bar, or plain lines without a terminal.

    Only the main process writes; on the others every method does nothing.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        step: int,
        *,
        resumed: bool,
        main: bool,
        progress: bool,
        images_per_step: int,
    ) -> None:
        self.run_dir, self.total_steps, self.main = run_dir, total_steps, main
        self.metrics_path = run_dir / METRICS_FILE
        # Where no bar is drawn (a log file, nohup, a cluster scheduler), plain lines say how it goes.
        self.plain = main and not progress
        self.images_per_step = images_per_step
        self.last = {"time": time.time(), "step": step}
        self.bar = tqdm(total=total_steps, initial=step, desc=run_dir.name, disable=not progress, dynamic_ncols=True)
        self.writer = None
        if not main:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after the checkpoint it resumes from.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=step if resumed else None)
        if not resumed:
            self.metrics_path.unlink(missing_ok=True)
        else:
            keep_records_until(self.metrics_path, step)

    def advance(self) -> None:
        """One step done."""
        self.bar.update(1)

    def train(self, state: TrainState, lr: float) -> None:
        """The mean losses since the last call (averaged over ranks), then a new window."""
        window = reduce_mean({k: sum(v) / len(v) for k, v in sorted(state.window.items())})
        state.window.clear()
        if not self.main:
            return
        record = {"type": "train", "step": state.step, "epoch": state.epoch, "lr": lr, **window}
        record.update(skipped_steps=state.skipped_steps, skipped_samples=state.skipped_samples)
        append_record(self.metrics_path, record)
        for name, value in window.items():
            self.writer.add_scalar(f"train/{name}", value, state.step)
        self.writer.add_scalar("train/lr", lr, state.step)
        shown = {"loss": window["loss"]} | ({"distill": window["loss_distill"]} if "loss_distill" in window else {})
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()} | {"lr": f"{lr:.2e}"})
        if self.plain:
            now = time.time()
            steps_per_s = (state.step - self.last["step"]) / max(now - self.last["time"], 1e-9)
            self.last.update(time=now, step=state.step)
            eta = (self.total_steps - state.step) / steps_per_s if steps_per_s > 0 else float("inf")
            losses = " ".join(f"{k}={v:.4f}" for k, v in window.items() if k == "loss" or k.startswith("loss_"))
            print(
                f"[{self.run_dir.name}] step {state.step}/{self.total_steps} {losses} lr={lr:.2e} "
                f"{steps_per_s * self.images_per_step:.1f} img/s eta {duration(eta)}",
                flush=True,
            )

    def evaluation(self, split: str, state: TrainState, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        append_record(self.metrics_path, {"type": split, "step": state.step, "epoch": state.epoch, **metrics})
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, state.step)
        if self.plain and split == "val":
            print(
                f"[{self.run_dir.name}] step {state.step}/{self.total_steps} val mAP {metrics['mAP']:.4f} "
                f"AP50 {metrics['AP50']:.4f} (best {state.best_metric:.4f} at step {state.best_step})",
                flush=True,
            )
            self.last["time"] = time.time()  # the evaluation is not training speed

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
