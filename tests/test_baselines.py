"""The Table 1 baselines: size, shapes, the sequence API, streaming, dampening, BM3D, their configs; a new
baseline is one class and one config file; checkpoints of the older build_model(backbone=...) configs load."""

import importlib.util
import math

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from recstab.lit.launch import run_training
from recstab.lit.module import VideoRestorationModule
from recstab.lit.preflight import check_checkpoint
from recstab.models import VideoModel, build_model, count_parameters
from recstab.models.baselines import BASELINES, FRVSR, FastDVDnet
from recstab.models.temporal import StreamingNotSupported

LEARNED = ("fastdvdnet", "frvsr", "dbdnet")
RECURRENT = ("frvsr", "dbdnet")
TABLE1 = {"fastdvdnet": 2.49e6, "frvsr": 2.49e6, "dbdnet": 965e3}
EXACT = {"fastdvdnet": 2_477_476, "frvsr": 2_489_317, "dbdnet": 964_712}  # the docstrings' arithmetic




def clip(b=1, t=4, c=3, h=12, w=20, seed=0):
    return torch.rand(b, t, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", LEARNED)
def test_parameter_count_matches_table1(name):
    n = count_parameters(build_model(name, task="denoise"))
    assert n == EXACT[name]
    assert abs(n / TABLE1[name] - 1) < 0.05, f"{name}: {n} parameters vs Table 1's {TABLE1[name]:.0f}"


@pytest.mark.parametrize("name", LEARNED)
def test_channels_resize_the_widths_and_64_is_the_published_model(name):
    assert count_parameters(build_model(name, channels=64)) == EXACT[name]
    small = build_model(name, channels=8)
    widths = {m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)}
    expected = {"fastdvdnet": {4, 8, 16, 90}, "frvsr": {4, 8, 16, 32}, "dbdnet": {8}}[name]  # + 4·w before a shuffle
    assert expected <= widths and max(widths) <= {"fastdvdnet": 90, "frvsr": 32, "dbdnet": 8}[name]
    x = clip(t=3, h=13, w=18)
    assert small(x).shape == x.shape


def test_depth_resizes_frvsr_and_dbdnet_and_is_refused_by_fastdvdnet():
    assert len(build_model("frvsr", channels=8, depth=2).blocks) == 2
    assert len(build_model("dbdnet", channels=8, depth=3).multi) == 3
    with pytest.raises(ValueError, match=r"fastdvdnet has no depth \(got depth=3\); its arguments: task, in_channels, "
                                         r"channels, noise_sigma, causal"):
        build_model("fastdvdnet", depth=3)
    with pytest.raises(ValueError, match=r"bm3d has no channels \(got channels=8\)"):
        build_model("bm3d", channels=8)
    with pytest.raises(ValueError, match="recurrence='feat' is for the backbones vdncnn, vresnet"):
        build_model("frvsr", "feat")
    with pytest.raises(ValueError, match="dbdnet is He-initialised: init='near_identity'"):
        build_model("dbdnet", init="near_identity")
    with pytest.raises(ValueError, match="even and >= 2, got 7"):
        build_model("fastdvdnet", channels=7)


@pytest.mark.parametrize("name", LEARNED)
@pytest.mark.parametrize("channels", [3, 1])
def test_shapes_and_backward(name, channels):
    model = build_model(name, task="denoise", in_channels=channels)
    x = clip(c=channels, t=2, h=13, w=18)  # sizes that are no multiple of the U-Net / FNet strides
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", LEARNED)
def test_chunked_equals_whole(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = clip(b=2, t=5)
    with torch.no_grad():
        whole = model(x)
        parts, state = [], None
        for chunk in (x[:, :1], x[:, 1:3], x[:, 3:]):
            y, state = model.process(chunk, state)
            parts.append(y)
    assert model.streamable
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LEARNED)
def test_causal(name):
    """Frame t never depends on later frames."""
    model = build_model(name).eval()
    x = clip(t=4)
    x2 = x.clone()
    x2[:, 2:] = torch.rand_like(x2[:, 2:])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :2], model(x2)[:, :2])


