"""hydra/launcher=ray_gpu: one GPU per job, Ray sets each job's CUDA_VISIBLE_DEVICES (tested with fake GPUs)."""

import json

import pytest
import torch


def test_ray_gpu_asks_one_gpu_per_job_and_can_join_a_cluster(compose):
    cfg = compose("train", ["hydra/launcher=ray_gpu"]).hydra.launcher
    assert cfg._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert cfg.ray.remote.num_gpus == 1 and cfg.ray.remote.max_calls == 1
    cfg = compose("train", ["hydra/launcher=ray_gpu", "hydra.launcher.ray.init.address=auto"]).hydra.launcher
    init = dict(cfg.ray.init)
    init.setdefault("object_store_memory", 78643200)  # what the plugin does before ray.init(**init)
    # Ray refuses num_cpus/num_gpus/object_store_memory when joining a running cluster: all must stay None
    assert init["address"] == "auto" and init["num_gpus"] is None and init["object_store_memory"] is None


@pytest.mark.slow
def test_local_ray_hands_each_job_its_own_gpu(tmp_path, run_script):
    pytest.importorskip("ray")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2  # fake GPUs on a CPU machine
    out = tmp_path / "sweep"
    # three short jobs (clips of 3, 4, 5 frames) on two GPUs: one GPU is handed out twice, to a fresh worker
    args = ["-m", "sweep=table8", "data.frames=3,4,5", "debug=smoke", "hydra/launcher=ray_gpu",
            f"hydra.launcher.ray.init.num_gpus={gpus}",
            "+hydra.launcher.ray.init.num_cpus=2", f"hydra.sweep.dir={out}",
            "diagnostics.trf=null", "diagnostics.onsets=null", "diagnostics.spectra_n=null", "diagnostics.lyapunov=null",
            f"trainer.accelerator={'auto' if torch.cuda.is_available() else 'cpu'}"]
    result = run_script("train.py", args, tmp_path, env={"RAY_USAGE_STATS_ENABLED": "0"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    devices = [json.loads(p.read_text()) for p in sorted(out.glob("*/device.json"))]
    assert len(devices) == 3 and len(list(out.glob("*/metrics.json"))) == 3
    for d in devices:
        assert d["cuda_visible_devices"] in {str(i) for i in range(gpus)}, d  # exactly one device per job
        assert d["ray_gpu_ids"] == [d["cuda_visible_devices"]]
        if torch.cuda.is_available():
            assert d["cuda_device_count"] == 1 and d["train_device"] == "cuda:0"
    assert {d["cuda_visible_devices"] for d in devices} == {str(i) for i in range(min(gpus, 3))}
    assert len({d["pid"] for d in devices}) == 3  # a fresh worker per job (max_calls=1)
