"""Train (and test) one model: ``python src/train.py [group=option ...] [key=value ...]``.

    python src/train.py                                        # the default run (CPU, synthetic clips)
    python src/train.py experiment=paper row=srnc_2.0_0.1      # a row of the paper at the paper's scale
    python src/train.py -m sweep=table3 debug=smoke            # a whole table, every job in seconds

Configs are in conf/ (root: conf/train.yaml); the work is in recstab.lit.launch.

In a ``-m`` sweep a job that raises does not stop the others: :func:`main` logs the error,
writes ``failed.json`` (the error, the traceback file, the job's log) into the job's output
dir and returns NaN as the sweep's objective; ``src/report.py`` then marks its row failed and
names the log. A single run re-raises, so its exit status says it failed.
"""

import json
import logging
import math
import os
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
log = logging.getLogger("train")


def record_failure(error: BaseException) -> Path:
    """Write ``failed.json`` and ``traceback.txt`` into this job's output dir; return the json's path."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "traceback.txt"
    trace.write_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    job_log = out / f"{hydra_cfg.job.name}.log"  # Hydra's job log file (hydra/job_logging default)
    cause = error  # Hydra wraps what the code raised (InstantiationException): name the original
    while cause.__cause__ is not None:
        cause = cause.__cause__
    failed = out / "failed.json"
    failed.write_text(json.dumps({
        "error": f"{type(cause).__name__}: {cause}", "raised": type(error).__name__, "traceback": str(trace),
        "log": str(job_log) if job_log.is_file() else None, "overrides": list(hydra_cfg.overrides.task),
    }, indent=2))
    return failed


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from recstab.lit.launch import run_training

    try:
        metrics = run_training(cfg)
    except Exception as error:
        if not in_multirun():
            raise
        log.exception("job failed (the sweep goes on)")
        log.error("failure recorded in %s", record_failure(error))
        return math.nan
    objective = cfg.get("objective")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
