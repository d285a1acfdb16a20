"""Diagnostics: TRF, onset test, burst processing, dampening, report, Figure 2, callbacks, CLI."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from recstab.diagnostics import (BurstProcessor, burst_process, figure2, instability_onsets,
                                 stability_report, temporal_receptive_field)
from recstab.models import build_model
from recstab.models.reference import LinearRecurrence




class BreaksAfter(nn.Module):
    """Returns its input, except on the k-th frame since the last reset: NaN (or +100)."""

    def __init__(self, k: int, how: str = "nan", in_channels: int = 3):
        super().__init__()
        self.k, self.how, self.in_channels = k, how, in_channels
        self.frames_seen = 0

    def process(self, x, state=None):
        n = 0 if state is None else state
        ys = []
        for t in range(x.shape[1]):
            n += 1
            self.frames_seen += 1
            y = x[:, t].clone()
            if n == self.k:
                y = y * float("nan") if self.how == "nan" else y + 100.0
            ys.append(y)
        return torch.stack(ys, 1), n

    def forward(self, x):
        return self.process(x)[0]


class Age(nn.Module):
    """Outputs, for every pixel, the number of frames since its state was reset (1 on the first)."""

    in_channels = 1

    def process(self, x, state=None):
        n = 0 if state is None else state
        ys = []
        for t in range(x.shape[1]):
            n += 1
            ys.append(torch.full_like(x[:, t], float(n)))
        return torch.stack(ys, 1), n

    def forward(self, x):
        return self.process(x)[0]


def frames(n=60, size=8, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(channels, size, size, generator=g) for _ in range(n)]


def tiny(recurrence="feat", channels=4, seed=0, task="denoise"):
    torch.manual_seed(seed)
    return build_model("vresnet", recurrence, task, channels)


# TRF tests: tests/test_trf.py


# ---------------------------------------------------------------------------------- onsets
def test_model_breaking_after_k_frames_gives_onsets_all_k():
    result = instability_onsets(BreaksAfter(7), frames(60), sigma=30 / 255)
    assert result.onsets == [7] * 8 and result.tail == 4
    assert result.deciles == (7.0, 7.0)
    assert result.unstable_frames == [6 + 7 * i for i in range(8)]
    assert np.isnan(result.psnr[6]) and np.isfinite(result.psnr[:6]).all()
    assert len(result.psnr) == 60 and result.frames == 60 and result.fps > 0


def test_chunk_size_does_not_change_the_onsets():
    runs = [instability_onsets(BreaksAfter(5, how="big"), frames(40), chunk=c, prefetch=p)
            for c, p in ((1, 0), (3, 2), (16, 4), (64, 1))]
    for r in runs[1:]:
        assert r.onsets == runs[0].onsets == [5] * 8
        assert np.array_equal(r.psnr, runs[0].psnr)  # same noise per frame, whatever the chunking
    assert (runs[0].psnr[4::5] < 0).all()  # +100 on the 5th frame: PSNR far below 0 dB, unclamped


def test_nan_model_is_counted_not_crashed_on():
    result = instability_onsets(BreaksAfter(1), frames(10), chunk=4)
    assert result.onsets == [1] * 10 and np.isnan(result.psnr).all()


def test_no_instability_gives_infinite_deciles_and_noise_is_seeded():
    a = instability_onsets(LinearRecurrence(0.0, b=1.0), frames(20), sigma=30 / 255, seed=1)
    assert a.onsets == [] and a.deciles == (math.inf, math.inf) and a.tail == 20
    assert 15 < float(np.median(a.psnr)) < 25  # identity on noisy input: ~18.6 dB at sigma 30
    b = instability_onsets(LinearRecurrence(0.0, b=1.0), frames(20), sigma=30 / 255, seed=2)
    assert not np.array_equal(a.psnr, b.psnr)


def test_stream_is_decoded_ahead_in_bounded_memory():
    model = BreaksAfter(10 ** 9)
    lead = []

    def stream():
        for i in range(400):
            lead.append(i - model.frames_seen)   # frames decoded but not yet processed
            yield torch.rand(3, 4, 4)
    result = instability_onsets(model, stream(), chunk=8, prefetch=2)
    assert result.frames == 400 and max(lead) <= (2 + 2) * 8


def test_onset_errors_are_clear():
    with pytest.raises(ValueError, match="sigma.*30"):
        instability_onsets(BreaksAfter(3), frames(4), sigma=30)
    with pytest.raises(ValueError, match="frame 2 has shape"):
        instability_onsets(BreaksAfter(3), frames(2) + [torch.rand(3, 5, 5)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        instability_onsets(BreaksAfter(3), [torch.full((3, 4, 4), 200.0)])

    def broken():
        yield torch.rand(3, 4, 4)
        raise OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        instability_onsets(BreaksAfter(3), broken())
    with pytest.raises(ValueError, match="bidirectional"):
        instability_onsets(tiny("birlsp"), frames(4))


def test_sr2_stream_is_downsampled():
    model = tiny("feat", task="sr2")
    model.tail.weight.data.zero_()  # bicubic upsampling of the input: a sane, stable output
    result = instability_onsets(model, frames(6, size=16), sigma=0.0, chunk=4)
    assert result.onsets == [] and len(result.psnr) == 6 and 8 < float(result.psnr.mean()) < 60


# ---------------------------------------------------------------------------------- coping strategies
def test_burst_processing_without_and_with_overlap():
    x = torch.rand(1, 30, 1, 2, 2)
    ages = burst_process(Age(), x, burst=10)[0, :, 0, 0, 0].tolist()
    assert ages == list(range(1, 11)) * 3
    ages = burst_process(Age(), x, burst=10, overlap=5)[0, :, 0, 0, 0].tolist()
    # frames 1-10 from the first burst, 11-15 from the one started at 6, 16-20 from the one at 11, ...
    assert ages == list(range(1, 11)) + list(range(6, 11)) * 4
    wrapper = BurstProcessor(Age(), burst=10, overlap=5)
    y1, s = wrapper.process(x[:, :7])
    y2, _ = wrapper.process(x[:, 7:], s)
    assert torch.equal(torch.cat([y1, y2], 1), wrapper(x))  # chunked == whole
    with pytest.raises(ValueError, match="overlap"):
        BurstProcessor(Age(), burst=4, overlap=4)


def test_bursts_keep_a_model_that_breaks_at_12_frames_stable():
    assert instability_onsets(BreaksAfter(12), frames(50)).onsets == [12] * 4
    assert instability_onsets(BreaksAfter(12), frames(50), burst=10).onsets == []
    assert instability_onsets(BreaksAfter(12), frames(50), burst=10, overlap=5).onsets == []
    trf = temporal_receptive_field(BurstProcessor(LinearRecurrence(1.5, b=0.2), burst=5), frames=21, size=4, iters=2)
    assert trf.verdict == "bounded" and trf.extent <= 5


def test_feature_dampening_is_applied_and_restored():
    model = tiny("feat")
    undamped = temporal_receptive_field(model, frames=21, size=8, iters=1)
    off = temporal_receptive_field(model, frames=21, size=8, iters=1, dampening=0.0)
    assert undamped.verdict == "unbounded" and off.verdict == "bounded" and off.extent == 1
    result = instability_onsets(model, frames(6), dampening=0.0)
    assert model.dampening == 1.0 and result.settings["dampening"] == 0.0


# ---------------------------------------------------------------------------------- certified stability
def test_srnc_half_is_bounded_and_certified(tmp_path):
    pytest.importorskip("recstab.norms")
    from recstab.norms import apply_norm, refresh

    model = tiny("feat")
    apply_norm(model, "srnc", alpha=0.5, beta=1.0, n=16)
    refresh(model)
    report = stability_report(model, tmp_path / "srnc", clean_frames=frames(30, size=16),
                              trf_kwargs=dict(frames=41, size=16, iters=5), spectra_n=16,
                              lyapunov_kwargs=dict(frames=30, size=8, burn_in=5))
    assert report.trf.verdict == "bounded" and report.trf.extent <= 4
    assert report.certificate.certified and report.bound < 1 and report.verdict == "certified stable"
    assert all(abs(c["sigma1"] - 0.5) < 0.01 for c in report.convs)
    assert report.onsets.onsets == [] and report.lyapunov.exponent < 0  # a contraction forgets its state
    assert "a theorem" in (tmp_path / "srnc" / "report.md").read_text()


def test_report_writes_its_files_and_an_unstable_verdict(tmp_path):
    pytest.importorskip("recstab.norms")
    model = tiny("feat")
    report = stability_report(model, tmp_path / "he", clean_frames=frames(16, size=16),
                              trf_kwargs=dict(frames=21, size=8, iters=2), spectra_n=8,
                              lyapunov_kwargs=dict(frames=20, size=8, burn_in=5))
    assert report.verdict == "proven unstable" and report.bound > 1 and report.trf.verdict == "unbounded"
    for name in ("trf.png", "onsets.png", "spectra.png", "report.json", "report.md", "trf_unbounded_sequence.pt"):
        assert (tmp_path / "he" / name).stat().st_size > 100
    data = json.loads((tmp_path / "he" / "report.json").read_text())
    assert data["verdict"] == "proven unstable" and len(data["convs"]) == 12
    assert data["metrics"]["stability/verdict_code"] == 3.0 and data["metrics"]["stability/trf_unbounded"] == 1.0
    assert "**Verdict: proven unstable**" in (tmp_path / "he" / "report.md").read_text()
    # the proof: the saved period, replayed through the model from the file, diverges again
    from recstab.diagnostics.demonstration import replay
    proof = torch.load(tmp_path / "he" / "trf_unbounded_sequence.pt", weights_only=False)
    assert proof["replayed_status_agrees"] and proof["period"].shape == (21, 3, 8, 8)
    assert 0 <= float(proof["period"].min()) and float(proof["period"].max()) <= 1  # a bounded input
    again = replay(model.eval(), tmp_path / "he" / "trf_unbounded_sequence.pt")
    assert again.diverged and again.status == proof["result"]["status"]
    ff = stability_report(tiny("none"), tmp_path / "ff", trf_kwargs=dict(frames=11, size=8, iters=2), spectra_n=8)
    assert ff.verdict == "certified stable" and ff.bound == 0.0  # no loop at all


def test_conv_spectra_measure_the_operator_and_skip_strided_convs():
    from recstab.diagnostics import conv_spectra

    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, stride=2), nn.Conv2d(3, 2, 1))
    spectra = conv_spectra(net, 6)
    assert [r["name"] for r in spectra.rows] == ["0", "2"] and "stride" in spectra.skipped["1"]
    # independent: the dense matrix of the circular conv on a 6×6 map, column by column
    eye = torch.eye(2 * 36, dtype=torch.float64).reshape(-1, 2, 6, 6)
    w = net[0].weight.detach().double()
    dense = torch.nn.functional.conv2d(torch.nn.functional.pad(eye, (1, 1, 1, 1), mode="circular"), w)
    sv = torch.linalg.svdvals(dense.reshape(72, -1).T)
    row = spectra.rows[0]
    assert row["sigma1"] == pytest.approx(float(sv[0]), rel=1e-9)
    assert row["srank"] == pytest.approx(float((sv ** 2).sum() / sv[0] ** 2), rel=1e-9)
    metrics = spectra.metrics()
    assert metrics["spectra/0/sigma1"] == pytest.approx(float(sv[0]), rel=1e-9)
    assert metrics["spectra/convs"] == 2.0 and metrics["spectra/sigma1_max"] >= metrics["spectra/0/sigma1"]


class _Lyap:
    def __init__(self, exponent, stderr=0.01, positive_ranges=()):
        self.exponent, self.stderr, self.positive_ranges = exponent, stderr, list(positive_ranges)


class _Cert:
    def __init__(self, bound):
        self.bound, self.certified, self.norm = bound, bound < 1, "the l2 norm of the state"


def test_verdict_words_match_what_was_proved():
    from recstab.diagnostics.engine import decide

    breaks = instability_onsets(BreaksAfter(7), frames(30))   # NaN after 7 frames of state: divergences
    bad = instability_onsets(BreaksAfter(1), frames(10))      # fails from the initial state too: bad outputs
    fine = instability_onsets(LinearRecurrence(0.0, b=1.0), frames(10))
    assert breaks.diverged and breaks.divergences[0] == (0, 6) and not bad.diverged and bad.n_onsets == 10
    assert decide(_Cert(0.5), None, breaks, _Lyap(0.3))[0] == "certified stable"   # a theorem wins
    assert "CONTRADICTION" in " ".join(decide(_Cert(0.5), None, breaks)[1])
    verdict, notes = decide(_Cert(2.0), None, breaks, _Lyap(-0.2))
    assert verdict == "proven unstable" and "stream frames 0-6" in " ".join(notes)
    verdict, notes = decide(_Cert(2.0), None, fine, _Lyap(-0.25), measured_on="frames 0-99 of the long video")
    assert verdict == "empirically stable" and "margin 0.25" in " ".join(notes)
    verdict, notes = decide(_Cert(2.0), None, bad, _Lyap(0.3, positive_ranges=[(50, 80)]), measured_on="frames 0-99")
    text = " ".join(notes)
    assert verdict == "inconclusive" and "not proof" in text and "50-79" in text and "not feedback divergences" in text
    assert decide(_Cert(2.0), None, fine, None)[0] == "inconclusive"   # no margin measured


# ---------------------------------------------------------------------------------- figure 2
def test_figure2_writes_its_png(tmp_path):
    result = figure2(tmp_path / "fig2.png", connections=["none", "shift", "frame", "rlsp"], channels=8,
                     frames=25, size=8)
    assert (tmp_path / "fig2.png").stat().st_size > 5000
    assert result.diverged == {"none": False, "shift": False, "frame": True, "rlsp": True}


# ---------------------------------------------------------------------------------- training callbacks
def test_callbacks_log_trf_and_onsets_during_training(tmp_path, caplog, two_videos_dir):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from recstab.diagnostics import MeasureSpec
    from recstab.lit.stability_callbacks import StabilityMonitor

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny("feat")

        def training_step(self, batch, _):
            return (self.model(batch[0]) - batch[0]).pow(2).mean() * 0

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(2, 2, 3, 8, 8)), batch_size=1)
    trainer = L.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=CSVLogger(tmp_path), default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                        callbacks=[StabilityMonitor(every_n_val_epochs=1, diagnostics=MeasureSpec(
                            spectra_n=8, trf={"frames": 11, "size": 8, "iters": 1},
                            lyapunov={"frames": 20, "size": 8, "burn_in": 5}, onsets={"max_frames": 8, "chunk": 4}),
                            long_video={"paths_or_folder": str(two_videos_dir), "loop_to": 20})])
    with caplog.at_level(logging.WARNING):
        trainer.fit(Module(), data, data)
    assert "UNSTABLE" in caplog.text
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for key in ("stability/trf_unbounded", "stability/trf_extent", "stability/trf_growth_rate",
                "stability/verdict_code", "stability/bound", "stability/lyapunov", "stability/lyapunov_stderr",
                "long/onset_d1", "long/onset_d9", "long/n_onsets", "long/n_divergences", "long/fps"):
        assert key in metrics
    assert list((tmp_path / "stability").glob("trf_step*.png")) and (tmp_path / "stability" / "onsets.png").exists()


@pytest.fixture
def two_videos_dir(tmp_path, write_video_folder):
    return write_video_folder(tmp_path / "videos", frames=(5, 5), size=32)


# ---------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_diagnose_fig2_runs_as_a_subprocess(tmp_path, repo_root, run_script):
    out = run_script("diagnose.py", ["experiment=fig2", "fig2.channels=4", "fig2.frames=8", "fig2.size=8",
                                     f"paths.log_dir={tmp_path}"], repo_root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(tmp_path.glob("fig2/runs/*/fig2.png"))) == 1


def test_diagnose_report_from_config_and_from_checkpoint(tmp_path, repo_root, two_videos_dir, compose):
    pytest.importorskip("recstab.lit.module")
    import importlib.util

    import lightning as L

    from recstab.lit.module import VideoRestorationModule

    spec = importlib.util.spec_from_file_location("diagnose_cli", repo_root / "src" / "diagnose.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    small = ["model.channels=4", "diagnostics.trf.frames=11", "diagnostics.trf.size=8", "diagnostics.trf.iters=2",
             "diagnostics.onsets.max_frames=6", f"long_video.paths_or_folder={two_videos_dir}",
             "long_video.loop_to=20", "diagnostics.spectra_n=8", "diagnostics.lyapunov.frames=20",
             "diagnostics.lyapunov.size=8", "diagnostics.lyapunov.burn_in=5",
             "wandb.enabled=false", f"paths.log_dir={tmp_path}"]
    report = cli.run_report(compose("diagnose", small + ["norm=srnc", "norm.alpha=0.5", "norm.beta=1.0",
                                                         "norm.n=8"]), tmp_path / "cfg")
    assert report.verdict == "certified stable" and (tmp_path / "cfg" / "report.md").exists()

    module = VideoRestorationModule(model={"_target_": "recstab.models.build_model", "backbone": "vresnet",
                                           "recurrence": "feat", "channels": 4})
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)
    report = cli.run_report(compose("diagnose", small + [f"ckpt_path={ckpt}"]), tmp_path / "ckpt")
    assert report.verdict == "proven unstable"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        cli.load_model(compose("diagnose", small + ["ckpt_path=nope.ckpt"]))


def test_long_sections_report_their_progress_within_the_section():
    """The progress bar moves inside the TRF (per iteration) and the onset test (per chunk), not only between
    sections: on_progress gets increasing fractions that end at 1."""
    from recstab.diagnostics import instability_onsets, temporal_receptive_field

    model = tiny("feat")
    seen = []
    temporal_receptive_field(model, frames=9, size=8, iters=6, replay_frames=0, on_progress=seen.append)
    assert seen == [pytest.approx((i + 1) / 6) for i in range(6)]
    seen.clear()
    instability_onsets(model, list(torch.rand(24, 3, 8, 8)), chunk=8, on_progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 3
