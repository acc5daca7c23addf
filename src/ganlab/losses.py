"""GAN objectives as pure functions of discriminator logits and features.

D outputs a logit ``l`` with D(x) = sigmoid(l). Every loss is written with ``softplus`` so it stays finite for
any logit: ``-log sigmoid(l) = softplus(-l)`` and ``-log(1 - sigmoid(l)) = softplus(l)``.

Each arm is a small :class:`Objective` class (Hydra's ``_target_`` is the registry) with a ``discriminator`` and a
``generator`` method, each returning ``(loss, logs)``: a scalar to minimise and a dict of detached tensors worth
logging. The training module only calls them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Logs = dict[str, Tensor]


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, real_target: float = 1.0) -> tuple[Tensor, Logs]:
    """D's loss, the negative of Goodfellow's L0 = E_x[log D(x)] + E_z[log(1 - D(G(z)))].

    ``real_target`` < 1 is one-sided label smoothing (Salimans et al. 2016 §3.4): the real side's target becomes
    alpha, i.e. ``alpha * -log D(x) + (1 - alpha) * -log(1 - D(x))``; the fake side's target stays 0.
    """
    # real: alpha * -log(sigmoid(l)) + (1 - alpha) * -log(1 - sigmoid(l)); at alpha = 1 the second term is
    # left out of the graph rather than multiplied by 0 (the same bits, three fewer ops forward and backward)
    real = F.softplus(-real_logits)
    if real_target != 1.0:
        real = real_target * real + (1.0 - real_target) * F.softplus(real_logits)
    # fake: -log(1 - sigmoid(l))
    real_mean, fake_mean = real.mean(), F.softplus(fake_logits).mean()
    return real_mean + fake_mean, {"loss/d_real": real_mean.detach(), "loss/d_fake": fake_mean.detach()}


def minimax_generator_loss(fake_logits: Tensor) -> Tensor:
    """The saturating loss of the original minimax game: minimise E_z[log(1 - D(G(z)))].

    Its gradient vanishes as D(G(z)) -> 0, which is exactly when a confident D rejects the fakes.
    """
    # log(1 - sigmoid(l)) = -softplus(l)
    return -F.softplus(fake_logits).mean()


def non_saturating_generator_loss(fake_logits: Tensor) -> Tensor:
    """The non-saturating loss: maximise E_z[log D(G(z))], i.e. minimise E_z[-log sigmoid(l)]."""
    # -log(sigmoid(l)) = softplus(-l)
    return F.softplus(-fake_logits).mean()


def feature_matching_loss(real_feats: Sequence[Tensor], fake_feats: Sequence[Tensor]) -> Tensor:
    """Salimans et al. 2016 §3.1: sum_i || E_x f_i(x) - E_z f_i(G(z)) ||^2 over the chosen D layers.

    Each ``f_i`` is a batch of features ``[n, ...]``; the expectation is the batch mean and the norm runs over
    every remaining dimension (channels and positions of a conv feature map alike).
    """
    total = fake_feats[0].new_zeros(())
    for r, f in zip(real_feats, fake_feats, strict=True):
        total = total + (r.mean(0) - f.mean(0)).pow(2).sum()
    return total


class Objective:
    """Base of the ``loss`` config group: D's and G's objectives, given D's view of a real and a fake batch.

    :meth:`discriminator` defaults to Goodfellow's D loss (:func:`discriminator_loss`); an arm that changes both
    players (hinge, least squares, Wasserstein) overrides it, and no training code changes. :meth:`generator` is
    what defines an arm. ``feature_layers`` lists the D feature indices G's objective needs (``None``: logits
    only); the training module then also runs the step's real batch through D and passes both feature lists.
    """

    feature_layers: list[int] | None = None

    def discriminator(
        self, real_logits: Tensor, fake_logits: Tensor, *, real_target: float = 1.0
    ) -> tuple[Tensor, Logs]:
        """D's loss (to minimise) and its logs; ``real_target`` < 1 is one-sided label smoothing."""
        return discriminator_loss(real_logits, fake_logits, real_target)

    def generator(
        self,
        fake_logits: Tensor,
        *,
        g_step: int,
        fake_feats: Sequence[Tensor] | None = None,
        real_feats: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Logs]:
        """G's loss (to minimise) and its logs (``loss/g`` at least)."""
        raise NotImplementedError


