"""Which runs are a paper row's: the row's identity, derived from conf/, and the match of a run to it.

A paper row (``paper.rows`` of ``sweeps/<sweep>.yaml``, the grammar: :mod:`recstab.report.tables`) names what
its runs are: a row file (``row: srnc_2.0_0.1``, ``conf/row/srnc_2.0_0.1.yaml``), group options
(``recurrence: mf3``), config values (``module.dampening: 0.95``). Its :class:`Identity` is derived from the
files that made those runs, in Hydra's order, so no match is written by hand:

- ``choices``, the options of :data:`GROUPS` (what was trained): ``conf/train.yaml``'s defaults, overridden
  by the sweep file's ``override /<group>: <option>`` entries, then by the row file's, then by the row's own
  group keys;
- ``row_values``: every value the row file sets (``norm.alpha: 2.0``, ``norm.beta: 0.1``; Fig. 9's
  ``callbacks.measure.burst: 10``), its ``row:`` name and ``defaults`` excepted;
- ``pinned``: the row's own dotted keys (``module.dampening: 0.95``, ``norm.base: null``).

A run matches a row when its choices equal the row's, it holds the pinned values, and it holds the row
file's values or was made from that row file (its config's ``row``, which the row file sets): a run trained by
hand (``python src/train.py norm=srnc norm.alpha=2 norm.beta=0.1``, no ``row``) is matched on the values, and
a run that names the row without all of its file's values is still its run (``experiment=bm3d`` sets
``row: bm3d`` outside a sweep, without the sweep measurement's fps settings that conf/row/bm3d.yaml adjusts).
A run that matches several rows goes to the most specific, the one with the most values (``certified ρ=0.5,
base=null`` before ``certified ρ=0.5``, whose row file leaves ``norm.base`` at its default); ties go to the
first in the paper's order.

A run's choices are ``hydra.runtime.choices`` (its ``.hydra/hydra.yaml``, or a config composed with
``return_hydra_config``). A run dir without them (older runs, test fixtures) falls back to its config:
``norm.name``, ``recurrence.name``, ``task.name`` and the model's option
(:func:`recstab.lit.preflight.model_name`: ``model.backbone``, else the ``name`` of the ``model._target_`` class,
``recstab.models.baselines.FastDVDnet`` -> ``fastdvdnet``).

Why the YAML files are read rather than composed with Hydra: the defaults lists of train.yaml, the sweep
files and the row files are plain ``<group>: <option>`` / ``override /<group>: <option>`` entries, which
read exactly (any other form naming one of :data:`GROUPS` raises); the values a row file sets are what it
says, which a composed config cannot tell apart from the defaults; and src/report.py is itself a Hydra
app, where a compose needs a second GlobalHydra. The files a defaults list includes (``common/measure``)
are not followed: none of them selects an identity group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

GROUPS = ("model", "recurrence", "norm", "task")  # the config groups that define what was trained
SPEC_KEYS = ("name", "note", "not_run", "row", *GROUPS)  # a paper row's keys besides the columns and dotted keys


@dataclass
class Identity:
    """What a paper row's runs are (the rule: the module docstring)."""

    choices: dict      # group -> option, for every group of GROUPS
    pinned: dict       # dotted config key -> value: the row's own keys, always held
    row: str | None    # the `row` the row file gives its runs (None: no row file)
    row_values: dict   # dotted config key -> value the row file sets: held, unless the run was made from it

    @property
    def specificity(self) -> int:
        """How many values it pins: the most specific of the rows a run matches gets it."""
        return len(self.pinned) + len(self.row_values)


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def flatten(node: dict, prefix: str = "") -> dict:
    """Nested dicts -> {dotted key: leaf value}."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def group_choices(defaults: list | None, source: Path) -> dict:
    """The options a defaults list selects for GROUPS: ``<group>: <option>`` and ``override /<group>: <option>``
    entries (includes such as ``common/measure`` or ``_self_`` select none)."""
    choices = {}
    for entry in defaults or []:
        if not isinstance(entry, dict):
            continue
        for key, option in entry.items():
            group = key.split()[-1].lstrip("/")
            if group not in GROUPS:
                continue
            if not isinstance(option, str):
                raise ValueError(f"{source}: defaults entry {key}: {option!r} is not one option of the {group} group; "
                                 f"the identity of a paper row reads `override /{group}: <option>` entries only")
            choices[group] = option
    return choices


def sweep_choices(sweep_defaults: list | None, conf: Path, source: Path | None = None) -> dict:
    """The groups of a sweep's jobs before their row: conf/train.yaml's, overridden by the sweep file's."""
    train = conf / "train.yaml"
    if not train.is_file():
        raise FileNotFoundError(f"no {train}: the identity of a paper row starts from conf/train.yaml's defaults")
    choices = group_choices(_yaml(train).get("defaults"), train)
    missing = [g for g in GROUPS if not choices.get(g)]
    if missing:
        raise ValueError(f"{train} selects no option for {', '.join(missing)}")
    return {**choices, **group_choices(sweep_defaults, source or Path("<sweep>"))}


