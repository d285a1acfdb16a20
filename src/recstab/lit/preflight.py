"""Checks that run before any work starts: places to write to, checkpoints to start from.

A run that would fail after an hour (the first checkpoint into a read-only
directory, a resumed state dict of another shape) fails in its first second
instead, with one paragraph that names both sides: what the configuration asks
for and what the place or the checkpoint has.

- ``check_writable(path, key)``: the directory exists or can be created, and a
  file can be written into it (checked without creating anything);
- ``read_checkpoint(path, key)``: the file exists and is a Lightning checkpoint
  of a ``VideoRestorationModule`` (it has ``hyper_parameters`` and ``state_dict``);
- ``check_compatible(hparams, module_cfg, path)``: the checkpoint's model is the
  one the config builds. The state dict is determined by the model config (its
  ``_target_`` and every argument but ``init``, an absent one at the target's default;
  a baseline saved as ``build_model(backbone=<name>)`` reads as its class; for older,
  flat hyper-parameters the ``ARCHITECTURE`` keys) and,
  for a normalised model, every key of ``norm`` (``n`` sets the shape of the SRN-C
  power-iteration buffers; ``name``, ``alpha``, ``beta`` and ``loop_only`` decide
  which convs are parametrised and how). The initialisation
  and the training keys (learning rate, loss, schedule) may differ: loading
  replaces the initial weights, and resuming with a new learning rate is legitimate.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import tempfile
from pathlib import Path

import torch

ARCHITECTURE = ("backbone", "recurrence", "task", "channels", "in_channels", "depth")  # of flat (older) hparams
NOT_MODEL = ("init",)  # model config keys that do not change what a state dict holds
BUILD_MODEL = "recstab.models.build_model"  # the target of the vdncnn / vresnet configs (and of older baseline ones)


class PreflightError(ValueError):
    """A configuration that cannot run; the message says what to change."""


class MissingCheckpointError(PreflightError, FileNotFoundError):
    """A checkpoint path that names no file."""


class ForeignCheckpointError(PreflightError):
    """A torch file that is not a checkpoint of src/train.py (no ``state_dict`` and ``hyper_parameters``)."""


def check_writable(path: str | os.PathLike, key: str) -> Path:
    """Check that ``path`` is, or can be created as, a directory we can write to; creates nothing.

    A probe file is written (and deleted) in ``path`` or, if it does not exist yet, in
    its nearest existing ancestor, which must be a directory.
    """
    directory = Path(path).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a directory")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise PreflightError(
            f"{key}={str(directory)!r} is not a writable directory ({type(error).__name__}: "
            f"{error.strerror or error}). The run writes its checkpoints, logs and metrics there; "
            f"point {key} at a directory you can write to (e.g. hydra.run.dir=<dir> for the whole run)."
        ) from None
    return directory


def read_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict:
    """Load a checkpoint on the CPU and check that it is one of this project's LightningModules."""
    path = Path(path)
    if not path.is_file():
        where = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise MissingCheckpointError(
            f"{key}={str(path)!r} {where} (relative paths are read from {os.getcwd()}). "
            f"Give the path of a .ckpt file, e.g. <run dir>/checkpoints/last.ckpt, or drop {key} "
            "to start a fresh run.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated file, not a torch file at all
        raise PreflightError(
            f"{key}={str(path)!r} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
            "it may be truncated by a crash during the save: use another checkpoint of the run "
            "(last.ckpt, best-*.ckpt, interrupted.ckpt).") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ForeignCheckpointError(
            f"{key}={str(path)!r} is not a checkpoint of src/train.py: it has no 'state_dict' and "
            f"'hyper_parameters' (found {found}). Resume from a checkpoint written by this project's "
            "Trainer (<run dir>/checkpoints/*.ckpt).")
    return checkpoint


def read_recstab_checkpoint(path: str | os.PathLike) -> dict:
    """:func:`read_checkpoint`, with what to do when the file is a torch file but not a checkpoint of src/train.py
    (a plain state dict or a pickled module: diagnose it from Python)."""
    path = Path(path)
    try:
        return read_checkpoint(path)
    except ForeignCheckpointError:
        raise ForeignCheckpointError(
            f"ckpt_path={str(path)!r} is not a checkpoint of src/train.py (a plain state dict or a pickled module?). "
            "Diagnose your own model from Python: wrap it (recstab.models.StepModel / ClipModel, README 'Diagnose "
            "your own model') and call recstab.diagnostics.stability_report(model, out_dir)") from None


@contextmanager
def one_line_errors():
    """Around a script's work: an error the user fixes by changing the command (a bad value, path, checkpoint,
    video, or nothing to resume) ends it with one line ``Error: ...`` (no traceback; HYDRA_FULL_ERROR=1 shows
    it). Any other exception is a bug and keeps its traceback."""
    from recstab.data.long_video import VideoDecodeError
    from recstab.diagnostics.workfiles import ResumeMismatch

    try:
        yield
    except (PreflightError, ResumeMismatch, VideoDecodeError, FileNotFoundError, ValueError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"Error: {error}") from None


def model_spec(config: dict) -> dict:
    """The model-defining values of a module config or of a checkpoint's hyper-parameters.

    Three layouts are read: the model config under ``model`` and the norm config under ``norm``
    (``{"model": {"_target_": ..., "channels": ...}, "norm": {"_target_": ..., "name": "srnc", ...}}``:
    the target and every argument but ``init`` count, an absent one at the target's default), the norm nested
    in the model config (``model.norm``, with a ``kind``: checkpoints of recstab 0.1), and the flat one of
    older checkpoints (the ``ARCHITECTURE`` keys and ``norm`` at the top level). Keys are named as the user
    sets them (``model.channels``, ``norm.n``); the unconstrained model's norm is just ``{"name": "none"}``.
    """
    if isinstance(config.get("model"), dict):
        source = _class_config(config["model"])
        source = {"_target_": source["_target_"], **_defaults(source["_target_"]), **source}  # absent: the default
        keys = [k for k in source if k not in NOT_MODEL and k != "norm"]
        norm = config.get("norm") if isinstance(config.get("norm"), dict) else config["model"].get("norm")
    else:
        source, keys, norm = config, list(ARCHITECTURE), config.get("norm")
    spec = {f"model.{k}": source.get(k) for k in keys}
    if isinstance(spec.get("model.recurrence"), dict):  # a connection config: its name identifies it
        spec["model.recurrence"] = spec["model.recurrence"].get("name")
    norm = {k: v for k, v in dict(norm or {}).items() if k not in ("_target_", "kind")} | {
        "name": (norm or {}).get("name", (norm or {}).get("kind", "none"))}
    spec.update({f"norm.{k}": v for k, v in norm.items()} if norm["name"] != "none" else {"norm.name": "none"})
    return spec


def _class_config(model: dict) -> dict:
    """The model config with its ``_target_`` as the path of what it imports; a baseline saved as
    ``build_model(backbone=<name>)`` (before the baselines had configs of their own) as its class's config,
    so that it equals the config of today's ``model=<name>``. No ``_target_`` (recstab 0.1): build_model."""
    from recstab.models import BASELINES

    model = {"_target_": BUILD_MODEL, **model}
    if _path(model["_target_"]) == BUILD_MODEL and model.get("backbone") in BASELINES:
        cls = BASELINES[model["backbone"]]
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}",
                **{k: v for k, v in model.items() if k not in ("_target_", "backbone", "recurrence") and v is not None}}
    return {**model, "_target_": _path(model["_target_"])}


