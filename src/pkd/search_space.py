"""Search spaces of ``pkd tune``: which config keys vary, and over what.

A space is one ``KEY=SPEC`` per searched key, ``KEY`` a dotted config key (``train.lr``,
``distill.weight``, ``train.batch_size``, ...) and ``SPEC`` one of:

- ``log:LOW:HIGH``: a float, log-uniform in [LOW, HIGH] (learning rates, loss weights);
- ``float:LOW:HIGH``: a float, uniform in [LOW, HIGH];
- ``int:LOW:HIGH``: an integer in [LOW, HIGH];
- ``around`` or ``around:F``: log-uniform from the config's value / F to its value x F (F = 4);
- ``A,B,C``: one of these values (each read as YAML: numbers, strings, true/false).

Without ``--space``, ``pkd tune`` searches ``train.lr=around`` and, for a distillation config,
``distill.weight=around`` (:func:`default_space`). Every bound and choice is checked against
the config's own validation before any trial runs, so a bad space fails at once, in one line.

Example:
    >>> space = parse_space(["train.lr=log:1e-4:1e-2", "distill.weight=1,2,4"])
    >>> space["train.lr"].describe(), space["distill.weight"].choices
    ('log:0.0001:0.01', (1, 2, 4))
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import yaml

from pkd.config import Config, ConfigError, config_from_dict, config_to_dict

__all__ = [
    "DEFAULT_FACTOR",
    "SPEC_FORMS",
    "Param",
    "base_values",
    "check_space",
    "default_space",
    "parse_param",
    "parse_space",
    "resolve_space",
    "with_values",
]

#: ``around`` without a factor: from the config's value / 4 to x 4.
DEFAULT_FACTOR = 4.0
#: What a SPEC may look like (for error messages and ``--help``).
SPEC_FORMS = "log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, around[:FACTOR] or choices A,B,C"
_RANGES = ("log", "float", "int")


@dataclass(frozen=True)
class Param:
    """One searched config key and the values it may take.

    Attributes:
        key: dotted config key, e.g. ``"train.lr"``.
        kind: ``"log"``, ``"float"``, ``"int"``, ``"choice"``, or ``"around"`` (until
            :func:`resolve_space` turns it into ``"log"`` around the config's value).
        low, high: bounds of the ranges (inclusive).
        choices: the values of ``"choice"``.
        factor: the factor of ``"around"``.
    """

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    factor: float = DEFAULT_FACTOR

    def describe(self) -> str:
        """The SPEC that parses back into this parameter."""
        if self.kind == "choice":
            return ",".join(
                yaml.safe_dump(c, default_flow_style=True).strip().removesuffix("...").strip() for c in self.choices
            )
        if self.kind == "around":
            return f"around:{self.factor:g}"
        return f"{self.kind}:{self.low:g}:{self.high:g}"

    def suggest(self, trial) -> Any:
        """This parameter's value for an Optuna trial (``trial.suggest_*``)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        if self.kind in ("log", "float"):
            return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")
        raise ValueError(f"{self.key}: resolve the space against a config first (resolve_space)")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return self.low <= value <= self.high and (self.kind != "int" or float(value).is_integer())

    def grid(self, points: int) -> list[Any]:
        """Values for a grid search: the choices, or ``points`` values spread over the range.

        Log ranges are spread geometrically, so an odd ``points`` of ``around`` has the
        config's own value in the middle; integer ranges give at most every integer once.
        """
        if self.kind == "choice":
            return list(self.choices)
        if points == 1:
            middle = math.sqrt(self.low * self.high) if self.kind == "log" else (self.low + self.high) / 2
            values = [middle]
        elif self.kind == "log":
            ratio = (self.high / self.low) ** (1 / (points - 1))
            values = [self.low * ratio**k for k in range(points)]
        else:
            values = [self.low + (self.high - self.low) * k / (points - 1) for k in range(points)]
        if self.kind == "int":
            return sorted({int(round(v)) for v in values})
        return [float(f"{v:.4g}") for v in values]


def _number(text: str, item: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--space {item}: {text!r} is not a number; a SPEC is {SPEC_FORMS}") from None


def parse_param(item: str) -> Param:
    """One ``KEY=SPEC`` (see the module docstring).

    Raises:
        ConfigError: no ``=``, an unknown SPEC form, bounds that are not numbers or not
            increasing, a non-positive log bound, or fewer than two choices.
    """
    if "=" not in item:
        raise ConfigError(f"--space {item!r} must look like KEY=SPEC, e.g. train.lr=log:1e-4:1e-2 ({SPEC_FORMS})")
    key, spec = (part.strip() for part in item.split("=", 1))
    if not key or not spec:
        raise ConfigError(f"--space {item!r}: give both a config key and a SPEC ({SPEC_FORMS})")
    if key == "output":
        raise ConfigError(f"--space {item!r}: pkd tune sets each trial's output folder itself")
    head, _, rest = spec.partition(":")
    if head == "around":
        factor = _number(rest, item) if rest else DEFAULT_FACTOR
        if factor <= 1:
            raise ConfigError(f"--space {item}: the factor of around must be above 1, e.g. around:4")
        return Param(key, "around", factor=factor)
    if head in _RANGES:
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise ConfigError(f"--space {item}: {head} needs two bounds, e.g. {key}={head}:LOW:HIGH")
        low, high = (_number(bound, item) for bound in bounds)
        if not low < high:
            raise ConfigError(f"--space {item}: LOW must be below HIGH")
        if head == "log" and low <= 0:
            raise ConfigError(f"--space {item}: log bounds must be positive")
        if head == "int" and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"--space {item}: int bounds must be integers")
        return Param(key, head, low=low, high=high)
    if ":" in spec and "," not in spec:
        raise ConfigError(f"--space {item}: unknown form {head!r}; a SPEC is {SPEC_FORMS}")
    try:
        choices = tuple(yaml.safe_load(value) for value in spec.split(","))
    except yaml.YAMLError as error:
        raise ConfigError(f"--space {item}: cannot read the choices ({error})".replace("\n", " ")) from None
    if len(choices) < 2:
        raise ConfigError(
            f"--space {item}: give a range or two or more choices ({SPEC_FORMS}); fix one value with --set KEY=VALUE"
        )
    if any(not isinstance(choice, bool | int | float | str) for choice in choices):
        raise ConfigError(f"--space {item}: each choice must be a number, a string or true/false")
    if len(set(choices)) < len(choices):
        raise ConfigError(f"--space {item}: a choice is listed twice")
    return Param(key, "choice", choices=choices)


def parse_space(items: list[str] | tuple[str, ...]) -> dict[str, Param]:
    """``KEY=SPEC`` items as ``{key: Param}``, in their order.

    Raises:
        ConfigError: a bad item (see :func:`parse_param`) or a key given twice.
    """
    space: dict[str, Param] = {}
    for item in items:
        param = parse_param(item)
        if param.key in space:
            raise ConfigError(f"--space {param.key} is given twice")
        space[param.key] = param
    return space


def default_space(config: Config) -> dict[str, Param]:
    """``train.lr`` and, when distilling, ``distill.weight``, each from its value / 4 to x 4."""
    keys = ["distill.weight"] if config.teacher is not None else []
    return {key: Param(key, "around") for key in [*keys, "train.lr"]}


def _get(values: dict, key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def with_values(values: dict, params: dict[str, Any]) -> dict:
    """A copy of plain config data (``config_to_dict``) with dotted keys set to values.

    Example:
        >>> with_values({"train": {"lr": 0.01}}, {"train.lr": 0.02, "distill.weight": 4})
        {'train': {'lr': 0.02}, 'distill': {'weight': 4}}
    """
    values = copy.deepcopy(values)
    for key, value in params.items():
        node = values
        *sections, name = key.split(".")
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[name] = value
    return values


def resolve_space(space: dict[str, Param], config: Config, *, distill_weight: float | None = None) -> dict[str, Param]:
    """The space with each ``around`` turned into a log range around the config's value.

    Args:
        space: parsed space.
        config: the config whose values ``around`` centres on.
        distill_weight: the weight a distiller uses when ``distill.weight`` is unset (the
            teacher's default, :func:`pkd.distiller.default_weight`).

    Raises:
        ConfigError: ``around`` on a key whose value is not a positive number.
    """
    values = config_to_dict(config)
    resolved = {}
    for key, param in space.items():
        if param.kind == "around":
            value = _get(values, key)
            if value is None and key == "distill.weight":
                value = distill_weight
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(
                    f"--space {key}=around: the config's {key} is {value!r}, not a positive number; "
                    f"give the range, e.g. {key}=log:LOW:HIGH"
                )
            param = replace(param, kind="log", low=value / param.factor, high=value * param.factor)
        resolved[key] = param
    return resolved


def check_space(space: dict[str, Param], config: Config) -> None:
    """Checks that every bound and choice of a resolved space makes a valid config.

    Raises:
        ConfigError: naming the key and what the config does not allow (an unknown key, a
            value of the wrong type or below the minimum, a choice not allowed).
    """
    values = config_to_dict(config)
    for key, param in space.items():
        node: Any = values
        for part in key.split(".")[:-1]:
            if isinstance(node, dict) and part in node and node[part] is None:
                raise ConfigError(f"--space {key}: the config has no {part} section, so {key} would change nothing")
            node = node.get(part) if isinstance(node, dict) else None
        samples = param.choices if param.kind == "choice" else (param.low, param.high)
        for sample in samples:
            if param.kind == "int":
                sample = int(sample)
            try:
                config_from_dict(with_values(values, {key: sample}))
            except ConfigError as error:
                raise ConfigError(f"--space {key}={param.describe()}: {error}") from None


def base_values(space: dict[str, Param], config: Config, *, distill_weight: float | None = None) -> dict | None:
    """The config's own values of the searched keys, or None when one is outside the space."""
    values = config_to_dict(config)
    params = {}
    for key, param in space.items():
        value = _get(values, key)
        if value is None and key == "distill.weight":
            value = distill_weight
        if value is None or not param.contains(value):
            return None
        params[key] = value
    return params
