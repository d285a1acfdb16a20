"""Stabilise a trained recurrent model after the fact (``python src/stabilise.py ckpt_path=<ckpt>``).

    python src/stabilise.py ckpt_path=logs/laptop/multiruns/<time>/0_.../checkpoints/last.ckpt
    python src/stabilise.py ckpt_path=<ckpt> method=dampening dampening.margin=0.1
    python src/stabilise.py ckpt_path=<ckpt> method=finetune finetune.steps=500 finetune.norm.alpha=1
    python src/stabilise.py ckpt_path=<ckpt> method=certify certify.rho=0.95

Root config: conf/stabilise.yaml. Three remedies for a model that is proven unstable (or merely
not certified), each writing a new checkpoint and a before/after report (``report.md``,
``report.json``: PSNR_7 on the validation clips, verdict, certified bound L̂, Lyapunov exponent
λ₁, TRF verdict and extent; ``report.png``: PSNR per frame, L̂ and λ₁ before and after) under
``${hydra:runtime.output_dir}/<method>/``.

(a) Feature dampening (appendix F of the paper). Scaling every fed-back signal by λ scales
    the recurrent kernels: (λK) * h = K * (λh). Every term of the loop bound is linear in
    what is fed back, so the certificate scales linearly, L̂(λ) = λ·L̂(1). Hence the largest
    λ with a certified contraction of factor e^(−m) is closed-form,

        λ_cert = min(1, e^(−m) / L̂(1)),

    and at λ_cert the Lyapunov exponent is provably λ₁ ≤ log L̂(λ_cert) = −m (a contraction
    by L shrinks every tangent vector by at least L per frame). The bound is usually loose (a
    product of per-layer norms), so λ_cert can be far below what the model tolerates; the
    *empirical* search bisects λ ∈ [λ_cert, 1] on the predicate

        stable(λ) = (verdict at λ is not "proven unstable") and (λ₁(λ) < −m),

    assuming it is monotone in λ (less feedback, more contraction), for the largest stable
    λ up to ``tol``. ``select`` picks which λ the new checkpoint carries (``auto``: λ_cert
    when it is at least ``min_lambda``, else the empirical one). The new checkpoint is the
    old one with the module's evaluation dampening set to λ (``module.hparams.dampening``).

(b) SRN-C fine-tuning (section 2.4). Build the LightningModule from the checkpoint's
    hyperparameters with the norm replaced (default SRN-C α=0.9 β=1 on the loop's convs, the
    Hard Lipschitz constraint, which certifies; or α=2 β=0.1, the Soft one), load the trained kernels as the raw
    (pre-normalisation) weights, re-converge the power vectors (``recstab.norms.refresh``:
    loaded plain weights leave them stale) and train K more steps on the same data. SRN-C at α < 1
    on the loop's convs certifies recurrence feat (each block's self-loop is bounded by α², VDnCNN
    α) and frame or rlsp with VDnCNN layers (a chain of convs, α^(D+2)); not frame or rlsp with
    VResNet layers (a residual block is bounded by 1 + α², above 1 for every α): there use (c).

(c) Certified fine-tuning: (b) with ``recstab.norms.CertifiedLoop(rho)`` (``norm=certified``):
    the slices through which the state enters the loop are normalised so that the loop
    certificate is ≤ ρ from the weights alone, at load and after every step, for recurrences feat,
    frame, rlsp and birlsp of both backbones; the model ends certified at ρ by construction, and
    the report says what the fine-tune recovered of the PSNR.

Every measurement is one :func:`recstab.diagnostics.measure` with the ``diagnostics`` spec (the
preset the training monitor, src/diagnose.py and the sweeps use): its certificate L̂ (proven for
every frame size), TRF and λ₁ (on noisy frames of the long video), and its verdict.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

METHODS = ("dampening", "finetune", "certify", "both")  # both: dampening and finetune
SELECT = ("auto", "certified", "empirical")


# ----------------------------------------------------------------------------------- measurements
@dataclass
class Measurement:
    """Stability of one model at one dampening λ."""
    dampening: float
    bound: float
    certified: bool
    lyapunov: float
    lyapunov_stderr: float
    trf_verdict: str
    trf_extent: int
    verdict: str
    psnr: list = field(default_factory=list)  # validation PSNR per frame (dB), when measured

    @property
    def psnr_7(self) -> float | None:
        return self.psnr[-1] if self.psnr else None


def measure_at(model, dampening: float, spec, stream, sigma: float) -> Measurement:
    """The spec's certificate, TRF and λ₁ of ``model`` with feature dampening λ, and their verdict."""
    from recstab.diagnostics import measure

    log.info("measuring at dampening λ = %.4g", dampening)
    m = measure(model, spec.only("certificate", "trf", "lyapunov"), clean_frames=stream, sigma=sigma / 255,
                dampening=dampening, progress=True)
    nan = float("nan")
    return Measurement(float(dampening), nan if m.certificate is None else float(m.certificate.bound),
                       bool(m.certificate is not None and m.certificate.certified),
                       nan if m.lyapunov is None else float(m.lyapunov.exponent),
                       nan if m.lyapunov is None else float(m.lyapunov.stderr),
                       "—" if m.trf is None else m.trf.verdict, -1 if m.trf is None else int(m.trf.extent), m.verdict)


