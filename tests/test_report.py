"""src/report.py: runs -> the paper's table with our numbers beside the paper's (Markdown, CSV, figure)."""

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recstab.report.tables import Run, build_table, collect_runs, load_paper, render_markdown, report, write_csv
from test_sweeps import ROOT, RUNS, SWEEPS, run_cli, smoke_root, smoke_sweep  # noqa: F401 (smoke_root: fixture)

PAPER = {"title": "T", "columns": ["psnr_7", "onset_d1", "onset_d9", "trf", "stable"],
         "notes": ["a note"],
         "rows": [{"name": "A", "match": {"norm": {"kind": "srnc", "alpha": 2.0}}, "psnr_7": 35.59,
                   "onset_d1": math.inf, "onset_d9": math.inf, "trf": "bounded", "stable": True},
                  {"name": "B", "match": {"norm": {"kind": "none"}}, "psnr_7": 35.74, "onset_d1": 29, "onset_d9": 75}]}


def fake_run(kind, alpha, metrics, name="r"):
    config = OmegaConf.create({"norm": {"kind": kind, "alpha": alpha}, "run_name": name})
    return Run(Path(f"/runs/{name}"), config, metrics, name)


def test_rows_matched_by_config_values_averaged_and_unmatched_listed():
    runs = [fake_run("srnc", 2, {"test/psnr_7": 30.0, "long/onset_d1": math.inf, "long/onset_d9": math.inf,
                                 "trf/unbounded": 0.0, "trf/extent": 6.0}, "s1"),
            fake_run("srnc", 2.0, {"test/psnr_7": 32.0, "long/onset_d1": math.inf, "long/onset_d9": math.inf,
                                   "trf/unbounded": 0.0, "trf/extent": 8.0}, "s2"),
            fake_run("none", 1.0, {"test/psnr_3": 20.0, "test/psnr_1": 19.0, "long/onset_d1": 3.0,
                                   "long/onset_d9": 9.0, "trf/unbounded": 1.0}, "n"),
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


def test_collect_reads_metrics_measurements_and_csv(tmp_path):
    run = tmp_path / "0_a"
    (run / ".hydra").mkdir(parents=True)
    (run / "csv").mkdir()
    OmegaConf.save(OmegaConf.create({"norm": {"kind": "none"}, "run_name": "a",
                                     "paths": {"output_dir": "${hydra:runtime.output_dir}"}}), run / ".hydra" / "config.yaml")
    (run / "metrics.json").write_text(json.dumps({"test/psnr_7": 33.0}))
    (run / "measurements.json").write_text(json.dumps({"metrics": {"long/onset_d1": 12.0}, "device": {"device_name": "X"}}))
    (run / "csv" / "metrics.csv").write_text("step,long/onset_d9,test/psnr_7\n0,99,1.0\n")
    (tmp_path / "1_unfinished" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"run_name": "u"}), tmp_path / "1_unfinished" / ".hydra" / "config.yaml")
    runs = collect_runs(tmp_path)
    assert len(runs) == 1
    m = runs[0].metrics
    assert (m["test/psnr_7"], m["long/onset_d1"], m["long/onset_d9"]) == (33.0, 12.0, 99.0)  # metrics.json beats csv
    assert runs[0].value("paths.output_dir") is None  # unresolvable without Hydra: no crash


