"""Post-hoc stabilisation (src/stabilise.py): feature-dampening search and SRN-C fine-tuning."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import recstab.stabilise as S
from recstab.diagnostics import MeasureSpec, loop_certificate
from recstab.lit.module import VideoRestorationModule

ROOT = Path(__file__).resolve().parents[1]
TRF = dict(frames=21, size=16, iters=30)




def he_module(channels: int = 8) -> VideoRestorationModule:
    torch.manual_seed(0)
    model = {"_target_": "recstab.models.build_model", "backbone": "vresnet", "recurrence": "feat",
             "channels": channels, "init": "he"}
    return VideoRestorationModule(model=model, frames=3)


def save_checkpoint(module: VideoRestorationModule, path: Path) -> Path:
    """A Lightning checkpoint without a trainer: weights and hyperparameters are all load_from_checkpoint needs."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def test_dampening_search_makes_an_unstable_model_not_proven_unstable():
    model = he_module().model.eval()
    clip = torch.rand(1, 40, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    spec = MeasureSpec(trf=TRF, lyapunov={"frames": 40, "size": None, "burn_in": 10})
    measure = lambda lam: S.measure_at(model, lam, spec, list(clip[0]), sigma=0.0)  # noqa: E731
    before = measure(1.0)
    assert before.verdict == "proven unstable" and before.trf_verdict == "unbounded"
    assert before.lyapunov > 0 and not before.certified
    search = S.search_dampening(measure, margin=0.05, tol=0.2, max_iters=2)
    assert search.chosen < 1
    assert search.trials[0].dampening == 1.0
    # independent checks at the chosen λ: the TRF no longer diverges, λ₁ < −margin
    from recstab.diagnostics import temporal_receptive_field
    from recstab.diagnostics.lyapunov import lyapunov_exponent
    from recstab.models.dampening import evaluating
    with evaluating(model, search.chosen):
        assert temporal_receptive_field(model, **TRF).verdict != "unbounded"
        assert lyapunov_exponent(model, clip, burn_in=10).exponent < -0.05
    # the certificate is (up to its weighting slack) linear in λ; at λ_cert it certifies with margin
    with evaluating(model, search.certified):
        bound_cert = loop_certificate(model).bound
    assert bound_cert <= math.exp(-0.05) + 1e-9
    assert bound_cert == pytest.approx(search.certified * before.bound, rel=0.02)
    assert search.certified <= search.empirical <= 1


def test_search_keeps_a_stable_model_undamped():
    calls = []

    def measure(lam):
        calls.append(lam)
        return S.Measurement(lam, 0.5 * lam, True, -1.0, 0.01, "bounded", 3, "certified stable")
    search = S.search_dampening(measure, margin=0.05)
    assert (search.chosen, search.selected_by, calls) == (1.0, "undamped", [1.0])


def test_search_bisects_to_the_stability_threshold():
    """A synthetic λ₁(λ) = log(λ·2): stable with margin m below λ* = e^(−m)/2; bisection brackets it."""
    margin = 0.1

    def measure(lam):
        lyap = math.log(2 * lam) if lam > 0 else -math.inf
        return S.Measurement(lam, 10 * lam, 10 * lam < 1, lyap, 0.0, "bounded", 1,
                             "certified stable" if 10 * lam < 1 else "empirically stable")
    search = S.search_dampening(measure, margin=margin, tol=1e-3, max_iters=30, select="empirical")
    threshold = math.exp(-margin) / 2
    assert search.empirical == pytest.approx(threshold, abs=1e-3) and search.empirical < threshold
    assert search.certified == pytest.approx(math.exp(-margin) / 10)
    assert search.chosen == search.empirical and search.selected_by == "empirical"
    assert S.search_dampening(measure, margin=margin, select="certified").chosen == pytest.approx(search.certified)


def test_search_refuses_bad_settings():
    with pytest.raises(ValueError, match="select"):
        S.search_dampening(lambda lam: None, select="best")
    with pytest.raises(ValueError, match="tol"):
        S.search_dampening(lambda lam: None, tol=2)


def test_plain_weights_load_into_a_normalised_module_with_converged_vectors():
    from recstab.norms import conv_singular_values
    module = he_module()
    norm = {"_target_": "recstab.norms.SRNC", "name": "srnc", "alpha": 1.0, "beta": 1.0, "n": 16}
    tuned = S.normalised_module(dict(module.hparams), module.state_dict(), norm)
    assert tuned.hparams.norm["name"] == "srnc" and "norm" not in tuned.hparams.model
    conv = tuned.model.body.blocks[0].convs()[0]
    raw = conv.parametrizations.weight.original
    assert torch.equal(raw, module.model.body.blocks[0].convs()[0].weight)
    tuned.eval()
    sigma = conv_singular_values(conv.weight.detach().double(), 16)[0].item()
    assert sigma == pytest.approx(1.0, rel=1e-3)  # exact power vectors after the refresh


@pytest.mark.slow
def test_cli_writes_both_reports_and_loadable_checkpoints(tmp_path):
    ckpt = save_checkpoint(he_module(), tmp_path / "he.ckpt")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "src" / "stabilise.py"), f"ckpt_path={ckpt}", f"hydra.run.dir={out}",
           "data.crop=16", "data.batch_size=2", "data.val_length=2", "data.train_length=4", "val_batches=1",
           "finetune.steps=2", "finetune.norm.n=16", "diagnostics=smoke", "diagnostics.lyapunov.frames=20",
           "diagnostics.trf.frames=21", "diagnostics.trf.iters=20", "long_video.loop_to=40", "dampening.tol=0.1"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for method, new in (("dampening", "dampened.ckpt"), ("finetune", "finetuned.ckpt")):
        text = (out / method / "report.md").read_text()
        assert "| | before | after |" in text and "PSNR_7" in text and "Lyapunov" in text
        data = json.loads((out / method / "report.json").read_text())
        for column in ("before", "after"):
            assert {"psnr_7", "verdict", "bound", "lyapunov"} <= set(data[column])
            assert len(data[column]["psnr"]) == 3 and math.isfinite(data[column]["psnr_7"])
        assert data["before"]["verdict"] == "proven unstable"
        loaded = VideoRestorationModule.load_from_checkpoint(str(out / method / new), map_location="cpu")
        if method == "dampening":
            assert loaded.hparams.dampening == data["after"]["dampening"] < 1
            assert data["after"]["verdict"] != "proven unstable"
        else:
            assert loaded.hparams.norm["name"] == "srnc" and loaded.hparams.norm["alpha"] == 0.9
            assert data["after"]["certified"] and data["after"]["verdict"] == "certified stable"


