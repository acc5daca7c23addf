"""The semi-supervised GAN of Salimans et al. 2016, §5 ("Semi-supervised learning").

The discriminator is a K-class classifier with outputs ``l_1..l_K`` (class logits). Generated images are a
(K+1)-th class whose logit is fixed at 0 (the softmax is invariant to a shift of all K+1 logits, so fixing one
loses nothing), hence with ``Z(x) = sum_k exp(l_k(x))``::

    p(y = K+1 | x) = 1 / (Z + 1),      D(x) = 1 - p(y = K+1 | x) = Z / (Z + 1) = sigmoid(logsumexp(l)).

So ``logsumexp(l)`` is the ordinary real/fake logit, and the unsupervised part of D's loss is the arm's D
objective on it (:func:`ganlab.losses.semi_supervised_d_loss`). G is trained with feature matching (§3.1), which
the paper found to work best for semi-supervised learning (``task=semi_supervised`` selects it by default).

The comparison with a classifier trained on the labelled examples alone is the same task with
``task.unsupervised_weight=0`` (D then learns from the labelled batches only): ``+sweep=ssl_labels`` runs both
over labels per class and seeds, and the ordinary report compares them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from ganlab.errors import UserError
from ganlab.losses import Objective, real_fake_logit, semi_supervised_d_loss
from ganlab.tasks.gan import GANModule
from ganlab.util import eval_mode, frozen_norm_stats


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


@torch.no_grad()
def classification_error(classifier: nn.Module, x: Tensor, y: Tensor, *, chunk: int) -> tuple[float, int]:
    """``(percent misclassified, count)`` of ``argmax_k l_k(x)`` against ``y``; ``x`` in model space.

    The classifier runs in eval mode (batch norm on its running statistics) in chunks of ``chunk`` examples: the
    training batch size, so a layer that looks across the batch (minibatch discrimination) sees batches of the
    size it was trained on, whatever the size of the test set.
    """
    with eval_mode(classifier):
        logits = torch.cat([classifier(part)[0] for part in x.split(chunk)])
    y = y.to(logits.device)
    accuracy = multiclass_accuracy(logits, y, num_classes=logits.shape[1], average="micro")
    wrong = round((1.0 - float(accuracy)) * len(y))
    return 100.0 * wrong / len(y), wrong


class SemiSupervisedGAN(GANModule):
    """GANModule whose D is a K-class classifier (``model.discriminator.n_outputs = K``).

    Only the D update (a labelled batch is added), the real/fake logit (``logsumexp(l)``) and the task metric
    (test error, computed by the evaluation callback like every other metric) change; the schedule, the
    step-seeded sampling, tricks and checkpoints are GANModule's.

    Args (besides GANModule's):
        labels_per_class: size of the labelled subset per class (chosen once from the train split).
        label_seed: seeds the choice of the labelled subset (independent of ``seed``).
        supervised_weight: weight of the cross-entropy term in D's loss.
        unsupervised_weight: weight of the real/fake term (0: a classifier of the labelled examples alone).
        labelled_batch_size: labelled examples per D update, drawn with replacement from the subset
            (default: ``batch_size``; the paper used 100 labelled + 100 unlabelled).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        objective: Objective,
        data: Any,
        *,
        labels_per_class: int = 10,
        label_seed: int = 0,
        supervised_weight: float = 1.0,
        unsupervised_weight: float = 1.0,
        labelled_batch_size: int | None = None,
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
        if supervised_weight < 0 or unsupervised_weight < 0:
            raise UserError(
                f"task.supervised_weight and task.unsupervised_weight must be >= 0 "
                f"(got {supervised_weight}, {unsupervised_weight})"
            )
        self.num_classes = k
        self.labels_per_class, self.label_seed = int(labels_per_class), int(label_seed)
        self.supervised_weight, self.unsupervised_weight = float(supervised_weight), float(unsupervised_weight)
        self.labelled_batch_size = int(labelled_batch_size or self.batch_size)
        idx = select_labelled(data.train_y, self.labels_per_class, self.label_seed, k)
        # fixed by label_seed, so rebuilt (not saved) on resume; they move with the module like real_pool
        self.register_buffer("labelled_idx", idx, persistent=False)
        self.register_buffer("labelled_y", data.train_y[idx].long(), persistent=False)
        self.register_buffer("test_pool", data.test_x, persistent=False)
        self.register_buffer("test_y", data.test_y.long(), persistent=False)
        self._rng: torch.Generator | None = None

    # -- sampling: the labelled batches come from the same per-step stream ------------------------------------
    def step_rng(self, step: int) -> torch.Generator:
        """GANModule's stream of step ``step``, kept so that ``_d_update`` draws its labelled indices from it
        (after the unlabelled indices and the noise): a resumed run draws the same labelled batches."""
        self._rng = super().step_rng(step)
        return self._rng

    def labelled_batch(self) -> tuple[Tensor, Tensor]:
        """A labelled batch (model space, labels), drawn with replacement from the fixed labelled subset."""
        rng = self._rng if self._rng is not None else self.step_rng(self.g_step)
        pick = torch.randint(len(self.labelled_idx), (self.labelled_batch_size,), generator=rng, device=self.device)
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
        with frozen_norm_stats(self.D):  # D's batch-norm running statistics come from real batches only
            fake_logits, _ = self.D(fake)
        loss, logs = semi_supervised_d_loss(
            lab_logits,
            y_lab,
            real_logits,
            fake_logits,
            objective=self.objective,
            supervised_weight=self.supervised_weight,
            unsupervised_weight=self.unsupervised_weight,
            real_target=self.real_target,
        )
        if log_now:
            logs["D(x)"] = torch.sigmoid(real_fake_logit(real_logits.detach())).mean()
            logs["ssl/train_error_labelled"] = (lab_logits.detach().argmax(1) != y_lab).float().mean() * 100
        self._apply_update("D", opt, loss, logs, log_now)
        return logs

    # -- the task metric --------------------------------------------------------------------------------------
    def classification_error(self, x: Tensor | None = None, y: Tensor | None = None) -> tuple[float, int]:
        """``(percent, count)`` of ``x`` (stored form, e.g. uint8 images; default: the test split) that D's
        classifier ``argmax_k l_k`` gets wrong."""
        x = self.test_pool if x is None else x.to(self.device)
        y = self.test_y if y is None else y
        return classification_error(self.D, self.data.to_model(x), y, chunk=self.batch_size)

    def task_metrics(self) -> Mapping[str, float]:
        """``ssl/test_error`` (% of the test split misclassified) and ``ssl/test_errors`` (the count)."""
        pct, count = self.classification_error()
        return {"ssl/test_error": pct, "ssl/test_errors": float(count)}