def stable(m: Measurement, margin: float) -> bool:
    return m.verdict != "proven unstable" and m.lyapunov < -margin


# ----------------------------------------------------------------------------------- (a) dampening
@dataclass
class DampeningSearch:
    chosen: float            # the λ the new checkpoint carries
    certified: float         # λ_cert = min(1, e^-margin / L̂(1))
    empirical: float         # largest λ found stable (bisection)
    selected_by: str         # certified | empirical | undamped (already stable at λ = 1)
    trials: list             # Measurement of every λ tried, in order


def search_dampening(measure_at, margin: float = 0.05, tol: float = 0.02, max_iters: int = 8,
                     select: str = "auto", min_lambda: float = 0.5) -> DampeningSearch:
    """Largest feature-dampening λ that is certified, or else stable with margin (see the module docstring).

    ``measure_at(λ) -> Measurement``. Bisection on [λ_cert, 1] keeps ``lo`` stable and ``hi``
    not stable until hi − lo ≤ tol or ``max_iters`` bisections.
    """
    if select not in SELECT:
        raise ValueError(f"select={select!r}; valid: {', '.join(SELECT)}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0 (λ₁ < −margin counts as stable), got {margin}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    trials = [measure_at(1.0)]
    one = trials[0]
    if one.certified and one.bound <= math.exp(-margin) or stable(one, margin):
        return DampeningSearch(1.0, 1.0 if one.certified else min(1.0, math.exp(-margin) / one.bound),
                               1.0, "undamped", trials)
    lam_cert = min(1.0, math.exp(-margin) / one.bound) if one.bound > 0 else 1.0
    at_cert = measure_at(lam_cert)
    for _ in range(4):  # the certificate is linear in λ up to its weighting slack: shrink if it is not
        if at_cert.bound <= math.exp(-margin):
            break
        lam_cert *= math.exp(-margin) / at_cert.bound
        trials.append(at_cert)
        at_cert = measure_at(lam_cert)
    trials.append(at_cert)
    lo, hi = lam_cert, 1.0
    if not stable(at_cert, margin):  # certified but λ₁ estimate noisy above −margin: bisect below it
        lo = 0.0
    for _ in range(max_iters):
        if hi - lo <= tol:
            break
        mid = 0.5 * (lo + hi)
        m = measure_at(mid)
        trials.append(m)
        lo, hi = (mid, hi) if stable(m, margin) else (lo, mid)
    if select == "certified" or (select == "auto" and lam_cert >= min_lambda):
        return DampeningSearch(lam_cert, lam_cert, lo, "certified", trials)
    return DampeningSearch(lo, lam_cert, lo, "empirical", trials)


# ----------------------------------------------------------------------------------- (b) fine-tune
def normalised_module(hparams: dict, state_dict: dict, norm: dict, **overrides):
    """The LightningModule of ``hparams`` with ``norm`` instead, the plain trained kernels as raw weights.

    A parametrized conv keeps its raw kernel at ``<conv>.parametrizations.weight.original``;
    a checkpoint trained without the norm has it at ``<conv>.weight``. Power vectors start
    stale, so they are re-converged (``refresh``, exact) after loading.
    """
    from recstab.lit.module import VideoRestorationModule
    from recstab.norms import refresh

    model = {k: v for k, v in dict(hparams["model"]).items() if k != "norm"}  # recstab 0.1 kept the norm there
    module = VideoRestorationModule(**{**hparams, "model": model, "norm": dict(norm), **overrides})
    target = module.state_dict()
    mapped, missing = {}, []
    for key in target:
        if key in state_dict:
            mapped[key] = state_dict[key]
        elif key.endswith(".parametrizations.weight.original"):
            plain = key.replace(".parametrizations.weight.original", ".weight")
            if plain not in state_dict:
                raise KeyError(f"checkpoint has neither {key!r} nor {plain!r}")
            mapped[key] = state_dict[plain]
        else:
            missing.append(key)
    not_vectors = [k for k in missing if not k.endswith(".u") and ".parametrizations.weight." not in k]
    if not_vectors:
        raise KeyError(f"checkpoint lacks {not_vectors[:5]} (and power vectors, which refresh rebuilds)")
    module.load_state_dict(mapped, strict=False)
    refresh(module.model)
    return module


# ----------------------------------------------------------------------------------- data, PSNR
def validation_psnr(model, datamodule, dampening: float, max_batches: int | None = None) -> list[float]:
    """Mean PSNR (dB) of every frame of the validation clips, output clamped to [0, 1]."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from recstab.models.dampening import evaluating

    datamodule.setup("validate")
    sums, count = None, 0
    device = next(model.parameters()).device
    with evaluating(model, dampening), torch.no_grad():
        for i, batch in enumerate(datamodule.val_dataloader()):
            if max_batches is not None and i >= max_batches:
                break
            y = model(batch["input"].to(device)).clamp(0, 1)
            target = batch["target"].to(device)
            psnr = torch.stack([peak_signal_noise_ratio(y[:, t], target[:, t], data_range=1.0, reduction="none",
                                                        dim=(1, 2, 3)) for t in range(y.shape[1])], 1)
            sums = psnr.sum(0) if sums is None else sums + psnr.sum(0)
            count += psnr.shape[0]
    return (sums / count).tolist()


def run_config(ckpt_path: Path) -> DictConfig | None:
    """The composed Hydra config of the run that wrote ``ckpt_path`` (<run>/.hydra/config.yaml), if any."""
    path = ckpt_path.resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def make_datamodule(cfg: DictConfig, hparams: dict, ckpt_path: Path):
    """The training run's data group (its validation split), else ``cfg.data``; the clip length and channels
    follow the checkpoint."""
    run = run_config(ckpt_path) if cfg.data_from_run else None
    node = run.data if run is not None else cfg.data
    data = OmegaConf.to_container(node, resolve=True)
    data.update(frames=int(hparams["frames"]), in_channels=int(hparams["model"].get("in_channels", 3)),
                **OmegaConf.to_container(cfg.data_overrides, resolve=True))
    return hydra.utils.instantiate(data, _convert_="all"), data


# ----------------------------------------------------------------------------------- reports
ROWS = (("PSNR_7 (dB, val)", "psnr_7", "{:.2f}"), ("verdict", "verdict", "{}"),
        ("certified bound L̂", "bound", "{:.3g}"), ("Lyapunov λ₁", "lyapunov", "{:+.3f}"),
        ("λ₁ stderr", "lyapunov_stderr", "{:.3f}"), ("TRF", "trf_verdict", "{}"),
        ("TRF extent", "trf_extent", "{}"), ("dampening λ", "dampening", "{:.3f}"))


def _cell(m: Measurement, key: str, fmt: str) -> str:
    value = m.psnr_7 if key == "psnr_7" else getattr(m, key)
    return "—" if value is None else fmt.format(value)


def write_report(out_dir: Path, title: str, before: Measurement, after: Measurement, extra: dict,
                 lines: list[str] | None = None) -> dict:
    """report.md (a before/after table) and report.json in ``out_dir``; returns the JSON dict."""
    from recstab.diagnostics import engine

    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", "| | before | after |", "|---|---|---|"]
    md += [f"| {label} | {_cell(before, key, fmt)} | {_cell(after, key, fmt)} |" for label, key, fmt in ROWS]
    md += [""] + list(lines or [])
    data = {"title": title, "before": {**asdict(before), "psnr_7": before.psnr_7},
            "after": {**asdict(after), "psnr_7": after.psnr_7}, **extra}
    (out_dir / "report.md").write_text("\n".join(md + ["", "![before and after](report.png)"]) + "\n")
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=engine.json_value))
    before_after_figure(out_dir / "report.png", title, before, after)
    return data


def before_after_figure(path: Path, title: str, before: Measurement, after: Measurement) -> Path:
    """report.png: validation PSNR per frame, the certified bound L̂ and λ₁, before and after."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, bound, lyap) = plt.subplots(1, 3, figsize=(11, 3.2), gridspec_kw={"width_ratios": [2, 1, 1]})
    for m, label, color in ((before, "before", "C3"), (after, "after", "C0")):
        if m.psnr:
            curve.plot(range(1, len(m.psnr) + 1), m.psnr, marker="o", color=color, label=label)
    curve.set(xlabel="frame of the validation clip", ylabel="PSNR (dB)", title="validation PSNR per frame")
    curve.legend(fontsize=8)
    for ax, key, label in ((bound, "bound", "certified bound L̂"), (lyap, "lyapunov", "Lyapunov λ₁ (per frame)")):
        values = [getattr(before, key), getattr(after, key)]
        ax.bar(["before", "after"], [v if math.isfinite(v) else 0.0 for v in values], color=["C3", "C0"])
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v if math.isfinite(v) else 0.0), ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0 if key == "bound" else 0.0, color="k", lw=0.7, ls="--")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stabilise_dampening(module, measure_lam, datamodule, cfg: DictConfig, out_dir: Path, ckpt: dict) -> dict:
    d = cfg.dampening
    search = search_dampening(lambda lam: measure_lam(module.model, lam),
                              margin=d.margin, tol=d.tol, max_iters=d.max_iters, select=d.select,
                              min_lambda=d.min_lambda)
    before = search.trials[0]
    after = next((m for m in search.trials if m.dampening == search.chosen), None)
    if after is None:
        after = measure_lam(module.model, search.chosen)
    psnr = {}  # validation PSNR per λ (λ_chosen is often λ_cert or 1): each λ validated once
    for lam in (1.0, search.chosen, search.certified):
        if lam not in psnr:
            psnr[lam] = validation_psnr(module.model, datamodule, lam, cfg.val_batches)
    before.psnr, after.psnr = psnr[1.0], psnr[search.chosen]
    psnr_cert = psnr[search.certified]  # the price of a proof
    new = copy.copy(ckpt)
    new["hyper_parameters"] = {**ckpt["hyper_parameters"], "dampening": search.chosen}
    import torch
    ckpt_out = out_dir / "dampened.ckpt"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(new, ckpt_out)
    lines = [f"λ_cert = e^(−{d.margin})/L̂(1) = {search.certified:.4f} (certified contraction); "
             f"largest λ found stable (λ₁ < −{d.margin}, TRF not unbounded): {search.empirical:.4f}; "
             f"chosen: {search.chosen:.4f} ({search.selected_by}). PSNR_7 at λ_cert: {psnr_cert[-1]:.2f} dB.", "",
             "| λ | L̂ | λ₁ | TRF | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {m.dampening:.4f} | {m.bound:.3g} | {m.lyapunov:+.3f} ± {m.lyapunov_stderr:.3f} | "
              f"{m.trf_verdict} ({m.trf_extent}) | {m.verdict} |" for m in search.trials]
    lines += ["", f"checkpoint: `{ckpt_out}` (module dampening = {search.chosen:.4f})"]
    return write_report(out_dir, "Feature dampening (appendix F)", before, after,
                        {"search": {k: v for k, v in asdict(search).items() if k != "trials"}, "psnr_at_certified": psnr_cert,
                         "trials": [asdict(m) for m in search.trials], "checkpoint": str(ckpt_out)}, lines)


