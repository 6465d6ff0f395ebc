"""Training and evaluation as plain functions: ``train_one_epoch``, ``evaluate`` and ``fit``.

``fit(config)`` runs a whole :class:`~pkd.config.Config`: it builds the datasets, the detector
(and, for distillation, the frozen teacher and the :class:`~pkd.distiller.Distiller`), then
trains with warm-up and a step or cosine schedule, evaluates COCO box mAP with pycocotools,
writes ``metrics.jsonl``, TensorBoard events and atomic ``last.pt`` / ``best.pt`` checkpoints
into the run folder, and resumes from ``last.pt`` when it is run again. Under ``torchrun`` it
trains with DistributedDataParallel (the student only), evaluates every rank's shard and
gathers the predictions on rank 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from tqdm.auto import tqdm

from pkd.build import (
    build_distiller,
    build_model,
    build_optimizer,
    build_scheduler,
)
from pkd.checkpoint import (
    load_checkpoint,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)
from pkd.config import Config, config_to_dict, save_config
from pkd.data import CocoDetection, build_loader, eval_transforms, set_epoch, train_transforms
from pkd.dist import (
    DistInfo,
    cleanup,
    gather_to_main,
    init_distributed,
    reduce_mean,
    seed_everything,
    set_deterministic,
    unwrap,
)
from pkd.distiller import Distiller
from pkd.metrics_log import METRICS_FILE, append_record, keep_records_until
from pkd.models import count_parameters

__all__ = [
    "COCO_METRICS",
    "TrainState",
    "coco_metrics",
    "evaluate",
    "fit",
    "train_one_epoch",
]

#: The 12 numbers of pycocotools' COCOeval.summarize(), in its order (-1: no such objects).
COCO_METRICS = (
    "mAP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


# -------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainState:
    """Where training stands; saved in checkpoints."""

    step: int = 0
    epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_steps: int = 0  # consecutive non-finite losses
    skipped_steps: int = 0  # non-finite losses in total
    skipped_samples: int = 0  # images that could not be loaded
    window: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def _named_losses(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss names as logged: a ``loss_`` prefix on each, plus the total distillation loss."""
    named = {(k if k.startswith("loss_") else f"loss_{k}"): v.detach() for k, v in losses.items()}
    distill = [v for k, v in named.items() if k.startswith("loss_distill/")]
    if distill:
        named["loss_distill"] = torch.stack(distill).sum()
    return named


def _all_finite(loss: Tensor, distributed: bool) -> bool:
    finite = torch.isfinite(loss.detach()).float()
    if distributed:  # every rank must skip together, or DDP's gradient all-reduce would hang
        finite = finite.to(loss.device)
        torch_dist.all_reduce(finite, op=torch_dist.ReduceOp.MIN)
    return bool(finite.item())


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    device: torch.device,
    *,
    state: TrainState,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    max_bad_steps: int = 5,
    distributed: bool = False,
    extra_grads: Iterable[nn.Parameter] = (),
) -> None:
    """One optimisation step on one batch; ``state`` counts it and keeps its losses in ``state.window``.

    A batch whose total loss is not finite is skipped (no update) and counted; more than
    ``max_bad_steps`` in a row stop training with an error.

    Args:
        model: a detector or :class:`~pkd.distiller.Distiller` returning a dict of losses.
        optimizer: its optimiser.
        images: list of ``(3, H, W)`` images; targets: their target dicts.
        device: where the model is.
        state: updated in place: step counter, skipped steps, loss window.
        scheduler: stepped once per step.
        scaler: a CUDA ``GradScaler`` for mixed precision, or None.
        clip_grad_norm: max gradient norm, or None.
        max_bad_steps: consecutive non-finite losses tolerated.
        distributed: DDP run (non-finite checks agree across ranks; ``extra_grads`` averaged).
        extra_grads: parameters outside the DDP-wrapped module whose gradients are averaged
            across ranks by hand (the distiller's connectors).
    """
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, enabled=scaler is not None):
        losses = model(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if _all_finite(total, distributed):
        state.bad_steps = 0
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if distributed:
            for parameter in extra_grads:
                if parameter.grad is not None:
                    torch_dist.all_reduce(parameter.grad)
                    parameter.grad /= torch_dist.get_world_size()
        if clip_grad_norm is not None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    else:
        state.bad_steps += 1
        state.skipped_steps += 1
        bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v)}
        warnings.warn(f"step {state.step}: non-finite loss {bad}; batch skipped", stacklevel=2)
        if state.bad_steps > max_bad_steps:
            raise RuntimeError(
                f"{state.bad_steps} non-finite losses in a row (last: {bad}); training stopped. "
                "Lower train.lr, set train.clip_grad_norm, or check the data with `pkd check-data`."
            )
    if scheduler is not None:
        scheduler.step()
    state.step += 1
    named = _named_losses(losses)
    named["loss"] = total.detach()
    for key, value in named.items():
        state.window[key].append(float(value))


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device,
    epoch: int,
    *,
    state: TrainState,
    max_steps: int | None = None,
    **step_options: Any,
) -> TrainState:
    """Trains for one pass over ``data_loader`` (or until ``state.step`` reaches ``max_steps``).

    For a loop of one's own; :func:`fit` runs :func:`train_step` itself, so that its loop says
    when to log, evaluate and save.

    Args:
        model, optimizer, device: as :func:`train_step`.
        data_loader: yields ``(images, targets, skipped)`` (see :func:`pkd.data.collate`).
        epoch: epoch number (for the state).
        state: updated in place (also ``skipped_samples``: images that failed to load).
        max_steps: stop when ``state.step`` reaches it.
        **step_options: :func:`train_step`'s keyword arguments (scheduler, scaler, ...).

    Returns:
        ``state``.
    """
    model.train()
    state.epoch = epoch
    for images, targets, skipped in data_loader:
        if max_steps is not None and state.step >= max_steps:
            break
        state.skipped_samples += skipped
        if images:  # else every image of the batch failed to load
            train_step(model, optimizer, images, targets, device, state=state, **step_options)
    return state


