"""Bad places fail before any work starts, with a message that names both sides."""


import pytest
import torch
from omegaconf import OmegaConf

from recstab.lit.launch import preflight, run_training
from recstab.lit.preflight import (MissingCheckpointError, PreflightError, check_checkpoint,
                                   check_compatible, check_writable, model_differences, read_checkpoint)

MODEL = {"backbone": "vresnet", "recurrence": "feat", "task": "denoise", "channels": 8, "in_channels": 3,
         "depth": None, "init": "he"}
NORM = {"_target_": "recstab.norms.SRNC", "name": "srnc", "alpha": 2.0, "beta": 0.1, "n": 16, "power_iters": 1,
        "loop_only": False}


def nested(**changes) -> dict:
    """Module hyper-parameters: the model config and the norm config (what src/train.py saves)."""
    model = {**MODEL, **{k: v for k, v in changes.items() if k != "norm"}}
    return {"model": model, "norm": {**NORM, **changes.get("norm", {})}, "lr": 1e-3, "loss": "mse"}


@pytest.fixture(scope="session")
def smoke_cfg(compose):
    """``smoke_cfg(run_dir, overrides)`` -> a debug=smoke, CSV-logged train config set up to run in ``run_dir``."""
    return lambda run_dir, overrides: compose("train", ["debug=smoke", "logger=csv", *overrides], output_dir=run_dir)


# ---------------------------------------------------------------- writable places
def test_unwritable_directory_names_key_path_and_reason(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PreflightError) as error:
        check_writable(blocker / "checkpoints", "callbacks.model_checkpoint.dirpath")
    message = str(error.value)
    assert f"callbacks.model_checkpoint.dirpath='{blocker / 'checkpoints'}'" in message
    assert "not a writable directory" in message and "NotADirectoryError" in message
    assert check_writable(tmp_path / "new" / "dir", "paths.output_dir") == tmp_path / "new" / "dir"
    assert list(tmp_path.iterdir()) == [blocker]  # nothing created, the probe file removed


