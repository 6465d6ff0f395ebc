"""``pkd tune``: the search for a run's best settings on the validation split, with Optuna.

:func:`tune` trains one run per trial, each with the searched config keys set to values that
Optuna's sampler (TPE by default, or a grid) proposes, and scores it by its best validation
mAP; the test split is not looked at. Trials that fall behind the others' validation curves
are stopped early (Optuna's median pruner, fed by :func:`pkd.engine.fit`'s ``on_validation``).
Several trials train at once, each in its own process with one thread.

Everything lives in the run folder's ``tune/``::

    RUN/tune/study.db      the Optuna study (SQLite): run the same command again to continue it
    RUN/tune/trial_K/      trial K's run folder (config.yaml, metrics.jsonl, best.pt, ...)
    RUN/tune/trials.csv    one row per trial: state, validation mAP, values tried
    RUN/tune/trials.png    validation mAP per trial, and against each searched value
    RUN/tune/best.yaml     the whole config with the best trial's values: the one to train with

A study is resumable: finished trials are kept, a trial that was interrupted (Ctrl-C, or a
killed process) is run again with the same values, resuming its run folder, and ``trials``
is the total over all calls. Do not run two ``pkd tune`` on one folder at the same time.

See docs/tune.md.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pkd.config import Config, ConfigError, config_from_dict, config_to_dict
from pkd.io import atomic_path
from pkd.metrics_log import METRICS_FILE, validation_curve
from pkd.runtime import worker_pool
from pkd.search_space import (
    Param,
    base_values,
    check_space,
    default_space,
    parse_space,
    resolve_space,
    with_values,
)

__all__ = ["SAMPLERS", "TuneResult", "tune"]

SAMPLERS = ("tpe", "grid")
_STUDY = "pkd"
_FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class TuneResult:
    """A study's trials and the files written about them.

    Attributes:
        folder: ``RUN/tune``.
        space: the searched keys, resolved (``around`` turned into its range).
        rows: one dict per trial: ``trial``, ``state``, ``val_mAP``, ``step`` (the best
            validation's, or the last one of a pruned trial), ``minutes``, and the values tried.
        best: the best finished trial's row (None before any finishes).
        best_config: ``best.yaml`` (None before any trial finishes).
        csv, plot: ``trials.csv`` and ``trials.png``.
    """

    folder: Path
    space: dict[str, Param]
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    csv: Path
    plot: Path

    def params(self) -> dict[str, Any]:
        """The best trial's values, ``{config key: value}`` (empty before any trial finishes)."""
        return {key: self.best[key] for key in self.space} if self.best else {}

    def table(self) -> str:
        """The trials as a Markdown table; the best one in bold."""
        keys = list(self.space)
        lines = ["| trial | state | val mAP | step | " + " | ".join(keys) + " | minutes |"]
        lines.append("|---|---|---|---|" + "---|" * len(keys) + "---|")
        for row in self.rows:
            value = "" if row["val_mAP"] is None else f"{row['val_mAP']:.4f}"
            if self.best is not None and row["trial"] == self.best["trial"]:
                value = f"**{value}**"
            cells = [_cell(row[key]) for key in keys]
            step = "" if row["step"] is None else str(row["step"])
            lines.append(
                f"| {row['trial']} | {row['state'].lower()} | {value} | {step} | "
                + " | ".join(cells)
                + f" | {row['minutes']:.1f} |"
            )
        return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _storage(folder: Path):
    import optuna

    # Several worker processes share the file: wait for its lock instead of failing at once.
    url = f"sqlite:///{(folder / 'study.db').resolve()}"
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})


