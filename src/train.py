"""Train one GAN (or, with ``-m``, a sweep of them): ``python src/train.py loss=feature_matching data=ring8``.

Hydra composes ``conf/config.yaml`` with the chosen options; the run folder is Hydra's output directory.
Bad settings exit with a one-line reason and a non-zero code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from ganlab.errors import UserError
    from ganlab.pipeline import train

    hc = HydraConfig.get()
    identity = {
        "overrides": list(hc.overrides.task),
        "choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
        "job_num": hc.job.num if hc.mode == RunMode.MULTIRUN else None,
        # runs of one sweep share a W&B group: the sweep folder's path below outputs/
        "sweep": hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None,
    }
    try:
        summary = train(cfg, Path(hc.runtime.output_dir), identity=identity)
    except UserError as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep goes on; summary.json of this job records the failure
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return summary.get("final", {}).get("loss/d")


if __name__ == "__main__":
    main()
