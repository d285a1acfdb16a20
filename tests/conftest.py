"""Shared test setup: isolated home and caches, W&B disabled, a tiny CPU budget, the repository root."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Isolated home and caches for the whole session, set at import time (before torch or anything
# that resolves cache paths is imported) and inherited by subprocesses (sweeps, train.py): no
# test reads or writes the user's ~/.cache/torch, ~/.cache/recstab or ~/.config.
ISOLATED_HOME = Path(tempfile.mkdtemp(prefix="recstab-tests-home-"))
atexit.register(shutil.rmtree, ISOLATED_HOME, ignore_errors=True)
for _var, _sub in (("HOME", ""), ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                   ("TORCH_HOME", ".cache/torch"), ("RECSTAB_CACHE", ".cache/recstab")):
    os.environ[_var] = str(ISOLATED_HOME / _sub)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: tiny tensors, 2 shared cores
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny tensors: threads cost more than they give

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Files with slow tests (real runs in subprocesses) first, each file's tests in their order: under
    pytest-xdist (``make test``: a file per worker) the long files start early and the quick ones fill in."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


# ---------------------------------------------------------------------------------------------- shared fixtures
CONF = ROOT / "conf"


def _compose(config_name: str = "train", overrides=(), output_dir: Path | None = None):
    """Compose conf/<config_name>.yaml as `python src/<config_name>.py <overrides>` would.

    The Hydra runtime is set (``${hydra:...}`` resolves); with ``output_dir`` as for a real run
    writing there (``${hydra:runtime.output_dir}``, ``paths.log_dir=<output_dir>/logs``), so the
    config can be handed to ``run_training`` directly.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
            cfg.paths.log_dir = str(Path(output_dir) / "logs")
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices.model} (run_name) resolves as in a run
    return cfg


@pytest.fixture(autouse=True)
def _forget_hydra_runtime():
    """A test that sets up the Hydra runtime (``output_dir=``) must not leak it into the next one."""
    yield
    from hydra.core.hydra_config import HydraConfig
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="session")
def compose():
    """``compose(config_name="train", overrides=[...], output_dir=None)`` -> the composed config."""
    return _compose


def _run_script(script: str, args, cwd: Path, env: dict | None = None, timeout: int = 900):
    """Run ``python src/<script> <args>`` in ``cwd`` (W&B disabled, one thread unless ``env`` says otherwise)."""
    import subprocess
    import sys

    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "src" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def run_script():
    """``run_script("train.py", [overrides...], cwd, env=None)`` -> the CompletedProcess."""
    return _run_script


def _sweep_jobs(cfg) -> list[list[str]]:
    """The job overrides of a composed sweep's ``hydra.sweeper.params`` (comma lists, Cartesian product), as
    Hydra's basic sweeper makes them."""
    import itertools

    from omegaconf import OmegaConf

    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    axes = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(combo) for combo in itertools.product(*axes)]


@pytest.fixture(scope="session")
def sweep_jobs():
    """``sweep_jobs(cfg)`` -> the list of job overrides of a composed sweep config."""
    return _sweep_jobs


EVALUATION_SWEEPS = {"table7", "fig12"}  # sweeps over one trained checkpoint (train=false ckpt_path=...)