def model_name(model: dict) -> str:
    """What ``model=<option>`` a model config is: its ``backbone`` (vdncnn, vresnet; a baseline in configs written
    before the baselines had their own), else the ``name`` of its ``_target_`` class (fastdvdnet, ...), else the
    last part of the target's path (a class without a name, or one that does not import here)."""
    if model.get("backbone"):
        return str(model["backbone"])
    target = str(model.get("_target_", "model"))
    name = getattr(locate(target), "name", None)
    return name if isinstance(name, str) else target.rsplit(".", 1)[-1]


def locate(target: str):
    """The object a ``_target_`` path ``package.module.Name`` names (``recstab.models.baselines.FastDVDnet``); None
    when it does not import here."""
    import importlib

    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _path(target: str) -> str:
    """``module.name`` of the object ``target`` names (two spellings of one class compare equal); else ``target``."""
    found = locate(target)
    return target if found is None else f"{found.__module__}.{found.__qualname__}"


def _defaults(target: str) -> dict:
    """The keyword defaults of ``target`` (a class or function), e.g. ``channels`` of a baseline config saved before
    the baselines had a width: 64, the published one; ``{}`` when it does not import here."""
    import inspect

    try:
        parameters = inspect.signature(locate(target)).parameters.values()
    except (TypeError, ValueError):  # None, or no signature
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def model_differences(hparams: dict, module_cfg: dict) -> list[tuple[str, object, object]]:
    """``(config key, checkpoint value, config value)`` for every model-defining value that differs."""
    saved, wanted = model_spec(hparams), model_spec(module_cfg)
    keys = list(wanted) + [k for k in saved if k not in wanted]
    if saved.get("norm.name") != wanted.get("norm.name"):  # another norm: its name says it all
        keys = [k for k in keys if not k.startswith("norm.") or k == "norm.name"]
    if not (isinstance(hparams.get("model"), dict) and isinstance(module_cfg.get("model"), dict)):
        keys = [k for k in keys if k.startswith("norm.") or k[len("model."):] in ARCHITECTURE]
    elif saved["model._target_"] != wanted["model._target_"]:  # another class: its name says it all
        keys = [k for k in keys if not k.startswith("model.") or k == "model._target_"]
    return [(k, saved.get(k), wanted.get(k)) for k in keys if saved.get(k) != wanted.get(k)]


