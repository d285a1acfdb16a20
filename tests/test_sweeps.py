"""Every table and figure of the paper is a sweep in sweeps/: header, paper rows, composition, smoke run.

The smoke runs are shared with tests/test_report.py through :func:`smoke_sweep` (each sweep runs once
per session, as `python src/train.py -m sweep=<name> debug=smoke hydra.sweep.dir=<tmp>`).
"""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recstab.report.tables import COLUMNS, Run, load_paper, matches

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
RUNS = {"table1": 10, "table2": 6, "table3": 9, "table4": 4, "table5": 3, "table6": 5, "table7": 8, "table8": 4,
        "fig7": 8, "fig9": 3, "fig12": 7}
SWEEPS = list(RUNS)
EVALUATION = {"table7", "fig12"}           # sweeps over one trained checkpoint (train=false ckpt_path=...)
SCALE = {"table8": "appendix_g"}            # the experiment= that gives a sweep the paper's scale
ENV = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}  # 1 thread: tiny convs are ~500x faster on a busy CPU


def jobs(cfg) -> list[list[str]]:
    """The job overrides of cfg.hydra.sweeper.params (comma lists, Cartesian product), as the basic sweeper makes them."""
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    axes = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(combo) for combo in itertools.product(*axes)]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


# ------------------------------------------------------------------------------------- files
def test_conf_sweep_is_the_sweeps_folder():
    link = ROOT / "conf" / "sweep"
    assert link.is_symlink() and os.readlink(link) == "../sweeps"
    assert {p.stem for p in (ROOT / "sweeps").glob("*.yaml")} == set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_names_table_command_and_runs(name):
    text = (ROOT / "sweeps" / f"{name}.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_"
    what = name.replace("table", "Table ").replace("fig", "Figure ")
    assert what in lines[1], f"line 2 must name the paper's {what}: {lines[1]!r}"
    assert f"python src/train.py -m sweep={name}" in text and f"python src/report.py sweep={name}" in text
    assert re.search(rf"^# Runs: {RUNS[name]}\b", text, re.M), f"header must say 'Runs: {RUNS[name]}'"
    assert "GPU hours" in text


@pytest.mark.parametrize("name", SWEEPS)
def test_paper_rows_are_transcribed(name):
    paper = load_paper(name)
    assert paper["title"] and paper["rows"]
    for column in paper["columns"]:
        assert column in COLUMNS or re.fullmatch(r"psnr_\d+", column), column
    for row in paper["rows"]:
        assert row["name"] and row["match"], row
        assert set(row) - {"name", "match", "note"} <= set(paper["columns"]), f"{row['name']}: unknown column"
    if name.startswith("table"):  # the tables have numbers; the figures only curves
        assert all(isinstance(r.get("psnr_7", r.get("psnr_1")), float) for r in paper["rows"] if r["name"] != "VNLB")


def test_some_transcribed_numbers():
    t3 = {r["name"]: r for r in load_paper("table3")["rows"]}
    assert (t3["SRN-C α=2.0 β=0.2"]["psnr_7"], t3["SRN-C α=2.0 β=0.2"]["onset_d1"], t3["SRN-C α=2.0 β=0.2"]["onset_d9"]) \
        == (35.63, 26, 110)
    assert t3["SRN-C α=2.0 β=0.1"]["onset_d1"] == float("inf")
    t7 = {r["name"]: r for r in load_paper("table7")["rows"]}
    assert t7["λ = 0.65"]["onset_d9"] == 38097
    t1 = {r["name"]: r for r in load_paper("table1")["rows"]}
    assert (t1["FRVSR"]["psnr_1"], t1["FRVSR"]["psnr_7"], t1["FRVSR"]["psnr_mean"]) == (34.63, 36.83, 36.24)
    t8 = {r["name"]: r for r in load_paper("table8")["rows"]}
    assert t8["56 frames"]["onset_d9"] == 12356


# ------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_composes_and_fills_exactly_one_paper_row(name):
    """Each job of the sweep composes (under debug=smoke) and matches one and only one row of the paper."""
    extra = ["ckpt_path=/x/last.ckpt"] if name in EVALUATION else []
    cfg = compose_cfg([f"sweep={name}", "debug=smoke", *extra])
    assert cfg.group == name and list(cfg.tags) == [name] and cfg.task_name == name
    assert cfg.logger.wandb.group == name and list(cfg.logger.wandb.tags) == [name]
    assert cfg.callbacks.measure._target_ == "recstab.report.TableMeasurements"
    job_list = jobs(cfg)
    assert len(job_list) == RUNS[name]
    rows = load_paper(name)["rows"]
    names = set()
    for overrides in job_list:
        job = compose_cfg([f"sweep={name}", "debug=smoke", *extra, *overrides])
        run = Run(Path("."), job, {}, str(job.run_name))
        hits = [r["name"] for r in rows if matches(run, r["match"])]
        assert len(hits) == 1, f"{overrides} matches {hits}"
        names.add(hits[0])
        assert job.trainer.max_steps == 3  # debug=smoke still applies
    assert len(names) == RUNS[name]


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_composes_at_the_papers_scale(name):
    scale = SCALE.get(name, "paper")
    cfg = compose_cfg([f"sweep={name}", f"experiment={scale}", "ckpt_path=/x/last.ckpt"])
    first = compose_cfg([f"sweep={name}", f"experiment={scale}", "ckpt_path=/x/last.ckpt", *jobs(cfg)[0]])
    assert first.model.channels in (64, 45) and first.trainer.accelerator == "gpu"
    assert first.trainer.max_steps == (300000 if name == "table8" else 600000)
    assert first.callbacks.measure.trf is None or first.callbacks.measure.trf.iters == 500
    if name == "table5":
        assert first.task.name == "sr2" and first.task.sigma == 0
    if name in EVALUATION:
        assert first.train is False


def test_evaluation_sweeps_require_a_checkpoint():
    for name in EVALUATION:
        cfg = compose_cfg([f"sweep={name}", "debug=smoke"])
        assert cfg.train is False and cfg.ckpt_path is None and cfg.callbacks.measure.require_checkpoint is True


@pytest.mark.slow
def test_evaluation_sweep_without_checkpoint_fails_loudly(tmp_path):
    result = run_cli([str(ROOT / "src" / "train.py"), "-m", "sweep=table7", "debug=smoke", "module.dampening=0.5",
                      f"hydra.sweep.dir={tmp_path}"], tmp_path)
    assert result.returncode != 0 and "pass ckpt_path=" in result.stderr
    assert not list(tmp_path.glob("*/measurements.json"))


def test_every_paper_model_has_an_experiment_config():
    experiments = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    needed = {"vdncnn_frame", "vdncnn_feat", "vdncnn_rlsp", "vresnet_frame", "vresnet_feat", "vresnet_rlsp",
              "fastdvdnet", "frvsr", "dbdnet", "bm3d", "vresnet_feat_srn_1.0_1.0", "vresnet_feat_srnc_2.0_0.1",
              "vresnet_feat_srnc_3.0_0.025", "vresnet_feat_sr2_srnc_2.0_0.05", "vdncnn1_feat_grey_56f",
              "vresnet_birlsp_mf7", "vresnet_feat_half"}
    assert needed <= set(experiments)
    cfg = compose_cfg(["experiment=vresnet_feat_srnc_2.0_0.1"])
    assert (cfg.norm.kind, cfg.norm.alpha, cfg.norm.beta, cfg.data.batch_size, cfg.data.crop, cfg.trainer.max_steps,
            cfg.task.sigma, cfg.model.channels) == ("srnc", 2.0, 0.1, 32, 64, 600000, 30, 64)
    assert cfg.data._target_.endswith("Vimeo90kDataModule")
    cfg = compose_cfg(["experiment=vdncnn1_feat_grey_28f"])
    assert (cfg.model.depth, cfg.model.in_channels, cfg.data.crop, cfg.data.frames, cfg.task.sigma,
            cfg.trainer.max_steps) == (1, 1, 32, 28, 20, 300000)


# ------------------------------------------------------------------------------------- smoke runs
_DONE: dict = {}


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke_sweeps")


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})


