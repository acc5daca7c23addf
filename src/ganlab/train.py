"""The training command as a function: ``ganlab-train`` (the installed console script) and ``src/train.py`` (a
checkout) run the same :func:`run`.

:func:`main` is a Hydra main over :func:`ganlab.paths.conf_dir`: the checkout's ``conf/`` when there is one, else
the configs shipped in the package, so ``ganlab-train data=ring8`` works from any folder (run folders go under
``./outputs`` there). ``ganlab-train --cfg job`` prints the composed config without training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ganlab.paths import conf_dir


def run(cfg: DictConfig) -> float | None:
    """Train the composed config into Hydra's output folder (the body of every training entry point).

    A run that cannot go on ends with one line and its error's exit code (2 bad input, 3 interrupted, 4 diverged:
    :mod:`ganlab.errors`); in a multirun the error is re-raised so the sweep goes on and the job's
    ``summary.json`` records why it stopped."""
    from ganlab.threads import wait_policy

    wait_policy(cfg.model.get("threads"))  # before torch loads OpenMP, which reads the policy once
    from ganlab.errors import RunStopped
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
    except RunStopped as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep goes on; summary.json of this job records why it stopped
        print(f"{exc.label}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    return summary.get("final", {}).get("loss/d")


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's entry over :func:`ganlab.paths.conf_dir` (the job is named ``train``, after this module)."""
    return run(cfg)


def main() -> None:
    """``ganlab-train [overrides]``: one run, or with ``-m`` a sweep, exactly as ``python src/train.py``. Overrides
    that do not compose end with one line and exit code 2 (:func:`ganlab.cli.precheck`)."""
    from ganlab.cli import precheck

    reason = precheck(sys.argv[1:], conf_dir())
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
