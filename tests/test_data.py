"""Data layer: degradations, synthetic clips, Vimeo-90k, data modules, configs."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.io import decode_png, read_file

from recstab.data import (
    SPLITS,
    Degradation,
    SyntheticClips,
    Vimeo90k,
    make_generator,
    synthetic_scene_changes,
)
from recstab.lit.datamodules import EpochSampler, SyntheticDataModule, Vimeo90kDataModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(scope="module")
def vimeo(tmp_path_factory, write_vimeo90k) -> Path:
    return write_vimeo90k(tmp_path_factory.mktemp("data") / "vimeo_septuplet", n_sequences=3, size=(96, 64))


def small(**kw) -> SyntheticClips:
    return SyntheticClips(**{"split": "val", "length": 4, "frames": 3, "crop": 32, **kw})


# --- degradations -------------------------------------------------------------------------------

def test_noise_std_matches_sigma_and_is_not_clamped():
    clean = torch.full((7, 3, 64, 64), 0.5)
    noisy = Degradation("denoise", sigma=30)(clean, make_generator(0, 1))
    assert noisy.shape == clean.shape and noisy.dtype == torch.float32
    assert abs((noisy - clean).std().item() - 30 / 255) < 2e-3
    assert abs((noisy - clean).mean().item()) < 2e-3
    spiky = Degradation("denoise", sigma=50)(torch.zeros(2, 1, 32, 32), make_generator(0, 2))
    assert spiky.min() < 0  # raw Gaussian model


def test_sr2_halves_size_and_keeps_content():
    clean = torch.rand(3, 3, 32, 48)
    low = Degradation("sr2", sigma=0)(clean)
    assert low.shape == (3, 3, 16, 24)
    assert 0 <= low.min() and low.max() <= 1
    assert torch.allclose(low.mean(), clean.mean(), atol=1e-2)
    flat = Degradation("sr2", sigma=0)(torch.full((1, 1, 8, 8), 0.3))
    assert torch.allclose(flat, torch.full((1, 1, 4, 4), 0.3))
    with pytest.raises(ValueError, match="divisible by 2"):
        Degradation("sr2", sigma=0)(torch.rand(1, 3, 9, 8))


def test_generator_depends_only_on_keys():
    a = torch.rand(5, generator=make_generator(3, 7))
    assert torch.equal(a, torch.rand(5, generator=make_generator(3, 7)))
    assert not torch.equal(a, torch.rand(5, generator=make_generator(3, 8)))
    assert not torch.equal(torch.rand(5, generator=make_generator(1, 23)),
                           torch.rand(5, generator=make_generator(12, 3)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="deblur", sigma=30), r"unknown task 'deblur'.*'denoise', 'sr2'"),
    (dict(task="denoise", sigma=-1), r"sigma must be >= 0.*-1"),
    (dict(task="sr2", sigma=0, scale=1), r"task 'sr2' has scale 2, got scale=1"),
])
def test_degradation_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Degradation(**kwargs)


# --- synthetic clips ----------------------------------------------------------------------------

def test_synthetic_shapes_denoise_sr2_grey():
    item = small(sigma=30)[1]
    assert set(item) == {"input", "target", "index"} and item["index"] == 1
    assert item["target"].shape == item["input"].shape == (3, 3, 32, 32)
    assert item["target"].dtype == item["input"].dtype == torch.float32
    assert 0 <= item["target"].min() and item["target"].max() <= 1
    sr = small(task="sr2", sigma=0, scale=2)[0]
    assert sr["target"].shape == (3, 3, 32, 32) and sr["input"].shape == (3, 3, 16, 16)
    grey = small(channels=1, crop=32)[0]
    assert grey["target"].shape == (3, 1, 32, 32)


def test_synthetic_is_deterministic_per_seed_and_index():
    a, b = small(seed=5), small(seed=5)
    for i in range(2):
        assert torch.equal(a[i]["target"], b[i]["target"])
        assert torch.equal(a[i]["input"], b[i]["input"])  # seeded val noise is reproducible
    assert not torch.equal(a[0]["target"], small(seed=6)[0]["target"])
    assert not torch.equal(a[0]["input"] - a[0]["target"], a[1]["input"] - a[1]["target"])


def test_synthetic_camera_moves_and_epochs_differ():
    clips = SyntheticClips("train", length=4, frames=5, crop=32, sigma=0, max_speed=3.0)
    item = clips[0]
    assert (item["target"][0] - item["target"][-1]).abs().mean() > 1e-3  # frames differ: motion
    later = clips[4]  # same index, epoch 1: fresh content
    assert later["index"] == 0 and not torch.equal(later["target"], item["target"])


def test_synthetic_splits_use_disjoint_photographs():
    train, val, test = (set(SPLITS[s]) for s in ("train", "val", "test"))
    assert train and val and test and not (train & val or train & test or val & test)
    stills = {s: small(split=s).stills for s in SPLITS}
    assert all(a.shape != b.shape or not torch.equal(a, b)
               for a in stills["val"] for b in stills["train"] + stills["test"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(crop=400), ValueError, r"crop=400 is larger than the smallest val still \(300 px"),
    (dict(frames=0), ValueError, r"frames must be a positive integer, got 0"),
    (dict(sigma=-5), ValueError, r"sigma must be >= 0"),
    (dict(task="sr4"), ValueError, r"unknown task 'sr4'; valid tasks: 'denoise', 'sr2'"),
    (dict(channels=2), ValueError, r"channels must be 1 \(grey\) or 3 \(RGB\), got 2"),
    (dict(split="dev"), ValueError, r"unknown split 'dev'; valid splits: 'train', 'val', 'test'"),
    (dict(task="sr2", sigma=0, crop=33), ValueError, r"divisible by 2"),
])
def test_synthetic_refuses_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        small(**kwargs)


def test_scene_changes():
    static = list(synthetic_scene_changes(1, total_frames=6, size=32))
    assert len(static) == 6 and all(torch.equal(f, static[0]) for f in static)
    assert static[0].shape == (3, 32, 32)
    cut = synthetic_scene_changes(2, total_frames=6, size=32)
    assert torch.equal(cut[0], cut[2]) and torch.equal(cut[3], cut[5]) and not torch.equal(cut[2], cut[3])
    every = list(synthetic_scene_changes(6, total_frames=6, size=32))
    assert all(not torch.equal(every[i], every[i + 1]) for i in range(5))
    with pytest.raises(ValueError, match=r"n_distinct must be an integer in \[1, total_frames=6\], got 7"):
        synthetic_scene_changes(7, total_frames=6)


# --- Vimeo-90k ----------------------------------------------------------------------------------

def test_vimeo_train_crops(vimeo):
    train = Vimeo90k(vimeo, "train", crop=32, sigma=30)
    assert len(train) == 3
    item = train[2]
    assert item["index"] == 2 and item["target"].shape == (7, 3, 32, 32) == item["input"].shape
    assert torch.equal(item["target"], Vimeo90k(vimeo, "train", crop=32, sigma=30)[2]["target"])
    short = Vimeo90k(vimeo, "train", frames=3, crop=16, task="sr2", sigma=0)[0]
    assert short["target"].shape == (3, 3, 16, 16) and short["input"].shape == (3, 3, 8, 8)


def test_vimeo_test_is_full_resolution_in_list_order(vimeo):
    names = (vimeo / "sep_testlist.txt").read_text().split()
    test = Vimeo90k(vimeo, "test", sigma=30)
    assert test.names == names and len(test) == 3
    item = test[1]
    assert item["target"].shape == (7, 3, 64, 96)
    frame7 = decode_png(read_file(str(vimeo / "sequences" / names[1] / "im7.png"))).float() / 255
    assert torch.equal(item["target"][6], frame7)
    assert torch.equal(item["input"], Vimeo90k(vimeo, "test", sigma=30)[1]["input"])  # seeded noise
    assert Vimeo90k(vimeo, "test", max_sequences=2).names == names[:2]
    assert Vimeo90k(vimeo, "val", max_sequences=2).names == names[-2:]
    assert Vimeo90k(vimeo, "test", task="sr2", sigma=0)[0]["input"].shape == (7, 3, 32, 48)


def test_vimeo_refuses_bad_values(vimeo, tmp_path, write_vimeo90k):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        Vimeo90k(missing)
    assert str(missing) in str(info.value) and "data.root" in str(info.value)
    assert "sep_trainlist.txt" in str(info.value)
    with pytest.raises(ValueError, match=r"crop must be an integer in \[1, 64\].*64x96.*got 65"):
        Vimeo90k(vimeo, "train", crop=65)
    for frames in (0, 8):
        with pytest.raises(ValueError, match=rf"frames must be an integer in \[1, 7\].*got {frames}"):
            Vimeo90k(vimeo, frames=frames)
    broken = write_vimeo90k(tmp_path / "broken", n_sequences=1, size=(32, 32), frames=5)
    with pytest.raises(FileNotFoundError, match="im6.png"):
        Vimeo90k(broken, "test", sigma=0)[0]


# --- data modules and configs -------------------------------------------------------------------

def test_synthetic_datamodule_loaders_with_workers():
    dm = SyntheticDataModule(batch_size=2, num_workers=2, frames=3, crop=32, task="sr2", sigma=0,
                             scale=2, train_length=4, val_length=2, test_length=2)
    assert dm.frames == 3 and dm.scale == 2
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 3, 3, 16, 16) and batch["target"].shape == (2, 3, 3, 32, 32)
    val = [b["index"].tolist() for b in dm.val_dataloader()]
    assert val == [[0, 1]]


def test_epoch_sampler_shuffles_and_offsets():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    sampler = EpochSampler(5, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(5)) and list(sampler) == first
    loader = torch.utils.data.DataLoader(range(5), sampler=sampler)
    _set_sampler_epoch(loader, 2)  # what Lightning calls at each epoch start
    assert sorted(sampler) == list(range(10, 15))


def test_val_is_identical_across_datamodules():
    def first_val_batch():
        dm = SyntheticDataModule(batch_size=2, frames=2, crop=32, sigma=25, seed=3, val_length=2)
        dm.setup("validate")
        return next(iter(dm.val_dataloader()))

    a, b = first_val_batch(), first_val_batch()
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=-1), r"sigma must be >= 0"),
    (dict(crop=256), r"crop=256 is larger than the smallest train still \(172 px"),
    (dict(eval_crop=320), r"crop=320 is larger than the smallest val still"),
    (dict(frames=0), r"frames must be a positive integer, got 0"),
    (dict(task="deblur"), r"unknown task 'deblur'; valid tasks: 'denoise', 'sr2'"),
    (dict(task="sr2", scale=1), r"task 'sr2' has scale 2, got scale=1"),
    (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
    (dict(num_workers=-1), r"num_workers must be an integer >= 0, got -1"),
])
def test_synthetic_datamodule_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticDataModule(**kwargs)


def test_vimeo_datamodule(vimeo, tmp_path):
    dm = Vimeo90kDataModule(root=str(vimeo), batch_size=2, num_workers=0, frames=7, crop=32,
                            max_sequences=2, val_sequences=1, eval_batch_size=2)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["target"].shape == (2, 7, 3, 32, 32)
    dm.setup("test")
    assert [b["target"].shape for b in dm.test_dataloader()] == [(2, 7, 3, 64, 96)]
    with pytest.raises(FileNotFoundError, match="data.root"):
        Vimeo90kDataModule(root=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"crop=128 is larger than the Vimeo-90k frames \(64x96\)"):
        Vimeo90kDataModule(root=str(vimeo), crop=128)
    with pytest.raises(ValueError, match=r"frames must be in \[1, 7\].*got 8"):
        Vimeo90kDataModule(root=str(vimeo), frames=8)


@pytest.mark.parametrize("name", ["synthetic", "vimeo90k"])
def test_configs_instantiate(name, vimeo):
    cfg = OmegaConf.create({
        "data": OmegaConf.load(CONF / f"{name}.yaml"),
        "task": {"name": "sr2", "sigma": 0, "scale": 2}, "seed": 1, "model": {"in_channels": 3},
        "paths": {"data_dir": str(vimeo.parent)},  # vimeo.yaml reads ${paths.data_dir}/vimeo_septuplet
    })
    dm = instantiate(cfg.data)
    assert dm.scale == 2 and dm.frames == 7 and dm.hparams.seed == 1
