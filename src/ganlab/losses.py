"""GAN objectives as pure functions of discriminator logits and features.

D outputs a logit ``l`` with D(x) = sigmoid(l). Every loss is written with ``softplus`` so it stays finite for
any logit: ``-log sigmoid(l) = softplus(-l)`` and ``-log(1 - sigmoid(l)) = softplus(l)``.

Each generator objective is a small callable class (so Hydra's ``_target_`` is the registry) returning
``(loss, logs)``: a scalar to minimise and a dict of detached tensors worth logging.
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
    # real: alpha * -log(sigmoid(l)) + (1 - alpha) * -log(1 - sigmoid(l))
    real = real_target * F.softplus(-real_logits) + (1.0 - real_target) * F.softplus(real_logits)
    # fake: -log(1 - sigmoid(l))
    fake = F.softplus(fake_logits)
    loss = real.mean() + fake.mean()
    return loss, {"loss/d_real": real.mean().detach(), "loss/d_fake": fake.mean().detach()}


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


class GeneratorObjective:
    """Base of the ``loss`` config group: what G minimises, given D's view of a fake batch.

    ``feature_layers`` lists the D feature indices the objective needs (``None``: logits only); the module then
    also runs the current real batch through D without gradients and passes both feature lists.
    """

    name: str = "base"
    feature_layers: list[int] | None = None

    def __call__(
        self,
        fake_logits: Tensor,
        *,
        g_step: int,
        fake_feats: Sequence[Tensor] | None = None,
        real_feats: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Logs]:
        raise NotImplementedError


class Minimax(GeneratorObjective):
    """``loss=minimax``: the true saturating loss, minimise log(1 - D(G(z)))."""

    name = "minimax"

    def __call__(self, fake_logits: Tensor, **_: object) -> tuple[Tensor, Logs]:
        loss = minimax_generator_loss(fake_logits)
        return loss, {"loss/g": loss.detach()}


class NonSaturating(GeneratorObjective):
    """``loss=non_saturating``: maximise log D(G(z)) (Goodfellow et al. 2014 §3)."""

    name = "non_saturating"

    def __call__(self, fake_logits: Tensor, **_: object) -> tuple[Tensor, Logs]:
        loss = non_saturating_generator_loss(fake_logits)
        return loss, {"loss/g": loss.detach()}


class NSThenMinimax(GeneratorObjective):
    """The original algorithm's schedule: non-saturating while training is early, minimax from ``switch_step``.

    ``switch_step`` counts generator updates. The switch is a Python branch on the host-side step counter, so it
    costs no device sync.
    """

    name = "ns_then_minimax"

    def __init__(self, switch_step: int = 1000) -> None:
        if switch_step < 0:
            raise ValueError(f"loss.switch_step must be >= 0 (got {switch_step})")
        self.switch_step = switch_step

    def __call__(self, fake_logits: Tensor, *, g_step: int, **_: object) -> tuple[Tensor, Logs]:
        if g_step < self.switch_step:
            loss = non_saturating_generator_loss(fake_logits)
        else:
            loss = minimax_generator_loss(fake_logits)
        return loss, {"loss/g": loss.detach()}


class FeatureMatching(GeneratorObjective):
    """``loss=feature_matching``: match the batch means of D's features on the listed layers.

    ``layers`` index D's list of hidden features (``-1``: the last hidden layer, Salimans' choice); several
    layers give the seed's sum over i.
    """

    name = "feature_matching"

    def __init__(self, layers: Sequence[int] = (-1,)) -> None:
        if len(layers) == 0:
            raise ValueError("loss.layers must name at least one D layer")
        self.feature_layers = [int(i) for i in layers]

    def __call__(
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
