"""Stabilise a trained recurrent model after the fact: ``python src/stabilise.py ckpt_path=<ckpt>``.

    python src/stabilise.py ckpt_path=logs/laptop/multiruns/<time>/0_.../checkpoints/last.ckpt
    python src/stabilise.py ckpt_path=<ckpt> method=dampening dampening.margin=0.1
    python src/stabilise.py ckpt_path=<ckpt> method=finetune finetune.steps=500 finetune.norm.alpha=0.9

Root config: conf/stabilise.yaml; the methods, the maths and the reports: :mod:`recstab.stabilise`.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(config_path="../conf", config_name="stabilise", version_base="1.3")
def main(cfg: DictConfig):
    import torch
    from hydra.core.hydra_config import HydraConfig

    from recstab.lit.preflight import one_line_errors
    from recstab.stabilise import stabilise

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    with one_line_errors():
        stabilise(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