def _once(path: Path, make) -> Path:
    """``make(path)`` unless it already ran: under pytest-xdist (``make test``) every worker shares ``path`` and a
    file lock, so a run that several workers' tests need is made once, by whichever asks first."""
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        done = path.with_name(path.name + ".done")
        if not done.exists():
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """``smoke_sweep(name)`` -> the dir of `python src/train.py -m sweep=<name> debug=smoke logger=csv`, run once
    per test session, shared by the xdist workers (the evaluation sweeps evaluate a VResNet-feat trained for 3
    steps, also trained once). The sweeps' W&B runs are tested on their own
    (test_sweeps.py::test_each_job_finishes_its_own_wandb_run)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the xdist workers' basetemps share it
    root = shared / "smoke_sweeps"
    root.mkdir(exist_ok=True)

    def train(run_dir: Path) -> None:
        result = _run_script("train.py", ["debug=smoke", "logger=csv", f"hydra.run.dir={run_dir}"], root)
        assert result.returncode == 0, result.stderr[-3000:]

    def sweep(name: str):
        def make(sweep_dir: Path) -> None:
            extra = []
            if name in EVALUATION_SWEEPS:
                extra = [f"ckpt_path={_once(root / 'vresnet_feat', train) / 'checkpoints' / 'last.ckpt'}"]
            result = _run_script("train.py", ["-m", f"sweep={name}", "debug=smoke", "logger=csv",
                                              f"hydra.sweep.dir={sweep_dir}", *extra], root)
            assert result.returncode == 0, result.stderr[-4000:]
        return make

    def run(name: str) -> Path:
        return _once(root / name, sweep(name))

    run.root = root
    return run


def _write_vimeo90k(root: Path, n_sequences: int = 3, size: tuple[int, int] = (96, 64),
                    frames: int = 7, still: str = "astronaut") -> Path:
    """Write a tiny data set in exactly the Vimeo-90k septuplet layout; return ``root``.

    ``n_sequences`` go to ``sep_trainlist.txt`` and ``n_sequences`` others to
    ``sep_testlist.txt`` (spread over two top folders, like "00001/0001"). Frames
    are ``size = (W, H)`` crops of a scikit-image photograph, panned by a few
    pixels per frame with a different offset and velocity per sequence, so content
    really moves. ``frames`` < 7 writes incomplete sequences (for error tests).
    """
    from torchvision.io import encode_png, write_file

    from recstab.data.synthetic import load_still

    root = Path(root)
    width, height = size
    image = (load_still(still, 3) * 255).round().to(torch.uint8)
    _, big_h, big_w = image.shape
    names = [f"{1 + k // 2:05d}/{1 + k % 2:04d}" for k in range(2 * n_sequences)]
    for k, name in enumerate(names):
        vx, vy = (k % 3) - 1, (k % 2) * 2 - 1  # pixels/frame, in [-1, 1]
        x0 = 8 + (13 * k) % max(big_w - width - 16, 1)
        y0 = 8 + (29 * k) % max(big_h - height - 16, 1)
        folder = root / "sequences" / name
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            x, y = x0 + vx * t, y0 + vy * t
            write_file(str(folder / f"im{t + 1}.png"), encode_png(image[:, y:y + height, x:x + width].contiguous()))
    (root / "sep_trainlist.txt").write_text("\n".join(names[:n_sequences]) + "\n")
    (root / "sep_testlist.txt").write_text("\n".join(names[n_sequences:]) + "\n\n")  # trailing blank, as the original
    return root


@pytest.fixture(scope="session")
def write_vimeo90k():
    """``write_vimeo90k(root, n_sequences=3, size=(W, H), frames=7)``: a tiny Vimeo-90k septuplet tree."""
    return _write_vimeo90k


def _write_video(path, frames: int = 6, height: int = 32, width: int = 48, level: int = 40,
                 codec: str = "mpeg4", faststart: bool = False) -> Path:
    """An mp4 whose frame i is flat grey `level + 10 i` with a white bar of width 2 i on the left."""
    import av
    import numpy as np

    options = {"movflags": "faststart"} if faststart else {}
    container = av.open(str(path), "w", options=options)
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
    for i in range(frames):
        a = np.full((height, width, 3), (level + 10 * i) % 256, np.uint8)
        a[:, :2 * i] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="session")
def write_video():
    """``write_video(path, frames=6, height=32, width=48, level=40, codec="mpeg4", faststart=False)`` -> path:
    a tiny mp4 written with PyAV (the test is skipped without it)."""
    pytest.importorskip("av")
    return _write_video


def _write_video_folder(folder, frames: tuple[int, int] = (5, 5), size: int = 32) -> Path:
    """``folder`` holding a.mp4 (grey level 40) and b.mp4 (level 150), ``frames`` long, size×size; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, level in (("a.mp4", frames[0], 40), ("b.mp4", frames[1], 150)):
        _write_video(folder / name, frames=n, height=size, width=size, level=level)
    return folder


@pytest.fixture(scope="session")
def write_video_folder(write_video):
    """``write_video_folder(folder, frames=(5, 5), size=32)`` -> folder with two tiny mp4s, a.mp4 and b.mp4."""
    return _write_video_folder


@pytest.fixture(scope="session")
def vresnet_feat():
    """``vresnet_feat(channels=16, seed=0, conv_norm=None)`` -> an untrained VResNet-feat."""
    from recstab.models.reference import vresnet_feat
    return vresnet_feat