# -------------------------------------------------------------------------------------------------
# Evaluation


def coco_metrics(coco_gt: COCO, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """pycocotools' 12 box metrics of ``detections`` (COCO result dicts) on ``image_ids``.

    Returns:
        ``{name: value}`` for the names of :data:`COCO_METRICS`; all 0 without detections.
    """
    if not detections:
        return dict.fromkeys(COCO_METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_METRICS, evaluator.stats, strict=True)}


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, *, progress: bool = False) -> dict[str, float] | None:
    """COCO box mAP of a detector on a :class:`~pkd.data.CocoDetection` loader.

    Each process predicts its shard; predictions are gathered on rank 0, which returns the
    metrics (other ranks return None).

    Args:
        model: detector (or distiller), put in eval mode here and left in eval mode.
        data_loader: evaluation loader whose ``dataset`` is a ``CocoDetection``.
        device: where the model is.
        progress: show a progress bar.

    Returns:
        ``{metric: value}`` (:data:`COCO_METRICS`) on rank 0.
    """
    model.eval()
    dataset = data_loader.dataset
    detections = []
    for images, targets, _ in tqdm(data_loader, desc="eval", leave=False, disable=not progress):
        outputs = model([image.to(device) for image in images])
        for target, output in zip(targets, outputs, strict=True):
            boxes = output["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            scores, labels = output["scores"].tolist(), output["labels"].tolist()
            for box, score, label in zip(boxes.tolist(), scores, labels, strict=True):
                detections.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": dataset.label_to_category[int(label)],
                        "bbox": [round(x, 2) for x in box],
                        "score": round(float(score), 5),
                    }
                )
    gathered = gather_to_main(detections)
    if gathered is None:
        return None
    return coco_metrics(dataset.coco, [d for part in gathered for d in part], dataset.ids)


# -------------------------------------------------------------------------------------------------
# A whole run


class _Interrupt:
    """First Ctrl-C: finish the step, save, stop. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Interrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _duration(seconds: float) -> str:
    """``"1:02:03"`` or ``"4:05"``; ``"?"`` for an unknown duration."""
    if seconds == float("inf") or seconds != seconds:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _datasets(config: Config, label_map=None):
    data = config.data
    train_set = CocoDetection(
        data.train.annotations,
        data.train.images,
        transforms=train_transforms(min_sizes=data.train_sizes, max_size=data.max_size, flip_prob=data.flip_prob),
        label_map=label_map,
        drop_empty=data.drop_empty,
    )
    evaluation = {}
    for split in ("val", "test"):
        section = getattr(data, split)
        if section is not None:
            evaluation[split] = CocoDetection(
                section.annotations, section.images, transforms=eval_transforms(), label_map=train_set.label_map
            )
    return train_set, evaluation


# Keys that may change between an interrupted run and its resumption without changing the result.
_RESUMABLE_CHANGES = {"output", "train.device", "train.log_every", "data.workers", "train.checkpoint_every"}


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    flat = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def config_changes(saved: dict, current: dict) -> list[str]:
    """Differences between two plain configs that would change a run, as ``key: old -> new``."""
    old, new = _flatten(saved), _flatten(current)
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in _RESUMABLE_CHANGES]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after saving ``last.pt``; run the same command to resume."""


