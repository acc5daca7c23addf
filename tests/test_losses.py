"""Each objective equals its formula on hand-computed logits; the MBD layer equals an explicit double loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ganlab.losses import (
    FeatureMatching,
    Minimax,
    NonSaturating,
    NSThenMinimax,
    discriminator_loss,
    feature_matching_loss,
)
from ganlab.nets.base import batch_parts
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


def test_unsmoothed_discriminator_loss_gives_the_general_formulas_bits() -> None:
    # alpha = 1 leaves the (1 - alpha) term out of the graph: the loss and D's gradient must be the very bits of
    # alpha * softplus(-l) + (1 - alpha) * softplus(l) at alpha = 1, so a run's numbers do not move
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(256, generator=gen) * 4, torch.randn(256, generator=gen) * 4
    r1, f1 = real.clone().requires_grad_(), fake.clone().requires_grad_()
    loss, logs = discriminator_loss(r1, f1)
    loss.backward()
    r2, f2 = real.clone().requires_grad_(), fake.clone().requires_grad_()
    general = (1.0 * F.softplus(-r2) + 0.0 * F.softplus(r2)).mean() + F.softplus(f2).mean()
    general.backward()
    assert torch.equal(loss, general)
    assert torch.equal(r1.grad, r2.grad) and torch.equal(f1.grad, f2.grad)
    assert logs["loss/d_real"] + logs["loss/d_fake"] == loss


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


def _double_loop(m: torch.Tensor) -> torch.Tensor:
    """o[i, b] = sum_{j != i} exp(-sum_c |m[i, b, c] - m[j, b, c]|), straight from the formula."""
    n, b, c = m.shape
    out = torch.zeros(n, b, dtype=m.dtype)
    for i in range(n):
        for j in range(n):
            if i != j:
                for k in range(b):
                    out[i, k] += torch.exp(-sum((m[i, k, q] - m[j, k, q]).abs() for q in range(c)))
    return out


def test_minibatch_discrimination_equals_an_explicit_double_loop() -> None:
    torch.manual_seed(0)
    n, a, b, c = 6, 7, 4, 3
    layer = MinibatchDiscrimination(a, n_kernels=b, kernel_dim=c, init_std=0.3).eval()  # eval: no data init
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    x = torch.randn(n, a)
    out = layer(x)
    theta = layer.theta.detach()
    t = theta * layer.log_scale.detach().exp() / theta.pow(2).sum(0).sqrt()  # weight norm over the inputs
    m = (x @ t.view(a, b * c)).view(n, b, c)
    assert out.shape == (n, a + b)
    torch.testing.assert_close(out[:, :a], x)
    torch.testing.assert_close(out[:, a:], _double_loop(m) + layer.bias.detach(), rtol=1e-5, atol=1e-6)
    # the whole layer's gradient (through T's weight norm and the matmul) in float64, by finite differences
    layer64 = MinibatchDiscrimination(a, n_kernels=b, kernel_dim=c, init_std=0.3).double().eval()
    with torch.no_grad():
        layer64.log_scale.copy_(0.3 * torch.randn(b, c, dtype=torch.float64))  # away from the all-zero start
    x64 = torch.randn(n, a, dtype=torch.float64, requires_grad=True)
    params = (layer64.theta, layer64.log_scale, layer64.bias)
    assert torch.autograd.gradcheck(lambda x_, *_: layer64.similarity(x_), (x64, *params))
    # a conv map: f(x) is the map averaged over its positions (the authors' GlobalPoolLayer), so A is its
    # channels; the map is flattened once and o(x) concatenated once: [n, c*h*w + B], not B channels per position
    xc = torch.randn(n, 2, 3, 3)
    conv_layer = MinibatchDiscrimination(2, n_kernels=b, kernel_dim=c).eval()
    outc = conv_layer(xc)
    assert outc.shape == (n, 18 + b) and conv_layer.T.shape == (2, b, c)
    torch.testing.assert_close(outc[:, :18], xc.flatten(1))
    torch.testing.assert_close(outc[:, 18:], conv_layer.similarity(xc.mean(dim=(2, 3))))
    # batch_parts: one pass over [real; fake] compares each example within its own part only, as two passes do
    with batch_parts(layer, (2, n - 2)):
        parted = layer(x)
    assert layer.parts is None  # only inside the block
    torch.testing.assert_close(parted, torch.cat([layer(x[:2]), layer(x[2:])]))
    assert not torch.allclose(parted, out)


def test_minibatch_discrimination_kernel_and_its_gradient_equal_the_formula() -> None:
    from ganlab.tricks.minibatch_discrimination import similarity, similarity_reference

    g = torch.Generator().manual_seed(1)
    m = torch.randn(3, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)  # [B, C, n]
    assert torch.autograd.gradcheck(similarity, (m,))  # forward and backward of the fused kernel, float64
    expected = _double_loop(m.detach().permute(2, 0, 1))  # [n, B]
    torch.testing.assert_close(similarity(m.detach()).t(), expected, rtol=1e-10, atol=1e-12)
    # float32 at a training size, forward and gradient, against cdist + autograd
    m32 = (0.3 * torch.randn(10, 3, 64, generator=g)).requires_grad_()
    w = torch.randn(10, 64, generator=g)
    fast = similarity(m32)
    (grad_fast,) = torch.autograd.grad((fast * w).sum(), m32)
    ref = similarity_reference(m32)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), m32)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-5)
    # the kernel's two paths: C <= 8 summed in registers (C a compile-time constant), larger C one pass per
    # coordinate; each against cdist + autograd in float64
    for c in (1, 5, 8, 9, 12):
        mc = torch.randn(4, c, 33, dtype=torch.float64, generator=g).requires_grad_()
        wc = torch.randn(4, 33, dtype=torch.float64, generator=g)
        fast, ref = similarity(mc), similarity_reference(mc)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        grads = [torch.autograd.grad((o * wc).sum(), mc)[0] for o in (fast, ref)]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_minibatch_discrimination_starts_as_the_authors_code_does() -> None:
    """improved-gan's MinibatchLayer: on the first training batch the scale of T makes half the mean
    nearest-neighbour distance 1 in every kernel, and the bias centres o; later batches change neither."""
    torch.manual_seed(0)
    layer = MinibatchDiscrimination(16, n_kernels=8, kernel_dim=5).train()
    x = 3.0 * torch.randn(64, 16)
    out = layer(x)
    assert bool(layer.initialised)
    m = (x @ layer.T.detach().view(16, 40)).view(64, 8, 5).transpose(0, 1)  # [B, n, C]
    d = torch.cdist(m, m, p=1) + torch.eye(64) * 1e9
    torch.testing.assert_close(0.5 * d.min(dim=2).values.mean(dim=1), torch.ones(8), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 16:].mean(0), torch.zeros(8), rtol=0, atol=1e-5)  # centred at the start
    scale = layer.log_scale.detach().clone()
    layer(torch.randn(64, 16))
    torch.testing.assert_close(layer.log_scale.detach(), scale)  # initialised once
    # weight norm: T's columns have norm exp(log_scale)
    torch.testing.assert_close(layer.T.detach().norm(dim=0), layer.log_scale.detach().exp())


def test_minibatch_discrimination_scale_by_mean_or_none() -> None:
    """``scale_by=mean``: half the mean distance over all pairs j != i is 1 in every kernel after the first batch
    (the bias still centres o); ``scale_by=none``: the authors' constant initialisers, untouched by data."""
    torch.manual_seed(0)
    layer = MinibatchDiscrimination(16, n_kernels=8, kernel_dim=5, scale_by="mean").train()
    x = 3.0 * torch.randn(64, 16)
    out = layer(x)
    m = (x @ layer.T.detach().view(16, 40)).view(64, 8, 5).transpose(0, 1)  # [B, n, C]
    d = torch.cdist(m, m, p=1)
    torch.testing.assert_close(0.5 * d.sum(dim=(1, 2)) / (64 * 63), torch.ones(8), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 16:].mean(0), torch.zeros(8), rtol=0, atol=1e-5)
    fixed = MinibatchDiscrimination(16, n_kernels=8, kernel_dim=5, scale_by="none").train()
    fixed(x)
    assert torch.equal(fixed.log_scale.detach(), torch.zeros(8, 5))
    assert torch.equal(fixed.bias.detach(), torch.full((8,), -1.0))
    with pytest.raises(ValueError, match="scale_by"):
        MinibatchDiscrimination(16, scale_by="median")


def test_minibatch_discrimination_sees_the_batch() -> None:
    """Identical examples are maximally similar: a collapsed batch is visible to D."""
    layer = MinibatchDiscrimination(5, n_kernels=3, kernel_dim=2).eval()
    collapsed = torch.ones(4, 5)
    torch.testing.assert_close(layer.similarity(collapsed) - layer.bias.detach(), torch.full((4, 3), 3.0))
