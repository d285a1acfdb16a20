"""LightningDataModules for the synthetic clips and Vimeo-90k.

Both take plain values (Hydra's ``_target_`` instantiates them from
``conf/data/*.yaml``) and validate everything in ``__init__``, so a bad config
fails before any model is built. Batches are dicts ``{"input": B x T x C x h x w,
"target": B x T x C x H x W, "index": B}`` (h = H / scale).

Training draws fresh crops, motion and noise every epoch through ``EpochSampler``:
it shuffles the indices and offsets them by ``epoch * len(dataset)``, which the
datasets read as "same sample, epoch e" (see ``recstab.data.synthetic``). Lightning
calls its ``set_epoch`` at every epoch start, in the main process, so this also
holds with persistent workers. (Under DDP Lightning wraps the sampler in a
distributed one that does not forward ``set_epoch``: every epoch then repeats the
crops of epoch 0.) Validation and test loaders are sequential and deterministic.

Exact resume. The training batch b of epoch e is a pure function of
(seed, e, b): the permutation comes from ``make_generator(seed, salt, e)`` and
every clip (content and noise) from its own key ``e * n + i``. So the position in
the data stream is two integers, and that is the training loader's state:
``ResumableLoader.state_dict()`` returns ``{"epoch": e, "batches_done": b, ...}``,
where b counts the batches training has consumed in epoch e (read from the
trainer's batch progress, not from the sampler, which runs ahead by the
prefetched batches). Lightning stores it in every checkpoint (``loops`` ->
``fit_loop`` -> ``combined_loader``) and, on resume, hands it back through
``load_state_dict`` before it creates the epoch's iterator; the sampler then
starts the same permutation at index ``b * batch_size``. A run resumed from any
checkpoint therefore sees exactly the batches the uninterrupted run would have.
(Single-device runs: under DDP Lightning replaces the sampler by its distributed
wrapper, the loader has no state and a resumed run restarts its epoch.)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from recstab.data.degradations import check_task, make_generator
from recstab.data.synthetic import SyntheticClips, check_crop
from recstab.data.vimeo90k import SEPTUPLET, Vimeo90k, check_root, frame_size

_SAMPLER_SALT = 7  # keeps the sampler's permutations independent of the datasets' streams


class EpochSampler(Sampler[int]):
    """Random permutation of range(n), a new one per epoch, offset by ``epoch * n``.

    ``skip`` drops the first indices of the next iteration only (a resumed epoch
    continues where it stopped); it is cleared once consumed and by a new epoch.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def permutation(self, epoch: int) -> torch.Tensor:
        """The keys of epoch ``epoch`` in training order (a pure function of seed and epoch)."""
        perm = torch.randperm(self.n, generator=make_generator(self.seed, _SAMPLER_SALT, epoch))
        return perm + epoch * self.n

    def __iter__(self):
        keys, self.skip = self.permutation(self.epoch)[self.skip:], 0
        return iter(keys.tolist())


class ResumableLoader(DataLoader):
    """The training DataLoader, with its position in the data stream as a state dict.

    ``progress`` (set by the DataModule) returns the number of batches training has
    consumed in the current epoch. Lightning calls ``state_dict`` when it writes a
    checkpoint and ``load_state_dict`` when it resumes from one (any object with both
    methods is stateful to it). A loader whose sampler is not an ``EpochSampler``
    (Lightning's DDP wrapper) has no state.
    """

    progress = None  # () -> int, batches of the current epoch already trained

    def state_dict(self) -> dict:
        if not isinstance(self.sampler, EpochSampler) or self.progress is None:
            return {}
        return {"epoch": self.sampler.epoch, "batches_done": int(self.progress()),
                "batch_size": self.batch_size, "length": self.sampler.n, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        if not state or not isinstance(self.sampler, EpochSampler):
            return
        sampler = self.sampler
        now = {"batch_size": self.batch_size, "length": sampler.n, "seed": sampler.seed}
        changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
        if changed:
            raise ValueError(
                "cannot resume the training data stream exactly: the checkpoint was written with "
                + ", ".join(f"{k}={old} (this run: {new})" for k, (old, new) in changed.items())
                + "; resume with the data settings of the checkpoint (data.batch_size, data.train_length, "
                "seed), or start a fresh run")
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done * self.batch_size >= sampler.n:  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        sampler.epoch, sampler.skip = epoch, done * self.batch_size


def _positive(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")


class VideoDataModule(L.LightningDataModule):
    """Loaders and validation shared by the data modules; subclasses build the datasets."""

    def __init__(self, batch_size: int, num_workers: int, frames: int, crop: int, in_channels: int,
                 task: str, sigma: float, scale: int | None, seed: int, eval_batch_size: int | None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("frames", frames), ("crop", crop)):
            _positive(name, value)
        _positive("eval_batch_size", eval_batch_size, allow_none=True)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}")
        self._scale = check_task(task, sigma, scale)
        if crop % self._scale:
            raise ValueError(f"crop={crop} must be divisible by the scale {self._scale} of task {task!r}")
        self._frames = frames
        self.batch_size, self.num_workers = batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.common = dict(frames=frames, channels=in_channels, task=task, sigma=sigma, scale=scale, seed=seed)
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def frames(self) -> int:
        """Clip length T of every batch."""
        return self._frames

    @property
    def scale(self) -> int:
        """Spatial factor between input and target (1 for denoise, 2 for sr2)."""
        return self._scale

    def _dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs ("fit", "validate", "test"; None: all), once."""
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._dataset("train")
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._dataset("val")
        if stage in ("test", None) and self.test_set is None:
            self.test_set = self._dataset("test")

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSampler(len(dataset), self.seed) if train else None,  # None: sequential
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        loader = self._loader(self.train_set, train=True)
        loader.progress = self._batches_trained
        return loader

    def _batches_trained(self) -> int:
        """Batches of the current epoch whose training step has run (0 outside a fit)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, train=False)