class _RunLog:
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
                f"{steps_per_s * self.images_per_step:.1f} img/s eta {_duration(eta)}",
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


def _save_run(
    run_dir: Path,
    config: Config,
    meta: dict,
    state: TrainState,
    metrics: dict[str, float] | None,
    is_best: bool,
    *,
    model: nn.Module,
    student: nn.Module,
    optimizer,
    scheduler,
    scaler,
) -> None:
    """``last.pt`` (and ``best.pt`` when ``is_best``): everything a resumed run needs."""
    extra = {
        "best_step": state.best_step,
        "skipped_steps": state.skipped_steps,
        "skipped_samples": state.skipped_samples,
    }
    if isinstance(model, Distiller):
        extra["connectors"] = model.connector_state_dict()
    save_run_checkpoint(
        run_dir,
        {
            "kind": "run",
            "model": unwrap(student).state_dict(),
            "meta": meta,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": state.epoch,
            "step": state.step,
            "rng": rng_state(),
            "config": config_to_dict(config),
            "metrics": dict(metrics or {}),
            "best_metric": state.best_metric,
            "extra": extra,
        },
        is_best=is_best,
    )


def fit(
    config: Config,
    *,
    resume: bool = True,
    progress: bool | None = None,
    on_validation: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any] | None:
    """Trains (and, with ``teacher`` and ``distill`` sections, distils) as the config says.

    Writes into ``config.output``: ``config.yaml``, ``metrics.jsonl``, TensorBoard events,
    ``last.pt`` / ``best.pt`` (best validation mAP), ``results.json`` and ``curves.png``. With ``resume`` and an
    existing ``last.pt`` it continues from there: weights, optimiser, scheduler, scaler, step,
    RNG states, so an interrupted run ends where an uninterrupted one would.

    Args:
        config: the run.
        resume: continue from ``last.pt`` when the run folder has one.
        progress: progress bars (default: when stderr is a terminal).
        on_validation: called with the step and the validation metrics after each validation
            (once the checkpoint of that step is saved). An exception it raises stops the run
            where it is, ``last.pt`` kept; :func:`pkd.tune.tune` prunes hopeless trials this way.

    Returns:
        ``results.json``'s content: best validation metrics, test metrics, steps, wall time,
        parameter count (on rank 0; None on the other ranks of a DDP run).

    Raises:
        RunInterrupted: after Ctrl-C, once ``last.pt`` is saved.
    """
    started = time.time()
    info: DistInfo = init_distributed(None if config.train.device == "auto" else config.train.device)
    device = info.device
    run_dir = Path(config.output)
    seed_everything(config.train.seed, info.rank)
    set_deterministic(config.train.deterministic)
    progress = (sys.stderr.isatty() if progress is None else progress) and info.is_main

    checkpoint = None
    last = run_dir / "last.pt"
    if resume and last.is_file():
        checkpoint = load_checkpoint(last)
        changes = config_changes(checkpoint.get("config", {}), config_to_dict(config))
        if changes:
            raise ValueError(
                f"{last} was written with another config ({'; '.join(changes[:5])}); resume with the same config, "
                "start over with --no-resume (resume=False), or choose another output folder"
            )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    train_set, evaluation = _datasets(config, checkpoint["meta"]["label_map"] if checkpoint else None)
    train_loader = build_loader(
        train_set,
        batch_size=config.train.batch_size,
        train=True,
        workers=config.data.workers,
        distributed=info.distributed,
        seed=config.train.seed,
        group_aspect_ratio=config.data.group_aspect_ratio,
    )
    eval_loaders = {
        split: build_loader(
            dataset,
            batch_size=config.train.batch_size,
            train=False,
            workers=config.data.workers,
            distributed=info.distributed,
            seed=0,
        )
        for split, dataset in evaluation.items()
    }

    sizes = dict(eval_size=config.data.eval_size, max_size=config.data.max_size)
    student, meta = build_model(config.model, num_classes=train_set.num_classes, skip_resize=True, **sizes)
    meta.update(label_map=dict(train_set.label_map), class_names=dict(train_set.class_names))
    model: nn.Module = student
    if config.teacher is not None:
        teacher, teacher_meta = build_model(config.teacher, num_classes=train_set.num_classes, **sizes)
        model = build_distiller(student, teacher, config.distill)
        meta["teacher"] = teacher_meta["detector"]
    if info.distributed and device.type == "cuda" and meta["build"]["norm"] == "batch":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        if isinstance(model, Distiller):
            model.student = student
        else:
            model = student
    model.to(device)
    if info.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
        if isinstance(model, Distiller):
            model.student = wrapped
        else:
            model = wrapped

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training split has no images")
    total_steps = config.train.steps or config.train.epochs * steps_per_epoch
    eval_every = config.train.eval_every or steps_per_epoch
    checkpoint_every = config.train.checkpoint_every or eval_every
    optimizer = build_optimizer(model.parameters(), config.train)
    scheduler = build_scheduler(optimizer, config.train, total_steps)
    scaler = torch.amp.GradScaler("cuda") if (config.train.amp and device.type == "cuda") else None
    state = TrainState()

    if checkpoint is not None:
        unwrap(student).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        extra = checkpoint.get("extra", {})
        if isinstance(model, Distiller):
            model.load_connector_state_dict(extra.get("connectors", {}))
            model.step = checkpoint["step"]
        state.step, state.epoch = checkpoint["step"], checkpoint["epoch"]
        state.best_metric, state.best_step = checkpoint.get("best_metric"), extra.get("best_step")
        state.skipped_steps = extra.get("skipped_steps", 0)
        state.skipped_samples = extra.get("skipped_samples", 0)
        if info.distributed:
            seed_everything(config.train.seed + state.step, info.rank)
        else:
            set_rng_state(checkpoint["rng"])

    log = _RunLog(
        run_dir,
        total_steps,
        state.step,
        resumed=checkpoint is not None,
        main=info.is_main,
        progress=progress,
        images_per_step=config.train.batch_size * info.world_size,
    )
    parts = {"model": model, "student": student, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    step_options = dict(
        scheduler=scheduler,
        scaler=scaler,
        clip_grad_norm=config.train.clip_grad_norm,
        max_bad_steps=config.train.max_bad_steps,
        distributed=info.distributed,
        extra_grads=list(model.connectors.parameters()) if isinstance(model, Distiller) else [],
    )
    try:
        with _Interrupt() as interrupt:
            while state.step < total_steps and not interrupt.requested:
                state.epoch = state.step // steps_per_epoch
                set_epoch(train_loader, state.epoch, skip_batches=state.step - state.epoch * steps_per_epoch)
                model.train()
                for images, targets, skipped in train_loader:
                    state.skipped_samples += skipped
                    if not images:  # every image of the batch failed to load
                        continue
                    train_step(model, optimizer, images, targets, device, state=state, **step_options)
                    log.advance()
                    done = state.step >= total_steps
                    if state.step % config.train.log_every == 0 or done:
                        log.train(state, optimizer.param_groups[0]["lr"])
                    evaluated = state.step % eval_every == 0 or done
                    metrics, is_best = None, False
                    if evaluated and "val" in eval_loaders:
                        metrics = evaluate(model, eval_loaders["val"], device, progress=progress)
                        model.train()
                        if info.is_main and (state.best_metric is None or metrics["mAP"] > state.best_metric):
                            state.best_metric, state.best_step, is_best = metrics["mAP"], state.step, True
                        log.evaluation("val", state, metrics)
                    elif evaluated:
                        is_best = True  # without validation, the latest weights are the ones to keep
                    if info.is_main and (evaluated or state.step % checkpoint_every == 0 or interrupt.requested):
                        _save_run(run_dir, config, meta, state, metrics, is_best, **parts)
                    if metrics is not None and on_validation is not None:
                        on_validation(state.step, metrics)
                    if done or interrupt.requested:
                        break
            if interrupt.requested:
                raise RunInterrupted(f"interrupted at step {state.step}; {last} saved, run again to resume")
        log.bar.close()

        results: dict[str, Any] = {
            "steps": state.step,
            "best_step": state.best_step,
            "skipped_steps": state.skipped_steps,
            "skipped_samples": state.skipped_samples,
            "parameters": count_parameters(unwrap(student)),
        }
        best = run_dir / "best.pt"
        if info.distributed:
            torch_dist.barrier()
        if "val" in eval_loaders and best.is_file():
            results["val"] = load_checkpoint(best)["metrics"]
        if "test" in eval_loaders and best.is_file():
            # The test split is evaluated once, with the weights chosen on validation.
            unwrap(student).load_state_dict(load_checkpoint(best)["model"])
            results["test"] = evaluate(model, eval_loaders["test"], device, progress=progress)
            log.evaluation("test", state, results["test"])
        results["wall_time_s"] = round(time.time() - started, 1)
        if not info.is_main:
            return None
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        from pkd.plots import plot_run

        plot_run(run_dir)
        return results
    finally:
        log.close()
        cleanup()
