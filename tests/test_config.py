"""Tests of pkd.config: typed configs, errors that name the key, overrides, round trips."""

from pathlib import Path

import pytest
import yaml

from pkd.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_changes,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def minimal(**sections):
    values = {
        "model": {"name": "fcos_resnet18_fpn"},
        "data": {"train": {"annotations": "a.json", "images": "img"}},
        "train": {"steps": 10},
    }
    values.update(sections)
    return values


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.data.train is not None


def test_defaults_and_types():
    config = config_from_dict(minimal())
    assert config.train.optimizer == "sgd" and config.train.lr == 0.01
    assert config.teacher is None and config.distill is None
    assert config.data.val is None and config.data.train_sizes == [800]
    lr_as_int = config_from_dict(minimal(train={"steps": 10, "lr": 1}))
    assert isinstance(lr_as_int.train.lr, float)


@pytest.mark.parametrize(
    "values, message",
    [
        (minimal(trian={}), r"unknown key trian; allowed keys: model, data, train, teacher, distill, output"),
        (minimal(train={"steps": 10, "lrr": 1}), r"unknown key train.lrr; allowed keys in train: epochs, steps"),
        (minimal(train={"steps": "ten"}), r"train.steps: expected an integer, got 'ten'"),
        (
            minimal(train={"steps": 10, "optimizer": "adam"}),
            r"train.optimizer: 'adam' is not allowed; choose one of sgd, adamw",
        ),
        (minimal(train={"steps": 0}), r"train.steps: 0 is below the minimum 1"),
        (minimal(train={"steps": 10, "amp": "yes"}), r"train.amp: expected true or false, got 'yes'"),
        (minimal(distill={"loss": "kl"}), r"distill.loss: 'kl' is not allowed; choose one of pkd, mse, cwd"),
        (minimal(model={"name": "x", "norm": "layer"}), r"model.norm: 'layer' is not allowed"),
        (minimal(data={"train": {"annotations": "a.json"}}), r"missing key data.train.images"),
        (minimal(data={}), r"data.train: a training split"),
        (minimal(train={"epochs": None}), r"train: set epochs or steps"),
        (minimal(train={"steps": 5, "milestones": [0.9, 0.5]}), r"train.milestones"),
        (minimal(teacher={}), r"teacher: give a name and weights"),
        (minimal(data={"train": {"annotations": "a", "images": "b"}, "train_sizes": ["big"]}), r"train_sizes\[0\]"),
        ([1, 2], r"a config is a mapping"),
    ],
)
def test_bad_configs_name_the_key_and_the_allowed_values(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_overrides_parse_values_as_yaml():
    values = apply_overrides(
        minimal(),
        ["train.lr=0.02", "train.milestones=[0.5, 0.75]", "model.backbone=null", "distill.weight=2", "output=x/y"],
    )
    config = config_from_dict(values)
    assert config.train.lr == 0.02 and config.train.milestones == [0.5, 0.75]
    assert config.model.backbone is None and config.distill.weight == 2.0 and config.output == "x/y"
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides(minimal(), ["train.lr"])
    with pytest.raises(ConfigError, match="unknown key train.rate"):
        config_from_dict(apply_overrides(minimal(), ["train.rate=1"]))
    with pytest.raises(ConfigError, match="output is not a section"):
        apply_overrides(minimal(output="x"), ["output.dir=y"])


def test_save_and_load_round_trip(tmp_path):
    config = config_from_dict(minimal(teacher={"weights": "t.pt"}, distill={"loss": "mse", "levels": [8, 16]}))
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["distill"]["levels"] == [8, 16]
    assert config_to_dict(load_config(path, ["train.seed=3"]))["train"]["seed"] == 3


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a config is a mapping"):
        load_config(tmp_path / "list.yaml")


def test_docs_config_reference_matches_the_code():
    from pkd.config import config_reference

    docs = Path(__file__).parents[1] / "docs" / "config.md"
    assert docs.read_text() == config_reference(), "regenerate docs/config.md from pkd.config.config_reference()"


def test_config_changes_sees_one_file_in_a_relative_and_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = {
        "data": {"train": {"annotations": "demo/a.json", "images": "demo/img"}},
        "model": {"weights": "DEFAULT"},
    }
    absolute = {"data": {"train": {"annotations": str(tmp_path / "demo/a.json"), "images": str(tmp_path / "demo/img")}}}
    absolute["model"] = {"weights": "DEFAULT"}
    assert config_changes(relative, absolute) == []
    moved = {
        "data": {"train": {"annotations": "/elsewhere/a.json", "images": "demo/img"}},
        "model": {"weights": "DEFAULT"},
    }
    assert config_changes(relative, moved) == ["data.train.annotations: 'demo/a.json' -> '/elsewhere/a.json'"]
    assert config_changes(relative, {**relative, "model": {"weights": "IMAGENET1K_V1"}}) == [
        "model.weights: 'DEFAULT' -> 'IMAGENET1K_V1'"
    ]
