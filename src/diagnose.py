"""Diagnose one model, or draw Figure 2: ``python src/diagnose.py [key=value ...]``.

    python src/diagnose.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python src/diagnose.py recurrence=feat norm=srnc norm.alpha=0.5 norm.beta=1.0
    python src/diagnose.py experiment=paper row=srnc_2.0_0.1     # the untrained model of that run
    python src/diagnose.py experiment=fig2

Root config: conf/diagnose.yaml. The report (exact conv spectra, loop certificate, TRF,
Lyapunov exponent, long-video onset test, verdict: one ``recstab.diagnostics.measure`` with the
``diagnostics`` spec) is written to
``${hydra:runtime.output_dir}/report`` section by section, and to W&B (offline unless
WANDB_MODE says otherwise). A killed diagnosis continues with ``resume=true`` (the newest
unfinished report of the same name, or ``report_dir=<folder>``): the onset test restarts
from its last progress point and its onsets equal an uninterrupted run's. Unreadable files
of the long video are skipped and listed (``long_video.skip_bad``); when none is readable
the diagnosis stops before measuring anything, naming every file and why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
log = logging.getLogger("diagnose")


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def load_model(cfg: DictConfig):
    """The nn.Module to diagnose: from ``ckpt_path``, or built untrained from the ``model`` config
    (``hydra.utils.instantiate``, as the LightningModule builds it for training)."""
    import torch

    if cfg.get("ckpt_path"):
        from recstab.lit.module import VideoRestorationModule
        from recstab.lit.preflight import read_recstab_checkpoint
        path = Path(cfg.ckpt_path)
        read_recstab_checkpoint(path)
        module = VideoRestorationModule.load_from_checkpoint(str(path), map_location="cpu")
        model = module.model
        if cfg.get("dampening") is None and "dampening" in module.hparams:
            model.dampening = float(module.hparams.dampening)
    else:
        from recstab.norms import make_norm
        torch.manual_seed(int(cfg.seed))
        model = make_norm(OmegaConf.to_container(cfg.norm, resolve=True))(
            hydra.utils.instantiate(cfg.model, _convert_="all"))
    from recstab.norms import refresh
    refresh(model)  # exact power-iteration vectors before measuring anything (a no-op without a norm)
    return model.to(pick_device(cfg.device)).eval()


def checkpoint_name(hparams: dict) -> str:
    """The report's name from the checkpoint's own model: model-recurrence-task-norm-<channels>ch, the model its
    ``backbone`` (vdncnn, vresnet; a baseline in older checkpoints) or the ``name`` of its ``_target_`` class
    (fastdvdnet, ...; else the class's own name)."""
    from recstab.lit.preflight import model_name

    model = dict(hparams.get("model") or {})
    norm = dict(hparams.get("norm") or model.get("norm") or {})
    recurrence = model.get("recurrence")
    recurrence = recurrence.get("name") if isinstance(recurrence, dict) else recurrence
    parts = [model_name(model), recurrence,
             model.get("task"), norm.get("name", norm.get("kind", "none")),
             f"{model['channels']}ch" if model.get("channels") else None]
    return "-".join(str(p) for p in parts if p)


def report_dir(cfg: DictConfig, out_dir: Path) -> Path:
    """Where the report goes: ``report_dir`` if set; with ``resume=true`` the newest earlier report
    of this ``name`` under ``${paths.log_dir}/${task_name}`` that did not finish; else ``out_dir``."""
    if cfg.get("report_dir"):
        return Path(cfg.report_dir)
    if not cfg.get("resume"):
        return out_dir
    import json

    from recstab.diagnostics.report import SECTIONS
    runs = Path(cfg.paths.log_dir) / cfg.task_name
    candidates = []
    for path in runs.glob("**/report.json"):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if saved.get("name") == cfg.name and len(saved.get("sections", {})) < len(SECTIONS):  # one never ran
            candidates.append(path.parent)
    if not candidates:
        raise FileNotFoundError(f"resume=true but no unfinished report of name={cfg.name!r} under {runs}; "
                                "pass report_dir=<its folder> or start afresh with resume=false")
    return max(candidates, key=lambda p: (p / "report.json").stat().st_mtime)


def run_report(cfg: DictConfig, out_dir: Path, run=None):
    """Write the stability report of the configured model into ``out_dir`` (see :func:`report_dir`);
    what it measures is the ``diagnostics`` spec (conf/diagnostics/). ``run``: a W&B run, or a function
    that starts one, called once the model and the video have passed their checks."""
    from recstab.diagnostics import stability_report
    from recstab.lit.publish import publish_image, publish_metrics, publish_summary

    out_dir = report_dir(cfg, out_dir)
    model = load_model(cfg)
    spec = OmegaConf.to_container(cfg.diagnostics, resolve=True)
    frames = None
    if spec.get("onsets") is not None or spec.get("lyapunov") is not None:
        from recstab.data.long_video import LongVideo
        stream = OmegaConf.to_container(cfg.long_video, resolve=True)
        if stream.get("gray") is None:
            stream["gray"] = int(model.in_channels) == 1
        frames = LongVideo(**stream)
        frames.probe()  # every file opened before anything is measured (unreadable ones skipped and listed)
    from recstab.diagnostics.measure import as_spec, check_input
    check_input(model, as_spec(spec), frames, burst=cfg.get("burst"))  # a refusal is one line, before W&B starts
    if callable(run):
        run = run()
    if cfg.get("resume"):
        log.info("resuming the report in %s", out_dir)
    report = stability_report(model, out_dir, clean_frames=frames, name=cfg.name, spec=spec,
                              sigma=float(cfg.task.sigma) / 255, burst=cfg.get("burst"),
                              overlap=int(cfg.get("overlap") or 0), dampening=cfg.get("dampening"),
                              resume=bool(cfg.get("resume")), source=cfg.get("ckpt_path"), progress=True)
    log.info("verdict: %s — %s", report.verdict, "; ".join(report.notes))  # the notes name failed sections
    if report.onsets is not None:
        log.info("onsets: %d on %d frames (%d feedback divergences), deciles %s, %.1f fps", report.onsets.n_onsets,
                 report.onsets.frames, sum(report.onsets.divergent), report.onsets.deciles, report.onsets.fps)
    log.info("report: %s", report.files["markdown"])
    publish_metrics(run, report.metrics())
    for key, path in report.files.items():
        if str(path).endswith(".png"):
            publish_image(run, f"report/{key}", path)
    publish_summary(run, report.measurements.summary())
    return report


def run_fig2(cfg: DictConfig, out_dir: Path, run=None):
    from recstab.diagnostics import figure2
    from recstab.lit.publish import publish_image, publish_metrics

    f = OmegaConf.to_container(cfg.fig2, resolve=True)
    if f["backbone"] is None:
        raise ValueError(f"Figure 2 draws every temporal connection on one backbone, model=vresnet or model=vdncnn; "
                         f"the chosen model ({cfg.model._target_}) has none")
    result = figure2(out_dir / "fig2.png", connections=f["connections"], backbone=f["backbone"],
                     channels=int(f["channels"]), depth=f.get("depth"), frames=int(f["frames"]),
                     size=int(f["size"]), seed=int(f["seed"]))
    log.info("figure 2: %s; diverged: %s", result.path,
             ", ".join(k for k, v in result.diverged.items() if v) or "none")
    publish_metrics(run, {f"fig2/diverged/{k}": float(v) for k, v in result.diverged.items()})
    publish_image(run, "fig2/output_norm", result.path)
    return result


def start_wandb(cfg: DictConfig, out_dir: Path):
    if not cfg.wandb.enabled:
        return None
    os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; WANDB_MODE=online to sync
    import wandb
    return wandb.init(project=cfg.wandb.project, name=cfg.name, group=cfg.wandb.group,
                      tags=list(cfg.wandb.tags or []), dir=str(out_dir), job_type=cfg.mode,
                      config=OmegaConf.to_container(cfg, resolve=True))


@hydra.main(config_path="../conf", config_name="diagnose", version_base="1.3")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from recstab.lit.preflight import one_line_errors, read_recstab_checkpoint

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = " ".join(HydraConfig.get().overrides.task)
    started, target = [], None  # the W&B run, once the inputs have passed their checks

    def start_run():
        started.append(start_wandb(cfg, out_dir))
        return started[-1]

    try:
        with one_line_errors():
            if cfg.mode not in ("report", "fig2"):
                raise ValueError(f"mode must be report or fig2, got {cfg.mode!r}")
            if cfg.mode == "fig2":
                run_fig2(cfg, out_dir, start_run())
                return None
            if cfg.get("ckpt_path"):  # the report is named from the checkpoint's own model
                with open_dict(cfg):
                    cfg.name = checkpoint_name(read_recstab_checkpoint(Path(cfg.ckpt_path))["hyper_parameters"])
            target = report_dir(cfg, out_dir / "report")
            report = run_report(cfg, out_dir / "report", start_run)
            failed = [k for k, v in report.sections.items() if v["status"] == "failed"]
            if failed:  # everything measured is written; the exit status says something failed
                raise RuntimeError(f"report sections failed: {', '.join(failed)} (see {report.files['json']})")
            return report.verdict
    except KeyboardInterrupt:
        where = f"what was measured is in {target}" if target is not None else "nothing was measured yet"
        resume = f" resume=true report_dir={target}" if target is not None else ""
        raise SystemExit(f"Interrupted: {where}; continue with: python src/diagnose.py {overrides}{resume}") from None
    finally:
        for run in started:
            if run is not None:
                run.finish()


if __name__ == "__main__":
    main()
