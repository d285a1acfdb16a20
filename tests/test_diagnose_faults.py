"""Faults during a diagnosis: killed and resumed, unreadable files, non-finite input, a failing section."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from recstab.data.long_video import LongVideo, VideoDecodeError
from recstab.diagnostics import engine, instability_onsets, stability_report
from recstab.models import build_model

pytest.importorskip("av")  # the test videos are written with PyAV

TRF = dict(frames=11, size=8, iters=2)
LYAP = dict(frames=30, size=8, burn_in=5)


def tiny(recurrence="feat", seed=0, init="he"):
    torch.manual_seed(seed)
    return build_model("vresnet", recurrence, "denoise", 8, init=init)


class Killed(RuntimeError):
    pass


class KillAfter(nn.Module):
    """The wrapped model, except that it raises after `after` frames (None: never): a kill mid-stream."""

    def __init__(self, model, after=None):
        super().__init__()
        self.model, self.after, self.seen = model, after, 0
        self.in_channels, self.task = model.in_channels, model.task

    def process(self, x, state=None):
        self.seen += x.shape[1]
        if self.after is not None and self.seen > self.after:
            raise Killed(f"killed after {self.after} frames")
        return self.model.process(x, state)

    def forward(self, x):
        return self.process(x)[0]


class Breaks(nn.Module):
    """Returns its input, NaN on the k-th frame since the last reset; remembers what it was fed."""

    in_channels = 3

    def __init__(self, k):
        super().__init__()
        self.k, self.inputs_finite, self.resets = k, [], 0

    def process(self, x, state=None):
        if state is None:
            self.resets += 1
        n = 0 if state is None else state
        ys = []
        for t in range(x.shape[1]):
            n += 1
            self.inputs_finite.append(bool(torch.isfinite(x[:, t]).all()))
            ys.append(x[:, t] * float("nan") if n == self.k else x[:, t].clone())
        return torch.stack(ys, 1), n

    def forward(self, x):
        return self.process(x)[0]


@pytest.fixture
def videos(tmp_path, write_video_folder):
    return write_video_folder(tmp_path / "videos", frames=(9, 7), size=16)


def bad_files(folder, write_video):
    (folder / "garbage.mp4").write_bytes(b"this is not a video\n" * 40)
    (folder / "empty.mp4").write_bytes(b"")
    t = write_video(folder / "truncated.mp4", frames=30, height=16, width=16)
    data = t.read_bytes()
    t.write_bytes(data[:len(data) * 6 // 10])
    return ["garbage.mp4", "empty.mp4", "truncated.mp4"]


# ---------------------------------------------------------------------------------- killed and resumed
def test_onset_test_killed_mid_stream_resumes_to_the_same_onsets(tmp_path, videos):
    stream = LongVideo(videos, loop_to=200)
    kw = dict(sigma=30 / 255, chunk=8, progress_every=24, prefetch=2)
    model = lambda seed=0: KillAfter(tiny(seed=seed, init="near_identity"))  # noqa: E731
    whole = instability_onsets(model(), stream, progress=tmp_path / "whole.pt", **kw)
    # untrained feat breaks again and again, after a few frames of carried state
    assert whole.n_onsets >= 10 and max(whole.onsets) >= 3 and whole.frames == 200

    progress = tmp_path / "progress.pt"
    with pytest.raises(Killed):
        instability_onsets(KillAfter(tiny(init="near_identity"), after=130), stream, progress=progress, **kw)
    saved = torch.load(progress, weights_only=True)
    assert 24 <= saved["frames"] <= 130 and not saved["complete"]
    assert 0 < len(saved["onsets"]) < whole.n_onsets  # onsets on both sides of the kill

    resumed = instability_onsets(model(), stream, progress=progress, resume=True, **kw)
    assert resumed.resumed_from == saved["frames"]
    assert resumed.onsets == whole.onsets and resumed.unstable_frames == whole.unstable_frames
    assert resumed.divergent == whole.divergent and resumed.frames == 200
    assert np.array_equal(resumed.psnr, whole.psnr, equal_nan=True)
    # a finished run resumes to itself; another model or other settings are refused, naming what differs
    again = instability_onsets(model(), stream, progress=progress, resume=True, **kw)
    assert again.onsets == whole.onsets
    with pytest.raises(ValueError, match="model"):
        instability_onsets(model(seed=1), stream, progress=progress, resume=True, **kw)
    with pytest.raises(ValueError, match="seed"):
        instability_onsets(model(), stream, progress=progress, resume=True, **{**kw, "seed": 3})


@pytest.mark.slow
def test_diagnose_killed_with_sigkill_and_resumed(tmp_path, repo_root, videos):
    """A real `python src/diagnose.py` run, SIGKILLed during the onset test, then resume=true."""
    common = ["model.channels=8", "diagnostics.trf.frames=11", "diagnostics.trf.size=8", "diagnostics.trf.iters=2",
              "diagnostics.lyapunov.frames=20", "diagnostics.lyapunov.size=8", "diagnostics.lyapunov.burn_in=5",
              f"long_video.paths_or_folder={videos}", "long_video.loop_to=1200", "diagnostics.onsets.max_frames=null",
              "diagnostics.onsets.chunk=8", "+diagnostics.onsets.progress_every=64", "diagnostics.spectra_n=8",
              "wandb.enabled=false", "device=cpu"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    # slow the model down so the kill lands mid-stream (1200 frames take ~5 s instead of ~1 s)
    slow = ("import sys, time, runpy; import recstab.models.interface as i; p = i.VideoModel.process\n"
            "def process(self, x, state=None):\n    time.sleep(0.004 * x.shape[1]); return p(self, x, state)\n"
            "i.VideoModel.process = process; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    script = str(repo_root / "src" / "diagnose.py")
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", slow, script, *common, f"paths.log_dir={tmp_path / 'logs'}",
                             f"report_dir={killed_dir}"], env=env, cwd=repo_root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = killed_dir / "onsets_progress.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.is_file() and torch.load(progress, weights_only=True)["frames"] >= 300:
            break
        if proc.poll() is not None:
            pytest.fail(f"diagnose ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = torch.load(progress, weights_only=True)["frames"]
    assert 300 <= done_at_kill < 1200
    partial = json.loads((killed_dir / "report.json").read_text())
    assert partial["sections"]["trf"]["status"] == "done" and "onsets" not in partial["sections"]

    out = subprocess.run([sys.executable, script, *common, f"paths.log_dir={tmp_path / 'logs'}",
                          f"report_dir={killed_dir}", "resume=true"], env=env, cwd=repo_root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    whole_dir = tmp_path / "whole"
    out = subprocess.run([sys.executable, script, *common, f"paths.log_dir={tmp_path / 'logs'}",
                          f"report_dir={whole_dir}"], env=env, cwd=repo_root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((killed_dir / "report.json").read_text())["onsets"]
    whole = json.loads((whole_dir / "report.json").read_text())["onsets"]
    assert resumed["resumed_from"] == done_at_kill and whole["resumed_from"] is None
    assert resumed["frames"] == whole["frames"] == 1200 and whole["n_onsets"] > 0
    assert resumed["onsets"] == whole["onsets"] and resumed["unstable_frames"] == whole["unstable_frames"]


# ---------------------------------------------------------------------------------- unreadable files
def test_bad_files_in_a_folder_are_skipped_and_listed(tmp_path, videos, write_video):
    names = bad_files(videos, write_video)
    stream = LongVideo(videos, skip_bad=True)
    with pytest.warns(RuntimeWarning) as caught:
        report = stability_report(tiny(), tmp_path / "r", clean_frames=stream, trf_kwargs=TRF,
                                  lyapunov_kwargs=LYAP, spectra_n=8)
    warned = " ".join(str(w.message) for w in caught)
    assert all(n in warned for n in names)
    assert report.onsets.frames == 16  # the two readable videos, 9 + 7 frames
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    listed = {os.path.basename(s["path"]): s["reason"] for s in data["skipped_files"]}
    assert set(listed) == set(names)
    assert "empty file" in listed["empty.mp4"] and "cannot open" in listed["garbage.mp4"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Skipped files" in md and all(n in md for n in names)
    assert all(v["status"] == "done" for v in data["sections"].values())


def test_no_readable_video_fails_before_the_trf_naming_every_file(tmp_path, write_video):
    folder = tmp_path / "bad"
    folder.mkdir()
    names = bad_files(folder, write_video)
    calls = []
    with pytest.raises(VideoDecodeError) as error:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stability_report(_Spy(tiny(), calls), tmp_path / "r", clean_frames=LongVideo(folder, skip_bad=True),
                             trf_kwargs=TRF, spectra_n=8)
    message = str(error.value)
    assert all(n in message for n in names) and "no readable video among the 3" in message
    assert "empty file" in message
    assert calls == [] and not (tmp_path / "r" / "trf.png").exists()  # nothing was measured


class _Spy(nn.Module):
    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls
        self.in_channels, self.task = model.in_channels, model.task

    def forward(self, x):
        self.calls.append("forward")
        return self.model(x)

    def process(self, x, state=None):
        self.calls.append("process")
        return self.model.process(x, state)


# ---------------------------------------------------------------------------------- non-finite input
def test_non_finite_input_frames_reset_the_state_and_are_listed():
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(3, 4, 4, generator=g) for _ in range(20)]
    frames[4] = frames[4].clone()
    frames[4][0, 1, 1] = float("nan")
    frames[15] = torch.full((3, 4, 4), float("inf"))
    model = Breaks(7)
    result = instability_onsets(model, frames, chunk=4)
    # 0-3, then NaN at 4 (reset, not an onset), 5-11: 7th frame since the reset diverges at 11,
    # 12-14, then Inf at 15 (reset), 16-19: the tail
    assert result.input_nonfinite_frames == [4, 15]
    assert result.onsets == [7] and result.unstable_frames == [11] and result.tail == 4
    assert result.frames == 20 and len(result.psnr) == 20
    assert np.isnan(result.psnr[[4, 15]]).all() and np.isfinite(np.delete(result.psnr, [4, 11, 15])).all()
    assert all(model.inputs_finite) and len(model.inputs_finite) == 18 + 1  # never fed; +1: the from-reset check
    assert result.divergent == [True]  # the same frame from the initial state is finite: a feedback divergence
    metrics = engine.onset_metrics(result)
    assert metrics["long/input_nonfinite"] == 2.0 and metrics["long/n_onsets"] == 1.0


# ---------------------------------------------------------------------------------- a failing section
def test_a_failing_section_is_recorded_and_the_others_written(tmp_path, monkeypatch, videos):
    def boom(*args, **kwargs):
        raise RuntimeError("lyapunov exploded")
    monkeypatch.setattr(engine, "lyapunov", boom)
    report = stability_report(tiny(), tmp_path / "r", clean_frames=LongVideo(videos), trf_kwargs=TRF,
                              lyapunov_kwargs=LYAP, spectra_n=8)
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["sections"]["lyapunov"]["status"] == "failed"
    assert "lyapunov exploded" in data["sections"]["lyapunov"]["error"]
    assert data["sections"]["trf"]["status"] == "done" and data["sections"]["onsets"]["status"] == "done"
    assert data["trf"] is not None and data["onsets"]["frames"] == 16 and len(data["convs"]) == 12
    assert "lyapunov exploded" in (tmp_path / "r" / "report.md").read_text()
    assert report.sections["lyapunov"]["status"] == "failed"


def test_a_kill_during_a_section_keeps_the_sections_before_it(tmp_path, monkeypatch, videos):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "onsets", killed)
    with pytest.raises(KeyboardInterrupt):
        stability_report(tiny(), tmp_path / "r", clean_frames=LongVideo(videos), trf_kwargs=TRF,
                         lyapunov_kwargs=LYAP, spectra_n=8)
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [k for k, v in data["sections"].items() if v["status"] == "done"] == \
        ["spectra", "certificate", "trf", "lyapunov"]
    assert data["trf"]["verdict"] == "unbounded" and data["verdict"] == "proven unstable"
    assert (tmp_path / "r" / "trf_unbounded_sequence.pt").is_file()


def test_ctrl_c_during_the_trf_then_resume_gives_the_uninterrupted_trf(tmp_path):
    """A real SIGINT in the middle of the TRF search: its progress file holds X and Adam's state; the resumed
    report's TRF is bit-identical to an uninterrupted one, and the progress file is gone once it ends."""
    settings = dict(trf_kwargs=dict(frames=9, size=12, iters=24, replay_frames=64, progress_every=4),
                    lyapunov_kwargs={"frames": 0}, spectra_n=None)
    model = tiny(init="near_identity")
    whole = stability_report(model, tmp_path / "whole", **settings)
    calls = {"n": 0}

    def ctrl_c_at_the_15th_call(module, args):
        calls["n"] += 1
        if calls["n"] == 15:
            signal.raise_signal(signal.SIGINT)  # Python's own handler: KeyboardInterrupt, as from a terminal
    hook = model.register_forward_pre_hook(ctrl_c_at_the_15th_call)
    # Python's own SIGINT handler, as in a terminal (another test of this worker, e.g. Ray's, may have replaced it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            stability_report(model, tmp_path / "r", **settings)
    finally:
        signal.signal(signal.SIGINT, previous)
    hook.remove()
    saved = torch.load(tmp_path / "r" / "trf_progress.pt", weights_only=True)
    assert 0 < saved["next"] < 24 and saved["optimizer"]["state"]
    resumed = stability_report(model, tmp_path / "r", **settings, resume=True)
    assert not (tmp_path / "r" / "trf_progress.pt").exists()
    assert torch.equal(resumed.trf.inputs, whole.trf.inputs) and torch.equal(resumed.trf.outputs, whole.trf.outputs)
    assert np.array_equal(resumed.trf.influence, whole.trf.influence)
    assert resumed.trf.p_history == whole.trf.p_history and resumed.trf.verdict == whole.trf.verdict


