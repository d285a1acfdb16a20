"""End to end through Hydra: the real configs, the real entry point, checkpoints, resume, bad input."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from recstab.lit.launch import run_training
from recstab.lit.module import VideoRestorationModule

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_cfg(tmp_path: Path, overrides: list[str]):
    """Compose conf/train.yaml as `python src/train.py <overrides>` would, output dir = tmp_path."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
        cfg.paths.log_dir = str(tmp_path / "logs")
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_cli(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "debug=smoke", f"hydra.run.dir={tmp_path}", *overrides]
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=full_env, timeout=600)


@pytest.mark.slow
def test_cli_default_dataset_trains_and_leaves_everything(tmp_path):
    """`python src/train.py debug=smoke`: checkpoint, metrics, figures and an offline W&B run."""
    result = run_cli(tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    keys = set().union(*rows)
    assert {"val/psnr_1", "val/psnr_3", "val/psnr_mean", "test/psnr_mean", "train/loss"} <= keys
    assert list((tmp_path / "figures").glob("val_psnr_per_frame_*.png"))
    assert list((tmp_path / "figures").glob("val_samples_*.png"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_cli_vimeo90k_fixture(tmp_path):
    from fixtures import write_vimeo90k

    root = write_vimeo90k(tmp_path / "vimeo", n_sequences=4, size=(64, 48))
    result = run_cli(tmp_path, "data=vimeo90k", f"data.root={root}", "model=vdncnn", "recurrence=rlsp")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_cli_missing_vimeo_root_names_path_key_and_layout(tmp_path):
    result = run_cli(tmp_path, "data=vimeo90k", f"data.root={tmp_path}/nowhere")
    assert result.returncode != 0
    assert f"{tmp_path}/nowhere" in result.stderr and "data.root" in result.stderr
    assert "sep_trainlist.txt" in result.stderr


@pytest.mark.parametrize("overrides,match", [
    (["task.sigma=-5"], "sigma"),
    (["data.crop=100000"], "crop"),
    (["data.frames=0"], "frames"),
    (["model=vresnet", "recurrence=lstm"], "recurrence"),
])
def test_bad_input_refused_before_training(tmp_path, overrides, match):
    if overrides[-1] == "recurrence=lstm":  # not a config option: Hydra itself lists the choices
        with pytest.raises(Exception, match="lstm"):
            compose_cfg(tmp_path, overrides)
        return
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(Exception, match=match) as error:  # Hydra wraps the ValueError of the DataModule
        run_training(cfg)
    assert "ValueError" in repr(error.value) or isinstance(error.value, ValueError)
    assert not (tmp_path / "checkpoints").exists()


def test_long_video_is_not_a_training_set(tmp_path):
    with pytest.raises(ValueError, match="data=long_video is the stream of src/diagnose.py"):
        run_training(compose_cfg(tmp_path, ["data=long_video"]))


def test_unknown_backbone_lists_choices(tmp_path):
    cfg = compose_cfg(tmp_path, ["model.backbone=unet"])
    with pytest.raises(Exception, match="valid backbones: vdncnn, vresnet"):
        run_training(cfg)


@pytest.mark.parametrize("model,recurrence,task", [
    ("vresnet", "feat", "denoise"), ("vdncnn", "frame", "sr2"), ("vresnet", "birlsp-mf3", "denoise"),
    ("vdncnn", "shift", "denoise"), ("vresnet", "mf7", "sr2"),
])
def test_any_combination_trains_through_the_configs(tmp_path, model, recurrence, task):
    cfg = compose_cfg(tmp_path, [f"model={model}", f"recurrence={recurrence}", f"task={task}", "logger=csv"])
    metrics = run_training(cfg)
    assert metrics["test/psnr_mean"] > 0 and (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("norm", [["norm=srnc", "norm.alpha=2", "norm.beta=0.1"], ["norm=sn"],
                                  ["norm=srn", "norm.alpha=1", "norm.beta=1"]])
def test_normalised_models_train_through_the_configs(tmp_path, norm):
    cfg = compose_cfg(tmp_path, ["model=vresnet", "recurrence=feat", "logger=csv", "norm.n=16", *norm])
    metrics = run_training(cfg)
    assert metrics["test/psnr_mean"] > 0
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.hparams.norm["kind"] == norm[0].split("=")[1]
    assert any("parametrizations" in name for name, _ in module.named_parameters())


def test_resume_restores_step_and_optimizer(tmp_path):
    first = tmp_path / "first"
    run_training(compose_cfg(first, ["logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2"]))
    last = first / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["optimizer_states"][0]["state"][0]["step"] == 2

    second = tmp_path / "second"
    run_training(compose_cfg(second, ["logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=2",
                                      f"ckpt_path={last}"]))
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 4  # Adam moments carried over, not restarted


def test_resume_true_finds_the_newest_last_checkpoint(tmp_path):
    from recstab.lit.launch import find_resume_checkpoint

    cfg = compose_cfg(tmp_path / "new", ["resume=true"])
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
    with pytest.raises(FileNotFoundError, match="resume=true"):
        find_resume_checkpoint(cfg)
    older = tmp_path / "logs" / "train" / "runs" / "a" / "checkpoints"
    newer = tmp_path / "logs" / "train" / "runs" / "b" / "checkpoints"
    for i, d in enumerate((older, newer)):
        d.mkdir(parents=True)
        (d / "last.ckpt").write_bytes(b"x")
        os.utime(d / "last.ckpt", (1000 + i, 1000 + i))
    assert find_resume_checkpoint(cfg) == str(newer / "last.ckpt")


def test_load_from_checkpoint_without_hydra(tmp_path):
    cfg = compose_cfg(tmp_path, ["logger=csv", "recurrence=rlsp"])
    run_training(cfg)
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.hparams.recurrence == "rlsp" and module.model.channels == 8
    x = torch.rand(1, 3, 3, 16, 16)
    assert module.eval()(x).shape == x.shape
