"""Tests of pkd.tune and `pkd tune`: a study of tiny distillation runs, resumed; best.yaml; errors."""

import csv

import optuna
import pytest
import yaml

from pkd.cli import main
from pkd.config import config_from_dict, config_to_dict, load_config
from pkd.tune import tune


def tiny_values(digits, output):
    split = lambda name: {"annotations": str(digits.annotations[name]), "images": str(digits.images[name])}  # noqa: E731
    return {
        "model": {"name": "fcos_resnet18_fpn", "fpn_channels": 32},
        # A teacher from random init: the study is about the machinery, not about mAP.
        "teacher": {"name": "fcos_resnet18_fpn", "fpn_channels": 32},
        "distill": {"loss": "pkd", "weight": 2.0},
        "data": {
            "train": split("train"),
            "val": split("val"),
            "test": split("test"),
            "train_sizes": [64],
            "max_size": 96,
            "eval_size": 64,
            "workers": 0,
        },
        "train": {"steps": 4, "batch_size": 4, "lr": 0.01, "warmup_steps": 1, "eval_every": 2, "log_every": 2},
        "output": str(output),
    }


def test_three_trials_on_two_jobs_interrupted_and_resumed(tiny_digits, tmp_path):
    config = config_from_dict(tiny_values(tiny_digits, tmp_path / "run"))
    # No pruning here: an untrained detector's mAP is 0 or a hair above, and a trial below the median would be pruned.
    first = tune(config, trials=2, jobs=2, prune=False)
    assert [row["state"] for row in first.rows] == ["COMPLETE", "COMPLETE"]
    # The config's own values are the first trial; the others lie in the default space (value / 4 ... x 4).
    assert first.rows[0]["distill.weight"] == 2.0 and first.rows[0]["train.lr"] == 0.01
    assert all(0.5 <= row["distill.weight"] <= 8 and 0.0025 <= row["train.lr"] <= 0.04 for row in first.rows)

    # A third trial whose process was killed: the study holds it as running, its run folder half made.
    folder = tmp_path / "run" / "tune"
    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.load_study(study_name="pkd", storage=storage)
    killed = study.ask()
    for param in first.space.values():
        param.suggest(killed)
    (folder / f"trial_{killed.number}").mkdir()
    (folder / f"trial_{killed.number}" / "marker").write_text("begun")

    second = tune(config, trials=3, jobs=2, prune=False)
    states = [row["state"] for row in second.rows]
    assert states.count("COMPLETE") == 3 and states[killed.number] == "FAIL"
    retried = second.rows[-1]
    assert retried["distill.weight"] == killed.params["distill.weight"]
    assert (folder / f"trial_{retried['trial']}" / "marker").is_file()  # its run folder, continued
    assert not list(folder.glob("trial_*/last.pt"))  # finished trials keep best.pt only

    assert second.best_config == folder / "best.yaml" and (folder / "trials.png").is_file()
    best = load_config(second.best_config)
    assert best.distill.weight == second.best["distill.weight"] and best.train.lr == second.best["train.lr"]
    assert best.output == config.output and best.data.test is not None
    with (folder / "trials.csv").open() as file:
        assert len(list(csv.DictReader(file))) == len(second.rows)
    assert "**" in second.table()

    # Enough trials: a third call trains nothing and returns the same study.
    assert [row["trial"] for row in tune(config, trials=3, jobs=2).rows] == [row["trial"] for row in second.rows]
    # The study is of this config and space: another is refused, saying what differs.
    with pytest.raises(ValueError, match="another"):
        tune(config, trials=4, space=["train.lr=0.01,0.03"])
    values = config_to_dict(config)
    values["train"]["steps"] = 6
    with pytest.raises(ValueError, match="train.steps"):
        tune(config_from_dict(values), trials=4)


def test_grid_of_choices_on_one_job_from_the_cli(tiny_digits, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    values = tiny_values(tiny_digits, tmp_path / "run")
    del values["teacher"], values["distill"]
    path.write_text(yaml.safe_dump(values))
    # 5 trials asked, but the grid has 2 points.
    code = main(
        ["tune", str(path), "--trials", "5", "--sampler", "grid", "--space", "train.lr=0.01,0.02", "--no-prune"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "pkd train" in out and "best.yaml" in out
    with (tmp_path / "run" / "tune" / "trials.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert sorted(float(row["train.lr"]) for row in rows) == [0.01, 0.02]
    assert {row["state"] for row in rows} == {"COMPLETE"}


@pytest.mark.parametrize(
    "space, word",
    [
        ("train.lr=log:0:1", "positive"),
        ("train.lrr=log:1e-3:1e-2", "lrr"),
        ("train.batch_size=int:0:4", "batch_size"),
        ("train.lr", "KEY=SPEC"),
    ],
)
def test_a_bad_search_space_is_a_one_line_error(tiny_digits, tmp_path, capsys, space, word):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_values(tiny_digits, tmp_path / "run")))
    assert main(["tune", str(path), "--trials", "2", "--space", space]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and word in error
    assert not (tmp_path / "run" / "tune" / "study.db").exists()


def test_a_config_without_validation_split_is_refused(tiny_digits, tmp_path):
    values = tiny_values(tiny_digits, tmp_path / "run")
    values["data"]["val"] = None
    with pytest.raises(ValueError, match="data.val"):
        tune(config_from_dict(values), trials=1)


def test_pruned_trials_stop_at_a_validation_and_keep_no_checkpoints(tiny_digits, tmp_path, monkeypatch, capsys):
    # A pruner that stops every trial at its first report (mAP is below 1): the machinery, without luck.
    monkeypatch.setattr("pkd.tune._pruner", lambda config, prune: optuna.pruners.ThresholdPruner(lower=1.0))
    config = config_from_dict(tiny_values(tiny_digits, tmp_path / "run"))
    study = tune(config, trials=2, space=["train.lr=0.01,0.02"], sampler="grid")
    assert [(row["state"], row["step"]) for row in study.rows] == [("PRUNED", 2), ("PRUNED", 2)]
    assert study.best is None and study.best_config is None and study.params() == {}
    assert not list((tmp_path / "run" / "tune").glob("trial_*/*.pt"))
    assert (tmp_path / "run" / "tune" / "trials.png").is_file()
    assert "pruned at step 2" in capsys.readouterr().out
