"""The semi-supervised GAN of Salimans et al. 2016, §5 ("Semi-supervised learning"), and its supervised baseline.

The discriminator is a K-class classifier with outputs ``l_1..l_K`` (class logits). Generated images are a
(K+1)-th class whose logit is fixed at 0 (the softmax is invariant to a shift of all K+1 logits, so fixing one
loses nothing), hence with ``Z(x) = sum_k exp(l_k(x))``::

    p(y = K+1 | x) = 1 / (Z + 1),      D(x) = 1 - p(y = K+1 | x) = Z / (Z + 1) = sigmoid(logsumexp(l)).

So ``logsumexp(l)`` is the ordinary real/fake logit, and the unsupervised part of D's loss is Goodfellow's D loss
on it. The paper's loss (§5) is ``L = L_supervised + L_unsupervised`` with::

    L_supervised   = -E_{x,y ~ p_data} log p(y | x, y < K+1)                    (cross-entropy on the K logits)
    L_unsupervised = -{ E_{x ~ p_data} log[1 - p(y = K+1 | x)] + E_{x ~ G} log p(y = K+1 | x) }
                   = E_x softplus(-logsumexp(l(x))) + E_z softplus(logsumexp(l(G(z))))

(``-log D = softplus(-lse)`` and ``-log(1 - D) = log(Z + 1) = softplus(lse)``: finite for any logits). G is
trained with feature matching (§3.1), which the paper found to work best for semi-supervised learning:
select it with ``loss=feature_matching`` (``task=semi_supervised`` does so by default).

Run the comparison table (SSL GAN vs. the same D trained on the labelled examples alone)::

    python -m ganlab.semi_supervised --labels-per-class 1 5 10 --seeds 0 1 2 --steps 400
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ganlab.errors import UserError
from ganlab.losses import GeneratorObjective, Logs, discriminator_loss
from ganlab.module import GANModule

# -- pure functions --------------------------------------------------------------------------------------------


def select_labelled(labels: Tensor, labels_per_class: int, label_seed: int, num_classes: int | None = None) -> Tensor:
    """Indices (sorted) of a labelled subset with exactly ``labels_per_class`` examples of every class.

    The choice depends only on ``labels`` and ``label_seed`` (a CPU ``torch.Generator``), never on the run's
    seed or device, so every run with the same ``label_seed`` sees the same labelled examples.
    """
    labels = labels.detach().cpu().long()
    k = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if labels_per_class < 1:
        raise UserError(f"task.labels_per_class must be >= 1 (got {labels_per_class})")
    counts = torch.bincount(labels, minlength=k)
    if int(counts.min()) < labels_per_class:
        c = int(counts.argmin())
        raise UserError(
            f"task.labels_per_class={labels_per_class} but class {c} has only {int(counts.min())} training "
            f"examples (use at most {int(counts.min())})"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(label_seed)))
    chosen = [order[labels[order] == c][:labels_per_class] for c in range(k)]
    return torch.cat(chosen).sort().values


def real_fake_logit(class_logits: Tensor) -> Tensor:
    """The real/fake logit of a K-class discriminator with an implicit fake class of logit 0: ``logsumexp(l)``.

    ``D(x) = Z / (Z + 1) = sigmoid(log Z)`` with ``Z = sum_k exp(l_k)`` (Salimans et al. 2016 §5).
    """
    return torch.logsumexp(class_logits, dim=1)


def semi_supervised_d_loss(
    labelled_logits: Tensor,
    labels: Tensor,
    real_logits: Tensor,
    fake_logits: Tensor,
    *,
    supervised_weight: float = 1.0,
    real_target: float = 1.0,
) -> tuple[Tensor, Logs]:
    """D's loss ``supervised_weight * L_supervised + L_unsupervised`` (Salimans et al. 2016 §5).

    ``L_supervised``: cross-entropy of the K class logits of a labelled batch (``-log p(y | x, y < K+1)``).
    ``L_unsupervised``: Goodfellow's D loss on the real/fake logit ``lse = logsumexp(l)`` of an unlabelled real
    batch and a generated batch, ``E softplus(-lse(x)) + E softplus(lse(G(z)))``; ``real_target`` < 1 is
    one-sided label smoothing of the real side, exactly as in :func:`ganlab.losses.discriminator_loss`.

    (The authors' code weights ``L_unsupervised`` by 0.5; ``supervised_weight=2`` is that loss times 2.)
    """
    sup = F.cross_entropy(labelled_logits, labels)
    unsup, logs = discriminator_loss(real_fake_logit(real_logits), real_fake_logit(fake_logits), real_target)
    loss = supervised_weight * sup + unsup
    logs = {**logs, "loss/d_sup": sup.detach(), "loss/d_unsup": unsup.detach()}
    return loss, logs


@torch.no_grad()
def classification_error(classifier: nn.Module, x: Tensor, y: Tensor, *, chunk: int = 1000) -> tuple[float, int]:
    """``(percent misclassified, count)`` of ``argmax_k l_k(x)`` against ``y``; ``x`` in model space.

    The classifier runs in eval mode (batch norm uses its running statistics) and is restored afterwards.
    """
    was_training = classifier.training
    classifier.eval()
    try:
        logits = torch.cat([classifier(part)[0] for part in x.split(chunk)])
    finally:
        classifier.train(was_training)
    wrong = int((logits.argmax(1) != y.to(logits.device)).sum())
    return 100.0 * wrong / len(y), wrong


# -- the LightningModule ---------------------------------------------------------------------------------------


class SemiSupervisedGAN(GANModule):
    """GANModule whose D is a K-class classifier (``model.discriminator.n_outputs = K``).

    Only the D update (a labelled batch is added), the G update (objectives see the real/fake logit
    ``logsumexp(l)``) and logging (test error) change; the k:1 schedule, the step-seeded sampling, tricks and
    checkpoints are GANModule's.

    Args (besides GANModule's):
        labels_per_class: size of the labelled subset per class (chosen once from the train split).
        label_seed: seeds the choice of the labelled subset (independent of ``seed``).
        supervised_weight: weight of the cross-entropy term in D's loss (1: the paper's ``L_sup + L_unsup``).
        labelled_batch_size: labelled examples per D update, drawn with replacement from the subset
            (default: ``batch_size``; the paper used 100 labelled + 100 unlabelled).
        eval_every: log ``ssl/test_error`` (% of the test split misclassified) and ``ssl/test_errors`` (count) at
            the log steps that are multiples of this, and at the end of training.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        objective: GeneratorObjective,
        data: Any,
        *,
        labels_per_class: int = 10,
        label_seed: int = 0,
        supervised_weight: float = 1.0,
        labelled_batch_size: int | None = None,
        eval_every: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(generator, discriminator, objective, data, **kwargs)
        if data.train_y is None or data.test_y is None:
            raise UserError(f"task=semi_supervised needs a labelled data set ({data.name} has no labels)")
        k = int(data.num_classes or int(data.train_y.max()) + 1)
        n_out = int(getattr(discriminator, "n_outputs", 1))
        if n_out != k:
            raise UserError(
                f"task=semi_supervised: D has {n_out} outputs but {data.name} has {k} classes "
                f"(set model.discriminator.n_outputs={k})"
            )
        if int(eval_every) < 1:
            raise UserError(f"task.eval_every must be a positive integer (got {eval_every})")
        self.num_classes = k
        self.labels_per_class, self.label_seed = int(labels_per_class), int(label_seed)
        self.supervised_weight = float(supervised_weight)
        self.labelled_batch_size = int(labelled_batch_size or self.batch_size)
        self.eval_every = int(eval_every)
        idx = select_labelled(data.train_y, self.labels_per_class, self.label_seed, k)
        # fixed by label_seed, so rebuilt (not saved) on resume; they move with the module like real_pool
        self.register_buffer("labelled_idx", idx, persistent=False)
        self.register_buffer("labelled_y", data.train_y[idx].long(), persistent=False)
        self.register_buffer("test_pool", data.test_x, persistent=False)
        self.register_buffer("test_y", data.test_y.long(), persistent=False)
        self._gen: torch.Generator | None = None
        self._last_eval_step = -1

    # -- sampling: the labelled batches come from the same per-step stream ------------------------------------
    def step_generator(self, step: int) -> torch.Generator:
        """GANModule's stream of step ``step``, kept so that ``_d_update`` draws its labelled indices from it
        (after the unlabelled indices and the noise): a resumed run draws the same labelled batches."""
        self._gen = super().step_generator(step)
        return self._gen

    def labelled_batch(self) -> tuple[Tensor, Tensor]:
        """A labelled batch (model space, labels), drawn with replacement from the fixed labelled subset."""
        gen = self._gen if self._gen is not None else self.step_generator(self.g_step)
        pick = torch.randint(len(self.labelled_idx), (self.labelled_batch_size,), generator=gen, device=self.device)
        return self.real_batch(self.labelled_idx[pick]), self.labelled_y[pick]

    # -- the updates ------------------------------------------------------------------------------------------
    def gan_logit(self, d_out: Tensor) -> Tensor:
        return real_fake_logit(d_out)

    def _d_update(self, opt: Any, real: Tensor, z: Tensor, log_now: bool) -> dict[str, Tensor]:
        x_lab, y_lab = self.labelled_batch()
        with torch.no_grad():
            fake = self.G(z)
        lab_logits, _ = self.D(x_lab)
        real_logits, _ = self.D(real)
        fake_logits, _ = self.D(fake)
        loss, logs = semi_supervised_d_loss(
            lab_logits,
            y_lab,
            real_logits,
            fake_logits,
            supervised_weight=self.supervised_weight,
            real_target=self.real_target,
        )
        if log_now:
            logs["D(x)"] = torch.sigmoid(real_fake_logit(real_logits.detach())).mean()
            logs["ssl/train_error_labelled"] = (lab_logits.detach().argmax(1) != y_lab).float().mean() * 100
        self._apply_update("D", opt, loss, logs, log_now)
        return logs

    # -- evaluation -------------------------------------------------------------------------------------------
    def classification_error(self, x: Tensor | None = None, y: Tensor | None = None) -> tuple[float, int]:
        """``(percent, count)`` of ``x`` (stored form, e.g. uint8 images; default: the test split) that D's
        classifier ``argmax_k l_k`` gets wrong."""
        x = self.test_pool if x is None else x.to(self.device)
        y = self.test_y if y is None else y
        return classification_error(self.D, self.data.to_model(x), y)

    def _eval_logs(self) -> dict[str, Tensor]:
        pct, count = self.classification_error()
        self._last_eval_step = self.g_step
        return {"ssl/test_error": torch.tensor(pct), "ssl/test_errors": torch.tensor(float(count))}

    def _log(self, logs: Mapping[str, Tensor]) -> None:
        if self.g_step % self.eval_every == 0 or self.g_step >= self.max_steps:
            self.assert_finite()  # never evaluate (or report) a D updated from a non-finite loss
            logs = {**logs, **{k: v.to(self.device) for k, v in self._eval_logs().items()}}
        super()._log(logs)

    def on_train_end(self) -> None:
        # training that stopped off the log grid (e.g. a resumed, already finished run) still reports its error
        if self._last_eval_step != self.g_step:
            self.assert_finite()
            metrics = {k: float(v) for k, v in self._eval_logs().items()}
            self.last_logged.update(metrics)
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.g_step)


