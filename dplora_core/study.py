"""A study: a grid of experiments around one base config, each repeated over seeds.

The grid is the product of named axes; each level of an axis is a set of dotted config overrides
(`privacy.target_epsilon: 4`). Every cell x seed is an ordinary experiment with its own name, run
directory and MLflow run, so a study is resumable (finished cells are skipped) and each result
keeps its own guarantee.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dplora_core.config import ConfigError, ExperimentConfig, describe_errors

Overrides = dict[str, Any]


# Set by the study for each cell: its seed and its name (from the study's name, levels and seed).
STUDY_SETS = {"federation.seed", "name"}


class StudyConfig(BaseModel):
    """What `dplora study` runs: base config x axes x seeds, and the document section it writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Prefix of every run's name.")
    base: str = Field(description="Experiment config YAML every run starts from.")
    seeds: tuple[int, ...] = Field((0,), min_length=1, description="federation.seed of each repeat.")
    common: Overrides = Field(default_factory=dict, description="Dotted overrides applied to every cell first.")
    axes: dict[str, dict[str, Overrides]] = Field(
        description="axis -> level -> dotted overrides; the grid is their product (insertion order)."
    )
    exclude: tuple[dict[str, str | list[int]], ...] = Field(
        (), description="Cells to skip, each as {axis: level, ...} (all must match); with `seeds: [...]`, only "
        "on those seeds (a screen: a level ruled out on the first seed is not repeated).",
    )
    results_doc: str | None = Field(None, description="Markdown file whose study section is rewritten.")
    frontier: str | None = Field(
        None, description="Axis whose record-level DP levels are plotted as test accuracy against epsilon, "
        "one line per level of the other axes (None: no frontier plot).",
    )

    @model_validator(mode="after")
    def _axes_have_levels(self) -> StudyConfig:
        if len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"seeds: {list(self.seeds)} repeats a seed (a repeat would read back the same run)")
        for axis, levels in self.axes.items():
            if not levels:
                raise ValueError(f"axes.{axis}: needs at least one level")
        if self.frontier is not None and self.frontier not in self.axes:
            raise ValueError(f"frontier: {self.frontier} is not an axis")
        for where, overrides in [("common", self.common)] + [
            (f"axes.{axis}.{level}", o) for axis, levels in self.axes.items() for level, o in levels.items()
        ]:
            if fixed := sorted(STUDY_SETS & set(overrides)):
                raise ValueError(f"{where}: sets {', '.join(fixed)}, which the study sets for each cell (use seeds)")
        for rule in self.exclude:
            if not rule:
                raise ValueError("exclude: an empty rule would drop every cell")
            for axis, level in rule.items():
                if axis == "seeds":
                    if not isinstance(level, list) or not set(level) <= set(self.seeds):
                        raise ValueError(f"exclude: seeds={level} must be a list of the study's seeds")
                elif not isinstance(level, str) or level not in self.axes.get(axis, {}):
                    raise ValueError(f"exclude: {axis}={level} is not a level of the axes")
        return self


@dataclass(frozen=True)
class Cell:
    """One experiment of the study: its levels on each axis, its seed, and its full config."""

    levels: dict[str, str]
    seed: int
    config: ExperimentConfig

    @property
    def group(self) -> tuple[str, ...]:
        return tuple(self.levels.values())


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML, or raise ConfigError naming the file and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return StudyConfig.model_validate(raw)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: study file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except ValidationError as err:
        raise ConfigError(describe_errors(f"{path}: invalid study", err)) from err


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for dotted 'a.b'; a key the base does not have is still set (pydantic judges)."""
    *sections, key = dotted.split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {section} is not a section")
    node[key] = value


def expand(study: StudyConfig, base: dict[str, Any]) -> list[Cell]:
    """Every cell x seed of the grid as a validated config; ConfigError names the cell and field."""
    cells: list[Cell] = []
    axes = list(study.axes.items())
    # seeds outermost: an interrupted study already has every cell once before any cell twice
    for seed, combo in itertools.product(study.seeds, itertools.product(*[list(v.items()) for _, v in axes])):
        levels = {axis: level for (axis, _), (level, _) in zip(axes, combo, strict=True)}
        if any(excludes(rule, levels, seed) for rule in study.exclude):
            continue
        tree = copy.deepcopy(base)
        for _, overrides in [("common", study.common), *combo]:
            for dotted, value in overrides.items():
                set_dotted(tree, dotted, value)
        set_dotted(tree, "federation.seed", seed)
        name = "-".join([study.name, *levels.values(), f"s{seed}"])
        if clash := next((c for c in cells if c.config.name == name), None):  # one run directory, two configs
            raise ConfigError(f"study {study.name}: cells {clash.levels} and {levels} are both named {name} "
                              "(rename a level)")
        set_dotted(tree, "name", name)
        try:
            cells.append(Cell(levels, seed, ExperimentConfig.model_validate(tree)))
        except ValidationError as err:
            raise ConfigError(describe_errors(f"study {study.name}, cell {name}: invalid config", err)) from err
    return cells


def selected(cell: Cell, only: Sequence[str]) -> bool:
    """Whether the cell's run name matches one of the globs (fnmatch: *, ?, [...])."""
    return any(fnmatch.fnmatchcase(cell.config.name, pattern) for pattern in only)


def excludes(rule: dict[str, str | list[int]], levels: dict[str, str], seed: int) -> bool:
    """Whether an `exclude` rule drops the cell at `levels` on `seed` (every named axis matches, and the seed
    is one of the rule's seeds if it names any)."""
    return all(seed in value if axis == "seeds" else levels.get(axis) == value for axis, value in rule.items())


def mean_sd(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); sd is nan for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarise(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Group rows by their `levels`, in first-seen order: n, and (mean, sd) of each numeric key."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row["levels"].values()), []).append(row)
    out = []
    for members in groups.values():
        summary: dict[str, Any] = {"levels": members[0]["levels"], "n": len(members)}
        for key in keys:
            values = [float(m[key]) for m in members if m.get(key) is not None]
            summary[key] = mean_sd(values) if values else None
        out.append(summary)
    return out
