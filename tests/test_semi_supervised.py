"""The semi-supervised GAN (Salimans et al. 2016 §5): the labelled subset, D's loss, a classifier that learns, and
the test error in the run's summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from conftest import compose_cfg
from ganlab.errors import UserError
from ganlab.losses import semi_supervised_d_loss
from ganlab.nets import DCGANDiscriminator, MLPDiscriminator
from ganlab.pipeline import build, train
from ganlab.tasks import SemiSupervisedGAN

SMALL = [
    "task=semi_supervised",
    "data=digits",
    "model=mlp",
    "model.z_dim=16",
    "model.generator.width=64",
    "model.generator.depth=2",
    "model.generator.norm=batch",
    "model.discriminator.width=64",
    "model.discriminator.depth=2",
    "logger=csv",
    "batch_size=32",
]


def test_n_outputs_gives_class_logits_and_keeps_the_default_shape() -> None:
    x = torch.randn(5, 1, 8, 8)
    assert MLPDiscriminator((1, 8, 8), width=8)(x)[0].shape == (5,)
    assert MLPDiscriminator((1, 8, 8), width=8, n_outputs=10)(x)[0].shape == (5, 10)
    assert DCGANDiscriminator((1, 8, 8), width=8)(x)[0].shape == (5,)
    assert DCGANDiscriminator((1, 8, 8), width=8, n_outputs=10)(x)[0].shape == (5, 10)


def test_labelled_subset_has_exactly_n_per_class_and_depends_only_on_label_seed() -> None:
    a = build(compose_cfg([*SMALL, "task.labels_per_class=7", "task.label_seed=3", "seed=0"]))
    b = build(compose_cfg([*SMALL, "task.labels_per_class=7", "task.label_seed=3", "seed=1"]))
    c = build(compose_cfg([*SMALL, "task.labels_per_class=7", "task.label_seed=4", "seed=0"]))
    assert isinstance(a, SemiSupervisedGAN)
    train_y = a.data.train_y
    assert torch.equal(torch.bincount(train_y[a.labelled_idx], minlength=10), torch.full((10,), 7))
    assert torch.equal(a.labelled_y, train_y[a.labelled_idx])
    assert len(set(a.labelled_idx.tolist())) == 70  # no example twice
    assert torch.equal(a.labelled_idx, b.labelled_idx)  # same label_seed, other run seed: same subset
    assert not torch.equal(a.labelled_idx, c.labelled_idx)
    # the smallest digits class has 139 training examples: asking for more is a clear error
    with pytest.raises(Exception) as info:  # Hydra's instantiate wraps it in an InstantiationException
        build(compose_cfg([*SMALL, "task.labels_per_class=140"]))
    cause: BaseException | None = info.value
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    assert cause is not None and "has only 139" in str(cause)


def _formula(lab: Tensor, y: Tensor, real: Tensor, fake: Tensor, w: float) -> float:
    """Salimans et al. 2016 §5 written out naively in float64: -log p(y|x, y<K+1), -log(Z/(Z+1)), -log(1/(Z+1))."""
    lab, real, fake = lab.double(), real.double(), fake.double()
    sup = -torch.log(lab.exp()[torch.arange(len(y)), y] / lab.exp().sum(1)).mean()
    z_real, z_fake = real.exp().sum(1), fake.exp().sum(1)
    unsup = -torch.log(z_real / (z_real + 1)).mean() - torch.log(1 / (z_fake + 1)).mean()
    return float(w * sup + unsup)


def test_d_loss_equals_its_formula_on_hand_set_logits() -> None:
    lab = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0], [-4.0, 0.0, 2.5]])
    y = torch.tensor([0, 1, 2, 0])
    real = torch.tensor([[1.0, 0.0, -1.0], [-3.0, -2.0, -5.0], [0.3, 0.2, 0.1]])
    fake = torch.tensor([[-1.0, -2.0, -0.5], [2.0, 0.0, 1.0]])
    for w in (1.0, 0.3):
        loss, logs = semi_supervised_d_loss(lab, y, real, fake, supervised_weight=w)
        assert float(loss) == pytest.approx(_formula(lab, y, real, fake, w), rel=1e-6)
    assert float(logs["loss/d_sup"]) == pytest.approx(
        _formula(lab, y, real, fake, 1.0) - _formula(lab, y, real, fake, 0.0)
    )
    # stable where the naive formula overflows: huge logits give finite losses and gradients
    big = torch.tensor([[800.0, -800.0, 0.0]], requires_grad=True)
    loss, _ = semi_supervised_d_loss(big, torch.tensor([1]), big, -big)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(big.grad).all()


class _HandSetD(nn.Module):
    """A stand-in D that returns queued logits (the module calls it on the labelled, real, then fake batch)."""

    n_outputs = 3

    def __init__(self, outputs: list[Tensor]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))
        self.outputs = list(outputs)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.outputs.pop(0)[: len(x)] + self.bias
        return out, [out]


def test_the_modules_d_update_is_that_loss_on_labelled_real_and_fake_batches() -> None:
    module = build(compose_cfg([*SMALL, "batch_size=4", "task.labels_per_class=2"]))
    lab = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0], [-4.0, 0.0, 2.5]])
    real = torch.tensor([[1.0, 0.0, -1.0], [-3.0, -2.0, -5.0], [0.3, 0.2, 0.1], [0.0, 0.0, 4.0]])
    fake = torch.tensor([[-1.0, -2.0, -0.5], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [5.0, -5.0, 0.0]])
    module.D = _HandSetD([lab, real, fake])
    # the labels the module will draw: replay its per-step stream
    module._rng = torch.Generator().manual_seed(123)
    pick = torch.randint(len(module.labelled_idx), (4,), generator=torch.Generator().manual_seed(123))
    y = module.labelled_y[pick] % 3  # the stand-in D has 3 classes
    module.labelled_y = module.labelled_y % 3
    module.manual_backward = lambda loss: loss.backward()  # no Trainer attached
    opt = torch.optim.SGD(module.D.parameters(), lr=0.0)
    logs = module._d_update(opt, torch.zeros(4, 1, 8, 8), torch.zeros(4, module.z_dim), True)
    assert float(logs["loss/d"]) == pytest.approx(_formula(lab, y, real, fake, 1.0), rel=1e-6)


def test_with_all_labels_the_classifier_beats_chance_by_far() -> None:
    # 139 labels per class is every example of the smallest class (~97 % of the train split)
    cfg = compose_cfg([*SMALL, "task.labels_per_class=139", "max_steps=200", "log_every=100"])
    pl.seed_everything(0, verbose=False)
    module = build(cfg)
    before, _ = module.classification_error()
    trainer = pl.Trainer(
        max_steps=200 * 2,
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    error, count = module.classification_error()
    assert module.g_step == 200
    assert before > 60.0  # an untrained classifier is at chance (90 %)
    assert error < 25.0, f"test error {error:.1f} % after 200 generator steps"  # measured 6.9-8.9 % (seeds 0-2)
    metrics = module.task_metrics()  # what the evaluation callback logs
    assert metrics["ssl/test_error"] == pytest.approx(error)
    assert metrics["ssl/test_errors"] == count == round(error * 360 / 100)


def test_a_run_writes_the_test_error_into_the_summary(tmp_path: Path) -> None:
    args = [
        "task=semi_supervised",
        "data=digits",
        "max_steps=3",
        "logger=csv",
        "model.generator.width=8",
        "model.discriminator.width=8",
        "batch_size=16",
        "log_every=1",
        "sample_every=1000",
        "ckpt_every=1000",
    ]
    train(compose_cfg(args), tmp_path / "run")  # the command's run, in this process (test_cli.py: the CLI itself)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    final = summary["final"]
    assert summary["status"] == "completed"
    assert 0.0 <= final["ssl/test_error"] <= 100.0
    assert final["ssl/test_errors"] == round(final["ssl/test_error"] * 360 / 100)
    assert "loss/d_sup" in final and "loss/g" in final
