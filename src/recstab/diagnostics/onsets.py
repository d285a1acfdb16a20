"""The long-video instability-onset test (section 3.1, Table 2) and burst-by-burst processing (appendix E).

The random-search half of the diagnosis: stream a long video through the model
with its recurrent state carried from chunk to chunk, and watch every frame.

    noisy_i = degrade(clean_i) with noise drawn from a generator seeded by (seed, i)
    y_i, state = model.process(noisy_i, state)
    PSNR_i = 10·log10(1 / mean((y_i - clean_i)²))        on the raw, unclamped y_i

A frame is an *instability* when PSNR_i < 0 dB (the error is larger than the whole
[0, 1] range: a clamped output can never get there, hence the raw output) or when
y_i is not finite. Its *onset* is the number of frames processed since the last
reset, the unstable frame included: a model that is fine for k-1 frames and
breaks on its k-th has onset k. The state is then reset (``state=None``, the
model's initial state) and counting starts again with the next frame. The 1st and
9th deciles of the onsets (numpy's linear percentile) summarise a run; ∞
(``math.inf``) when there was none.

Why the chunk size cannot change the result: the noise of frame i depends only on
(seed, i); ``process`` on a chunk equals ``process`` frame by frame; and when an
instability is found inside a chunk, the frames after it are processed again from
the reset state, exactly as a frame-by-frame run would. After a reset the model is
fed 1, 2, 4, … frames at a time up to ``chunk`` (so a model that fails on every frame
costs one pass, not chunk/2 passes).

Memory is constant in the stream length: frames flow through a bounded queue
filled by a decode-ahead thread (decoding, the degradation and its noise run there,
ahead of the model); only 4 bytes of PSNR per frame are kept.

What an instability proves. A frame with PSNR < 0 dB may just be a bad output. It is
a *feedback divergence* (``OnsetResult.divergent``) when the same input frame processed
from the initial state gives a finite output y₀, and the output with the carried state
is not finite or is more than 10⁶ times larger than y₀ (max |y|; ``DIVERGENCE_RATIO``):
the carried state, not the frame, made the output diverge. The noisy frames from the last reset to that frame
(``OnsetResult.divergences``, reproducible from (seed, frame index)) are then a
demonstrated diverging input sequence: a proof that the model is unstable.

Non-finite input. A clean frame holding a NaN or an Inf is an instability of the
*input*, not of the model: it is not fed to the model, its PSNR is nan, it is listed in
``input_nonfinite_frames``, the state is reset after it (the frames since the last reset
are censored, not an onset) and the stream goes on.

Resumable runs. With ``progress=<file>`` the run writes what it has measured every
``progress_every`` frames (atomically: a temporary file then ``os.replace``): the frames
done (the stream position), the onsets so far, the PSNR curve, the frames since the last
reset, the chunk ramp, and the carried state (None right after a reset). The noise of
frame i is a function of (seed, i), so the position is the whole RNG state. ``resume=True``
seeks the stream to that position (:meth:`LongVideo.iter_from` seeks in the file; any
other iterable is read and the frames dropped), restores the state and goes on: the
onsets equal those of an uninterrupted run. The file also holds the settings and a
SHA-1 of the model's state_dict; a resume with other settings or another model is
refused, naming what differs.

Coping strategies of section 3.4 usable here (and in the report):

- feature dampening (appendix F): ``dampening=λ`` sets ``model.dampening`` for the run;
- burst-by-burst processing (appendix E): ``burst=B, overlap=O`` wraps the model in a
  :class:`BurstProcessor` (reset every B frames; with overlap, bursts of B frames start
  every B-O frames and each frame is taken from the oldest running burst).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from recstab.diagnostics.workfiles import (PROGRESS_VERSION, check_progress_settings, load_progress,
                                           model_fingerprint, save_progress)
from recstab.models.dampening import evaluating
from recstab.models.interface import traits

DIVERGENCE_RATIO = 1e6  # max |y| with the carried state over max |y| from the initial state: a divergence


# ---------------------------------------------------------------------- burst-by-burst processing
class BurstProcessor(nn.Module):
    """Run a recurrent model burst by burst, resetting its state at every burst (appendix E).

    Bursts of ``burst`` frames start every ``stride = burst - overlap`` frames, each
    from the model's initial state; frame t is taken from the *oldest* burst that
    covers it, so with an overlap every output after the first burst has seen at
    least ``overlap`` frames of warm-up. ``overlap=0``: bursts 1-10, 11-20, ...
    (the state is reset every 10 frames). ``burst=10, overlap=5``: bursts 1-10,
    6-15, 11-20, ...; the output comes from the first on frames 1-10, 16-20, ...
    and from the second on 11-15, 21-25, ... — the paper's two interleaved models.
    The cost is ``burst / stride`` times the model's (×2 for overlap = burst/2).

    ``process(x, state)`` has the model's streaming contract (chunked == whole),
    ``forward(x)`` processes a clip from the start, so both the onset test and the
    TRF can run on the wrapper.
    """

    def __init__(self, model: nn.Module, burst: int, overlap: int = 0):
        super().__init__()
        burst, overlap = int(burst), int(overlap)
        if burst < 1:
            raise ValueError(f"burst must be >= 1 frame, got {burst}")
        if not 0 <= overlap < burst:
            raise ValueError(f"overlap must be in [0, burst) = [0, {burst}), got {overlap}")
        known = traits(model)
        if not known.streamable:
            raise ValueError(f"burst processing needs a streamable model with process(x, state); "
                             f"{type(model).__name__} is not")
        self.model = model
        self.burst, self.overlap = burst, overlap
        self.stride = burst - overlap
        self.runners = math.ceil(burst / self.stride)
        self.period = self.runners * self.stride  # each runner restarts every `period` frames
        self.in_channels, self.scale, self.task = known.in_channels, known.scale, known.task
        self.streamable = True

    @property
    def dampening(self):
        return self.model.dampening

    @dampening.setter
    def dampening(self, value):
        self.model.dampening = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.process(x)[0]

    def process(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        state = {"t": 0, "states": [None] * self.runners} if state is None else state
        t0, length = state["t"], x.shape[1]
        new_states, outputs = [], []  # outputs[r]: {chunk index: frame}
        for r in range(self.runners):
            offset, st, frames = r * self.stride, state["states"][r], {}
            i = max(0, offset - t0)
            while i < length:
                age = (t0 + i - offset) % self.period
                if age == 0:
                    st = None
                if age >= self.burst:  # this runner's output is never used until its next restart
                    i += self.period - age
                    continue
                j = min(length, i + self.burst - age)
                y, st = self.model.process(x[:, i:j], st)
                frames.update({i + k: y[:, k] for k in range(j - i)})
                i = j
            new_states.append(st)
            outputs.append(frames)
        chosen = []
        for i in range(length):
            ages = [((t0 + i - r * self.stride) % self.period, r) for r in range(self.runners)
                    if t0 + i >= r * self.stride]
            _, r = max((a, r) for a, r in ages if a < self.burst)
            chosen.append(outputs[r][i])
        return torch.stack(chosen, dim=1), {"t": t0 + length, "states": new_states}

    def extra_repr(self) -> str:
        return f"burst={self.burst}, overlap={self.overlap}"


def burst_process(model: nn.Module, x: torch.Tensor, burst: int, overlap: int = 0) -> torch.Tensor:
    """Process a whole clip x (B×T×C×H×W) burst by burst (see :class:`BurstProcessor`)."""
    return BurstProcessor(model, burst, overlap)(x)


# ---------------------------------------------------------------------- the onset test
@dataclass
class OnsetResult:
    """What :func:`instability_onsets` measured."""

    onsets: list                    # frames since the last reset, per instability (ints)
    psnr: np.ndarray                # per-frame PSNR (float32, raw output; nan/-inf when not finite)
    deciles: tuple                  # (1st, 9th) decile of the onsets; (inf, inf) when none
    fps: float                      # frames per second of the whole test (decode, noise, model, PSNR)
    model_fps: float                # frames per second counting the model's time only
    frames: int                     # frames streamed
    seconds: float
    unstable_frames: list = field(default_factory=list)  # 0-based stream index of each instability
    tail: int = 0                   # frames since the last reset when the stream ended (censored)
    settings: dict = field(default_factory=dict)
    divergent: list = field(default_factory=list)  # per onset: a feedback divergence (see the module doc)
    input_nonfinite_frames: list = field(default_factory=list)  # stream index of each NaN/Inf input frame
    resumed_from: int | None = None  # frames already done by a killed run this one continued
    input_psnr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # per frame: the degraded
    # input against the clean frame (bicubic-upsampled for SR): what the model starts from

    @property
    def n_onsets(self) -> int:
        return len(self.onsets)

    @property
    def divergences(self) -> list[tuple[int, int]]:
        """(first, last) stream frame of every feedback divergence: the diverging input sequence."""
        return [(f - o + 1, f) for o, f, d in zip(self.onsets, self.unstable_frames, self.divergent) if d]

    @property
    def diverged(self) -> bool:
        """A feedback divergence on a finite input was demonstrated (not merely a bad frame)."""
        return any(self.divergent)

    def to_dict(self) -> dict:
        finite = self.psnr[np.isfinite(self.psnr)]
        return {"onsets": [int(o) for o in self.onsets], "n_onsets": self.n_onsets,
                "onset_d1": float(self.deciles[0]), "onset_d9": float(self.deciles[1]),
                "fps": self.fps, "model_fps": self.model_fps, "frames": self.frames,
                "seconds": self.seconds, "unstable_frames": [int(i) for i in self.unstable_frames],
                "divergent": [bool(d) for d in self.divergent],
                "feedback_divergences": [list(r) for r in self.divergences],
                "input_nonfinite_frames": [int(i) for i in self.input_nonfinite_frames],
                "tail": self.tail, "psnr_median": float(np.median(finite)) if len(finite) else None,
                "input_psnr_median": _median(self.input_psnr),
                "resumed_from": self.resumed_from, "settings": self.settings}

    def figure(self):
        """PSNR per frame with the instabilities marked, as in the paper's Fig. 1."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 3))
        shown = np.clip(np.nan_to_num(self.psnr, nan=-10.0, posinf=60.0, neginf=-10.0), -10, 60)
        ax.plot(np.arange(len(shown)), shown, lw=0.6, label="output")
        if len(self.input_psnr):
            ax.plot(np.arange(len(self.input_psnr)), np.clip(np.nan_to_num(self.input_psnr, nan=-10.0), -10, 60),
                    lw=0.6, color="0.6", label="input (degraded)")
        if self.unstable_frames:
            ax.plot(self.unstable_frames, np.zeros(len(self.unstable_frames)), "r*", ms=8,
                    label=f"{self.n_onsets} instabilities")
        if self.input_nonfinite_frames:
            ax.plot(self.input_nonfinite_frames, np.zeros(len(self.input_nonfinite_frames)), "kx", ms=6,
                    label=f"{len(self.input_nonfinite_frames)} non-finite input frames")
        ax.legend(loc="lower right", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("frame")
        ax.set_ylabel("PSNR (dB, raw output)")
        d1, d9 = self.deciles
        ax.set_title(f"onsets: 1st decile {d1:g}, 9th decile {d9:g}; {self.fps:.1f} fps", fontsize=9)
        return fig

    def save_png(self, path: str | Path) -> Path:
        import matplotlib.pyplot as plt
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = self.figure()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def deciles(onsets) -> tuple[float, float]:
    """(1st, 9th) decile of the onsets (numpy linear percentile); (inf, inf) when there are none."""
    if len(onsets) == 0:
        return math.inf, math.inf
    d1, d9 = np.percentile(np.asarray(onsets, dtype=np.float64), [10, 90])
    return float(d1), float(d9)


def _as_frame(frame, index: int) -> torch.Tensor:
    """One clean frame -> float32 C×H×W tensor in [0, 1] (uint8 frames are divided by 255)."""
    f = torch.as_tensor(frame)
    if f.dim() != 3:
        raise ValueError(f"clean frame {index} must be C×H×W, got shape {tuple(f.shape)}")
    if f.dtype == torch.uint8:
        return f.float().div_(255)
    return f.float()


def frames_from(clean_frames, start: int):
    """An iterator over `clean_frames` from stream index `start` on.

    A stream with an ``iter_from(start)`` method (:class:`recstab.data.long_video.LongVideo`
    seeks in the file) uses it; any other iterable is decoded and the first `start` frames dropped.
    """
    if start == 0:
        return iter(clean_frames)
    seek = getattr(clean_frames, "iter_from", None)
    if callable(seek):
        return seek(start)
    return itertools.islice(iter(clean_frames), start, None)


class _Prefetcher:
    """Decode-ahead thread: turns the frame iterable into (clean, degraded, first index) chunks."""

    _END = object()

    def __init__(self, frames, chunk: int, degrade, seed: int, make_generator, in_channels: int,
                 scale: int, max_frames: int | None, depth: int, start: int = 0):
        self.frames, self.chunk, self.degrade, self.seed = frames, chunk, degrade, seed
        self.make_generator, self.in_channels, self.scale = make_generator, in_channels, scale
        self.max_frames, self.start = max_frames, start
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.decode_seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="onset-decode-ahead", daemon=True) \
            if depth > 0 else None

    def _chunks(self):
        buf, start, shape = [], self.start, None
        iterator = frames_from(self.frames, self.start)
        i = self.start
        while self.max_frames is None or i < self.max_frames:
            t = time.perf_counter()
            try:
                raw = next(iterator)
            except StopIteration:
                break
            f = _as_frame(raw, i)
            if shape is None:
                if f.shape[0] != self.in_channels:
                    raise ValueError(f"clean frames have {f.shape[0]} channels, the model expects "
                                     f"{self.in_channels}")
                finite = f[torch.isfinite(f)]
                if len(finite):
                    lo, hi = float(finite.min()), float(finite.max())
                    if lo < -1e-3 or hi > 1 + 1e-3:
                        raise ValueError(f"clean frames must be in [0, 1], frame {i} spans "
                                         f"[{lo:.3g}, {hi:.3g}] (divide 8-bit frames by 255)")
                shape = f.shape
                h, w = shape[1] - shape[1] % self.scale, shape[2] - shape[2] % self.scale
                if h == 0 or w == 0:
                    raise ValueError(f"frames of {shape[1]}x{shape[2]} are too small for scale {self.scale}")
            elif f.shape != shape:
                raise ValueError(f"clean frame {i} has shape {tuple(f.shape)}, the stream started with "
                                 f"{tuple(shape)}: resize or crop the video to one size")
            buf.append(f[:, :h, :w])
            i += 1
            self.decode_seconds += time.perf_counter() - t
            if len(buf) == self.chunk:
                yield self._degrade(buf, start)
                start, buf = i, []
        if buf:
            yield self._degrade(buf, start)

    def _degrade(self, buf, start):
        t = time.perf_counter()
        clean = torch.stack(buf)
        noisy = torch.stack([self.degrade(f, self.make_generator(self.seed, start + k))
                             for k, f in enumerate(clean)])
        seen = noisy if self.scale == 1 else torch.nn.functional.interpolate(
            noisy, size=clean.shape[-2:], mode="bicubic", align_corners=False)
        input_psnr = (-10 * torch.log10((seen - clean).square().flatten(1).mean(dim=1))).float().numpy()
        self.decode_seconds += time.perf_counter() - t
        return clean, noisy, start, input_psnr

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for item in self._chunks():
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)

    def __iter__(self):
        if self.thread is None:  # synchronous (depth 0)
            yield from self._chunks()
            return
        self.thread.start()
        try:
            while True:
                item = self.queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()
            self.thread.join(timeout=5)


