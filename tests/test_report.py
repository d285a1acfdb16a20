"""src/report.py: runs -> the paper's table with our numbers beside the paper's (Markdown, CSV, figure)."""

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recstab.report.tables import Run, build_table, collect_runs, load_paper, render_markdown, report, write_csv

SWEEPS = ["table1", "table2", "table3", "table4", "table5", "table6", "table7", "table8", "fig7", "fig9", "fig12"]

PAPER = {"title": "T", "columns": ["psnr_7", "onset_d1", "onset_d9", "trf", "stable"],  # no sweep file: train.yaml's groups
         "notes": ["a note"],
         "rows": [{"name": "A", "norm": "srnc", "norm.alpha": 2.0, "psnr_7": 35.59,
                   "onset_d1": math.inf, "onset_d9": math.inf, "trf": "bounded", "stable": True},
                  {"name": "B", "norm": "none", "psnr_7": 35.74, "onset_d1": 29, "onset_d9": 75}]}


def fake_run(kind, alpha, metrics, name="r", failure=None):
    """A VResNet-feat denoising run with norm ``kind`` (no hydra.yaml: matched on its config's names)."""
    config = OmegaConf.create({"model": {"backbone": "vresnet"}, "recurrence": {"name": "feat"},
                               "task": {"name": "denoise"}, "norm": {"name": kind, "alpha": alpha}, "run_name": name})
    return Run(Path(f"/runs/{name}"), config, metrics, name, failure=failure)


def test_rows_matched_by_config_values_averaged_and_unmatched_listed():
    # "Stable" is the verdict of each run's own measurement (stability/verdict), not a rule of the report's
    runs = [fake_run("srnc", 2, {"test/psnr_7": 30.0, "long/onset_d1": math.inf, "long/onset_d9": math.inf,
                                 "stability/trf_unbounded": 0.0, "stability/trf_extent": 6.0,
                                 "stability/verdict": "empirically stable"}, "s1"),
            fake_run("srnc", 2.0, {"test/psnr_7": 32.0, "long/onset_d1": math.inf, "long/onset_d9": math.inf,
                                   "stability/trf_unbounded": 0.0, "stability/trf_extent": 8.0,
                                   "stability/verdict": "empirically stable"}, "s2"),
            fake_run("none", 1.0, {"test/psnr_3": 20.0, "test/psnr_1": 19.0, "long/onset_d1": 3.0,
                                   "long/onset_d9": 9.0, "stability/trf_unbounded": 1.0,
                                   "stability/verdict": "proven unstable"}, "n"),
            fake_run("sn", 1.0, {"test/psnr_7": 10.0}, "extra")]
    table = build_table("x", runs, PAPER)
    a, b, extra = table.rows
    assert a["runs"] == 2 and a["ours"]["psnr_7"] == 31.0 and a["ours"]["onset_d1"] == math.inf
    assert a["ours"]["trf"] == "bounded (7 fr.)" and a["ours"]["stable"] == "✓" and a["paper"]["psnr_7"] == 35.59
    assert b["ours"]["psnr_7"] == 20.0 and b["ours"]["stable"] == "✗" and b["ours"]["trf"] == "unbounded"
    assert "not in the paper" in extra["name"]
    assert any("frame 3" in n for n in table.notes) and "a note" in table.notes
    md = render_markdown(table)
    assert "| A | 2 | 31.00 | 35.59 | ∞ | ∞ | ∞ | ∞ | bounded (7 fr.) | bounded | ✓ | ✓ |" in md
    assert "| B | 1 | 20.00 | 35.74 | 3 | 29 | 9 | 75 |" in md


def test_an_onset_in_one_of_several_runs_is_not_infinite():
    runs = [fake_run("none", 1, {"long/onset_d1": math.inf}), fake_run("none", 1, {"long/onset_d1": 40.0})]
    assert build_table("x", runs, PAPER).rows[1]["ours"]["onset_d1"] == 40.0