# ---------------------------------------------------------------- checkpoint files
def test_missing_directory_garbage_and_foreign_checkpoints(tmp_path):
    with pytest.raises(MissingCheckpointError, match=f"ckpt_path='{tmp_path}/nope.ckpt' does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="is a directory, not a checkpoint file"):
        read_checkpoint(tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(PreflightError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(PreflightError, match=r"no 'state_dict' and 'hyper_parameters' \(found \['weights'\]\)"):
        read_checkpoint(tmp_path / "plain.pt")


# ---------------------------------------------------------------- same model?
@pytest.mark.parametrize("change,key,saved,wanted", [
    ({"backbone": "vdncnn"}, "model.backbone", "vdncnn", "vresnet"),
    ({"recurrence": "rlsp"}, "model.recurrence", "rlsp", "feat"),
    ({"channels": 16}, "model.channels", 16, 8),
    ({"task": "sr2"}, "model.task", "sr2", "denoise"),
    ({"norm": {"n": 64}}, "norm.n", 64, 16),
    ({"norm": {"name": "sn"}}, "norm.name", "sn", "srnc"),
])
def test_another_model_names_both_sides(change, key, saved, wanted):
    hparams = nested(**change)
    assert model_differences(hparams, nested()) == [(key, saved, wanted)]
    with pytest.raises(PreflightError) as error:
        check_compatible(hparams, nested(), "/runs/x/last.ckpt")
    message = str(error.value)
    assert f"{key}: checkpoint {saved!r}, config {wanted!r}" in message
    assert "ckpt_path='/runs/x/last.ckpt' holds another model" in message
    override = f"norm={saved}" if key == "norm.name" else f"{key}={saved}"
    assert override in message  # the override that would match the checkpoint


def test_same_model_with_other_training_settings_is_accepted():
    hparams = nested(init="near_identity")
    hparams["lr"] = 1e-5
    check_compatible(hparams, nested(), "x.ckpt")
    unnormalised = nested(norm={"name": "none", "n": 64})  # an unused n does not matter
    assert model_differences(unnormalised, nested(norm={"name": "none", "n": 16})) == []


def test_hyper_parameters_of_older_checkpoints_are_read():
    """recstab 0.1 kept the norm in the model config (with a ``kind``); older ones had flat hyper-parameters."""
    old_norm = {"kind": "srnc"} | {k: v for k, v in NORM.items() if k not in ("_target_", "name")}
    in_model = {"model": {**MODEL, "norm": old_norm}, "lr": 1e-3}
    assert model_differences(in_model, nested()) == []
    assert model_differences(in_model, nested(norm={"alpha": 1.0})) == [("norm.alpha", 2.0, 1.0)]
    flat = MODEL | {"norm": old_norm, "channels": 32}
    assert model_differences(flat, nested()) == [("model.channels", 32, 8)]


def test_a_baseline_saved_as_build_model_is_its_class():
    """Older checkpoints name a baseline `build_model(backbone=dbdnet)`, the oldest without a width (64, the
    published one) and with experiment=paper's `init: he`; today's config names the class and every argument."""
    old = {"model": {"_target_": "recstab.models.build_model", "backbone": "dbdnet", "task": "denoise",
                     "in_channels": 3, "init": "he"}, "norm": {"name": "none"}}
    new = {"model": {"_target_": "recstab.models.baselines.DBDNet", "task": "denoise", "in_channels": 3,
                     "channels": 64, "depth": 8}, "norm": {"name": "none"}}
    assert model_differences(old, new) == []
    untargeted = {k: v for k, v in old["model"].items() if k != "_target_"}  # recstab 0.1
    assert model_differences({**old, "model": untargeted}, new) == []
    assert model_differences(old, {**new, "model": {**new["model"], "channels": 8}}) == [("model.channels", 64, 8)]
    frvsr = {**new, "model": {**new["model"], "_target_": "recstab.models.baselines.FRVSR", "depth": 10}}
    assert model_differences(old, frvsr) == [  # another class: its other arguments are moot
        ("model._target_", "recstab.models.baselines.dbdnet.DBDNet", "recstab.models.baselines.frvsr.FRVSR")]
    with pytest.raises(PreflightError, match=r"\(e\.g\. model=dbdnet\)"):
        check_compatible(old, frvsr, "x.ckpt")
    with pytest.raises(PreflightError, match=r"\(e\.g\. model=vresnet norm=srnc\)"):
        check_compatible(nested(), frvsr, "x.ckpt")


# ---------------------------------------------------------------- through the configs
@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_cfg):
    """One real smoke run (SRN-C, n=16): its last.ckpt is the checkpoint of the tests below."""
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    run_training(smoke_cfg(run_dir, ["norm=srnc", "norm.n=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                       "test=false"]))
    return run_dir / "checkpoints" / "last.ckpt"


def test_real_checkpoint_passes_and_another_n_fails_before_training(trained, tmp_path, smoke_cfg):
    cfg = smoke_cfg(tmp_path / "ok", ["norm=srnc", "norm.n=16", f"ckpt_path={trained}"])
    assert preflight(cfg) == str(trained)
    check_checkpoint(trained, OmegaConf.to_container(cfg.module, resolve=True))
    cfg = smoke_cfg(tmp_path / "bad", ["norm=srnc", "norm.n=32", f"ckpt_path={trained}"])
    with pytest.raises(PreflightError, match="norm.n: checkpoint 16, config 32"):
        run_training(cfg)
    assert not (tmp_path / "bad" / "checkpoints" / "last.ckpt").exists()


def test_stale_interrupted_checkpoint_of_another_model_is_refused(trained, tmp_path, smoke_cfg):
    run_dir = tmp_path / "reused"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = run_dir / "checkpoints" / "interrupted.ckpt"
    stale.write_bytes(trained.read_bytes())  # a crashed SRN-C run left it behind
    cfg = smoke_cfg(run_dir, ["norm=none", "resume=true"])  # now an unnormalised model in the same dir
    with pytest.raises(PreflightError) as error:
        run_training(cfg)
    message = str(error.value)
    assert f"'{stale}' holds another model" in message and "resume=true" in message
    assert "(norm.name: checkpoint 'srnc', config 'none')" in message  # the other norm keys are moot
    assert "norm=srnc" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["interrupted.ckpt"]


def test_unwritable_checkpoint_dir_fails_before_the_data_is_built(tmp_path, smoke_cfg):
    (tmp_path / "a_file").write_text("x")
    cfg = smoke_cfg(tmp_path / "run", [f"callbacks.model_checkpoint.dirpath={tmp_path}/a_file/ckpts"])
    with pytest.raises(PreflightError, match="callbacks.model_checkpoint.dirpath=.*a_file/ckpts.*not a writable"):
        run_training(cfg)
    assert not (tmp_path / "run" / "csv").exists()


@pytest.mark.slow
def test_cli_another_model_fails_with_one_paragraph(trained, tmp_path, run_script):
    result = run_script("train.py", ["debug=smoke", "logger=csv", f"hydra.run.dir={tmp_path}", "model=vdncnn",
                                     "norm=srnc", f"ckpt_path={trained}"], tmp_path)
    assert result.returncode != 0
    assert "model.backbone: checkpoint 'vresnet', config 'vdncnn'" in result.stderr, result.stderr[-3000:]
    assert "Seed set" not in result.stderr + result.stdout  # refused before anything was built
    assert not (tmp_path / "checkpoints").exists()


def test_unwritable_hydra_run_dir_exits_before_hydra_creates_it(tmp_path):
    from recstab.lit.preflight import RunDirCheck

    (tmp_path / "a_file").write_text("x")
    config = OmegaConf.create({"hydra": {"run": {"dir": f"{tmp_path}/a_file/run"},
                                         "sweep": {"dir": f"{tmp_path}/ok/sweep"}}})
    with pytest.raises(SystemExit, match=r"Error: hydra.run.dir='.*a_file/run' is not a writable directory"):
        RunDirCheck().on_run_start(config)
    RunDirCheck().on_multirun_start(config)  # a sweep dir that can be created passes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
