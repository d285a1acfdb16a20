"""The config grammar: the model node is a class (or build_model) and its arguments, the norm its own group,
the run's scale (width, init) reaches every model, rows are a group, diagnose composes the groups of training,
--help and --cfg job stay readable."""

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
ROWS = sorted(p.stem for p in (CONF / "row").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
BACKBONES = ("vdncnn", "vresnet")  # build_model configs; the other models' configs name their class


def diagnose_cli():
    spec = importlib.util.spec_from_file_location("diagnose_cli", CONF.parent / "src" / "diagnose.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_help_lists_the_groups(tmp_path, run_script):
    result = run_script("train.py", ["--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("python src/train.py [group=option ...]")  # our usage header, not Hydra's
    for group in ("model:", "norm:", "row:", "experiment:", "long_video:", "sweep:"):
        assert f"\n{group} " in result.stdout  # "== Configuration groups ==" lists each with its options
    assert "srnc_3.0_0.05_loop" in result.stdout and "appendix_g, bm3d, fig2, paper" in result.stdout


def test_cfg_job_of_a_paper_row(tmp_path, run_script):
    """`--cfg job` of `experiment=paper row=srnc_2.0_0.1`: the norm group holds the row's norm, the module gets it."""
    result = run_script("train.py", ["experiment=paper", "row=srnc_2.0_0.1", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model._target_ == "recstab.models.build_model" and cfg.model.init == "he"
    assert (cfg.norm._target_, cfg.norm.alpha, cfg.norm.beta) == ("recstab.norms.SRNC", 2.0, 0.1)
    assert (cfg.row, cfg.model.channels, cfg.trainer.max_steps) == ("srnc_2.0_0.1", 64, 600000)
    assert cfg.module.norm == cfg.norm and "norm" not in cfg.model  # one place for the norm: the norm group


def test_default_model_config(compose):
    cfg = compose("train", [])
    assert cfg.model.init == "near_identity" and cfg.norm.name == "none"
    assert cfg.module.model == cfg.model and cfg.module.norm == cfg.norm and cfg.module._recursive_ is False
    assert cfg.callbacks.stability.long_video == cfg.long_video  # one long-video stream, one group
    assert cfg.callbacks.stability.diagnostics == cfg.diagnostics and cfg.diagnostics.name == "cpu"  # one spec


def test_paper_experiments_use_he_init(compose):
    assert compose("train", ["experiment=paper"]).model.init == "he"
    assert compose("train", ["experiment=appendix_g"]).model.init == "he"
    assert compose("diagnose", ["experiment=fig2"]).model.init == "he"


def test_norm_values_are_set_as_the_user_types_them(compose, tmp_path):
    cfg = compose("train", ["model=vresnet", "recurrence=feat", "norm=srnc", "norm.alpha=2", "norm.beta=0.1"],
                  output_dir=tmp_path)  # the Hydra runtime: run_name reads the model group's choice from it
    assert (cfg.norm.name, cfg.norm.alpha, cfg.norm.beta, cfg.norm.n) == ("srnc", 2, 0.1, 64)
    assert cfg.run_name == "vresnet-feat-denoise-srnc"
    with pytest.raises(Exception, match="norm.alfa"):  # a misspelt key is refused, not silently ignored
        compose("train", ["norm=srnc", "norm.alfa=0.5"])


def test_a_row_overrides_the_experiment_and_a_value_the_row(compose):
    cfg = compose("train", ["experiment=appendix_g", "row=srnc_1.0_1.0", "norm.beta=0.5"])
    assert (cfg.model.backbone, cfg.model.depth, cfg.norm.name, cfg.norm.alpha, cfg.norm.beta) \
        == ("vdncnn", 1, "srnc", 1.0, 0.5)


@pytest.mark.parametrize("row", ROWS)
def test_every_row_is_a_single_run_at_the_papers_scale(compose, row):
    cfg = compose("train", ["experiment=paper", f"row={row}"])
    assert cfg.row == row and cfg.data._target_.endswith("Vimeo90kDataModule")
    name = row.removesuffix("_loop")
    if name.startswith(("srnc_", "srn_")):
        kind, alpha, beta = name.split("_")
        assert (cfg.norm.name, cfg.norm.alpha, cfg.norm.beta) == (kind, float(alpha), float(beta))
        assert cfg.norm.get("loop_only", False) is row.endswith("_loop")
    elif name.startswith("certified_"):
        assert (cfg.norm.name, cfg.norm.rho) == ("certified", float(name.split("_")[1]))
    elif row in ("vdncnn_frame", "vdncnn_feat", "vdncnn_rlsp", "vresnet_frame", "vresnet_feat", "vresnet_rlsp"):
        assert f"{cfg.model.backbone}_{cfg.recurrence.name}" == row and cfg.norm.name == "none"
    elif row in ("fastdvdnet", "frvsr", "dbdnet", "bm3d"):
        assert cfg.hydra.runtime.choices.model == row and get_object(cfg.model._target_).name == row
    else:
        assert cfg.norm.name == "none"  # unconstrained, and Fig. 9's burst rows


@pytest.mark.parametrize("scale,width,init", [([], 32, "near_identity"), (["experiment=paper"], 64, "he"),
                                              (["debug=smoke"], 8, "near_identity")])
@pytest.mark.parametrize("model", MODELS)
def test_every_model_takes_the_runs_scale_and_only_its_own_arguments(compose, model, scale, width, init):
    """`model=<m>`, `experiment=paper model=<m>`, `model=<m> debug=smoke` for every model: the shared overrides reach
    the knobs a model has (width -> channels, init) and no other, so every key is an argument of its class."""
    cfg = compose("train", [f"model={model}", *scale])
    config = OmegaConf.to_container(cfg.model, resolve=True)
    target = get_object(config.pop("_target_"))
    assert set(config) <= set(inspect.signature(target).parameters), f"{model}: not arguments of {target}"
    if model == "bm3d":
        pytest.importorskip("bm3d")
        assert "channels" not in config and "init" not in config  # BM3D has neither: the scale passes it by
    else:
        assert config["channels"] == width
        assert config["init"] == init if model in BACKBONES else "init" not in config  # baselines: He-initialised
    built = instantiate(cfg.model, _convert_="all")
    assert built.task == "denoise" and built.in_channels == 3
    assert (built.backbone_name if model in BACKBONES else built.name) == model


@pytest.mark.parametrize("model", BACKBONES)
def test_the_backbones_take_their_norm(compose, model):
    cfg = compose("train", [f"model={model}", "norm=srnc", "norm.n=8", "model.channels=4"])
    built = instantiate(cfg.norm)(instantiate(cfg.model, _convert_="all"))
    assert built.channels == 4 and built.backbone_name == model
    assert any("parametrizations" in name for name, _ in built.named_parameters())  # the norm applied


@pytest.mark.parametrize("model", MODELS)
def test_run_name_and_report_name_say_the_chosen_model(compose, tmp_path, model):
    cfg = compose("train", [f"model={model}", "debug=smoke"], output_dir=tmp_path)
    assert cfg.run_name == f"{model}-feat-denoise-none"
    assert cfg.logger.wandb.name == cfg.run_name
    saved = {"model": OmegaConf.to_container(cfg.model, resolve=True), "norm": {"name": "none"}}
    if isinstance(saved["model"].get("recurrence"), dict):
        saved["model"]["recurrence"] = {"name": "feat"}
    expected = f"{model}-feat-denoise-none-8ch" if model in BACKBONES else \
        f"{model}-denoise-none" + ("" if model == "bm3d" else "-8ch")
    assert diagnose_cli().checkpoint_name(saved) == expected  # what src/diagnose.py ckpt_path=... names its report


def test_diagnose_composes_the_training_groups(compose, tmp_path):
    """`src/diagnose.py experiment=paper row=...` builds the very model `src/train.py` would train."""
    train = compose("train", ["experiment=paper", "row=srnc_2.0_0.1"])
    diagnose = compose("diagnose", ["experiment=paper", "row=srnc_2.0_0.1"], output_dir=tmp_path)
    assert OmegaConf.to_container(diagnose.model, resolve=True) == OmegaConf.to_container(train.model, resolve=True)
    assert diagnose.mode == "report" and diagnose.task_name == "diagnose" and diagnose.name == "vresnet-feat-denoise-srnc"
    assert diagnose.long_video == train.long_video


@pytest.mark.parametrize("model", MODELS)
def test_diagnose_resolves_for_every_model(compose, tmp_path, model):
    """The whole diagnose config resolves (its W&B run records it) whatever the model; Figure 2 needs a backbone."""
    cfg = compose("diagnose", [f"model={model}", "debug=smoke"], output_dir=tmp_path)
    assert OmegaConf.to_container(cfg, resolve=True)["name"] == f"{model}-feat-denoise-none"
    fig2 = compose("diagnose", [f"model={model}", "experiment=fig2"], output_dir=tmp_path)
    if model in BACKBONES:
        assert (fig2.name, fig2.fig2.backbone, fig2.fig2.channels) == (f"fig2-{model}", model, 64)
        assert fig2.model.init == "he"
    else:
        with pytest.raises(ValueError, match="model=vresnet or model=vdncnn"):
            diagnose_cli().run_fig2(fig2, tmp_path)


def test_diagnose_builds_the_configured_model(compose):
    cli = diagnose_cli()
    cfg = compose("diagnose", ["row=srnc_1.0_1.0", "model.channels=4", "norm.n=8", "device=cpu"])
    model = cli.load_model(cfg)
    conv = model.body.head
    # SRN-C alpha=1 on an 8x8 circular map, refreshed: the exact operator norm of the head conv is 1
    w = conv.weight.detach()
    spectrum = torch.fft.fft2(torch.nn.functional.pad(w, (0, 8 - 3, 0, 8 - 3)), dim=(-2, -1))
    sigma = torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max()
    assert float(sigma) == pytest.approx(1.0, rel=1e-2)