def test_csv_has_ours_and_paper_columns(tmp_path):
    table = build_table("x", [fake_run("srnc", 2.0, {"test/psnr_7": 30.0})], PAPER)
    rows = list(csv.DictReader(open(write_csv(table, tmp_path / "x.csv"))))
    assert rows[0]["model"] == "A" and float(rows[0]["psnr_7"]) == 30.0 and rows[0]["paper_psnr_7"] == "35.59"
    assert rows[0]["paper_onset_d1"] == "inf" and rows[1]["psnr_7"] == ""
    assert (rows[0]["status"], rows[1]["status"]) == ("ok", "not run")


def test_a_row_whose_jobs_failed_is_marked_failed_and_names_the_log(tmp_path):
    failure = {"error": "ValueError: n=2 is smaller than the kernel", "log": "/runs/f/train.log"}
    runs = [fake_run("srnc", 2.0, {}, "f", failure), fake_run("none", 1.0, {"test/psnr_7": 20.0}, "ok"),
            fake_run("none", 1.0, {}, "g", failure)]
    table = build_table("x", runs, PAPER)
    a, b = table.rows
    assert (a["status"], a["runs"], a["failed"], a["ours"]["psnr_7"]) == ("failed", 0, 1, "failed")
    assert (b["status"], b["runs"], b["failed"], b["ours"]["psnr_7"]) == ("partly failed", 1, 1, 20.0)
    assert any("A: job f failed (ValueError: n=2" in n and "log: /runs/f/train.log" in n for n in table.notes)
    md = render_markdown(table)
    assert "| A | 0 + 1 failed | failed | 35.59 |" in md and "| B | 1 + 1 failed | 20.00 | 35.74 |" in md
    rows = list(csv.DictReader(open(write_csv(table, tmp_path / "x.csv"))))
    assert rows[0]["failed_logs"] == "/runs/f/train.log" and rows[0]["psnr_7"] == "failed"


def test_collect_keeps_failed_jobs(tmp_path):
    run = tmp_path / "0_f"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"norm": {"name": "srnc"}, "run_name": "f"}), run / ".hydra" / "config.yaml")
    (run / "failed.json").write_text(json.dumps({"error": "ValueError: bad", "log": str(run / "train.log")}))
    (runs,) = collect_runs(tmp_path)
    assert runs.failure["error"] == "ValueError: bad" and runs.notes == []


def test_collect_reads_metrics_measurements_and_csv(tmp_path):
    run = tmp_path / "0_a"
    (run / ".hydra").mkdir(parents=True)
    (run / "csv").mkdir()
    OmegaConf.save(OmegaConf.create({"norm": {"name": "none"}, "run_name": "a",
                                     "paths": {"output_dir": "${hydra:runtime.output_dir}"}}), run / ".hydra" / "config.yaml")
    (run / "metrics.json").write_text(json.dumps({"test/psnr_7": 33.0}))
    (run / "measurements.json").write_text(json.dumps({"metrics": {"long/onset_d1": 12.0}, "device": {"device_name": "X"}}))
    (run / "csv" / "metrics.csv").write_text("step,long/onset_d9,test/psnr_7\n0,99,1.0\n")
    (tmp_path / "1_unfinished" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"run_name": "u"}), tmp_path / "1_unfinished" / ".hydra" / "config.yaml")
    runs = collect_runs(tmp_path)
    assert len(runs) == 1
    m = runs[0].metrics
    assert (m["test/psnr_7"], m["long/onset_d1"]) == (33.0, 12.0)  # metrics.json beats csv
    # the stability columns come from the one measurement of measurements.json, never mixed with the CSV's
    assert "long/onset_d9" not in m
    assert runs[0].value("paths.output_dir") is None  # unresolvable without Hydra: no crash


