"""Training as plain functions: ``train_step``, ``train_one_epoch`` and ``fit``.

``fit(config)`` runs a whole :class:`~pkd.config.Config`: it builds the datasets, the detector
(and, for distillation, the frozen teacher and the :class:`~pkd.distiller.Distiller`), then
trains with warm-up and a step or cosine schedule, evaluates COCO box mAP
(:func:`pkd.evaluation.evaluate`), reports through :class:`pkd.run_log.RunLog` and writes atomic
``last.pt`` / ``best.pt`` checkpoints into the run folder, and resumes from ``last.pt`` when it
is run again. Under ``torchrun`` everything the Distiller trains (student and connectors) sits
in one DistributedDataParallel; each rank evaluates its shard and rank 0 gathers the predictions.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from pkd.build import build_dataset, build_distiller, build_model, build_optimizer, build_scheduler
from pkd.checkpoint import CheckpointError, load_checkpoint, resume_checkpoint, save_run_checkpoint
from pkd.config import Config, config_changes, config_to_dict, save_config
from pkd.data import build_loader, set_epoch
from pkd.dist import DistInfo, cleanup, init_distributed, seed_everything, set_deterministic
from pkd.distiller import Distiller
from pkd.evaluation import evaluate
from pkd.io import atomic_write_text
from pkd.models import count_parameters
from pkd.rng import rng_state, set_rng_state
from pkd.run_log import RunLog
from pkd.train_state import TrainState

__all__ = [
    "RunInterrupted",
    "TrainState",
    "fit",
    "train_one_epoch",
    "train_step",
]


# -------------------------------------------------------------------------------------------------
# Training


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
        distributed: DDP run (the non-finite check agrees across ranks).
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
    after_step: Callable[[TrainState], bool] | None = None,
    **step_options: Any,
) -> TrainState:
    """Trains for one pass over ``data_loader``, or until ``max_steps`` or ``after_step`` stop it.

    Args:
        model, optimizer, device: as :func:`train_step`.
        data_loader: yields ``(images, targets, skipped)`` (see :func:`pkd.data.collate`).
        epoch: epoch number (for the state).
        state: updated in place (also ``skipped_samples``: images that failed to load).
        max_steps: stop when ``state.step`` reaches it.
        after_step: called after each step (to log, evaluate, save); returning True stops the
            epoch. One that evaluates puts the model back in training mode.
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
        if not images:  # every image of the batch failed to load
            continue
        train_step(model, optimizer, images, targets, device, state=state, **step_options)
        if after_step is not None and after_step(state):
            break
    return state


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


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after saving ``last.pt``; run the same command to resume."""


def _save_run(
    run_dir: Path,
    config: Config,
    meta: dict,
    state: TrainState,
    metrics: dict[str, float] | None,
    is_best: bool,
    *,
    trained: nn.Module,
    optimizer,
    scheduler,
    scaler,
) -> None:
    """``last.pt`` (and ``best.pt`` when ``is_best``): everything a resumed run needs."""
    checkpoint = {
        "kind": "run",
        "model": trained.state_dict(),  # a Distiller's is its bare student's
        "meta": meta,
        "state": state.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "config": config_to_dict(config),
        "metrics": dict(metrics or {}),
    }
    if isinstance(trained, Distiller):
        checkpoint["connectors"] = trained.connector_state_dict()
    save_run_checkpoint(run_dir, checkpoint, is_best=is_best)


def _resume(checkpoint: dict, trained: nn.Module, state: TrainState, optimizer, scheduler, scaler) -> None:
    """Loads a run checkpoint's weights, optimiser, schedule and counters into the built parts."""
    if "state" not in checkpoint:
        raise CheckpointError(
            "the run checkpoint has no training state (written by an older pkd); start over with --no-resume"
        )
    state.load_state_dict(checkpoint["state"])
    trained.load_state_dict(checkpoint["model"])
    if isinstance(trained, Distiller):
        trained.load_connector_state_dict(checkpoint.get("connectors") or {})
        trained.step = state.step
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])


