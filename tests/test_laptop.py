"""The paper on a laptop: sweeps/laptop.yaml composes, every row runs under debug=smoke, the report and the
stability-across-training figure are drawn."""

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recstab.report.trajectory import draw_trajectories, read_trajectory


def test_laptop_sweep_composes_unconstrained_hard_and_soft(compose, sweep_jobs):
    cfg = compose("train", ["sweep=laptop"])
    assert cfg.task_name == cfg.group == "laptop"
    default = compose("train")  # the default recipe; the laptop's is shorter and narrower: 300 steps, 16 channels
    norms = []
    for overrides in sweep_jobs(cfg):
        job = compose("train", ["sweep=laptop", *overrides])
        norm = job.norm
        norms.append((norm.name, norm.get("alpha"), norm.get("beta")))
        assert (job.model.backbone, job.recurrence.name, job.task.name) == ("vresnet", "rlsp", "denoise")
        assert job.callbacks.step_timer._target_ == "recstab.lit.step_timer.StepTimer"
        assert job.callbacks.stability.every_n_val_epochs == 1 and job.callbacks.stability.at_end is False
        assert (job.trainer.max_steps, job.model.channels) == (300, 16)
        assert (job.module.lr, job.model.init, job.data.crop) == (default.module.lr, default.model.init, default.data.crop)
    assert norms == [("none", None, None), ("srnc", 0.5, 1.0), ("srnc", 2.0, 0.1), ("certified", None, None)]
    certified = compose("train", ["sweep=laptop", "row=certified_0.95"]).norm
    assert (certified._target_, certified.rho) == ("recstab.norms.certified.CertifiedLoop", 0.95)


@pytest.mark.slow
def test_every_row_runs_under_smoke_and_the_report_has_a_row_each(smoke_sweep, run_script):
    sweep_dir = smoke_sweep("laptop")
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file())
    assert [p.name.split("_", 1)[1] for p in runs] == ["laptop-unconstrained", "laptop-srnc_0.5_1.0",
                                                       "laptop-srnc_2.0_0.1", "laptop-certified_0.95"]
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "measurements.json").is_file()
    report = run_script("report.py", ["sweep=laptop", f"dir={sweep_dir}", "wandb=false"], sweep_dir)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    table = [line for line in report.stdout.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[1:]}
    assert rows == {"No constraint": "1", "SRN-C α=0.5 β=1.0 (Hard)": "1", "SRN-C α=2.0 β=0.1 (Soft)": "1",
                    "certified ρ=0.95 (not in the paper)": "1"}


def write_csv(path: Path, rows: list[dict]) -> Path:
    keys = sorted(set().union(*rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_trajectory_reads_the_monitor_rows_and_draws_one_png(tmp_path):
    rows = [{"step": 99, "train/loss": 0.1},
            {"step": 100, "stability/lyapunov": 0.3, "stability/bound": 40.0, "stability/trf_growth_rate": 0.2,
             "stability/verdict_code": 3},
            {"step": 150, "train/loss": 0.05},
            {"step": 200, "stability/lyapunov": -0.4, "stability/bound": 30.0, "stability/trf_growth_rate": -0.3,
             "stability/verdict_code": 1}]
    a = write_csv(tmp_path / "a" / "csv" / "metrics.csv", rows)
    data = read_trajectory(a)
    assert data["stability/lyapunov"] == ([100, 200], [0.3, -0.4])
    assert data["stability/verdict_code"] == ([100, 200], [3.0, 1.0])
    write_csv(tmp_path / "b" / "csv" / "metrics.csv", [{"step": 10, "train/loss": 1.0}])  # no monitor rows
    png = draw_trajectories({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "out" / "trajectory.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert draw_trajectories({"b": tmp_path / "b"}, tmp_path / "none.png") is None
    with pytest.raises(FileNotFoundError, match="metrics"):
        read_trajectory(tmp_path / "missing.csv")


def test_laptop_report_columns_show_the_stability_numbers(tmp_path):
    from recstab.report.tables import Run, build_table, render_markdown

    def run(norm, metrics):
        cfg = OmegaConf.create({"model": {"backbone": "vresnet"}, "norm": norm, "recurrence": {"name": "rlsp"},
                                "task": {"name": "denoise"}})
        return Run(tmp_path, cfg, metrics, str(norm))
    runs = [run({"name": "none"}, {"test/psnr_7": 28.45, "stability/verdict": "empirically stable",
                                   "stability/bound": 12.6, "stability/lyapunov": -0.545,
                                   "stability/trf_growth_rate": -0.739, "speed/train_step_cpu_s": 1.234}),
            run({"name": "srnc", "alpha": 0.5, "beta": 1.0}, {"test/psnr_7": 27.9, "stability/verdict": "certified stable",
                                                              "stability/bound": 0.26})]
    table = build_table("laptop", runs)
    ours = {row["name"]: row["ours"] for row in table.rows}
    assert ours["No constraint"]["verdict"] == "empirically stable" and ours["No constraint"]["lyapunov"] == -0.545
    assert ours["SRN-C α=0.5 β=1.0 (Hard)"]["bound"] == 0.26 and ours["SRN-C α=2.0 β=0.1 (Soft)"]["psnr_7"] is None
    text = render_markdown(table)
    assert "| No constraint | 1 | 28.45 | 35.74 | empirically stable | proven unstable | 12.6 |" in text
    assert "-0.545" in text and "-0.739" in text and "1.23" in text