# -- the supervised baseline -----------------------------------------------------------------------------------


def train_supervised_baseline(
    data: Any,
    labels_per_class: int,
    seed: int,
    *,
    discriminator: nn.Module | None = None,
    label_seed: int | None = None,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.5, 0.999),
) -> float:
    """Train D's architecture as a plain classifier on the labelled subset alone; return its test error (%).

    ``discriminator``: a fresh K-output D (default: ``MLPDiscriminator(data.shape, n_outputs=K)``, built under
    ``torch.manual_seed(seed)``); ``label_seed`` (default ``seed``) picks the same subset as a semi-supervised
    run with that ``task.label_seed``. ``steps`` Adam updates on batches of ``batch_size`` drawn with
    replacement from the subset (the same number and size of updates as the GAN's D gets: a fair comparison
    with no early stopping on test data).
    """
    data.setup()
    k = int(data.num_classes or int(data.train_y.max()) + 1)
    torch.manual_seed(seed)
    if discriminator is None:
        from ganlab.nets import MLPDiscriminator

        discriminator = MLPDiscriminator(data.shape, n_outputs=k)
    idx = select_labelled(data.train_y, labels_per_class, seed if label_seed is None else label_seed, k)
    x_lab, y_lab = data.to_model(data.train_x[idx]), data.train_y[idx].long()
    opt = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=tuple(betas))
    gen = torch.Generator().manual_seed(seed)
    discriminator.train()
    for _ in range(steps):
        pick = torch.randint(len(idx), (batch_size,), generator=gen)
        logits, _ = discriminator(x_lab[pick])
        loss = F.cross_entropy(logits, y_lab[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    pct, _ = classification_error(discriminator, data.to_model(data.test_x), data.test_y)
    return pct


# -- the comparison table --------------------------------------------------------------------------------------

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The permutation-invariant setting of the paper's MNIST experiment, scaled to 8x8 digits: MLP nets (no
# convolutions; G with batch norm, as the paper's G), feature matching, CSV logging only. Without BN in G the
# discriminator wins outright (D(G(z)) -> 0) and the unlabelled data stop helping.
TABLE_OVERRIDES = (
    "data=digits",
    "model=mlp",
    "model.z_dim=32",
    "model.generator.width=256",
    "model.generator.depth=2",
    "model.generator.batch_norm=true",
    "model.discriminator.width=256",
    "model.discriminator.depth=3",
    "logger=csv",
)


def compose(overrides: Sequence[str]) -> Any:
    """The config ``python src/train.py <overrides>`` would run with (Hydra's compose API on ``conf/``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not CONF_DIR.is_dir():
        raise UserError(f"config folder not found at {CONF_DIR} (run from a checkout of the project)")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def _mean_std(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def run_table(
    labels_per_class: Sequence[int],
    seeds: Sequence[int],
    steps: int,
    out_dir: Path,
    overrides: Sequence[str] = (),
) -> tuple[str, list[dict[str, Any]]]:
    """Train the SSL GAN (through :func:`ganlab.pipeline.train`) and the classifier-only baseline for every
    (labels per class, seed); ``label_seed = seed``, so each seed draws its own labelled subset and both methods
    of a row see the same one. Returns the Markdown table and the per-run records."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ganlab.pipeline import train

    records: list[dict[str, Any]] = []
    for n in labels_per_class:
        for seed in seeds:
            cfg = compose(
                [
                    *TABLE_OVERRIDES,
                    "task=semi_supervised",
                    f"max_steps={steps}",
                    f"seed={seed}",
                    f"task.labels_per_class={n}",
                    f"task.label_seed={seed}",
                    f"task.eval_every={steps}",
                    f"log_every={max(1, steps // 10)}",
                    f"sample_every={steps}",
                    f"ckpt_every={steps}",
                    *overrides,
                ]
            )
            t0 = time.time()
            summary = train(cfg, out_dir / f"lpc{n}_seed{seed}", identity={"table": "semi_supervised"})
            t_ssl = time.time() - t0
            data = instantiate(cfg.data)
            data.setup()
            torch.manual_seed(seed)
            disc = instantiate(cfg.model.discriminator, in_shape=data.shape)
            t0 = time.time()
            base = train_supervised_baseline(
                data,
                n,
                seed,
                discriminator=disc,
                label_seed=seed,
                steps=steps * cfg.d_steps,
                batch_size=int(cfg.task.get("labelled_batch_size") or cfg.batch_size),
                lr=float(cfg.model.optim_d.lr),
                betas=list(OmegaConf.to_container(cfg.model.optim_d.betas)),
            )
            rec = {
                "labels_per_class": n,
                "seed": seed,
                "ssl_test_error": summary["final"]["ssl/test_error"],
                "baseline_test_error": base,
                "test_size": len(data.test_y),
                "ssl_wall_s": round(t_ssl, 1),
                "baseline_wall_s": round(time.time() - t0, 1),
            }
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    lines = [
        "| labels per class | SSL-GAN test error % | classifier-only test error % |",
        "|---:|---:|---:|",
    ]
    for n in labels_per_class:
        rows = [r for r in records if r["labels_per_class"] == n]
        lines.append(
            f"| {n} | {_mean_std([r['ssl_test_error'] for r in rows])} "
            f"| {_mean_std([r['baseline_test_error'] for r in rows])} |"
        )
    return "\n".join(lines), records


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ganlab.semi_supervised``: the SSL GAN vs. classifier-only table (mean ± std over seeds)."""
    parser = argparse.ArgumentParser(
        prog="python -m ganlab.semi_supervised",
        description="Semi-supervised GAN (Salimans et al. 2016 §5) vs. the same D trained on the labels alone.",
    )
    parser.add_argument("--labels-per-class", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="generator steps per SSL run")
    parser.add_argument("--out", type=Path, default=Path("outputs/semi_supervised"), help="run folders go here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.optim_d.lr=3e-3")
    args = parser.parse_args(argv)
    t0 = time.time()
    table, records = run_table(args.labels_per_class, args.seeds, args.steps, args.out, args.overrides)
    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps({"records": records, "wall_s": round(wall, 1)}, indent=2))
    print(table)
    test_n = records[0]["test_size"] if records else 0
    print(f"\n{args.steps} generator steps per SSL run, seeds {args.seeds}, {test_n} test images; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