def fit(
    config: Config,
    *,
    resume: bool | str = True,
    progress: bool | None = None,
    on_validation: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any] | None:
    """Trains (and, with ``teacher`` and ``distill`` sections, distils) as the config says.

    Writes into ``config.output``: ``config.yaml``, ``metrics.jsonl``, TensorBoard events,
    ``last.pt`` / ``best.pt`` (best validation mAP) and ``results.json``; curves are the
    caller's to draw (:func:`pkd.plots.plot_run`). With ``resume`` and an existing ``last.pt``
    it continues from there: weights, optimiser, scheduler, scaler, step, RNG states, so an
    interrupted run ends where an uninterrupted one would.

    Args:
        config: the run.
        resume: continue from ``last.pt`` when the run folder has one (True or ``"last"``), from
            ``best.pt`` (``"best"``), or start afresh (False); see :func:`~pkd.checkpoint.resume_checkpoint`.
        progress: progress bars (default: when stderr is a terminal).
        on_validation: called on the main process with the step and the validation metrics after
            each validation (once the checkpoint of that step is saved). An exception it raises
            stops the run where it is, ``last.pt`` kept; :func:`pkd.tune.tune` prunes hopeless
            trials this way.

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
    resumed_from = resume_checkpoint(run_dir, resume)
    if resumed_from is not None:
        source, checkpoint = resumed_from
        changes = config_changes(checkpoint.get("config", {}), config_to_dict(config))
        if changes:
            raise ValueError(
                f"{source} was written with another config ({'; '.join(changes[:5])}); resume with the same config, "
                "start over with --no-resume (resume=False), or choose another output folder"
            )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    train_set = build_dataset(
        config.data, "train", label_map=checkpoint["meta"]["label_map"] if checkpoint else None, augment=True
    )
    evaluation = {
        split: build_dataset(config.data, split, label_map=train_set.label_map)
        for split in ("val", "test")
        if getattr(config.data, split) is not None
    }
    loader_options = dict(batch_size=config.train.batch_size, workers=config.data.workers, distributed=info.distributed)
    train_loader = build_loader(
        train_set,
        train=True,
        seed=config.train.seed,
        group_aspect_ratio=config.data.group_aspect_ratio,
        **loader_options,
    )
    eval_loaders = {
        split: build_loader(data, train=False, seed=0, **loader_options) for split, data in evaluation.items()
    }

    sizes = dict(eval_size=config.data.eval_size, max_size=config.data.max_size)
    student, meta = build_model(config.model, num_classes=train_set.num_classes, skip_resize=True, **sizes)
    meta.update(label_map=dict(train_set.label_map), class_names=dict(train_set.class_names))
    if info.distributed and device.type == "cuda" and meta["build"]["norm"] == "batch":
        # Converted before the distiller is built, so that it taps the converted student.
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    trained: nn.Module = student  # what the optimiser trains: the student, or the distiller around it
    if config.teacher is not None:
        teacher, teacher_meta = build_model(config.teacher, num_classes=train_set.num_classes, **sizes)
        trained = build_distiller(student, teacher, config.distill)
        meta["teacher"] = teacher_meta["detector"]
    trained.to(device)
    model = trained
    if info.distributed:
        # One DDP around everything trained: the connectors' gradients are averaged with the
        # student's. Once distillation stops (distill_until) the connectors get no gradient.
        unused = isinstance(trained, Distiller) and trained.distill_until is not None
        model = nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training split has no images")
    total_steps = config.train.steps or config.train.epochs * steps_per_epoch
    eval_every = config.train.eval_every or steps_per_epoch
    checkpoint_every = config.train.checkpoint_every or eval_every
    optimizer = build_optimizer(trained.parameters(), config.train)
    scheduler = build_scheduler(optimizer, config.train, total_steps)
    scaler = torch.amp.GradScaler("cuda") if (config.train.amp and device.type == "cuda") else None
    state = TrainState()
    if checkpoint is not None:
        _resume(checkpoint, trained, state, optimizer, scheduler, scaler)
        if info.distributed:
            seed_everything(config.train.seed + state.step, info.rank)
        else:
            set_rng_state(checkpoint["rng"])

    log = RunLog(
        run_dir,
        total_steps,
        state.step,
        resumed=checkpoint is not None,
        main=info.is_main,
        progress=progress,
        images_per_step=config.train.batch_size * info.world_size,
    )
    step_options = dict(
        scheduler=scheduler,
        scaler=scaler,
        clip_grad_norm=config.train.clip_grad_norm,
        max_bad_steps=config.train.max_bad_steps,
        distributed=info.distributed,
    )
    saved = dict(trained=trained, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    try:
        with _Interrupt() as interrupt:

            def after_step(state: TrainState) -> bool:
                log.advance()
                done = state.step >= total_steps
                if state.step % config.train.log_every == 0 or done:
                    log.train(state, optimizer.param_groups[0]["lr"])
                evaluated = state.step % eval_every == 0 or done
                metrics, is_best = None, False
                if evaluated and "val" in eval_loaders:
                    # The bare module: evaluation batches differ across ranks, DDP's forward must not sync.
                    metrics = evaluate(trained, eval_loaders["val"], device, progress=progress)
                    model.train()
                    if info.is_main and (state.best_metric is None or metrics["mAP"] > state.best_metric):
                        state.best_metric, state.best_step, is_best = metrics["mAP"], state.step, True
                    log.evaluation("val", state, metrics)
                elif evaluated:
                    is_best = True  # without validation, the latest weights are the ones to keep
                if info.is_main and (evaluated or state.step % checkpoint_every == 0 or interrupt.requested):
                    _save_run(run_dir, config, meta, state, metrics, is_best, **saved)
                if metrics is not None and on_validation is not None and info.is_main:
                    on_validation(state.step, metrics)
                return done or interrupt.requested

            while state.step < total_steps and not interrupt.requested:
                epoch = state.step // steps_per_epoch
                set_epoch(train_loader, epoch, skip_batches=state.step - epoch * steps_per_epoch)
                train_one_epoch(
                    model,
                    optimizer,
                    train_loader,
                    device,
                    epoch,
                    state=state,
                    max_steps=total_steps,
                    after_step=after_step,
                    **step_options,
                )
            if interrupt.requested:
                raise RunInterrupted(f"interrupted at step {state.step}; {last} saved, run again to resume")
        log.bar.close()

        results: dict[str, Any] = {
            "steps": state.step,
            "best_step": state.best_step,
            "skipped_steps": state.skipped_steps,
            "skipped_samples": state.skipped_samples,
            "parameters": count_parameters(student),
        }
        best = run_dir / "best.pt"
        if info.distributed:
            torch_dist.barrier()
        if "val" in eval_loaders and best.is_file():
            results["val"] = load_checkpoint(best)["metrics"]
        if "test" in eval_loaders and best.is_file():
            # The test split is evaluated once, with the weights chosen on validation.
            student.load_state_dict(load_checkpoint(best)["model"])
            results["test"] = evaluate(trained, eval_loaders["test"], device, progress=progress)
            log.evaluation("test", state, results["test"])
        results["wall_time_s"] = round(time.time() - started, 1)
        if not info.is_main:
            return None
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        return results
    finally:
        log.close()
        cleanup()