def check_compatible(hparams: dict, module_cfg: dict, path: str | os.PathLike, key: str = "ckpt_path") -> None:
    """Refuse a checkpoint whose model differs from the one ``module_cfg`` builds, naming every difference."""
    diffs = model_differences(hparams, module_cfg)
    if not diffs:
        return
    listed = "; ".join(f"{k}: checkpoint {old!r}, config {new!r}" for k, old, new in diffs)
    saved = model_spec(hparams)
    overrides = " ".join(_override(k, old, saved) for k, old, _ in diffs)
    raise PreflightError(
        f"{key}={str(path)!r} holds another model than the config builds ({listed}). Its weights cannot "
        f"be loaded into this model. Either run with the checkpoint's settings (e.g. {overrides}) or start "
        "a fresh run: drop ckpt_path / set resume=false, or give this run its own task_name or hydra.run.dir "
        "so an old run's checkpoints are not picked up.")


def _override(key: str, value, saved: dict) -> str:
    """The override that sets the checkpoint's ``value`` of ``key``: for another norm or another model class the
    group's option (``norm=srnc``, ``model=fastdvdnet``: the backbone, or the class's ``name``), else key=value."""
    if key == "norm.name":
        return f"norm={value}"
    if key == "model._target_":
        return f"model={model_name({'backbone': saved.get('model.backbone'), '_target_': value})}"
    return f"{key}={'null' if value is None else value}"


def check_checkpoint(path: str | os.PathLike, module_cfg: dict, key: str = "ckpt_path") -> dict:
    """``read_checkpoint`` + ``check_compatible``; returns the checkpoint's hyper-parameters."""
    checkpoint = read_checkpoint(path, key)
    hparams = dict(checkpoint["hyper_parameters"])
    check_compatible(hparams, module_cfg, path, key)
    return hparams


try:  # a Hydra callback: the run directory is created by Hydra itself, before the task starts
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra is a dependency of the entry points only
    _HydraCallback = object


class RunDirCheck(_HydraCallback):
    """Hydra callback (``hydra.callbacks``): the run or sweep directory must be writable before Hydra makes it.

    Hydra turns an exception of a callback into a warning and goes on (to fail on the
    directory with a bare OS error), so a refusal exits here with the message (status 1).
    """

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(path, key: str) -> None:
        try:
            check_writable(path, key)
        except PreflightError as error:
            raise SystemExit(f"Error: {error}") from None