def test_report_cli_refuses_bad_arguments(tmp_path):
    result = run_cli([str(ROOT / "src" / "report.py"), "sweep=table3", "bogus=1"], tmp_path)
    assert result.returncode != 0 and "usage" in result.stderr
    result = run_cli([str(ROOT / "src" / "report.py"), "sweep=table99", f"dir={tmp_path}"], tmp_path)
    assert result.returncode != 0 and "table3" in result.stderr  # lists the sweeps


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_report_builds_each_table_from_its_smoke_sweep(name, smoke_root):
    sweep_dir = smoke_sweep(name, smoke_root)
    result = run_cli([str(ROOT / "src" / "report.py"), f"sweep={name}", f"dir={sweep_dir}"], smoke_root)
    assert result.returncode == 0, result.stderr[-3000:]
    paper = load_paper(name)
    md = (sweep_dir / "report" / f"{name}.md").read_text()
    assert md in result.stdout and paper["title"] in md
    rows = list(csv.DictReader(open(sweep_dir / "report" / f"{name}.csv")))
    assert [r["model"] for r in rows] == [r["name"] for r in paper["rows"]]  # every run fills a paper row
    filled = [r for r in rows if int(r["runs"])]
    assert len(filled) == RUNS[name] and sum(int(r["runs"]) for r in rows) == RUNS[name]
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
def test_report_defaults_to_the_newest_sweep_dir(smoke_root, tmp_path):
    sweep_dir = smoke_sweep("table8", smoke_root)
    logs = tmp_path / "logs" / "table8" / "multiruns"
    logs.mkdir(parents=True)
    (logs / "2000-01-01_00-00-00").symlink_to(sweep_dir)
    result = run_cli([str(ROOT / "src" / "report.py"), "sweep=table8"], tmp_path, env={"PROJECT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "56 frames" in result.stdout


def test_report_function_writes_markdown_csv(tmp_path):
    run = tmp_path / "sweep" / "0_x"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": {"backbone": "vresnet"}, "recurrence": {"name": "feat"},
                                     "norm": {"kind": "none"}, "run_name": "x"}), run / ".hydra" / "config.yaml")
    (run / "metrics.json").write_text(json.dumps({"test/psnr_7": 30.5}))
    table, files = report("table2", [tmp_path / "sweep"], tmp_path / "out")
    assert files["markdown"].read_text().count("| VResNet-feat | 1 | 30.50 | 35.74 |") == 1
    assert files["csv"].is_file()


# ------------------------------------------------------------------------------------- the measurement callback
class _Trainer:
    """The few Trainer attributes TableMeasurements reads."""

    def __init__(self, out, ckpt_path=None):
        self.default_root_dir, self.ckpt_path, self.loggers = str(out), ckpt_path, []
        self.is_global_zero, self.global_step, self.world_size = True, 0, 1


def test_measurements_smoke_sizes_apply_only_under_debug_smoke():
    from recstab.report import TableMeasurements

    kw = dict(trf={"frames": 81, "size": 64, "iters": 500}, onsets=None, fps=None,
              smoke={"trf": {"frames": 9, "iters": 3}, "fps": {"height": 32}, "spectra_n": 16})
    paper, smoke = TableMeasurements(**kw), TableMeasurements(debug="smoke", **kw)
    assert paper.trf == {"frames": 81, "size": 64, "iters": 500} and paper.spectra_n == 64
    assert smoke.trf == {"frames": 9, "size": 64, "iters": 3} and smoke.spectra_n == 16
    assert smoke.fps is None and smoke.onsets is None  # a part that is off stays off


def test_measurements_force_the_configured_dampening_and_write_json(tmp_path):
    from recstab.lit.module import VideoRestorationModule
    from recstab.report import TableMeasurements

    module = VideoRestorationModule(channels=4, frames=3, dampening=1.0, norm={"kind": "srnc", "alpha": 0.5,
                                                                               "beta": 1.0, "n": 8})
    callback = TableMeasurements(spectra_n=8, trf={"frames": 5, "size": 8, "iters": 2}, dampening=0.0,
                                 onsets={"video": "scenes", "sigma": 30, "chunk": 4,
                                         "scenes": {"n_distinct": 2, "total_frames": 8, "size": 16, "repeats": 2}},
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


def test_evaluation_sweeps_refuse_to_test_without_a_checkpoint(tmp_path):
    from recstab.lit.module import VideoRestorationModule
    from recstab.report import TableMeasurements

    with pytest.raises(ValueError, match="pass ckpt_path="):
        TableMeasurements(require_checkpoint=True).on_test_start(_Trainer(tmp_path), VideoRestorationModule(channels=4))
    TableMeasurements(require_checkpoint=True).on_test_start(_Trainer(tmp_path, "x.ckpt"), VideoRestorationModule(channels=4))
