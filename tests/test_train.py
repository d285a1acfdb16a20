"""End to end through Hydra: the real configs, the real entry point, checkpoints, resume, bad input, failing sweeps."""

import csv
import json
import math
import os

import pytest
import torch

from recstab.lit.launch import run_training
from recstab.lit.module import VideoRestorationModule
from recstab.report.tables import report


def smoke(compose, tmp_path, overrides):
    """The config of `python src/train.py debug=smoke <overrides>` writing into tmp_path."""
    return compose("train", ["debug=smoke", *overrides], output_dir=tmp_path)


def train_cli(run_script, tmp_path, *overrides, env=None):
    return run_script("train.py", ["debug=smoke", f"hydra.run.dir={tmp_path}", *overrides], tmp_path, env=env,
                      timeout=600)


def wandb_summary(path) -> dict:
    """The run summary an offline W&B run recorded (its transaction log), key -> value."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store, summary = datastore.DataStore(), {}
    store.open_for_scan(str(path))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return summary


@pytest.mark.slow
def test_the_users_command_line_verbatim_trains_srnc_with_its_alpha_and_beta(tmp_path, run_script):
    """`python src/train.py model=vresnet recurrence=feat norm=srnc norm.alpha=2 norm.beta=0.1` (+ debug=smoke):
    every conv of the trained VResNet-feat carries SRN-C with alpha 2, beta 0.1, and its operator norm is 2."""
    from recstab.norms import ConvStableRankNorm, conv_singular_values, normalised_convs

    words = "model=vresnet recurrence=feat norm=srnc norm.alpha=2 norm.beta=0.1".split()
    result = train_cli(run_script, tmp_path, *words, "logger=csv")
    assert result.returncode == 0, result.stderr[-4000:]
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    model = module.model.eval()
    assert (model.backbone_name, model.connection.name) == ("vresnet", "feat")
    convs = normalised_convs(model)
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 12
    for name, conv, norm in convs:
        assert isinstance(norm, ConvStableRankNorm) and (norm.alpha, norm.beta) == (2.0, 0.1), name
        sigma1 = conv_singular_values(conv.weight.detach(), n=norm.n)[0]
        assert float(sigma1) == pytest.approx(2.0, rel=0.01), name


@pytest.mark.slow
def test_cli_default_dataset_trains_and_leaves_everything(tmp_path, run_script):
    """`python src/train.py debug=smoke`: checkpoint, metrics, figures and an offline W&B run."""
    result = train_cli(run_script, tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    keys = set().union(*rows)
    assert {"val/psnr_1", "val/psnr_3", "val/psnr_mean", "test/psnr_mean", "train/loss"} <= keys
    assert list((tmp_path / "figures").glob("val_psnr_per_frame_*.png"))
    assert list((tmp_path / "figures").glob("val_samples_*.png"))
    (run,) = list((tmp_path / "wandb").glob("offline-run-*"))
    # the W&B run summary holds the final numbers of metrics.json, from the same dict
    summary = wandb_summary(next(run.glob("*.wandb")))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics and {k: summary.get(k) for k in metrics} == metrics


@pytest.mark.slow
def test_cli_vimeo90k_fixture(tmp_path, run_script, write_vimeo90k):
    root = write_vimeo90k(tmp_path / "vimeo", n_sequences=4, size=(64, 48))
    result = train_cli(run_script, tmp_path, "data=vimeo90k", f"data.root={root}", "model=vdncnn", "recurrence=rlsp")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_cli_missing_vimeo_root_names_path_key_and_layout(tmp_path, run_script):
    result = train_cli(run_script, tmp_path, "data=vimeo90k", f"data.root={tmp_path}/nowhere")
    assert result.returncode != 0  # a single run re-raises (only -m sweeps record the failure and go on)
    assert f"{tmp_path}/nowhere" in result.stderr and "data.root" in result.stderr
    assert "sep_trainlist.txt" in result.stderr
    assert not (tmp_path / "failed.json").exists()


@pytest.mark.parametrize("overrides,match", [
    (["task.sigma=-5"], "sigma"),
    (["data.crop=100000"], "crop"),
    (["data.frames=0"], "frames"),
])
def test_bad_input_refused_before_training(compose, tmp_path, overrides, match):
    cfg = smoke(compose, tmp_path, overrides)
    with pytest.raises(Exception, match=match) as error:  # Hydra wraps the ValueError of the DataModule
        run_training(cfg)
    assert "ValueError" in repr(error.value) or isinstance(error.value, ValueError)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_options_are_listed(compose, tmp_path):
    with pytest.raises(Exception, match="lstm"):  # not a config option: Hydra itself lists the choices
        smoke(compose, tmp_path, ["recurrence=lstm"])
    with pytest.raises(Exception, match="valid backbones: vdncnn, vresnet"):
        run_training(smoke(compose, tmp_path, ["model.backbone=unet"]))


@pytest.mark.parametrize("model,recurrence,task", [
    ("vresnet", "feat", "denoise"), ("vdncnn", "frame", "sr2"), ("vresnet", "birlsp-mf3", "denoise"),
    ("vdncnn", "shift", "denoise"), ("vresnet", "mf7", "sr2"),
])
def test_any_combination_trains_through_the_configs(compose, tmp_path, model, recurrence, task):
    cfg = smoke(compose, tmp_path, [f"model={model}", f"recurrence={recurrence}", f"task={task}", "logger=csv"])
    metrics = run_training(cfg)
    per_frame = [metrics[f"test/psnr_{t}"] for t in (1, 2, 3)]
    assert all(math.isfinite(p) for p in per_frame)
    assert metrics["test/psnr_mean"] == pytest.approx(sum(per_frame) / 3, abs=1e-4)
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert (module.model.backbone_name, module.model.recurrence, module.model.task) == (model, recurrence, task)
    x = torch.rand(1, 3, 3, 16, 16)
    assert module.eval()(x).shape == (1, 3, 3, 16 * module.model.scale, 16 * module.model.scale)


def test_a_short_training_beats_the_noisy_input(compose, tmp_path):
    """60 steps of a single-frame VDnCNN (fixed seed) denoise sigma=30: the test PSNR beats the input's
    20 log10(255 / 30) = 18.59 dB (the noise is not clamped, so its MSE is sigma^2) by more than 1 dB."""
    cfg = smoke(compose, tmp_path, ["model=vdncnn", "recurrence=none", "model.depth=2", "trainer.max_steps=60",
                                    "trainer.val_check_interval=60", "module.lr=1e-2", "module.lr_schedule=constant",
                                    "logger=csv", "callbacks.spectrum=null", "callbacks.validation_figures=null"])
    metrics = run_training(cfg)
    assert metrics["test/psnr_mean"] > 20 * math.log10(255 / 30) + 1.0


@pytest.mark.parametrize("norm", [["norm=srnc", "norm.alpha=2", "norm.beta=0.1"], ["norm=sn"],
                                  ["norm=srn", "norm.alpha=1", "norm.beta=1"]])
def test_normalised_models_train_through_the_configs(compose, tmp_path, norm):
    cfg = smoke(compose, tmp_path, ["model=vresnet", "recurrence=feat", "logger=csv", *norm])
    metrics = run_training(cfg)
    assert math.isfinite(metrics["test/psnr_mean"])
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.hparams.norm["name"] == norm[0].split("=")[1] and "norm" not in module.hparams.model
    assert any("parametrizations" in name for name, _ in module.named_parameters())


def test_resume_restores_step_and_optimizer(compose, tmp_path):
    first = tmp_path / "first"
    run_training(smoke(compose, first, ["logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2"]))
    last = first / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["optimizer_states"][0]["state"][0]["step"] == 2

    second = tmp_path / "second"
    run_training(smoke(compose, second, ["logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=2",
                                         f"ckpt_path={last}"]))
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 4  # Adam moments carried over, not restarted


def test_resume_true_finds_the_newest_last_checkpoint(compose, tmp_path):
    from recstab.lit.launch import find_resume_checkpoint

    cfg = smoke(compose, tmp_path / "new", ["resume=true"])
    with pytest.raises(FileNotFoundError, match="resume=true"):
        find_resume_checkpoint(cfg)
    older = tmp_path / "new" / "logs" / "train" / "runs" / "a" / "checkpoints"
    newer = tmp_path / "new" / "logs" / "train" / "runs" / "b" / "checkpoints"
    for i, d in enumerate((older, newer)):
        d.mkdir(parents=True)
        (d / "last.ckpt").write_bytes(b"x")
        os.utime(d / "last.ckpt", (1000 + i, 1000 + i))
    assert find_resume_checkpoint(cfg) == str(newer / "last.ckpt")


def test_load_from_checkpoint_without_hydra(compose, tmp_path):
    """The checkpoint carries the plain-dict model config: load_from_checkpoint rebuilds the same model."""
    from hydra.core.global_hydra import GlobalHydra

    cfg = smoke(compose, tmp_path, ["logger=csv", "recurrence=rlsp", "norm=srnc"])
    run_training(cfg)
    GlobalHydra.instance().clear()
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert isinstance(module.hparams.model, dict) and module.hparams.model["_target_"] == "recstab.models.build_model"
    assert module.hparams.model["recurrence"]["name"] == "rlsp" and module.model.channels == 8
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    x = torch.rand(1, 3, 3, 16, 16)
    assert module.eval()(x).shape == x.shape


def test_module_refuses_a_model_without_target():
    with pytest.raises(ValueError, match="_target_"):
        VideoRestorationModule(model={"backbone": "vresnet"})


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failing_job_leaves_the_sweep_running(tmp_path, run_script, launcher):
    """`-m` sweep of a Table 3 row over two SRN-C map sizes, one invalid (n=2 < the 3x3 kernel): the n=16
    job still trains, the n=2 job writes failed.json naming its log, the sweep exits 0, and the report (what
    src/report.py writes) counts the failed job in the row and names its log."""
    result = run_script("train.py", [
        "-m", "sweep=table3", "debug=smoke", "row=srnc_2.0_0.1", "norm.n=2,16", "logger=csv",
        "diagnostics.trf=null", "diagnostics.onsets=null", "diagnostics.spectra_n=null", "diagnostics.lyapunov=null",
        f"hydra/launcher={launcher}", *(["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []),
        f"hydra.sweep.dir={tmp_path}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    bad, good = sorted(p for p in tmp_path.iterdir() if p.is_dir())  # jobs 0 (n=2) and 1 (n=16)
    assert (good / "metrics.json").is_file() and not (good / "failed.json").exists()
    failed = json.loads((bad / "failed.json").read_text())
    assert "n=2 is smaller than the 3×3 kernel" in failed["error"] and failed["error"].startswith("ValueError")
    assert failed["log"] == str(bad / "train.log") and "n=2 is smaller" in (bad / "train.log").read_text()
    assert "ValueError" in (bad / "traceback.txt").read_text()

    _, files = report("table3", tmp_path)  # what src/report.py writes
    rows = {r["model"]: r for r in csv.DictReader(open(files["csv"]))}
    srnc = rows["SRN-C α=2.0 β=0.1"]
    assert (srnc["failed"], srnc["runs"]) == ("1", "1") and float(srnc["psnr_7"]) > 0
    assert srnc["failed_logs"] == str(bad / "train.log")
    assert f"log: {bad / 'train.log'}" in files["markdown"].read_text()