def test_fastdvdnet_window_of_five():
    """Causal: frame t sees exactly t-4..t; centred (the original): t-2..t+2, whole clips only."""
    causal = FastDVDnet().eval()
    x = clip(t=7, h=8, w=8)
    x2 = x.clone()
    x2[:, 1] = torch.rand_like(x2[:, 1])
    with torch.no_grad():
        d = (causal(x) - causal(x2)).abs().flatten(2).amax(-1).amax(0)
    assert d[1:6].min() > 0 and d[0] == 0 and d[6] == 0  # frame 1 is seen by frames 1..5 only
    assert not causal.is_recurrent and causal.recurrent_convs() == []
    assert causal.loop_certificate().bound == 0 and causal.loop_certificate().certified

    centred = FastDVDnet(causal=False).eval()
    with torch.no_grad():
        d = (centred(x) - centred(x2)).abs().flatten(2).amax(-1).amax(0)
    assert d[:4].min() > 0 and d[4:].max() == 0  # frame 1 is seen by frames 0..3
    assert not centred.streamable
    with pytest.raises(StreamingNotSupported, match="causal=True"):
        centred.process(x)


def test_fastdvdnet_noise_map_and_train_mode():
    """The optional noise map adds 810 parameters per block; BatchNorm batch statistics are
    per time step, so chunked equals whole in training mode too."""
    model = FastDVDnet(noise_sigma=30).train()
    assert count_parameters(model) == EXACT["fastdvdnet"] + 2 * 810
    x = clip(b=2, t=3, h=8, w=12)
    with torch.no_grad():
        whole = model(x)
        first, state = model.process(x[:, :1])
        rest, _ = model.process(x[:, 1:], state)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole)


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrence_and_dampening(name):
    """λ = 1: the past matters; λ = 0: every frame is processed as if it were the first."""
    model = build_model(name).eval()
    assert model.is_recurrent and model.dampening == 1.0
    x = clip(t=3)
    with torch.no_grad():
        alone = model(x[:, 2:])[:, 0]
        assert (model(x)[:, 2] - alone).abs().max() > 1e-4
        model.dampening = 0.0
        torch.testing.assert_close(model(x)[:, 2], alone)


def test_stability_structure():
    frvsr, dbdnet = build_model("frvsr"), build_model("dbdnet")
    assert len(frvsr.recurrent_convs()) == 1 + 2 * 10 + 1
    assert frvsr.loop_certificate(lambda w: 0.5).bound == math.inf  # warping: no bound derived
    assert len(dbdnet.recurrent_convs()) == 8
    assert all(isinstance(c, torch.nn.Conv2d) for c in frvsr.recurrent_convs() + dbdnet.recurrent_convs())
    dbdnet.dampening = 0.5
    cert = dbdnet.loop_certificate(lambda w: 0.8)  # every self-loop 0.5 * 0.8: rho = 0.404
    assert cert.certified and cert.bound == pytest.approx(0.404) and len(cert.weights) == 8


@pytest.mark.parametrize("name", list(BASELINES))
def test_bad_task_and_input(name):
    with pytest.raises(ValueError, match="sr2"):
        build_model(name, task="sr2")
    model = build_model(name)
    with pytest.raises(ValueError, match=r"B×T×3×H×W"):
        model(torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize("name", list(BASELINES))
def test_model_configs(compose, name):
    """`model=<baseline>` composes into the config of its class, named by `_target_`."""
    cfg = compose("train", [f"model={name}", "experiment=paper"])
    assert cfg.model._target_ == f"recstab.models.baselines.{BASELINES[name].__name__}"
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert type(model) is BASELINES[name] and model.name == name and model.in_channels == cfg.model.in_channels
    if name in EXACT:
        assert count_parameters(model) == EXACT[name]  # experiment=paper: the published architecture


class FrameCNN(VideoModel):
    """A new baseline: every frame alone through two convs, added to it (feedforward, streamable)."""

    name = "framecnn"
    memory = 1

    def __init__(self, task: str = "denoise", in_channels: int = 3, channels: int = 16):
        super().__init__()
        self.task, self.in_channels = task, in_channels
        self.body = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, in_channels, 3, padding=1))

    def initial_state(self, x: torch.Tensor) -> dict:
        return {}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        return frame + self.body(frame), state


