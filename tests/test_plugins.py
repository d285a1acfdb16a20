"""A component is one class plus one config file, found by `_target_`: nothing else to register.

Each test writes its config file into a folder of its own, adds it to Hydra's search path
(`hydra.searchpath=[file://<dir>]`, what a user's package does with its own conf/) and composes
the real train config with it, as `python src/train.py <group>=<new option>` would.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from recstab.lit.module import VideoRestorationModule
from recstab.norms import WeightNorm, normalised_convs


class ScaleBy(nn.Module):
    """A parametrization: the conv uses its raw weight times a constant."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale * weight


@dataclass
class Scaled(WeightNorm):
    """A new norm: every conv weight times `scale`."""

    name: str = "scaled"
    scale: float = 0.5

    def parametrization(self, weight: torch.Tensor) -> nn.Module:
        return ScaleBy(self.scale)


def compose_with(compose, tmp_path, group: str, option: str, yaml: str, overrides=()):
    (tmp_path / "plugin" / group).mkdir(parents=True)
    (tmp_path / "plugin" / group / f"{option}.yaml").write_text(yaml)
    return compose("train", [f"hydra.searchpath=[file://{tmp_path / 'plugin'}]", f"{group}={option}", *overrides])


def test_a_new_norm_is_one_class_and_one_config_file(compose, tmp_path):
    cfg = compose_with(compose, tmp_path, "norm", "scaled",
                       f"_target_: {__name__}.Scaled\nname: scaled\nscale: 0.5\n",
                       ["norm.scale=0.25", "model.channels=4"])
    assert cfg.run_name == "vresnet-feat-denoise-scaled"
    module = VideoRestorationModule(model=cfg.module.model, norm=cfg.module.norm)
    convs = normalised_convs(module.model)  # only our power-iteration norms are listed there
    assert convs == []
    scaled = [m for m in module.model.modules() if isinstance(m, nn.Conv2d)]
    assert scaled and all(isinstance(m.parametrizations.weight[0], ScaleBy) for m in scaled)
    conv = scaled[0]
    assert torch.equal(conv.weight, 0.25 * conv.parametrizations.weight.original)
    with pytest.raises(TypeError, match="alfa"):  # a misspelt key of the new norm is named
        Scaled(scale=0.5, alfa=1)


class WeightNorms:
    """A new diagnostic: the Frobenius norm of every conv kernel, largest and total."""

    def __init__(self, power: float = 2.0):
        self.power = power

    def __call__(self, model, measurements) -> dict:
        norms = [m.weight.detach().norm() for m in model.modules() if isinstance(m, nn.Conv2d)]
        return {"largest": float(max(norms)), "total": float(sum(n ** self.power for n in norms))}


def test_a_new_diagnostic_is_one_class_and_one_config_file(compose, tmp_path):
    from hydra.utils import instantiate

    from recstab.diagnostics import measure
    from recstab.models import build_model

    cfg = compose_with(compose, tmp_path, "diagnostics", "mine",
                       "defaults:\n  - smoke\n  - _self_\nname: mine\n"
                       f"extra:\n  weights:\n    _target_: {__name__}.WeightNorms\n    power: 1.0\n")
    spec = instantiate(cfg.diagnostics)
    assert spec.name == "mine" and (spec.trf["frames"], spec.trf["iters"]) == (9, 3)  # the smoke preset, extended
    model = build_model("vresnet", "feat", channels=4)
    result = measure(model, spec.only("certificate", "weights"))
    expected = [m.weight.detach().norm() for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert result.metrics["weights/total"] == pytest.approx(float(sum(expected)))
    assert result.metrics["weights/largest"] == pytest.approx(float(max(expected)))
    assert result.sections["weights"]["status"] == "done" and result.verdict != "certified stable"  # L̂ > 1 here


def test_the_diagnostics_import_no_wandb():
    import subprocess
    import sys

    code = "import sys, recstab.diagnostics, recstab.diagnostics.measure; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
