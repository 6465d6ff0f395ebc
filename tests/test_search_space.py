"""Tests of pkd.search_space: parsing KEY=SPEC, the default space, and checks against the config."""

import math

import pytest

from pkd.config import ConfigError, config_from_dict
from pkd.search_space import (
    Param,
    base_values,
    check_space,
    default_space,
    parse_param,
    parse_space,
    resolve_space,
    with_values,
)


def make_config(*, distill=True, weight=2.0, lr=0.01):
    values = {
        "model": {"name": "fcos_resnet18_fpn"},
        "data": {"train": {"annotations": "train.json", "images": "train"}},
        "train": {"steps": 10, "lr": lr},
    }
    if distill:
        values["teacher"] = {"name": "fcos_resnet50_fpn"}
        values["distill"] = {"loss": "pkd", "weight": weight}
    return config_from_dict(values)


class FakeTrial:
    """Records what a Param asks of an Optuna trial and answers the lower bound or first choice."""

    def __init__(self):
        self.calls = []

    def suggest_float(self, name, low, high, log=False):
        self.calls.append(("float", name, low, high, log))
        return low

    def suggest_int(self, name, low, high):
        self.calls.append(("int", name, low, high))
        return low

    def suggest_categorical(self, name, choices):
        self.calls.append(("categorical", name, tuple(choices)))
        return choices[0]


@pytest.mark.parametrize(
    "item, expected",
    [
        ("train.lr=log:1e-4:1e-2", Param("train.lr", "log", low=1e-4, high=1e-2)),
        ("train.momentum=float:0.8:0.95", Param("train.momentum", "float", low=0.8, high=0.95)),
        ("train.batch_size=int:2:8", Param("train.batch_size", "int", low=2, high=8)),
        ("distill.weight=1,2,4", Param("distill.weight", "choice", choices=(1, 2, 4))),
        ("train.optimizer=sgd,adamw", Param("train.optimizer", "choice", choices=("sgd", "adamw"))),
        ("train.lr=around", Param("train.lr", "around", factor=4.0)),
        ("train.lr=around:2", Param("train.lr", "around", factor=2.0)),
    ],
)
def test_parse_param(item, expected):
    param = parse_param(item)
    assert param == expected
    assert parse_param(f"{param.key}={param.describe()}") == param


@pytest.mark.parametrize(
    "item, word",
    [
        ("train.lr", "KEY=SPEC"),
        ("train.lr=", "SPEC"),
        ("train.lr=log:0:1", "positive"),
        ("train.lr=log:1e-2:1e-4", "below"),
        ("train.lr=log:1e-4", "two bounds"),
        ("train.lr=log:a:1", "not a number"),
        ("train.batch_size=int:2.5:8", "integers"),
        ("train.lr=normal:0:1", "unknown form"),
        ("train.lr=0.01", "two or more"),
        ("distill.weight=1,1", "twice"),
        ("data.train_sizes=[64],[80]", "number"),
        ("output=a,b", "output"),
        ("train.lr=around:1", "above 1"),
    ],
)
def test_bad_specs_are_one_line_config_errors(item, word):
    with pytest.raises(ConfigError, match=word) as error:
        parse_param(item)
    assert "\n" not in str(error.value)


def test_a_key_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="twice"):
        parse_space(["train.lr=log:1e-4:1e-2", "train.lr=1e-3,1e-2"])


def test_default_space_is_lr_and_the_weight_around_the_configs_values():
    config = make_config(weight=8.0, lr=0.002)
    space = resolve_space(default_space(config), config)
    assert list(space) == ["distill.weight", "train.lr"]
    assert (space["distill.weight"].kind, space["distill.weight"].low, space["distill.weight"].high) == ("log", 2, 32)
    assert space["train.lr"].low == pytest.approx(0.0005) and space["train.lr"].high == pytest.approx(0.008)
    assert base_values(space, config) == {"distill.weight": 8.0, "train.lr": 0.002}


def test_default_space_without_a_teacher_is_the_lr_only():
    config = make_config(distill=False)
    assert list(resolve_space(default_space(config), config)) == ["train.lr"]


def test_an_unset_weight_centres_on_the_teachers_default():
    config = make_config(weight=None)
    with pytest.raises(ConfigError, match="distill.weight"):
        resolve_space(default_space(config), config)
    space = resolve_space(default_space(config), config, distill_weight=10.0)
    assert space["distill.weight"].low == 2.5 and space["distill.weight"].high == 40


@pytest.mark.parametrize(
    "item, word",
    [
        ("train.lrr=log:1e-4:1e-2", "lrr"),  # unknown key
        ("train.batch_size=int:0:4", "minimum"),  # a bound the config does not allow
        ("train.optimizer=sgd,adam", "adam"),  # a choice the config does not allow
        ("train.steps=float:1:2", "integer"),  # wrong type
        ("data.val.images=a,b", "val"),  # a section the config does not have
    ],
)
def test_check_space_names_what_the_config_does_not_allow(item, word):
    config = make_config()
    with pytest.raises(ConfigError, match=word) as error:
        check_space(resolve_space(parse_space([item]), config), config)
    assert "\n" not in str(error.value) and "--space" in str(error.value)


def test_distill_keys_need_a_distillation_config():
    config = make_config(distill=False)
    with pytest.raises(ConfigError, match="distill"):
        check_space(parse_space(["distill.weight=1,2"]), config)


def test_suggest_asks_the_trial_for_each_kind():
    trial = FakeTrial()
    space = parse_space(["train.lr=log:1e-4:1e-2", "train.batch_size=int:2:8", "distill.weight=1,2,4"])
    values = {key: param.suggest(trial) for key, param in space.items()}
    assert values == {"train.lr": 1e-4, "train.batch_size": 2, "distill.weight": 1}
    assert trial.calls[0] == ("float", "train.lr", 1e-4, 1e-2, True)
    with pytest.raises(ValueError, match="resolve"):
        parse_param("train.lr=around").suggest(trial)


def test_grid_values():
    log = Param("train.lr", "log", low=0.0025, high=0.04)
    assert log.grid(3) == pytest.approx([0.0025, 0.01, 0.04])
    assert Param("train.momentum", "float", low=0.8, high=0.9).grid(3) == pytest.approx([0.8, 0.85, 0.9])
    assert Param("train.batch_size", "int", low=2, high=4).grid(5) == [2, 3, 4]
    assert Param("distill.weight", "choice", choices=(1, 2)).grid(7) == [1, 2]
    assert math.isclose(log.grid(1)[0], 0.01)


def test_with_values_sets_dotted_keys_on_a_copy():
    values = {"train": {"lr": 0.01, "steps": 5}, "distill": None}
    changed = with_values(values, {"train.lr": 0.02, "distill.weight": 4})
    assert changed == {"train": {"lr": 0.02, "steps": 5}, "distill": {"weight": 4}}
    assert values["train"]["lr"] == 0.01


def test_base_values_is_none_outside_the_space():
    config = make_config(lr=0.01)
    assert base_values(parse_space(["train.lr=log:1e-4:1e-3"]), config) is None
    assert base_values(parse_space(["train.lr=0.01,0.02"]), config) == {"train.lr": 0.01}
