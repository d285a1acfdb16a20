"""Every table and figure of the paper is a sweep in sweeps/: paper rows, composition, smoke runs.

The smoke runs (`python src/train.py -m sweep=<name> debug=smoke`) come from the session fixture
``smoke_sweep`` of conftest.py, shared with tests/test_report.py: each sweep runs once per session.
"""

import json
import math
import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recstab.report.rows import GROUPS, matches
from recstab.report.tables import COLUMNS, Run, load_paper

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"table1": 10, "table2": 6, "table3": 9, "table4": 4, "table5": 3, "table6": 5, "table7": 8, "table8": 4,
        "fig7": 8, "fig9": 3, "fig12": 7}
SWEEPS = list(RUNS)
ALL_SWEEPS = [*SWEEPS, "laptop", "certified"]  # with the CPU-scale sweeps (tests/test_laptop.py, test_certified.py)
EVALUATION = {"table7", "fig12"}           # sweeps over one trained checkpoint (train=false ckpt_path=...)
SCALE = {"table8": "appendix_g"}            # the experiment= that gives a sweep the paper's scale


def conv_params(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + c_out  # a 3x3 conv with bias


def paper_model_params(backbone: str, recurrence: str, c: int, depth: int | None = None, image: int = 3) -> int:
    """Parameters of a VDnCNN / VResNet by the arithmetic of section 3.1: head conv, blocks, tail conv.

    frame-recurrence feeds the previous output frame to the head, RLSP the previous hidden features;
    feature-recurrence feeds each block its own previous output (c more input channels per block).
    """
    head_in = image + {"none": 0, "frame": image, "rlsp": c, "feat": 0}[recurrence]
    side = c if recurrence == "feat" else 0
    if backbone == "vdncnn":
        blocks = (depth or 10) * conv_params(c + side, c)
    else:
        blocks = (depth or 5) * (conv_params(c + side, c) + conv_params(c, c))
    return conv_params(head_in, c) + blocks + conv_params(c, image)


# ------------------------------------------------------------------------------------- files
def test_conf_sweep_is_the_sweeps_folder():
    link = ROOT / "conf" / "sweep"
    assert link.is_symlink() and os.readlink(link) == "../sweeps"
    # every table and figure of the paper, the laptop sweep (tests/test_laptop.py) and the certified trade-off
    assert {p.stem for p in (ROOT / "sweeps").glob("*.yaml")} == set(SWEEPS) | {"laptop", "certified"}


@pytest.mark.parametrize("name", SWEEPS)
def test_paper_rows_are_transcribed(name):
    paper = load_paper(name)
    assert paper["title"] and paper["rows"]
    for column in paper["columns"]:
        assert column in COLUMNS or re.fullmatch(r"psnr_\d+", column), column
    for row in paper["rows"]:
        assert row["name"] and (row["identity"] is not None or row["not_run"]), row
        keys = {k for k in row if "." not in k} - {"name", "note", "not_run", "row", "identity", *GROUPS}
        assert keys <= set(paper["columns"]), f"{row['name']}: unknown column"
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


@pytest.mark.parametrize("name", ALL_SWEEPS)
def test_every_row_derives_its_identity_from_conf(name):
    """Each paper row names its runs (no hand-written match): an existing option of every identity group, the
    values its row file sets, and no two rows of a table alike (one of them could never get a run)."""
    rows = load_paper(name)["rows"]
    assert not any("match" in row for row in rows)
    for row in rows:
        identity = row["identity"]
        if row.get("not_run"):  # Table 1's VNLB: no run of ours
            assert identity is None and name == "table1"
            continue
        assert set(identity.choices) == set(GROUPS)
        for group, option in identity.choices.items():
            assert (ROOT / "conf" / group / f"{option}.yaml").is_file(), (row["name"], group, option)
        if "row" in row:
            file = OmegaConf.load(ROOT / "conf" / "row" / f"{row['row']}.yaml")
            assert identity.row == file.row
            for entry in file.get("defaults", []):  # `override /norm: srnc` -> norm: srnc
                (key, option), = entry.items()
                assert identity.choices[key.split("/")[-1]] == option, (row["name"], key)
            assert all(OmegaConf.select(file, key) == value for key, value in identity.row_values.items())
        else:
            assert identity.row is None and (identity.pinned or any(g in row for g in GROUPS)), row["name"]
    keys = [(sorted(i.choices.items()), i.row, sorted(i.row_values.items()), sorted(i.pinned.items()))
            for i in (row["identity"] for row in rows) if i is not None]
    assert len({repr(k) for k in keys}) == len(keys)


def test_identities_come_from_train_yaml_the_sweep_and_the_row_file():
    t3 = {r["name"]: r["identity"] for r in load_paper("table3")["rows"]}
    soft = t3["SRN-C α=2.0 β=0.1"]
    assert soft.choices == {"model": "vresnet", "recurrence": "feat", "norm": "srnc", "task": "denoise"}
    assert soft.row_values == {"norm.alpha": 2.0, "norm.beta": 0.1} and soft.row == "srnc_2.0_0.1"
    laptop = {r["name"]: r["identity"] for r in load_paper("laptop")["rows"]}
    assert laptop["SRN-C α=2.0 β=0.1 (Soft)"].choices["recurrence"] == "rlsp"  # the sweep's override /recurrence
    t5 = {r["name"]: r["identity"] for r in load_paper("table5")["rows"]}
    assert t5["No Constraint"].choices == {"model": "vresnet", "recurrence": "feat", "norm": "none", "task": "sr2"}
    t1 = {r["name"]: r["identity"] for r in load_paper("table1")["rows"]}
    assert t1["FastDVDnet"].choices["model"] == "fastdvdnet" and t1["VDnCNN-RLSP"].choices["recurrence"] == "rlsp"
    fig7 = {r["name"]: r["identity"] for r in load_paper("fig7")["rows"]}
    assert fig7["VResNet-BiRLSP-mf7"].choices == {"model": "vresnet", "recurrence": "birlsp-mf7", "norm": "none",
                                                  "task": "denoise"}
    t7 = {r["name"]: r["identity"] for r in load_paper("table7")["rows"]}
    assert t7["λ = 0.65"].pinned == {"module.dampening": 0.65} and t7["λ = 0.65"].choices["norm"] == "none"
    cert = {r["name"]: r["identity"] for r in load_paper("certified")["rows"]}
    assert cert["certified ρ=0.5, base=null"].pinned == {"norm.base": None}
    assert cert["certified ρ=0.5, base=null"].specificity > cert["certified ρ=0.5"].specificity


# ------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_composes_and_fills_exactly_one_paper_row(name, compose, sweep_jobs):
    """Each job of the sweep composes (under debug=smoke) and matches one and only one row of the paper."""
    extra = ["ckpt_path=/x/last.ckpt"] if name in EVALUATION else []
    cfg = compose("train", [f"sweep={name}", "debug=smoke", *extra])
    assert cfg.group == name and list(cfg.tags) == [name] and cfg.task_name == name
    assert cfg.logger.wandb.group == name and list(cfg.logger.wandb.tags) == [name]
    assert cfg.callbacks.measure._target_ == "recstab.report.TableMeasurements"
    job_list = sweep_jobs(cfg)
    assert len(job_list) == RUNS[name]
    rows = load_paper(name)["rows"]
    names = set()
    for overrides in job_list:
        job = compose("train", [f"sweep={name}", "debug=smoke", *extra, *overrides])
        run = Run(Path("."), job, {}, " ".join(overrides))  # its choices: job.hydra.runtime.choices
        hits = [r["name"] for r in rows if r["identity"] is not None and matches(run, r["identity"])]
        assert len(hits) == 1, f"{overrides} matches {hits}"
        names.add(hits[0])
        assert job.trainer.max_steps == 3  # debug=smoke still applies
    assert len(names) == RUNS[name]


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_composes_at_the_papers_scale(name, compose, sweep_jobs):
    scale = SCALE.get(name, "paper")
    cfg = compose("train", [f"sweep={name}", f"experiment={scale}", "ckpt_path=/x/last.ckpt"])
    first = compose("train", [f"sweep={name}", f"experiment={scale}", "ckpt_path=/x/last.ckpt", *sweep_jobs(cfg)[0]])
    assert first.trainer.accelerator == "gpu"
    assert first.trainer.max_steps == (300000 if name == "table8" else 600000)
    assert first.diagnostics.name == "paper" and first.callbacks.measure.diagnostics == first.diagnostics
    assert first.diagnostics.trf is None or first.diagnostics.trf.iters == 500
    if first.model.get("backbone") in ("vdncnn", "vresnet"):  # the baselines have no backbone key
        assert first.model.channels in (64, 45) and first.model.init == "he"
    if name == "table5":
        assert first.task.name == "sr2" and first.task.sigma == 0
    if name in EVALUATION:
        assert first.train is False


def test_table6_rows_constrain_the_loop_only(compose, sweep_jobs):
    cfg = compose("train", ["sweep=table6"])
    for overrides in sweep_jobs(cfg):
        norm = compose("train", ["sweep=table6", *overrides]).norm
        assert (norm.name, norm.alpha, norm.loop_only) == ("srnc", 3.0, True)


def test_evaluation_sweeps_require_a_checkpoint(compose):
    for name in EVALUATION:
        cfg = compose("train", [f"sweep={name}", "debug=smoke"])
        assert cfg.train is False and cfg.ckpt_path is None and cfg.callbacks.measure.require_checkpoint is True


@pytest.mark.parametrize("row,backbone,recurrence,paper_k", [
    ("vdncnn_frame", "vdncnn", "frame", 375), ("vdncnn_feat", "vdncnn", "feat", 741),
    ("vdncnn_rlsp", "vdncnn", "rlsp", 410), ("vresnet_frame", "vresnet", "frame", 375),
    ("vresnet_feat", "vresnet", "feat", 557), ("vresnet_rlsp", "vresnet", "rlsp", 410),
])
def test_table1_rows_build_the_papers_models(compose, row, backbone, recurrence, paper_k):
    """`experiment=paper row=<row>` instantiates the model of Table 1: its exact size by the arithmetic of
    section 3.1, and Table 1's rounded count."""
    from hydra.utils import instantiate

    cfg = compose("train", ["experiment=paper", f"row={row}"])
    model = instantiate(cfg.model)
    count = sum(p.numel() for p in model.parameters())
    assert count == paper_model_params(backbone, recurrence, 64)
    assert round(count / 1000) == paper_k


@pytest.mark.slow
def test_evaluation_sweep_without_checkpoint_fails_loudly(tmp_path, run_script):
    """An evaluation job without ckpt_path fails (recorded in failed.json) instead of testing an untrained model."""
    result = run_script("train.py", ["-m", "sweep=table7", "debug=smoke", "module.dampening=0.5",
                                     f"hydra.sweep.dir={tmp_path}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]  # the sweep itself goes on
    failed = json.loads(next(tmp_path.glob("*/failed.json")).read_text())
    assert "pass ckpt_path=" in failed["error"]
    assert not list(tmp_path.glob("*/measurements.json"))


# ------------------------------------------------------------------------------------- smoke runs
@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS[::-1])  # back to front: under xdist, test_report.py's worker starts at the front
def test_whole_sweep_runs_under_smoke(name, smoke_sweep):
    out = smoke_sweep(name)
    runs = sorted(p for p in out.iterdir() if (p / ".hydra" / "config.yaml").is_file())
    assert len(runs) == RUNS[name]
    for run in runs:
        assert (run / "metrics.json").is_file() and not (run / "failed.json").exists(), run
        measured = json.loads((run / "measurements.json").read_text())
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert config.group == name and list(config.tags) == [name]
        metrics = measured["metrics"]
        m = config.model
        if m.get("backbone") in ("vdncnn", "vresnet") and config.recurrence.name in ("frame", "feat", "rlsp") \
                and config.task.name == "denoise":
            assert metrics["params/count"] == paper_model_params(m.backbone, config.recurrence.name, m.channels,
                                                                 m.depth, m.in_channels)
        if name == "table1":
            assert metrics["speed/fps"] > 0
        if name in ("table2", "table3", "table5", "table6", "table7", "table8"):
            assert {"stability/trf_unbounded", "long/onset_d1", "long/onset_d9", "spectra/sigma1_mean"} <= set(metrics)
        if name in ("fig9", "fig12"):
            assert "long/onset_d1" in metrics and (run / "measure" / "long_psnr.npy").is_file()
        if name == "table4":
            assert "test/lpips_7" in json.loads((run / "metrics.json").read_text())
        norm = config.norm
        if norm.name == "srnc" and not norm.get("loop_only") and config.diagnostics.spectra_n is not None:
            # SRN-C holds every conv's operator norm at alpha
            assert math.isclose(metrics["spectra/sigma1_max"], norm.alpha, rel_tol=0.05)


@pytest.mark.slow
def test_table7_dampening_reaches_the_model_tested_from_a_checkpoint(smoke_sweep):
    """train=false ckpt_path=... module.dampening=λ: the λ of the config is the one tested and diagnosed."""
    out = smoke_sweep("table7")
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
def test_each_job_finishes_its_own_wandb_run(tmp_path, run_script):
    """Offline W&B: one run per job (a job that left its run open would make the next one reuse it)."""
    result = run_script("train.py", ["-m", "sweep=table8", "data.frames=3,4", "debug=smoke",
                                     f"hydra.sweep.dir={tmp_path}", "diagnostics.trf=null",
                                     "diagnostics.onsets=null"],
                        tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 2  # two jobs, two run ids
    for run in runs:
        data = b"".join(f.read_bytes() for f in run.glob("*.wandb"))
        assert b"table8" in data