def smoke_checkpoint(root: Path) -> Path:
    """A VResNet-feat trained for 3 steps (what the evaluation sweeps evaluate)."""
    ckpt = root / "vresnet_feat" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        result = run_cli([str(ROOT / "src" / "train.py"), "debug=smoke", "logger=csv",
                          f"hydra.run.dir={root / 'vresnet_feat'}"], root)
        assert result.returncode == 0, result.stderr[-3000:]
    return ckpt


def smoke_sweep(name: str, root: Path) -> Path:
    """Run `python src/train.py -m sweep=<name> debug=smoke` once per session; return its sweep dir."""
    if name not in _DONE:
        out = root / name
        extra = [f"ckpt_path={smoke_checkpoint(root)}"] if name in EVALUATION else []
        result = run_cli([str(ROOT / "src" / "train.py"), "-m", f"sweep={name}", "debug=smoke",
                          f"hydra.sweep.dir={out}", *extra], root)
        assert result.returncode == 0, result.stderr[-4000:]
        _DONE[name] = out
    return _DONE[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_whole_sweep_runs_under_smoke(name, smoke_root):
    out = smoke_sweep(name, smoke_root)
    runs = sorted(p for p in out.iterdir() if (p / ".hydra" / "config.yaml").is_file())
    assert len(runs) == RUNS[name]
    for run in runs:
        assert (run / "metrics.json").is_file(), run
        measured = json.loads((run / "measurements.json").read_text())
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert config.group == name and list(config.tags) == [name]
        metrics = measured["metrics"]
        assert metrics["params/count"] >= 0
        if name == "table1":
            assert metrics["speed/fps"] > 0
        if name in ("table2", "table3", "table5", "table6", "table7", "table8"):
            assert {"stability/trf_unbounded", "long/onset_d1", "long/onset_d9", "spectra/sigma1_mean"} <= set(metrics)
        if name in ("fig9", "fig12"):
            assert "long/onset_d1" in metrics and (run / "measure" / "long_psnr.npy").is_file()
        if name == "table4":
            assert "test/lpips_7" in json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_table7_dampening_reaches_the_model_tested_from_a_checkpoint(smoke_root):
    """train=false ckpt_path=... module.dampening=λ: the λ of the config is the one tested and diagnosed."""
    out = smoke_sweep("table7", smoke_root)
    by_lambda = {}
    for run in out.iterdir():
        if not (run / "measurements.json").is_file():
            continue
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        measured = json.loads((run / "measurements.json").read_text())["metrics"]
        assert measured["eval/dampening"] == float(config.module.dampening)
        by_lambda[float(config.module.dampening)] = (json.loads((run / "metrics.json").read_text()), measured)
    assert len(by_lambda) == 8
    assert by_lambda[1.0][0]["test/psnr_mean"] != by_lambda[0.0][0]["test/psnr_mean"]  # the output changed
    assert by_lambda[0.0][1]["stability/trf_unbounded"] == 0.0  # λ = 0 cuts the feedback: a feedforward model
    # the same trained weights for every λ
    assert len({round(m["spectra/sigma1_mean"], 6) for _, m in by_lambda.values()}) == 1


@pytest.mark.slow
def test_each_job_finishes_its_own_wandb_run(tmp_path):
    """Offline W&B: one run per job (a job that left its run open would make the next one reuse it)."""
    result = run_cli([str(ROOT / "src" / "train.py"), "-m", "sweep=table8", "debug=smoke",
                      f"hydra.sweep.dir={tmp_path}", "callbacks.measure.trf=null", "callbacks.measure.onsets=null"],
                     tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(runs) == RUNS["table8"] and len({p.name.rsplit("-", 1)[1] for p in runs}) == RUNS["table8"]
    for run in runs:
        data = b"".join(f.read_bytes() for f in run.glob("*.wandb"))
        assert b"table8" in data