class SyntheticDataModule(VideoDataModule):
    """Download-free moving clips of scikit-image photographs (``recstab.data.synthetic``).

    ``train_length``/``val_length``/``test_length`` are the clips per epoch of each
    split; ``eval_crop`` (default: ``crop``) is the size of the val/test clips.
    """

    def __init__(self, batch_size: int = 8, num_workers: int = 0, frames: int = 7, crop: int = 64,
                 in_channels: int = 3, task: str = "denoise", sigma: float = 30.0, scale: int | None = None,
                 seed: int = 0, train_length: int = 512, val_length: int = 64, test_length: int = 128,
                 eval_crop: int | None = None, eval_batch_size: int | None = None,
                 max_speed: float = 2.0):
        super().__init__(batch_size, num_workers, frames, crop, in_channels, task, sigma, scale, seed,
                         eval_batch_size)
        self.save_hyperparameters()
        for name, value in (("train_length", train_length), ("val_length", val_length),
                            ("test_length", test_length)):
            _positive(name, value)
        _positive("eval_crop", eval_crop, allow_none=True)
        eval_crop = eval_crop or crop
        if eval_crop % self.scale:
            raise ValueError(f"eval_crop={eval_crop} must be divisible by the scale {self.scale}")
        if not max_speed >= 0:
            raise ValueError(f"max_speed must be >= 0 (pixels/frame), got {max_speed!r}")
        check_crop(crop, "train")
        check_crop(eval_crop, "val")
        check_crop(eval_crop, "test")
        self.lengths = {"train": train_length, "val": val_length, "test": test_length}
        self.crops = {"train": crop, "val": eval_crop, "test": eval_crop}
        self.max_speed = max_speed

    def _dataset(self, split: str) -> SyntheticClips:
        return SyntheticClips(split, self.lengths[split], crop=self.crops[split],
                              max_speed=self.max_speed, **self.common)


class Vimeo90kDataModule(VideoDataModule):
    """Vimeo-90k septuplets (``recstab.data.vimeo90k``).

    Train: random ``crop`` crops of every training sequence (``train_sequences``
    caps their number). Test: the first ``max_sequences`` test sequences at full
    resolution (the paper: 1024). Val: the last ``val_sequences`` test sequences.
    """

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 4, frames: int = SEPTUPLET,
                 crop: int = 64, in_channels: int = 3, task: str = "denoise", sigma: float = 30.0,
                 scale: int | None = None, seed: int = 0, max_sequences: int = 1024,
                 val_sequences: int = 256, train_sequences: int | None = None,
                 eval_batch_size: int | None = None):
        super().__init__(batch_size, num_workers, frames, crop, in_channels, task, sigma, scale, seed,
                         eval_batch_size)
        self.save_hyperparameters()
        if frames > SEPTUPLET:
            raise ValueError(f"frames must be in [1, {SEPTUPLET}] for Vimeo-90k septuplets, got {frames}")
        _positive("max_sequences", max_sequences)
        _positive("val_sequences", val_sequences)
        _positive("train_sequences", train_sequences, allow_none=True)
        self.root = check_root(root)
        height, width = frame_size(self.root)
        if crop > min(height, width):
            raise ValueError(f"crop={crop} is larger than the Vimeo-90k frames ({height}x{width})")
        if height % self.scale or width % self.scale:
            raise ValueError(f"frames of {height}x{width} are not divisible by the scale {self.scale}")
        self.sequences = {"train": train_sequences, "val": val_sequences, "test": max_sequences}
        self.crop = crop

    def _dataset(self, split: str) -> Vimeo90k:
        return Vimeo90k(Path(self.root), split, crop=self.crop, max_sequences=self.sequences[split],
                        **self.common)
