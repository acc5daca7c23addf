"""Each objective equals its formula on hand-computed logits; the MBD layer equals an explicit double loop."""

from __future__ import annotations

import math

import pytest
import torch

from ganlab.losses import (
    FeatureMatching,
    Minimax,
    NonSaturating,
    NSThenMinimax,
    discriminator_loss,
    feature_matching_loss,
)
from ganlab.tricks import MinibatchDiscrimination


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


REAL = [2.0, -1.0, 0.3]
FAKE = [0.5, -3.0]


def test_discriminator_loss_is_negative_L0() -> None:
    loss, logs = discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE))
    real = sum(-math.log(sigmoid(r)) for r in REAL) / len(REAL)
    fake = sum(-math.log(1 - sigmoid(f)) for f in FAKE) / len(FAKE)
    assert loss.item() == pytest.approx(real + fake, rel=1e-6)
    assert logs["loss/d_real"].item() == pytest.approx(real, rel=1e-6)
    assert logs["loss/d_fake"].item() == pytest.approx(fake, rel=1e-6)


def test_one_sided_label_smoothing_changes_only_the_real_side() -> None:
    a = 0.9
    loss, logs = discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE), real_target=a)
    real = sum(-(a * math.log(sigmoid(r)) + (1 - a) * math.log(1 - sigmoid(r))) for r in REAL) / len(REAL)
    fake = sum(-math.log(1 - sigmoid(f)) for f in FAKE) / len(FAKE)
    assert logs["loss/d_real"].item() == pytest.approx(real, rel=1e-6)
    _, plain = discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE))
    assert logs["loss/d_fake"].item() == plain["loss/d_fake"].item()  # fake side untouched
    assert loss.item() == pytest.approx(real + fake, rel=1e-6)


def test_minimax_and_non_saturating_equal_their_formulas() -> None:
    mm, _ = Minimax().generator(torch.tensor(FAKE), g_step=0)
    ns, _ = NonSaturating().generator(torch.tensor(FAKE), g_step=0)
    assert mm.item() == pytest.approx(sum(math.log(1 - sigmoid(f)) for f in FAKE) / 2, rel=1e-6)
    assert ns.item() == pytest.approx(sum(-math.log(sigmoid(f)) for f in FAKE) / 2, rel=1e-6)


def test_minimax_saturates_where_non_saturating_does_not() -> None:
    # D confidently rejects the fake: D(G(z)) = sigmoid(-10) ~ 4.5e-5
    for objective, lo, hi in ((Minimax(), 0.0, 1e-4), (NonSaturating(), 0.99, 1.0)):
        logit = torch.tensor([-10.0], requires_grad=True)
        loss, _ = objective.generator(logit, g_step=0)
        loss.backward()
        assert lo <= abs(logit.grad.item()) <= hi
    # d/dl log(1 - sigmoid(l)) = -sigmoid(l); d/dl -log sigmoid(l) = -(1 - sigmoid(l))
    logit = torch.tensor([-10.0], requires_grad=True)
    Minimax().generator(logit, g_step=0)[0].backward()
    assert logit.grad.item() == pytest.approx(-sigmoid(-10.0), rel=1e-5)


def test_losses_stay_finite_at_extreme_logits() -> None:
    big = torch.tensor([-500.0, 500.0], requires_grad=True)
    for value in (
        Minimax().generator(big, g_step=0)[0],
        NonSaturating().generator(big, g_step=0)[0],
        discriminator_loss(big, big)[0],
    ):
        assert torch.isfinite(value)
        (g,) = torch.autograd.grad(value, big)
        assert torch.isfinite(g).all()


def test_ns_then_minimax_switches_at_the_configured_step() -> None:
    obj = NSThenMinimax(switch_step=10)
    logits = torch.tensor(FAKE)
    assert obj.generator(logits, g_step=9)[0].item() == NonSaturating().generator(logits, g_step=9)[0].item()
    assert obj.generator(logits, g_step=10)[0].item() == Minimax().generator(logits, g_step=10)[0].item()
    with pytest.raises(ValueError):
        NSThenMinimax(switch_step=-1)


def test_feature_matching_is_the_squared_distance_of_batch_means() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(16, 3, 4, 4, generator=g)
    fake = torch.randn(8, 3, 4, 4, generator=g)
    expected = sum(
        (real[:, c, i, j].mean() - fake[:, c, i, j].mean()) ** 2 for c in range(3) for i in range(4) for j in range(4)
    )
    assert feature_matching_loss([real], [fake]).item() == pytest.approx(expected.item(), rel=1e-5)
    loss, logs = FeatureMatching(layers=[-1]).generator(torch.zeros(8), real_feats=[real], fake_feats=[fake], g_step=0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "loss/g_ns" in logs


def test_minibatch_discrimination_equals_an_explicit_double_loop() -> None:
    torch.manual_seed(0)
    n, a, b, c = 6, 7, 4, 3
    layer = MinibatchDiscrimination(a, n_kernels=b, kernel_dim=c, init_std=0.3)
    x = torch.randn(n, a)
    out = layer(x)
    m = (x @ layer.T).view(n, b, c)
    expected = torch.zeros(n, b)
    for i in range(n):
        for j in range(n):
            if i != j:
                for k in range(b):
                    expected[i, k] += torch.exp(-(m[i, k] - m[j, k]).abs().sum())
    assert out.shape == (n, a + b)
    torch.testing.assert_close(out[:, :a], x)
    torch.testing.assert_close(out[:, a:], expected, rtol=1e-5, atol=1e-6)
    # conv input: o(x) broadcast as B extra channels
    xc = torch.randn(n, 2, 3, 3)
    conv_layer = MinibatchDiscrimination(18, n_kernels=b, kernel_dim=c)
    outc = conv_layer(xc)
    assert outc.shape == (n, 2 + b, 3, 3)
    torch.testing.assert_close(outc[:, 2:, 1, 2], conv_layer.similarity(xc))


def test_minibatch_discrimination_sees_the_batch() -> None:
    """Identical examples are maximally similar: a collapsed batch is visible to D."""
    layer = MinibatchDiscrimination(5, n_kernels=3, kernel_dim=2)
    collapsed = torch.ones(4, 5)
    torch.testing.assert_close(layer.similarity(collapsed), torch.full((4, 3), 3.0))