def _options(conf: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def derive(spec: dict, choices: dict, conf: Path, columns=()) -> Identity | None:
    """The identity of one paper row ``spec`` in a sweep whose jobs have ``choices`` (:func:`sweep_choices`) before
    their row; None for a row we do not run (``not_run: <why>``). ValueError naming the row for a row file or an
    option that does not exist, an unknown key, or a row that names nothing."""
    name = spec.get("name")
    unknown = [k for k in spec if k not in SPEC_KEYS and "." not in k and k not in columns]
    if unknown:
        raise ValueError(f"paper row {name!r}: unknown key {unknown[0]!r}; a row takes name, row (a conf/row file), "
                         f"{', '.join(GROUPS)} (an option), <dotted.config.key> (a value), not_run, note and the "
                         f"table's columns ({', '.join(columns)})")
    if "not_run" in spec:
        return None
    choices, row, row_values = dict(choices), None, {}
    if spec.get("row") is not None:
        path = conf / "row" / f"{spec['row']}.yaml"
        if not path.is_file():
            raise ValueError(f"paper row {name!r}: no row file {path}; rows: {', '.join(_options(conf, 'row'))}")
        values = _yaml(path)
        choices.update(group_choices(values.pop("defaults", None), path))
        row = values.pop("row", None)
        row_values = flatten(values)
    for group in GROUPS:
        if group in spec:
            if not (conf / group / f"{spec[group]}.yaml").is_file():
                raise ValueError(f"paper row {name!r}: {group}: {spec[group]!r} is not an option of conf/{group}/; "
                                 f"options: {', '.join(_options(conf, group))}")
            choices[group] = spec[group]
    pinned = {k: v for k, v in spec.items() if "." in k}
    if spec.get("row") is None and not pinned and not any(g in spec for g in GROUPS):
        raise ValueError(f"paper row {name!r} names no runs: give it row: <conf/row file>, a group option "
                         f"({', '.join(GROUPS)}), a config value (<dotted.key>: <value>), or not_run: <why>")
    return Identity(choices, pinned, row, row_values)


def run_choices(run) -> dict:
    """The options of GROUPS a run (a :class:`recstab.report.tables.Run`) was made with (the fallback: the
    module docstring)."""
    choices = run.choices or OmegaConf.select(run.config, "hydra.runtime.choices", default=None)
    if choices:
        return {g: choices.get(g) for g in GROUPS}
    from recstab.lit.preflight import model_name

    model = {"backbone": run.value("model.backbone"), "_target_": run.value("model._target_")}
    return {"model": model_name(model) if any(model.values()) else None, "recurrence": run.value("recurrence.name"),
            "norm": run.value("norm.name"), "task": run.value("task.name")}


def same(a, b) -> bool:
    """Config values equal: numbers within float rounding (2 == 2.0), bools as bools, the rest as text."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def matches(run, identity: Identity) -> bool:
    """Whether ``run`` is one of the runs of the row with ``identity`` (the rule: the module docstring)."""
    if run_choices(run) != identity.choices:
        return False
    if not all(same(run.value(key), value) for key, value in identity.pinned.items()):
        return False
    if identity.row is not None and run.value("row") == identity.row:
        return True
    return all(same(run.value(key), value) for key, value in identity.row_values.items())


def best_row(run, identities: list[Identity | None]) -> int | None:
    """The index of the row ``run`` goes to: the most specific of the rows it matches, ties to the first; None
    when it matches none."""
    hits = [i for i, identity in enumerate(identities) if identity is not None and matches(run, identity)]
    return min(hits, key=lambda i: (-identities[i].specificity, i), default=None)