class Minimax(Objective):
    """``loss=minimax``: the true saturating loss, minimise log(1 - D(G(z)))."""

    def generator(self, fake_logits: Tensor, **_: object) -> tuple[Tensor, Logs]:
        loss = minimax_generator_loss(fake_logits)
        return loss, {"loss/g": loss.detach()}


class NonSaturating(Objective):
    """``loss=non_saturating``: maximise log D(G(z)) (Goodfellow et al. 2014 §3)."""

    def generator(self, fake_logits: Tensor, **_: object) -> tuple[Tensor, Logs]:
        loss = non_saturating_generator_loss(fake_logits)
        return loss, {"loss/g": loss.detach()}


class NSThenMinimax(Objective):
    """The original algorithm's schedule: non-saturating while training is early, minimax from ``switch_step``.

    ``switch_step`` counts generator updates. The switch is a Python branch on the host-side step counter, so it
    costs no device sync.
    """

    def __init__(self, switch_step: int = 1000) -> None:
        if switch_step < 0:
            raise ValueError(f"loss.switch_step must be >= 0 (got {switch_step})")
        self.switch_step = switch_step

    def generator(self, fake_logits: Tensor, *, g_step: int, **_: object) -> tuple[Tensor, Logs]:
        if g_step < self.switch_step:
            loss = non_saturating_generator_loss(fake_logits)
        else:
            loss = minimax_generator_loss(fake_logits)
        return loss, {"loss/g": loss.detach()}


class FeatureMatching(Objective):
    """``loss=feature_matching``: match the batch means of D's features on the listed layers.

    ``layers`` index D's list of hidden features (``-1``: the last hidden layer, Salimans' choice); several
    layers give the seed's sum over i.
    """

    def __init__(self, layers: Sequence[int] = (-1,)) -> None:
        if len(layers) == 0:
            raise ValueError("loss.layers must name at least one D layer")
        self.feature_layers = [int(i) for i in layers]

    def generator(
        self,
        fake_logits: Tensor,
        *,
        fake_feats: Sequence[Tensor] | None = None,
        real_feats: Sequence[Tensor] | None = None,
        **_: object,
    ) -> tuple[Tensor, Logs]:
        assert fake_feats is not None and real_feats is not None, "feature matching needs D's features"
        loss = feature_matching_loss(real_feats, fake_feats)
        with torch.no_grad():
            # the non-saturating value is logged for comparison with the other arms; it is not optimised
            ns = non_saturating_generator_loss(fake_logits)
        return loss, {"loss/g": loss.detach(), "loss/g_ns": ns}


# -- the semi-supervised GAN (Salimans et al. 2016 §5) ---------------------------------------------------------


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
    objective: Objective | None = None,
    supervised_weight: float = 1.0,
    unsupervised_weight: float = 1.0,
    real_target: float = 1.0,
) -> tuple[Tensor, Logs]:
    """D's loss ``supervised_weight * L_supervised + unsupervised_weight * L_unsupervised`` (Salimans et al. §5).

    ``L_supervised``: cross-entropy of the K class logits of a labelled batch (``-log p(y | x, y < K+1)``).
    ``L_unsupervised``: the arm's D objective (Goodfellow's by default: ``E softplus(-lse(x)) + E softplus(lse(G(z)))``)
    on the real/fake logit ``lse = logsumexp(l)`` of an unlabelled real batch and a generated batch.
    ``unsupervised_weight = 0`` trains D as a classifier of the labelled examples alone: the baseline the unlabelled
    data must beat. (The authors' code weights ``L_unsupervised`` by 0.5.)
    """
    objective = objective or Objective()
    sup = F.cross_entropy(labelled_logits, labels)
    unsup, logs = objective.discriminator(
        real_fake_logit(real_logits), real_fake_logit(fake_logits), real_target=real_target
    )
    loss = supervised_weight * sup + unsupervised_weight * unsup
    return loss, {**logs, "loss/d_sup": sup.detach(), "loss/d_unsup": unsup.detach()}
