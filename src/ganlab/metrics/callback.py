"""The evaluation callback: ``conf/metrics/default.yaml`` instantiates it (``metrics=none`` leaves it out)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

from ganlab.util import chunked, eval_mode, is_due, log_to_all

if TYPE_CHECKING:
    from ganlab.tasks.gan import GANModule


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer (got {value!r})")


MIN_SAMPLES = 100  # the smallest evaluation worth a number (KID subsets, k-NN precision/recall, 25 modes)


class Evaluation(pl.Callback):
    """Every ``eval_every`` generator steps and after the last one: ``n_samples`` samples from a fixed seed, the
    metrics the data set declares (``data.evaluation``, built by :func:`ganlab.metrics.build_evaluator`), D's view
    of the equilibrium on held-out data, and the task's own metrics (``module.task_metrics()``, e.g. the
    semi-supervised test error).

    Logged to every logger at the generator step and kept in ``module.last_logged`` (so the final values land in
    ``summary.json``). In a DDP run each rank generates its share of the same samples, all are gathered on rank 0,
    which alone computes the metrics (and holds the evaluator: reference statistics, classifiers), and every rank
    receives them: each rank's ``last_logged`` holds the same numbers, those one process would compute from rank 0's
    state. ``eval/seconds`` (logged) is the cumulative evaluation time; ``summary.json`` keeps it as
    ``eval_time_s`` so its share of a run stays visible.

    Args (the keys of ``conf/metrics/default.yaml``; a bad value is a one-line ``ValueError`` naming the key):
        eval_every: generator steps between evaluations.
        n_samples: generated samples per evaluation; None: the data set's protocol (``evaluation.samples``).
        seed: noise seed of the evaluation samples.
        kid_subset_size: requested KID subset size.
        inception_weights: local Inception-v3 weights file (must exist when given).
        cache_dir: reference-statistics cache (None: ``$GANLAB_CACHE``).
    """

    def __init__(
        self,
        eval_every: int,
        n_samples: int | None = None,
        seed: int = 2024,
        kid_subset_size: int = 500,
        inception_weights: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        _positive_int("metrics.eval_every", eval_every)
        if n_samples is not None:
            _positive_int("metrics.n_samples", n_samples)
            if n_samples < MIN_SAMPLES:
                raise ValueError(
                    f"metrics.n_samples must be at least {MIN_SAMPLES} (got {n_samples}): fewer samples make FID, "
                    "KID, precision/recall and mode counts meaningless"
                )
        _positive_int("metrics.kid_subset_size", kid_subset_size)
        if inception_weights is not None and not Path(str(inception_weights)).expanduser().is_file():
            raise ValueError(f"metrics.inception_weights: no file at {inception_weights}")
        self.every, self.n_samples, self.seed = eval_every, n_samples, seed
        self.kid_subset_size, self.inception_weights, self.cache_dir = kid_subset_size, inception_weights, cache_dir
        self.evaluator = None
        self.seconds = 0.0
        self.interim_keys: set[str] = set()

    @property
    def step_cadence(self) -> tuple[int, ...]:
        """Evaluates every ``eval_every`` generator steps (see ``GANModule.steps_this_call``)."""
        return (self.every,)

    def n_samples_for(self, module: GANModule, final: bool = True) -> int:
        """Samples per evaluation: ``n_samples``, else the data set's protocol (its interim count before the end)."""
        if self.evaluator is not None:
            return self.evaluator.n_samples if final else self.evaluator.interim_samples
        spec = module.data.evaluation
        return self.n_samples or (spec.samples if final else spec.interim_samples or spec.samples)

    def on_fit_start(self, trainer: pl.Trainer | None, module: GANModule) -> None:
        from ganlab.metrics.evaluator import build_evaluator  # torch-fidelity only once a run evaluates

        if module.rank != 0:  # DDP: rank 0 computes the metrics (caches and classifiers are built once)
            return
        self.evaluator = build_evaluator(
            module.data,
            n_samples=self.n_samples,
            device=module.device,
            inception_weights=self.inception_weights,
            kid_subset_size=self.kid_subset_size,
            cache_dir=self.cache_dir,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, module: GANModule, *args: Any) -> None:
        if is_due(module.g_step, self.every, module.max_steps):
            self.evaluate(trainer, module, final=module.g_step >= module.max_steps)

    @torch.no_grad()
    def equilibrium(self, module: GANModule, fake: torch.Tensor) -> dict[str, float]:
        """Mean D(x) on held-out real data, mean D(G(z)), and D's accuracy telling them apart (½ = fooled), on
        sets of equal size: ``min(len(test split), len(fake))`` of each (digits: its 360 held-out images and the
        first 360 samples). None without a held-out split (``data=folder data.test_fraction=0``)."""
        if len(module.data.test_x) == 0:
            return {}
        real = module.data.to_model(module.data.test_x[: len(fake)].to(module.device))
        fake = fake[: len(real)]

        def d_of(x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(module.gan_logit(module.D(x)[0]))

        with eval_mode(module.D):  # in chunks of the training batch: D's view must not depend on how many we ask
            p_real = chunked(d_of, real, module.batch_size)
            p_fake = chunked(d_of, fake, module.batch_size)
        acc = torch.cat([(p_real > 0.5).float(), (p_fake < 0.5).float()]).mean()
        values = torch.stack([p_real.mean(), p_fake.mean(), acc]).tolist()
        return dict(zip(("eval/D(x_test)", "eval/D(G(z))", "eval/d_accuracy"), values, strict=True))

    def evaluate(self, trainer: Any, module: GANModule, final: bool = True) -> dict[str, float]:
        t0 = time.perf_counter()
        n = self.n_samples_for(module, final)
        fake = module.sample(n, seed=self.seed, gather=True)  # a collective under DDP
        metrics: dict[str, float] | None = None
        if module.rank == 0:
            stored = module.data.to_uint8(fake) if module.data.kind == "image" else fake
            metrics = self.evaluator(stored, n_samples=n)
            metrics.update(self.equilibrium(module, fake))
            task_metrics = getattr(module, "task_metrics", None)  # the task's own numbers ({} for a plain GAN)
            if task_metrics is not None:
                metrics.update(task_metrics())
        if module.world_size > 1:
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        self.seconds += time.perf_counter() - t0
        if final:  # numbers of interim evaluations (their own names) are not the run's final values
            for key in self.interim_keys - metrics.keys():
                module.last_logged.pop(key, None)
        else:
            self.interim_keys |= set(metrics)
        module.last_logged.update(metrics)  # the final values go into summary.json; timing is not a result
        log_to_all(trainer.loggers, {**metrics, "eval/seconds": self.seconds}, module.g_step)
        return metrics
