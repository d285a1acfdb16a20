"""Train (and test) one model: ``python src/train.py [group=option ...] [key=value ...]``.

Configs are in conf/ (root: conf/train.yaml); the work is in recstab.lit.launch.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from recstab.lit.launch import run_training

    metrics = run_training(cfg)
    objective = cfg.get("objective")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