def test_report_cli_refuses_bad_arguments(tmp_path, run_script):
    result = run_script("report.py", ["sweep=table3", "bogus=1"], tmp_path)
    assert result.returncode != 0 and "Could not override 'bogus'" in result.stderr
    result = run_script("report.py", [], tmp_path)
    assert result.returncode != 0 and "sweep=<name> is required" in result.stderr and "usage" in result.stderr
    result = run_script("report.py", ["sweep=table3", "wandb=maybe"], tmp_path)
    assert result.returncode != 0 and "wandb must be true or false" in result.stderr
    result = run_script("report.py", ["sweep=table99", f"dir={tmp_path}"], tmp_path)
    assert result.returncode != 0 and "table3" in result.stderr  # lists the sweeps


def test_report_cli_is_a_hydra_app(tmp_path, run_script):
    """--help and --cfg job as in the other scripts; dir=a,b (a bare comma list) is the list [a, b], not a sweep."""
    result = run_script("report.py", ["--help"], tmp_path)
    assert result.returncode == 0 and "python src/report.py sweep=<name>" in result.stdout
    result = run_script("report.py", ["sweep=laptop", "dir=/x/a,/x/b", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.sweep == "laptop" and list(cfg.dir) == ["/x/a", "/x/b"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_report_builds_each_table_from_its_smoke_sweep(name, smoke_sweep, compose, sweep_jobs):
    """What `python src/report.py sweep=<name> dir=<sweep dir>` writes (the CLI itself: the tests below)."""
    sweep_dir = smoke_sweep(name)
    _, files = report(name, sweep_dir)
    paper = load_paper(name)
    md = (sweep_dir / "report" / f"{name}.md").read_text()
    assert files["markdown"] == sweep_dir / "report" / f"{name}.md" and paper["title"] in md
    rows = list(csv.DictReader(open(sweep_dir / "report" / f"{name}.csv")))
    assert [r["model"] for r in rows] == [r["name"] for r in paper["rows"]]  # every run fills a paper row
    jobs = len(sweep_jobs(compose("train", [f"sweep={name}", "debug=smoke"])))  # the jobs the sweep file asks for
    filled = [r for r in rows if int(r["runs"])]
    assert len(filled) == jobs and sum(int(r["runs"]) for r in rows) == jobs  # one row per job
    for spec, row in zip(paper["rows"], rows):
        for column in paper["columns"]:
            if isinstance(spec.get(column), float) and math.isfinite(spec[column]):
                assert float(row[f"paper_{column}"]) == spec[column]  # the paper's numbers are in the table
    first = paper["rows"][0]
    if "psnr_7" in first:
        assert f"{first['psnr_7']:.2f}" in md
    if paper.get("figure"):
        assert (sweep_dir / "report" / f"{name}.png").is_file()
    key = {"table1": "fps", "table4": "lpips_7", "fig12": "onset_d1", "fig9": "long_psnr", "fig7": "psnr_1"}.get(name, "trf")
    assert all(r[key] != "" for r in filled), f"{key} missing"


@pytest.mark.slow
def test_report_defaults_to_the_newest_sweep_dir(smoke_sweep, run_script, tmp_path):
    sweep_dir = smoke_sweep("table8")
    logs = tmp_path / "logs" / "table8" / "multiruns"
    logs.mkdir(parents=True)
    (logs / "2000-01-01_00-00-00").symlink_to(sweep_dir)
    result = run_script("report.py", ["sweep=table8", "wandb=false", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "56 frames" in result.stdout and (sweep_dir / "report" / "table8.md").read_text() in result.stdout


def test_report_function_writes_markdown_csv(tmp_path):
    run = tmp_path / "sweep" / "0_x"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": {"backbone": "vresnet"}, "norm": {"name": "none"}, "task": {"name": "denoise"},
                                     "recurrence": {"name": "feat"}, "run_name": "x"}), run / ".hydra" / "config.yaml")
    (run / "metrics.json").write_text(json.dumps({"test/psnr_7": 30.5}))
    table, files = report("table2", [tmp_path / "sweep"], tmp_path / "out")
    assert files["markdown"].read_text().count("| VResNet-feat | 1 | 30.50 | 35.74 |") == 1
    assert files["csv"].is_file()


# ------------------------------------------------------------------------------------- which runs fill a row
def hydra_run(path: Path, compose, overrides: list, metrics: dict | None = None) -> Path:
    """The run dir `python src/train.py <overrides>` leaves: .hydra/config.yaml, .hydra/hydra.yaml, metrics.json."""
    cfg = OmegaConf.to_container(compose("train", overrides), resolve=False)
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": cfg.pop("hydra")}), path / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(cfg), path / ".hydra" / "config.yaml")
    (path / "metrics.json").write_text(json.dumps(metrics or {"test/psnr_7": 30.0}))
    return path


def filled(table) -> list[str]:
    return [row["name"] for row in table.rows if row["runs"]]


@pytest.mark.parametrize("sweep,overrides,row", [
    ("table3", ["norm=srnc", "norm.alpha=2", "norm.beta=0.1"], "SRN-C α=2.0 β=0.1"),
    ("table4", ["norm=srnc", "norm.alpha=3", "norm.beta=0.025", "norm.loop_only=true"], "SRN-C-3.0-0.025 (Soft Cons.)"),
    ("laptop", ["recurrence=rlsp", "norm=srnc", "norm.alpha=0.5", "norm.beta=1"], "SRN-C α=0.5 β=1.0 (Hard)"),
    ("table5", ["task=sr2", "norm=srnc", "norm.alpha=2", "norm.beta=0.05"], "SRN-C α=2.0 β=0.05 (Soft)"),
    ("table1", ["model=fastdvdnet"], "FastDVDnet"),
    ("table2", ["model=vdncnn", "recurrence=rlsp"], "VDnCNN-RLSP"),
    ("fig7", ["recurrence=birlsp-mf3"], "VResNet-BiRLSP-mf3"),
    ("certified", ["norm=certified", "norm.rho=0.8"], "certified ρ=0.8"),
    # matches "certified ρ=0.8" too (its row file leaves norm.base at its default): the more specific row wins
    ("certified", ["norm=certified", "norm.rho=0.8", "norm.base=null"], "certified ρ=0.8, base=null"),
    ("table1", ["experiment=bm3d"], "BM3D"),  # row: bm3d without the sweep's measurement: made from the row file
])
def test_a_run_trained_by_hand_fills_its_row(tmp_path, compose, sweep, overrides, row):
    """`python src/train.py <overrides>`, no row= and no sweep=: its run dir fills the row with those settings."""
    hydra_run(tmp_path / "run", compose, overrides, {"test/psnr_7": 30.5})
    table = build_table(sweep, collect_runs(tmp_path))
    assert filled(table) == [row]
    assert next(r for r in table.rows if r["name"] == row)["ours"].get("psnr_7", 30.5) == 30.5


@pytest.mark.parametrize("sweep,overrides", [
    ("table3", ["norm=srnc", "norm.alpha=1.9", "norm.beta=0.1"]),            # another alpha
    ("table3", ["norm=srn", "norm.alpha=2", "norm.beta=0.1"]),               # SRN, not SRN-C
    ("table3", ["norm=srnc", "norm.alpha=2", "norm.beta=0.1", "recurrence=rlsp"]),  # another recurrence ...
    ("table3", ["row=srnc_2.0_0.1", "recurrence=rlsp"]),                     # ... even from the row's own file
    ("table5", ["norm=srnc", "norm.alpha=2", "norm.beta=0.05"]),             # denoising, not x2 SR
    ("table4", ["norm=srnc", "norm.alpha=3", "norm.beta=0.025"]),            # the whole model, not the loop only
    ("fig9", ["row=srnc_2.0_0.1", "model=vdncnn"]),                          # another model
])
def test_a_run_with_other_settings_fills_no_row(tmp_path, compose, sweep, overrides):
    hydra_run(tmp_path / "run", compose, overrides)
    table = build_table(sweep, collect_runs(tmp_path))
    assert filled(table) == [table.rows[-1]["name"]] and table.rows[-1]["name"].endswith("(not in the paper)")


def test_a_run_dir_without_hydra_yaml_is_matched_on_its_config(tmp_path):
    """Older runs and fixtures: norm.name, recurrence.name, task.name and model.backbone, else the model's class."""
    names = {"recurrence": {"name": "feat"}, "task": {"name": "denoise"}}
    _write_run(tmp_path / "0_a", {**names, "model": {"backbone": "vresnet"}, "norm": {"name": "srnc", "alpha": 2,
                                                                                     "beta": 0.1}}, {"test/psnr_7": 1.0})
    _write_run(tmp_path / "1_b", {**names, "model": {"_target_": "recstab.models.baselines.FastDVDnet"},
                                  "norm": {"name": "none"}}, {"test/psnr_7": 2.0})
    _write_run(tmp_path / "2_c", {"model": {"backbone": "vresnet"}, "norm": {"name": "none"}}, {"test/psnr_7": 3.0})
    runs = collect_runs(tmp_path)
    assert all(run.choices == {} for run in runs)
    assert filled(build_table("table3", runs)) == ["SRN-C α=2.0 β=0.1", "1_b (not in the paper)", "2_c (not in the paper)"]
    assert filled(build_table("table1", runs))[0] == "FastDVDnet"
    assert filled(build_table("table2", runs)) == ["0_a (not in the paper)", "1_b (not in the paper)",
                                                   "2_c (not in the paper)"]  # 2_c: no recurrence, no task: unknown


@pytest.mark.parametrize("row,error", [
    ({"row": "srnc_9.9_9.9"}, r"paper row 'A': no row file .*srnc_9\.9_9\.9\.yaml; rows: .*srnc_2\.0_0\.1"),
    ({"recurrence": "mf9"}, r"paper row 'A': recurrence: 'mf9' is not an option of conf/recurrence/; options: .*mf3"),
    ({"match": {"norm": {"name": "srnc"}}}, r"paper row 'A': unknown key 'match'; a row takes name, row"),
    ({"psnr_7": 30.0}, r"paper row 'A' names no runs"),
])
def test_a_bad_paper_row_is_refused_naming_it(tmp_path, repo_root, row, error):
    (tmp_path / "conf").symlink_to(repo_root / "conf")  # the conf/ beside the sweeps folder
    (tmp_path / "sweeps").mkdir()
    OmegaConf.save(OmegaConf.create({"defaults": [{"override /model": "vresnet"}], "paper": {
        "title": "X", "columns": ["psnr_7"], "rows": [{"name": "A", **row}]}}), tmp_path / "sweeps" / "x.yaml")
    with pytest.raises(ValueError, match=r"^sweeps/x\.yaml: " + error):
        load_paper("x", tmp_path / "sweeps")


def test_a_sweep_default_that_is_not_one_option_is_refused(tmp_path, repo_root):
    (tmp_path / "conf").symlink_to(repo_root / "conf")
    (tmp_path / "sweeps").mkdir()
    OmegaConf.save(OmegaConf.create({"defaults": [{"override /norm": ["sn", "srn"]}], "paper": {
        "title": "X", "columns": [], "rows": [{"name": "A", "row": "unconstrained"}]}}), tmp_path / "sweeps" / "x.yaml")
    with pytest.raises(ValueError, match=r"x\.yaml: defaults entry override /norm: \['sn', 'srn'\] is not one option"):
        load_paper("x", tmp_path / "sweeps")


# ------------------------------------------------------------------------------------- the measurement callback
def tiny_model(**kw) -> dict:
    """A 4-channel VResNet-feat model config."""
    return {"_target_": "recstab.models.build_model", "backbone": "vresnet", "recurrence": "feat", "channels": 4, **kw}


class _Trainer:
    """The few Trainer attributes TableMeasurements reads."""

    def __init__(self, out, ckpt_path=None):
        self.default_root_dir, self.ckpt_path, self.loggers = str(out), ckpt_path, []
        self.is_global_zero, self.global_step, self.world_size = True, 0, 1


def test_measurements_smoke_sizes_apply_only_under_debug_smoke():
    from recstab.report import TableMeasurements

    kw = dict(scenes={"total_frames": 2048, "size": 256}, fps=None,
              smoke={"scenes": {"total_frames": 16}, "fps": {"height": 32}})
    paper, smoke = TableMeasurements(**kw), TableMeasurements(debug="smoke", **kw)
    assert paper.scenes == {"total_frames": 2048, "size": 256}
    assert smoke.scenes == {"total_frames": 16, "size": 256}
    assert smoke.fps is None  # a part that is off stays off


def test_the_table_row_is_one_measurement_of_the_tested_weights(tmp_path):
    """measurements.json holds ONE diagnostics.measure of the tested weights: its verdict and its columns equal a
    direct measure() call with the same spec on the same weights; the configured dampening wins."""
    from recstab.diagnostics import MeasureSpec, measure
    from recstab.lit.module import VideoRestorationModule
    from recstab.report import TableMeasurements

    module = VideoRestorationModule(model=tiny_model(), norm={"_target_": "recstab.norms.SRNC", "alpha": 0.5,
                                                              "beta": 1.0, "n": 8}, frames=3, dampening=1.0)
    spec = MeasureSpec(spectra_n=8, trf={"frames": 5, "size": 8, "iters": 2}, lyapunov={"frames": 8, "size": 8,
                       "burn_in": 2}, onsets={"chunk": 4})
    scenes = {"n_distinct": 2, "total_frames": 8, "size": 16, "repeats": 2}
    callback = TableMeasurements(diagnostics=spec, video="scenes", scenes=scenes, sigma=30, dampening=0.0,
                                 fps={"height": 8, "width": 8, "frames": 2, "warmup": 1})
    trainer = _Trainer(tmp_path)
    callback.on_test_start(trainer, module)
    assert module.hparams.dampening == 0.0  # the config's λ wins over the module's (e.g. a checkpoint's)
    callback.on_test_end(trainer, module)
    saved = json.loads((tmp_path / "measurements.json").read_text())
    m = saved["metrics"]
    assert m["eval/dampening"] == 0.0 and m["stability/trf_unbounded"] == 0.0  # λ = 0: no feedback, bounded
    assert abs(m["spectra/sigma1_max"] - 0.5) < 0.02  # SRN-C α = 0.5, refreshed before measuring
    assert m["long/frames"] == 16 and saved["onsets"]["sequences"] == 2 and m["speed/fps"] > 0
    assert json.loads((tmp_path / "device.json").read_text())["test_device"] == "cpu"
    assert (tmp_path / "measure" / "trf.png").is_file()
    # the same spec on the same weights, measured directly: the same verdict and the same numbers
    streams = callback._streams(module.model)
    direct = measure(module.model.eval(), spec, clean_frames=streams[0], onset_streams=streams, sigma=30 / 255,
                     dampening=0.0)
    assert saved["verdict"] == m["stability/verdict"] == direct.verdict
    for key, value in direct.metrics.items():
        if key != "long/fps":  # wall time
            assert m[key] == pytest.approx(value, nan_ok=True), key


def test_evaluation_sweeps_refuse_to_test_without_a_checkpoint(tmp_path):
    from recstab.lit.module import VideoRestorationModule
    from recstab.report import TableMeasurements

    with pytest.raises(ValueError, match="pass ckpt_path="):
        TableMeasurements(require_checkpoint=True).on_test_start(_Trainer(tmp_path),
                                                                 VideoRestorationModule(model=tiny_model()))
    TableMeasurements(require_checkpoint=True).on_test_start(_Trainer(tmp_path, "x.ckpt"),
                                                             VideoRestorationModule(model=tiny_model()))


# ------------------------------------------------------------------------------------- the W&B dashboard
def _write_run(path: Path, config: dict, metrics: dict | None = None, failure: dict | None = None) -> Path:
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if failure is not None:
        (path / "failed.json").write_text(json.dumps(failure))
    return path


def _wandb_records(path: Path) -> list:
    """The records of an offline .wandb file (W&B's own datastore reader)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(path))
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def test_verdicts_compare_our_stability_with_the_papers():
    from recstab.report.dashboard import verdicts

    runs = [fake_run("srnc", 2.0, {"test/psnr_7": 35.0, "long/onset_d1": math.inf, "stability/trf_unbounded": 0.0}, "s"),
            fake_run("none", 1.0, {"test/psnr_7": 36.0, "long/onset_d1": math.inf, "stability/trf_unbounded": 0.0}, "n")]
    a, b = verdicts(build_table("x", runs, PAPER))
    assert (a["ours"], a["paper"], a["agrees"]) == ("stable", "stable", True)
    assert a["psnr_minus_paper"] == pytest.approx(35.0 - 35.59)
    assert (b["ours"], b["paper"], b["agrees"]) == ("stable", "unstable", False)  # paper: onsets at 29 frames


@pytest.mark.slow
def test_report_logs_an_offline_wandb_report_run_to_the_sweeps_group(tmp_path, run_script):
    """report.py under WANDB_MODE=offline: a job_type=report run of group table2 inside the sweep dir, holding
    the comparison table (ours and the paper's side by side) and the per-row verdicts."""
    sweep = tmp_path / "sweep"
    base = {"recurrence": {"name": "feat"}, "task": {"name": "denoise"}, "group": "table2"}
    _write_run(sweep / "0_a", {**base, "model": {"backbone": "vresnet"}, "norm": {"name": "none"}, "run_name": "a"},
               {"test/psnr_7": 30.5, "long/onset_d1": 12.0, "long/onset_d9": 40.0})
    _write_run(sweep / "1_b", {**base, "model": {"backbone": "vdncnn"}, "norm": {"name": "none"}, "run_name": "b"},
               failure={"error": "ValueError: bad", "log": str(sweep / "1_b" / "train.log")})
    result = run_script("report.py", ["sweep=table2", f"dir={sweep}"], tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (sweep / "report" / "wandb").glob("offline-run-*")
    (comparison,) = (run_dir / "files" / "media" / "table").glob("comparison_*.table.json")
    table = json.loads(comparison.read_text())
    assert table["columns"][:6] == ["model", "runs", "failed", "status", "psnr_7", "paper_psnr_7"]
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert (rows["VResNet-feat"]["psnr_7"], rows["VResNet-feat"]["paper_psnr_7"]) == (30.5, 35.74)
    assert (rows["VResNet-feat"]["onset_d1"], rows["VResNet-feat"]["paper_onset_d1"]) == (12.0, 29)
    assert (rows["VDnCNN-feat"]["status"], rows["VDnCNN-feat"]["psnr_7"]) == ("failed", "failed")
    (verdict_file,) = (run_dir / "files" / "media" / "table").glob("verdicts_*.table.json")
    verdict = json.loads(verdict_file.read_text())
    by_model = {r[0]: dict(zip(verdict["columns"], r)) for r in verdict["data"]}
    assert (by_model["VResNet-feat"]["ours"], by_model["VResNet-feat"]["agrees"]) == ("unstable", True)
    assert by_model["VDnCNN-feat"]["failed_logs"] == str(sweep / "1_b" / "train.log")
    (store,) = run_dir.glob("*.wandb")
    (run,) = [r.run for r in _wandb_records(store) if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type, list(run.tags)) == ("table2", "report", ["table2"])


def test_a_runs_name_resolves_its_hydra_choices_from_its_own_hydra_yaml(tmp_path):
    """run_name is `${hydra:runtime.choices.model}-…` (model= as chosen): outside the run no Hydra runtime
    answers it, so the report reads the choice from the run's .hydra/hydra.yaml."""
    from recstab.report.tables import load_run

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"run_name": "${hydra:runtime.choices.model}-${recurrence.name}",
                                     "recurrence": {"name": "none"}}), tmp_path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": {"model": "fastdvdnet"}}}}),
                   tmp_path / ".hydra" / "hydra.yaml")
    assert load_run(tmp_path).name == "fastdvdnet-none"
    (tmp_path / ".hydra" / "hydra.yaml").unlink()
    assert load_run(tmp_path).name == tmp_path.name  # nothing to resolve it with: the dir's name