def test_a_new_baseline_is_one_class_and_one_config_file(compose, tmp_path):
    """The class above and conf/model/framecnn.yaml (written into a search-path folder of the test, as a user's
    package adds its own conf/): `model=framecnn` takes the run's width, composes with experiment=paper (whose init
    it does not have), trains under debug=smoke and loads from its checkpoint. Nothing is registered."""
    (tmp_path / "plugin" / "model").mkdir(parents=True)
    (tmp_path / "plugin" / "model" / "framecnn.yaml").write_text(
        f"_target_: {__name__}.FrameCNN\ntask: ${{task.name}}\nin_channels: 3\nchannels: ${{width}}\n")
    chosen = [f"hydra.searchpath=[file://{tmp_path / 'plugin'}]", "model=framecnn", "logger=csv"]
    paper = hydra.utils.instantiate(compose("train", [*chosen, "experiment=paper"]).model, _convert_="all")
    assert isinstance(paper, FrameCNN) and paper.body[0].out_channels == 64
    cfg = compose("train", [*chosen, "debug=smoke"], output_dir=tmp_path / "run")
    assert cfg.run_name == "framecnn-feat-denoise-none"
    metrics = run_training(cfg)
    assert math.isfinite(metrics["test/psnr_mean"])
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt",
                                                         map_location="cpu")
    assert isinstance(module.model, FrameCNN) and module.model.body[0].out_channels == 8  # debug=smoke's width


def test_a_checkpoint_of_an_older_baseline_config_loads(compose, tmp_path):
    """Before the baselines had configs of their own, a checkpoint's model config was
    `{_target_: recstab.models.build_model, backbone: frvsr, ...}` (with experiment=paper's `init: he`): it still
    builds the same model, and today's `model=frvsr` accepts it as the model it configures."""
    old = {"_target_": "recstab.models.build_model", "backbone": "frvsr", "task": "denoise", "in_channels": 3,
           "channels": 8, "init": "he"}
    module = VideoRestorationModule(model=old)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    loaded = VideoRestorationModule.load_from_checkpoint(path, map_location="cpu").eval()
    assert type(loaded.model) is FRVSR and loaded.hparams.model == old
    x = clip(t=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.eval()(x))
    today = compose("train", ["model=frvsr", "model.channels=8"]).module
    check_checkpoint(path, OmegaConf.to_container(today, resolve=True))  # no "holds another model"


@pytest.mark.skipif(importlib.util.find_spec("bm3d") is None,
                    reason="the PyPI package 'bm3d' is not installed (pip install 'recstab[baselines]')")
def test_bm3d_improves_psnr():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    clean = torch.stack([0.5 + 0.3 * torch.sin(6 * xx), 0.5 + 0.3 * torch.cos(5 * yy), 0.3 + 0.4 * xx * yy])
    clean = clean[None, None]  # 1×1×3×32×32
    noisy = clean + 30 / 255 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    model = build_model("bm3d")
    assert count_parameters(model) == 0 and not model.is_recurrent and model.streamable
    denoised = model(noisy)
    assert denoised.shape == noisy.shape and denoised.dtype == noisy.dtype
    psnr = lambda a: float(-10 * torch.log10(((a - clean) ** 2).mean()))  # noqa: E731
    assert psnr(denoised) > psnr(noisy) + 5, (psnr(noisy), psnr(denoised))