def _sampler(kind: str, space: dict[str, Param], *, trials: int, grid_points: int, seed: int):
    import optuna

    if kind == "grid":
        return optuna.samplers.GridSampler({key: p.grid(grid_points) for key, p in space.items()}, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A third of a small budget (at most Optuna's 10) is random before TPE models the rest;
        # multivariate: the learning rate and the loss weight act together; constant_liar:
        # parallel workers do not all propose the same values.
        return optuna.samplers.TPESampler(
            n_startup_trials=max(2, min(10, trials // 3)), multivariate=True, constant_liar=True, seed=seed
        )


def _pruner(config: Config, prune: bool):
    import optuna

    if not prune:
        return optuna.pruners.NopPruner()
    # The first quarter of a run says little (warm-up, noisy early mAP): no pruning there.
    warmup = (config.train.steps or 0) // 4
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup)


def _trial_config(config: Config, params: dict[str, Any], run_dir: Path) -> Config:
    """The base config with a trial's values, its own folder, and no test split (trials see validation only)."""
    values = with_values(config_to_dict(config), params)
    values["output"] = str(run_dir)
    values["data"]["test"] = None
    return config_from_dict(values)


def _objective(trial, config: Config, space: dict[str, Param], folder: Path, prune: bool) -> float:
    """One trial: trains its run (resuming an interrupted one) and returns the best validation mAP."""
    import optuna

    from pkd.engine import fit

    params = {key: param.suggest(trial) for key, param in space.items()}
    run_dir = folder / f"trial_{trial.number}"
    earlier = trial.user_attrs.get("resumes")
    if earlier is not None and (folder / f"trial_{earlier}").is_dir() and not run_dir.exists():
        (folder / f"trial_{earlier}").rename(run_dir)  # an interrupted trial's run continues here
    reported: set[int] = set()
    if (run_dir / METRICS_FILE).is_file():  # a resumed run: its validations so far are this trial's too
        for step, value in validation_curve(run_dir):
            trial.report(value, step)
            reported.add(step)

    def on_validation(step: int, metrics: dict[str, float]) -> None:
        if step in reported:
            return
        reported.add(step)
        trial.report(metrics["mAP"], step)
        if prune and trial.should_prune():
            print(f"[tune] trial {trial.number} pruned at step {step}: val mAP {metrics['mAP']:.4f}", flush=True)
            raise optuna.TrialPruned(f"val mAP {metrics['mAP']:.4f} at step {step}, below the other trials'")

    try:
        results = fit(_trial_config(config, params, run_dir), resume=True, progress=False, on_validation=on_validation)
    except optuna.TrialPruned:
        _drop_checkpoints(run_dir, keep_best=False)
        raise
    except RuntimeError as error:
        if "non-finite" not in str(error):
            raise
        # Diverged (e.g. a learning rate too high): a result about these values, not a failure of the study.
        trial.set_user_attr("diverged", str(error))
        _drop_checkpoints(run_dir, keep_best=False)
        raise optuna.TrialPruned(f"diverged: {error}") from error
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        raise
    trial.set_user_attr("best_step", results["best_step"])
    _drop_checkpoints(run_dir, keep_best=True)
    values = ", ".join(f"{key}={_cell(value)}" for key, value in params.items())
    print(f"[tune] trial {trial.number} ({values}): best val mAP {results['val']['mAP']:.4f}", flush=True)
    return results["val"]["mAP"]


def _drop_checkpoints(run_dir: Path, *, keep_best: bool) -> None:
    """A finished trial keeps its metrics and (if it completed) ``best.pt``: a study's disk stays small."""
    (run_dir / "last.pt").unlink(missing_ok=True)
    if not keep_best:
        (run_dir / "best.pt").unlink(missing_ok=True)


def _work(
    folder: Path,
    config: Config,
    space: dict[str, Param],
    n_trials: int,
    *,
    sampler: str,
    trials: int,
    grid_points: int,
    seed: int,
    prune: bool,
    one_thread: bool,
) -> None:
    """One worker: runs ``n_trials`` trials of the study in ``folder`` (in this process)."""
    import optuna
    from optuna.storages.journal import JournalFileOpenLock

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial's end is one [tune] line; errors re-raise
    if one_thread:
        import torch

        torch.set_num_threads(1)
    study = optuna.load_study(
        study_name=_STUDY,
        storage=_storage(folder),
        sampler=_sampler(sampler, space, trials=trials, grid_points=grid_points, seed=seed),
        pruner=_pruner(config, prune),
    )
    # SQLite has no row locks: two workers asking at once can both pop the same queued trial (the
    # config's own values, a retried one) and both train it (optuna/optuna#4621). Asks take turns.
    ask, lock = study.ask, JournalFileOpenLock(str(folder / "ask.lock"))

    def ask_in_turn(*args, **kwargs):
        lock.acquire()
        try:
            return ask(*args, **kwargs)
        finally:
            lock.release()

    study.ask = ask_in_turn
    # The table, plot and best.yaml follow the study as it goes, not only at its end.
    write = lambda study, trial: _write_outputs(study, config, space, folder)  # noqa: E731
    study.optimize(lambda trial: _objective(trial, config, space, folder, prune), n_trials=n_trials, callbacks=[write])


def _open_study(folder: Path, config: Config, space: dict[str, Param], sampler: str, first: dict | None):
    """Creates the study, or opens the folder's and checks that it searches the same thing."""
    import optuna

    from pkd.engine import config_changes

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=_STUDY, storage=_storage(folder), direction="maximize", load_if_exists=True)
    described = {key: param.describe() for key, param in space.items()}
    if "space" not in study.user_attrs:
        study.set_user_attr("config", config_to_dict(config))
        study.set_user_attr("space", described)
        study.set_user_attr("sampler", sampler)
        if first is not None and sampler == "tpe":
            study.enqueue_trial(first)  # the config's own values first: the study starts from what is known
        return study
    changes = config_changes(study.user_attrs["config"], config_to_dict(config))
    if study.user_attrs["space"] != described or study.user_attrs["sampler"] != sampler or changes:
        what = "; ".join(changes[:3]) or f"space {study.user_attrs['space']}, sampler {study.user_attrs['sampler']}"
        raise ConfigError(
            f"{folder} holds a study of another config or search ({what}); run it with the same ones, "
            "or give another --output"
        )
    return study


def _retry_interrupted(study) -> None:
    """Queues again the values of trials that an interruption stopped (each once), resuming their runs."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("resumes") for t in trials}
    for trial in trials:
        killed = trial.state == TrialState.RUNNING  # its process died without telling the study
        stopped = trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")
        if (killed or stopped) and trial.number not in retried:
            if killed:
                study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"resumes": trial.number})


def _shares(remaining: int, jobs: int) -> list[int]:
    """``remaining`` trials split over at most ``jobs`` workers, as evenly as they go."""
    workers = min(jobs, remaining)
    return [remaining // workers + (k < remaining % workers) for k in range(workers)]


def tune(
    config: Config,
    *,
    trials: int,
    jobs: int = 1,
    space: list[str] | tuple[str, ...] | None = None,
    sampler: str = "tpe",
    grid_points: int = 3,
    prune: bool = True,
    seed: int = 0,
) -> TuneResult:
    """Searches config values for the best validation mAP, ``trials`` runs in all (see the module docstring).

    Args:
        config: the run to tune (``pkd train`` or ``pkd distill`` config); it needs a
            validation split. The study goes into ``<config.output>/tune``.
        trials: finished trials (completed or pruned) the study should hold; a second call
            with a larger number adds the difference.
        jobs: trials trained at a time, each in its own process with one thread (1: in this
            process, with torch's threads).
        space: ``KEY=SPEC`` items (:mod:`pkd.search_space`); default: ``train.lr`` and, when
            distilling, ``distill.weight``, each from its value / 4 to x 4.
        sampler: ``"tpe"`` (Optuna's TPE, the config's own values tried first) or ``"grid"``
            (every combination of ``grid_points`` values per range, and every choice).
        grid_points: values per range of a grid.
        prune: stop trials whose validation mAP falls below the median of the others' at the
            same step (after the first quarter of the run).
        seed: sampler seed (worker k of a call uses ``seed + k`` plus the trials so far).

    Returns:
        The trials, the best one and the files written.

    Raises:
        ConfigError: a bad search space, a config without a validation split, or a folder
            that holds a study of another config or space (the message says which).
    """
    if trials < 1 or jobs < 1 or grid_points < 1:
        raise ValueError(f"trials, jobs and grid points must be at least 1 (got {trials}, {jobs}, {grid_points})")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if config.data.val is None:
        raise ConfigError("data.val: pkd tune scores each trial on a validation split; add one to the config")
    try:
        import optuna
    except ImportError:
        raise ValueError('pkd tune needs Optuna: pip install "pkd[tune]" (or "optuna>=4")') from None

    unset = config.teacher is not None and (config.distill is None or config.distill.weight is None)
    weight = _default_weight(config) if unset else None
    searched = resolve_space(parse_space(space) if space else default_space(config), config, distill_weight=weight)
    check_space(searched, config)
    folder = Path(config.output) / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    if sampler == "grid":  # a grid has so many points; more trials would repeat them
        trials = min(trials, math.prod(len(param.grid(grid_points)) for param in searched.values()))
    study = _open_study(folder, config, searched, sampler, base_values(searched, config, distill_weight=weight))
    _retry_interrupted(study)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name in _FINISHED]
    shares = _shares(trials - len(finished), jobs) if len(finished) < trials else []
    options = dict(sampler=sampler, trials=trials, grid_points=grid_points, prune=prune)
    start_seed = seed + len(study.trials)
    try:
        if len(shares) == 1 and jobs == 1:
            _work(folder, config, searched, shares[0], seed=start_seed, one_thread=False, **options)
        elif shares:
            with worker_pool(len(shares)) as pool:
                futures = [
                    pool.submit(_work, folder, config, searched, n, seed=start_seed + k, one_thread=True, **options)
                    for k, n in enumerate(shares)
                ]
                for future in futures:
                    future.result()  # re-raises a worker's error here
    except KeyboardInterrupt:
        from pkd.engine import RunInterrupted

        raise RunInterrupted(f"tune interrupted; run the same command to continue the study in {folder}") from None
    study = optuna.load_study(study_name=_STUDY, storage=_storage(folder))
    return _write_outputs(study, config, searched, folder)


def _default_weight(config: Config) -> float:
    """The weight the distiller uses when ``distill.weight`` is unset: the teacher's (built once here)."""
    from pkd.build import build_model
    from pkd.data import CocoDetection
    from pkd.distiller import default_weight

    train = CocoDetection(config.data.train.annotations, config.data.train.images)
    teacher, _ = build_model(config.teacher, num_classes=train.num_classes)
    return default_weight(teacher)


def _rows(study, space: dict[str, Param]) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        step = trial.user_attrs.get("best_step")
        if step is None and trial.intermediate_values:
            step = max(trial.intermediate_values)
        value = trial.value
        if value is None and trial.state.name == "PRUNED" and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        seconds = trial.duration.total_seconds() if trial.duration is not None else 0.0
        row = {"trial": trial.number, "state": trial.state.name, "val_mAP": value, "step": step}
        row.update({key: trial.params.get(key) for key in space})
        row["minutes"] = seconds / 60
        rows.append(row)
    return rows


def _replace(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary)``, then the temporary file becomes ``path`` (pkd.io's atomic write): a
    parallel worker's write never shows half done."""
    with atomic_path(path) as temporary:
        write(temporary)
    return path


def _write_outputs(study, config: Config, space: dict[str, Param], folder: Path) -> TuneResult:
    """trials.csv, trials.png and best.yaml of the study so far (after every trial, and at the end)."""
    rows = _rows(study, space)

    def write_table(path: Path) -> None:
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["trial"])
            writer.writeheader()
            writer.writerows(rows)

    table = _replace(folder / "trials.csv", write_table)
    plot = _replace(folder / "trials.png", lambda path: plot_trials(rows, space, path))
    complete = [row for row in rows if row["state"] == "COMPLETE"]
    best = max(complete, key=lambda row: (row["val_mAP"], -row["trial"])) if complete else None
    best_config = None
    if best is not None:
        params = {key: best[key] for key in space}
        values = with_values(config_to_dict(config), params)
        config_from_dict(values)  # the values were checked; this keeps best.yaml loadable for sure
        best_config = folder / "best.yaml"
        header = (
            f"# pkd tune: trial {best['trial']} of {len(rows)}, validation mAP {best['val_mAP']:.4f} "
            f"({folder / 'trials.csv'}); searched: " + ", ".join(f"{k}={p.describe()}" for k, p in space.items())
        )
        _replace(best_config, lambda path: path.write_text(header + "\n" + yaml.safe_dump(values, sort_keys=False)))
    return TuneResult(folder, space, rows, best, best_config, table, plot)


def plot_trials(rows: list[dict[str, Any]], space: dict[str, Param], out: Path) -> Path:
    """``trials.png``: validation mAP per trial (best so far as a line), and against each searched value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 1 + len(space), figsize=(4.2 * (1 + len(space)), 3.6), squeeze=False)
    axes = axes[0]
    styles = {
        "COMPLETE": dict(marker="o", color="C0", label="completed"),
        "PRUNED": dict(marker="x", color="C3", label="pruned (last val mAP)"),
    }
    scored = [row for row in rows if row["val_mAP"] is not None and row["state"] in styles]
    for state, style in styles.items():
        points = [row for row in scored if row["state"] == state]
        if not points:
            continue
        mAPs = [row["val_mAP"] for row in points]
        axes[0].scatter([row["trial"] for row in points], mAPs, linestyle="None", **style)
        for ax, (key, param) in zip(axes[1:], space.items(), strict=True):
            ax.scatter([_plottable(row[key], param) for row in points], mAPs, linestyle="None", **style)
    complete = sorted((row["trial"], row["val_mAP"]) for row in scored if row["state"] == "COMPLETE")
    if complete:
        running = [max(value for _, value in complete[: k + 1]) for k in range(len(complete))]
        axes[0].step([t for t, _ in complete], running, where="post", color="C0", alpha=0.5, label="best so far")
    axes[0].set(xlabel="trial", ylabel="validation mAP", title="trials")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    for ax, (key, param) in zip(axes[1:], space.items(), strict=True):
        ax.set(xlabel=key, title=param.describe())
        if param.kind == "log":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks overlap
            ax.set_xlim(param.low / 1.15, param.high * 1.15)  # the whole range searched, not just what was tried
        elif param.kind != "choice":
            margin = (param.high - param.low) * 0.05
            ax.set_xlim(param.low - margin, param.high + margin)
        if param.kind == "choice":
            ax.set_xticks(range(len(param.choices)), [str(c) for c in param.choices])
    for ax in axes:
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110, format="png")  # out may be a temporary name without .png
    plt.close(figure)
    return out


def _plottable(value: Any, param: Param) -> float:
    if param.kind == "choice":
        return param.choices.index(value) if value in param.choices else math.nan
    return math.nan if value is None else float(value)