@pytest.mark.slow
def test_cli_certified_finetune_ends_certified_at_rho_with_before_after_figure(tmp_path):
    """method=certify: the unstable He-init model, fine-tuned under norm=certified at rho 0.8, ends with a loop
    certificate <= 0.8 recomputed from the saved checkpoint alone; report.png holds the before/after figure."""
    ckpt = save_checkpoint(he_module(), tmp_path / "he.ckpt")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "src" / "stabilise.py"), f"ckpt_path={ckpt}", f"hydra.run.dir={out}",
           "method=certify", "certify.rho=0.8", "data.crop=16", "data.batch_size=2", "data.val_length=2",
           "data.train_length=4", "val_batches=1", "finetune.steps=3", "diagnostics=smoke",
           "diagnostics.trf.iters=10", "long_video.loop_to=40"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((out / "certify" / "report.json").read_text())
    assert data["before"]["verdict"] == "proven unstable" and data["before"]["bound"] > 1
    assert data["after"]["certified"] and data["after"]["bound"] <= 0.8 and data["after"]["verdict"] == "certified stable"
    assert data["at_load"]["bound"] <= 0.8  # certified from the first step on, not only after training
    assert len(data["after"]["psnr"]) == 3 and math.isfinite(data["after"]["psnr_7"])
    loaded = VideoRestorationModule.load_from_checkpoint(str(out / "certify" / "finetuned.ckpt"), map_location="cpu")
    assert loaded.hparams.norm["name"] == "certified" and loaded.hparams.norm["rho"] == 0.8
    certificate = loop_certificate(loaded.model)
    assert certificate.certified and certificate.bound <= 0.8
    assert "Certified at ρ = 0.8" in (out / "certify" / "report.md").read_text()
    from PIL import Image
    assert Image.open(out / "certify" / "report.png").size[0] > 600


def test_cli_names_a_missing_checkpoint(tmp_path):
    cmd = [sys.executable, str(ROOT / "src" / "stabilise.py"), f"ckpt_path={tmp_path / 'nope.ckpt'}",
           f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}, timeout=300)
    assert result.returncode != 0 and "nope.ckpt" in result.stderr


def test_cli_refuses_a_foreign_checkpoint_in_one_line(tmp_path):
    torch.save(he_module().model.state_dict(), tmp_path / "plain.pt")  # a plain state dict, not train.py's
    cmd = [sys.executable, str(ROOT / "src" / "stabilise.py"), f"ckpt_path={tmp_path / 'plain.pt'}",
           f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and lines[-1].startswith("Error: ") and "Diagnose your own model" in lines[-1]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