# ---------------------------------------------------------------------- progress (resumable runs)
def _to_device(state, device):
    if torch.is_tensor(state):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(v, device) for v in state)
    return state


def _stream_identity(clean_frames) -> str:
    files = getattr(clean_frames, "files", None)
    if files is not None:  # a LongVideo: its files and decoding settings
        return repr([str(f) for f in files]) + repr({k: getattr(clean_frames, k, None)
                                                     for k in ("loop_to", "resize", "crop", "gray")})
    return type(clean_frames).__name__


def instability_onsets(model: nn.Module, clean_frames, sigma: float = 30 / 255, *, chunk: int = 16,
                       seed: int = 0, task: str | None = None, max_frames: int | None = None,
                       burst: int | None = None, overlap: int = 0, dampening: float | None = None,
                       prefetch: int = 4, device=None, progress: str | Path | None = None,
                       progress_every: int = 1024, resume: bool = False, on_progress=None) -> OnsetResult:
    """Stream clean frames through ``model.process`` and record the instability onsets.

    Args:
        model: a streamable model with ``process(x, state) -> (y, state)`` (x: 1×k×C×H×W).
        clean_frames: any iterable of C×H×W frames in [0, 1] (tensors or arrays; uint8 is /255),
            e.g. a :class:`recstab.data.long_video.LongVideo`.
        sigma: noise std on the [0, 1] scale (30/255 in the paper).
        chunk: frames per ``process`` call (does not change the result, only the speed).
        seed: the noise of frame i is drawn from a generator seeded by (seed, i).
        task: ``denoise`` or ``sr2`` (default ``model.task``, else denoise); sr2 downsamples ×2.
        max_frames: stop after this many frames (None: the whole iterable).
        burst, overlap: run burst by burst (appendix E, :class:`BurstProcessor`).
        dampening: feature dampening λ for the run (appendix F); None keeps ``model.dampening``.
        prefetch: chunks decoded ahead by the background thread (0: decode synchronously).
        device: default the device of the model's parameters.
        progress: file the progress is written to (atomically) every ``progress_every`` frames
            and at the end; None: none.
        resume: continue from ``progress`` when it holds a killed run of the same model and
            settings (a finished one is returned as it is); the onsets equal an uninterrupted run's.
        on_progress: called with the fraction of the stream done after each chunk (a progress bar;
            the stream's length is ``max_frames``, else ``len(clean_frames)`` when it has one).
    """
    from recstab.data.degradations import Degradation, make_generator

    if not 0 <= sigma <= 1:
        raise ValueError(f"sigma is the noise std on the [0, 1] scale (e.g. 30/255), got {sigma}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 frame, got {chunk}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0 chunks, got {prefetch}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    check_progress_settings(progress, progress_every, resume, "frame")
    known = traits(model)
    task = task or known.task
    degrade = Degradation(task, sigma * 255.0)
    runner = model
    if burst is not None:
        runner = BurstProcessor(model, burst, overlap)
    elif overlap:
        raise ValueError(f"overlap={overlap} needs burst=<frames per burst>")
    elif not callable(getattr(model, "process", None)):
        raise ValueError(f"{type(model).__name__} has no process(x, state) to stream with; "
                         "pass burst=<frames> to run it burst by burst instead")
    elif not known.streamable:
        raise ValueError(f"{type(model).__name__} is not streamable (bidirectional): the onset test "
                         "streams frames and needs a causal model with process(x, state)")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    in_channels = known.in_channels
    used_dampening = known.dampening if dampening is None else float(dampening)
    settings = {"sigma": sigma, "task": task, "chunk": chunk, "seed": seed, "burst": burst,
                "overlap": overlap, "dampening": used_dampening, "prefetch": prefetch}
    progress = None if progress is None else Path(progress)
    identity = {"sigma": float(sigma), "task": task, "chunk": int(chunk), "seed": int(seed),
                "burst": burst, "overlap": int(overlap), "dampening": used_dampening,
                "max_frames": max_frames, "model": model_fingerprint(model),
                "stream": _stream_identity(clean_frames)}

    # what the run has measured so far (restored from the progress file when resuming)
    run = {"frames": 0, "since": 0, "step": chunk, "onsets": [], "unstable": [], "divergent": [],
           "nonfinite": [], "psnr": [], "input_psnr": [], "model_seconds": 0.0, "decode_seconds": 0.0,
           "seconds": 0.0}
    state, resumed_from = None, None
    saved = load_progress(progress, identity, device) if resume else None
    if saved is not None:
        run.update({k: saved[k] for k in ("frames", "since", "step", "onsets", "unstable", "divergent",
                                          "nonfinite", "model_seconds", "decode_seconds", "seconds")})
        run["psnr"] = [saved["psnr"].cpu().numpy()]
        run["input_psnr"] = [saved["input_psnr"].cpu().numpy()]
        state, resumed_from = _to_device(saved["state"], device), run["frames"]
        if saved["complete"]:
            return _result(run, settings, resumed_from)

    def checkpoint(complete: bool) -> None:
        curves = {k: _joined(run[k]) for k in ("psnr", "input_psnr")}
        run.update({k: [v] for k, v in curves.items()})
        save_progress(progress, {"version": PROGRESS_VERSION, "identity": identity, "complete": complete,
                                 "state": _to_device(state, "cpu"),
                                 **{k: torch.from_numpy(v) for k, v in curves.items()},
                                 **{k: v for k, v in run.items() if k not in curves}})

    try:
        expected = max_frames if max_frames is not None else len(clean_frames)
    except TypeError:  # an iterable without a length: no fraction to report
        expected = None
    source = _Prefetcher(clean_frames, chunk, degrade, seed, make_generator, in_channels,
                         degrade.scale, max_frames, prefetch, start=run["frames"])
    scope = ExitStack()
    scope.enter_context(evaluating(model, dampening))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    start, decode_before, saved_at = time.perf_counter(), run["decode_seconds"], run["frames"]
    since, step, frames = run["since"], run["step"], run["frames"]
    try:
        with torch.no_grad(), parametrize.cached():
            for clean, noisy, first, input_psnr in source:
                run["input_psnr"].append(input_psnr)
                clean, noisy = clean.to(device, non_blocking=True), noisy.to(device, non_blocking=True)
                k, i = clean.shape[0], 0
                # a NaN/Inf in the input is an instability of the input, not of the model: such a
                # frame is not fed to the model, its PSNR is nan, and the state is reset after it
                finite_in = (torch.isfinite(clean).flatten(1).all(1) & torch.isfinite(noisy).flatten(1).all(1)).tolist()
                while i < k:
                    if not finite_in[i]:
                        run["nonfinite"].append(frames + i)
                        run["psnr"].append(np.full(1, np.nan, np.float32))
                        since, state, i, step = 0, None, i + 1, 1
                        continue
                    e = min(k, i + step)
                    if not all(finite_in[i:e]):
                        e = i + finite_in[i:e].index(False)
                    t = time.perf_counter()
                    y, new_state = runner.process(noisy[None, i:e], state)
                    sync()
                    run["model_seconds"] += time.perf_counter() - t
                    y, target = y[0], clean[i:e]
                    if y.shape != target.shape:
                        raise ValueError(f"model output {tuple(y.shape)} does not match the clean frames "
                                         f"{tuple(target.shape)}: is task={task!r} right?")
                    psnr = -10 * torch.log10((y - target).square().flatten(1).mean(dim=1))
                    # a non-finite output (or one whose squared error overflows) gives a nan / -inf
                    # PSNR, so one comparison flags both kinds of instability
                    bad = ~(psnr >= 0)
                    psnr = psnr.float().cpu().numpy()
                    hits = torch.nonzero(bad).flatten()
                    if len(hits) == 0:
                        run["psnr"].append(psnr)
                        since += e - i
                        state, i, step = new_state, e, min(2 * step, chunk)
                    else:
                        j = int(hits[0])
                        run["psnr"].append(psnr[:j + 1])
                        since += j + 1
                        run["onsets"].append(since)
                        run["unstable"].append(frames + i + j)
                        run["divergent"].append(_feedback_divergence(runner, y[j], noisy[None, i + j:i + j + 1]))
                        since, state, i, step = 0, None, i + j + 1, 1
                frames += k
                if on_progress is not None and expected:
                    on_progress(min(1.0, frames / expected))
                if progress is not None and frames - saved_at >= progress_every:
                    run.update(frames=frames, since=since, step=step,
                               decode_seconds=decode_before + source.decode_seconds,
                               seconds=run["seconds"] + time.perf_counter() - start)
                    start = time.perf_counter()
                    checkpoint(complete=False)
                    saved_at = frames
    finally:
        scope.close()
    run.update(frames=frames, since=since, step=step, decode_seconds=decode_before + source.decode_seconds,
               seconds=run["seconds"] + time.perf_counter() - start)
    if progress is not None:
        checkpoint(complete=True)
    return _result(run, settings, resumed_from)


def _feedback_divergence(runner, y: torch.Tensor, x: torch.Tensor) -> bool:
    """Is the instability at input frame x (1×1×C×H×W, finite) with output y a feedback divergence?

    Yes when the same frame processed from the initial state gives a finite output y₀ and the
    output with the carried state is not finite, or is more than DIVERGENCE_RATIO times larger
    (max |y| > 10⁶ · max |y₀|): the carried state, not the frame, made it diverge. The ratio is
    scale-free: a model multiplied by a constant is judged the same.
    """
    fresh = runner.process(x, None)[0][0]
    if not bool(torch.isfinite(fresh).all()):
        return False
    if not bool(torch.isfinite(y).all()):
        return True
    return float(y.abs().max()) > DIVERGENCE_RATIO * max(float(fresh.abs().max()), 1e-30)


def _joined(curve: list) -> np.ndarray:
    return np.concatenate(curve).astype(np.float32) if curve else np.zeros(0, np.float32)


def _median(curve: np.ndarray) -> float | None:
    finite = curve[np.isfinite(curve)]
    return float(np.median(finite)) if len(finite) else None


def _result(run: dict, settings: dict, resumed_from: int | None) -> OnsetResult:
    psnr = _joined(run["psnr"])
    frames, seconds, model_seconds = run["frames"], run["seconds"], run["model_seconds"]
    settings = {**settings, "decode_seconds": run["decode_seconds"], "model_seconds": model_seconds}
    return OnsetResult(onsets=list(run["onsets"]), psnr=psnr, deciles=deciles(run["onsets"]),
                       fps=frames / seconds if seconds > 0 else math.inf,
                       model_fps=frames / model_seconds if model_seconds > 0 else math.inf,
                       frames=frames, seconds=seconds, unstable_frames=list(run["unstable"]),
                       tail=run["since"], settings=settings, divergent=list(run["divergent"]),
                       input_nonfinite_frames=list(run["nonfinite"]), resumed_from=resumed_from,
                       input_psnr=_joined(run["input_psnr"]))