def test_a_trf_progress_file_of_other_settings_is_refused_naming_them(tmp_path):
    from recstab.diagnostics import ResumeMismatch, temporal_receptive_field

    model = tiny(init="near_identity")
    path = tmp_path / "trf_progress.pt"
    calls = {"n": 0}

    def stop(module, args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
    hook = model.register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        temporal_receptive_field(model, frames=9, size=12, iters=20, replay_frames=0, progress=path, progress_every=2)
    hook.remove()
    with pytest.raises(ResumeMismatch, match=r"size: saved 12, now 16"):
        temporal_receptive_field(model, frames=9, size=16, iters=20, replay_frames=0, progress=path, progress_every=2,
                                 resume=True)
    with pytest.raises(ResumeMismatch, match=r"model: saved"):
        temporal_receptive_field(tiny(seed=1, init="near_identity"), frames=9, size=12, iters=20, replay_frames=0,
                                 progress=path, progress_every=2, resume=True)


# ---------------------------------------------------------------------------------- whose diagnosis is it
def test_a_resumed_diagnosis_never_mixes_two_models(tmp_path):
    """Model A's report folder, resumed with model B: refused before anything is measured, naming the difference;
    A's report is left as it was. The same model resumes and reuses its own TRF."""
    from recstab.diagnostics.measure import ResumeMismatch

    folder = tmp_path / "r"
    first = stability_report(tiny(seed=0), folder, trf_kwargs=TRF, lyapunov_kwargs={"frames": 0}, spectra_n=8)
    before = (folder / "report.json").read_text()
    with pytest.raises(ResumeMismatch, match="another model"):
        stability_report(tiny(seed=1), folder, trf_kwargs=TRF, lyapunov_kwargs={"frames": 0}, spectra_n=8, resume=True)
    assert (folder / "report.json").read_text() == before
    (folder / "report.json").unlink()  # only the TRF work file left: it names the weights
    with pytest.raises(ResumeMismatch, match="model: saved"):
        stability_report(tiny(seed=1), folder, trf_kwargs=TRF, lyapunov_kwargs={"frames": 0}, spectra_n=8, resume=True)
    again = stability_report(tiny(seed=0), folder, trf_kwargs=TRF, lyapunov_kwargs={"frames": 0}, spectra_n=8,
                             resume=True)
    assert again.trf.verdict == first.trf.verdict and torch.equal(again.trf.inputs, first.trf.inputs)


def test_the_report_is_named_from_the_checkpoints_own_model(tmp_path, repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("diagnose_cli", repo_root / "src" / "diagnose.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    hparams = {"model": {"_target_": "recstab.models.build_model", "backbone": "vresnet",
                         "recurrence": {"_target_": "recstab.models.RLSP", "name": "rlsp"}, "task": "denoise",
                         "channels": 16}, "norm": {"name": "srnc", "alpha": 2.0}}
    assert cli.checkpoint_name(hparams) == "vresnet-rlsp-denoise-srnc-16ch"
    old = {"model": {"backbone": "vdncnn", "recurrence": "feat", "task": "sr2", "norm": {"kind": "none"}}}
    assert cli.checkpoint_name(old) == "vdncnn-feat-sr2-none"
    torch.save(tiny().state_dict(), tmp_path / "plain.pt")  # a plain state dict, not a checkpoint of train.py
    from recstab.lit.preflight import read_recstab_checkpoint
    with pytest.raises(ValueError, match="Diagnose your own model from Python"):
        read_recstab_checkpoint(tmp_path / "plain.pt")


@pytest.mark.slow
def test_user_errors_are_one_line_without_a_traceback(tmp_path, run_script, write_video):
    torch.save(tiny().state_dict(), tmp_path / "plain.pt")
    short = write_video(tmp_path / "short.mp4", frames=4)
    for args, words in ((["ckpt_path=nope.ckpt"], "does not exist"),
                        ([f"ckpt_path={tmp_path / 'plain.pt'}"], "not a checkpoint of src/train.py"),
                        (["long_video.paths_or_folder=/no/such/videos"], "not found"),
                        ([f"long_video.paths_or_folder={short}", "long_video.loop_to=null"],
                         "λ₁ needs at least 15 frames (a burn-in of 5, then 10 for its error bar), the video has 4"),
                        ([f"long_video.paths_or_folder={short}", "long_video.gray=true"],
                         "the video's frames have 1 channel(s), the model expects 3")):
        result = run_script("diagnose.py", [*args, f"hydra.run.dir={tmp_path / 'run'}", "diagnostics=smoke"], tmp_path)
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("Error: ") and words in lines[-1], result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
        assert not list((tmp_path / "run").glob("wandb/*run-*"))  # refused before any W&B run exists


# ---------------------------------------------------------------------------------- what the model is fed
def test_grey_and_odd_sized_video_is_measured_and_said_with_the_input_psnr(tmp_path, write_video):
    """A greyscale 61×97 video into an RGB model: measured at its own size, the report says it is grey and gives
    its size; the degraded input's PSNR (σ = 30: 20·log10(255/30) = 18.59 dB where nothing clips) is beside the
    output's."""
    video = write_video(tmp_path / "grey.mp4", frames=40, height=61 + 3, width=97 + 3, level=90)
    frames = LongVideo(video, crop=(61, 97), loop_to=None)
    report = stability_report(tiny(), tmp_path / "r", clean_frames=frames, trf_kwargs=None,
                              lyapunov_kwargs=LYAP, spectra_n=None, onset_kwargs={"max_frames": 40})
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["settings"]["input"]["frame_size"] == [61, 97] and data["settings"]["input"]["channels"] == 3
    text = (tmp_path / "r" / "report.md").read_text()
    assert "40 frames of 61×97, 3 channel(s)" in text and "the video is greyscale (R = G = B" in text
    assert report.onsets.frames == 40 and np.median(report.onsets.input_psnr) == pytest.approx(18.59, abs=0.1)
    assert report.measurements.metrics["long/input_psnr_mean"] == pytest.approx(
        float(np.mean(report.onsets.input_psnr)), rel=1e-6)
    assert "degraded input" in text


def test_channel_mismatch_and_short_video_are_refused_before_anything_runs(tmp_path):
    from recstab.diagnostics.measure import MeasureSpec, check_input

    spec = MeasureSpec(name="t", lyapunov={"frames": 120, "burn_in": 20})
    rgb = list(torch.rand(200, 3, 8, 8))
    with pytest.raises(ValueError, match="the video's frames have 3 channel.*expects 1: convert to luma"):
        check_input(build_model("vresnet", "feat", "denoise", 8, in_channels=1), spec, rgb)
    with pytest.raises(ValueError, match="λ₁ needs at least 30 frames .* the video has 29"):
        check_input(tiny(), spec, rgb[:29])
    assert check_input(tiny(), spec, rgb[:30])["notes"] == [
        "λ₁ is measured on the video's 30 frames (diagnostics.lyapunov.frames asks for 120)",
        "λ₁ is fitted on 10 frames after the burn-in (fewer than 30): a plain mean, no fit of a transient"]
    with pytest.raises(ValueError, match="shorter than the burst window"):
        check_input(tiny(), spec, rgb[:30], burst=40)
    # inside measure() (a training monitor must not die of its video) the section is skipped, saying why
    lenient = check_input(tiny(), spec, rgb[:29], strict=False)
    assert lenient["refused"]["lyapunov"].startswith("λ₁ needs at least 30 frames")
    grey = build_model("vresnet", "feat", "denoise", 8, in_channels=1)
    lenient = check_input(grey, spec, rgb, strict=False)
    assert set(lenient["refused"]) == {"lyapunov", "onsets"} and "expects 1" in lenient["refused"]["onsets"]
    sr = build_model("vresnet", "feat", "sr2", 8)
    assert "cropped to 8×10" in check_input(sr, spec.only("onsets"), list(torch.rand(5, 3, 9, 11)))["notes"][0]