def certified_norm(rho: float) -> dict:
    """The norm of (c): conf/norm/certified.yaml at ``rho``, without its SRN-C base (a base would rescale every
    trained kernel at load; the fine-tune keeps the trained feed-forward path as it is)."""
    return {"_target_": "recstab.norms.certified.CertifiedLoop", "name": "certified", "rho": float(rho)}


def stabilise_finetune(module, measure_lam, datamodule, data_cfg: dict, cfg: DictConfig, out_dir: Path,
                       ckpt: dict, norm: dict | None = None) -> dict:
    """(b), or (c) with ``norm=certified_norm(rho)``: fine-tune ``cfg.finetune.steps`` steps under ``norm``."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    f = cfg.finetune
    before = measure_lam(module.model, 1.0)
    before.psnr = validation_psnr(module.model, datamodule, 1.0, cfg.val_batches)
    norm = OmegaConf.to_container(f.norm, resolve=True) if norm is None else dict(norm)
    tuned = normalised_module(dict(ckpt["hyper_parameters"]), ckpt["state_dict"], norm, lr=float(f.lr),
                              lr_schedule=str(f.lr_schedule), dampening=1.0)
    at_load = measure_lam(tuned.model, 1.0)
    at_load.psnr = validation_psnr(tuned.model, datamodule, 1.0, cfg.val_batches)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(max_steps=int(f.steps), max_epochs=-1, accelerator=cfg.accelerator, devices=1,
                        logger=CSVLogger(str(out_dir), name="csv", version=""), enable_checkpointing=False,
                        gradient_clip_val=f.gradient_clip_val, log_every_n_steps=10, num_sanity_val_steps=0,
                        limit_val_batches=0, enable_progress_bar=True, enable_model_summary=False,
                        default_root_dir=str(out_dir))
    trainer.fit(tuned, datamodule=datamodule)
    from recstab.norms import refresh
    refresh(tuned.model)
    ckpt_out = out_dir / "finetuned.ckpt"
    trainer.save_checkpoint(str(ckpt_out))
    after = measure_lam(tuned.model, 1.0)
    after.psnr = validation_psnr(tuned.model, datamodule, 1.0, cfg.val_batches)
    lines = [f"Fine-tuned {int(f.steps)} steps with {norm} (lr {f.lr}, {f.lr_schedule}) from the checkpoint.",
             "", "Right after loading the kernels into the normalised model (before any step): "
             f"PSNR_7 {at_load.psnr_7:.2f} dB, {at_load.verdict}, L̂ {at_load.bound:.3g}, "
             f"λ₁ {at_load.lyapunov:+.3f}.", "", f"checkpoint: `{ckpt_out}`"]
    what = (f"ρ={norm.get('rho')}" if norm.get("name") == "certified"
            else f"α={norm.get('alpha')} β={norm.get('beta')}")
    if norm.get("name") == "certified":
        lines.insert(1, f"Certified at ρ = {norm['rho']}: L̂ = {after.bound:.4g} ≤ ρ, recomputed from the fine-tuned "
                        "weights alone (a theorem); it held at every step by construction.")
    return write_report(out_dir, f"Fine-tuning ({norm.get('name')} {what}, {int(f.steps)} steps)", before, after,
                        {"at_load": {**asdict(at_load), "psnr_7": at_load.psnr_7}, "norm": norm,
                         "steps": int(f.steps), "checkpoint": str(ckpt_out), "data": data_cfg}, lines)


def stabilise(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the configured method(s) on ``cfg.ckpt_path``; return {method: report dict}."""
    import torch

    from recstab.lit.module import VideoRestorationModule
    from recstab.lit.preflight import read_recstab_checkpoint

    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}; valid: {', '.join(METHODS)}")
    if cfg.method == "certify" and not 0 < float(cfg.certify.rho) < 1:
        raise ValueError(f"certify.rho must be in (0, 1) (the certified contraction factor), got {cfg.certify.rho}")
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path=<checkpoint> is required (a .ckpt written by src/train.py)")
    path = Path(cfg.ckpt_path)
    ckpt = read_recstab_checkpoint(path)  # a missing file or a foreign one: what to do, in one line
    torch.manual_seed(int(cfg.seed))
    module = VideoRestorationModule.load_from_checkpoint(str(path), map_location="cpu")
    from recstab.norms import refresh
    refresh(module.model)  # exact power-iteration vectors (a no-op without a norm)
    module.eval()
    hp = dict(module.hparams)
    datamodule, data_cfg = make_datamodule(cfg, hp, path)
    from recstab.data.long_video import LongVideo
    from recstab.diagnostics.measure import as_spec

    spec = as_spec(cfg.diagnostics)
    stream = LongVideo(**{**OmegaConf.to_container(cfg.long_video, resolve=True),
                          "gray": int(module.model.in_channels) == 1})
    stream.probe()
    from recstab.diagnostics.measure import check_input
    check_input(module.model, spec, stream)  # a channel mismatch or a too short video: refused before any work

    def measure_lam(model, lam: float) -> Measurement:
        return measure_at(model, lam, spec, stream, float(cfg.sigma))

    reports = {}
    if cfg.method in ("dampening", "both"):
        reports["dampening"] = stabilise_dampening(module, measure_lam, datamodule, cfg, out_dir / "dampening", ckpt)
        log.info("dampening: %s", (out_dir / "dampening" / "report.md").read_text())
    if cfg.method in ("finetune", "both"):
        reports["finetune"] = stabilise_finetune(module, measure_lam, datamodule, data_cfg, cfg,
                                                 out_dir / "finetune", ckpt)
        log.info("finetune: %s", (out_dir / "finetune" / "report.md").read_text())
    if cfg.method == "certify":
        reports["certify"] = stabilise_finetune(module, measure_lam, datamodule, data_cfg, cfg, out_dir / "certify",
                                                ckpt, norm=certified_norm(float(cfg.certify.rho)))
        log.info("certify: %s", (out_dir / "certify" / "report.md").read_text())
    return reports
