"""Each Improved-GAN trick does what the paper says, survives checkpoints, and composes with every loss arm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import CONF, TINY, compose_cfg, run_cli
from ganlab.losses import FeatureMatching
from ganlab.nets import DCGANDiscriminator, DCGANGenerator, MLPGenerator, Prior
from ganlab.pipeline import build, train
from ganlab.tricks import (
    HistoricalAveraging,
    LabelSmoothing,
    LayerInsert,
    MinibatchDiscrimination,
    VirtualBatchNormG,
)

TRICKS = sorted(p.stem for p in (CONF / "tricks").glob("*.yaml"))
ARMS = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))


def test_label_smoothing_changes_only_the_real_side_targets() -> None:
    module = build(compose_cfg([*TINY, "tricks=[label_smoothing]", "tricks.label_smoothing.alpha=0.8"]))
    assert module.real_target == 0.8
    assert build(compose_cfg(TINY)).real_target == 1.0
    with pytest.raises(ValueError):
        LabelSmoothing(alpha=1.5)


def test_historical_averaging_penalty_by_hand_and_through_a_checkpoint() -> None:
    net = nn.Linear(2, 1, bias=False)
    trick = HistoricalAveraging(weight=0.5, players=["D"])
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    assert trick.penalty("D", net).item() == 0.0  # first step: theta equals its own history
    assert trick.penalty("G", net) is None  # G not listed
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 0.0]]))
    trick.after_update("D", net)  # history: (1, 2), (3, 0) -> mean (2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[4.0, 4.0]]))
    # 0.5 * ((4 - 2)^2 + (4 - 1)^2) = 6.5
    assert trick.penalty("D", net).item() == pytest.approx(6.5)
    restored = HistoricalAveraging(weight=0.5, players=["D"])
    restored.load_state_dict(trick.state_dict())
    assert restored.penalty("D", net).item() == pytest.approx(6.5)
    restored.after_update("D", net)  # count 3: mean (8/3, 2)
    torch.testing.assert_close(restored.mean["D"][0], torch.tensor([[8 / 3, 2.0]]))


def test_historical_average_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    common = [*TINY, "tricks=[historical_averaging]", "ckpt_every=3", "seed=1", "model.lr_decay=none"]
    full = train(compose_cfg([*common, "max_steps=6"]), tmp_path / "full")
    train(compose_cfg([*common, "max_steps=3"]), tmp_path / "a")
    resumed = train(compose_cfg([*common, "max_steps=6", f"resume={tmp_path / 'a'}"]), tmp_path / "b")
    assert resumed["final"] == full["final"]  # the penalty after resuming uses the restored running mean
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["ganlab"]["tricks"][0]
    assert state["count"] == {"D": 7, "G": 7}


@pytest.mark.parametrize("net", ["dcgan", "mlp"])
def test_virtual_batch_norm_output_does_not_depend_on_the_rest_of_the_batch(net: str) -> None:
    torch.manual_seed(0)
    trick = VirtualBatchNormG(ref_batch_size=16)
    if net == "dcgan":
        bare = DCGANGenerator((1, 8, 8), z_dim=8, width=8, **trick.network_args("G"))
    else:
        bare = MLPGenerator((2,), z_dim=4, width=16, **trick.network_args("G"))
    g = trick.wrap_generator(bare, Prior("normal")).train()
    z = torch.randn(6, g.z_dim)
    alone = g(z[:1])
    with_others = g(z)
    with_others_shuffled = g(torch.cat([z[3:], z[:3]]))
    torch.testing.assert_close(alone[0], with_others[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_others[0], with_others_shuffled[3], atol=1e-5, rtol=1e-5)
    # batch norm, by contrast, mixes examples
    bn = MLPGenerator((2,), z_dim=4, width=16, norm="batch").train()
    zb = torch.randn(6, 4)
    assert not torch.allclose(bn(zb[:2])[0], bn(zb)[0], atol=1e-4)
    assert "z_ref" in dict(g.named_buffers())  # fixed at the start and saved with the weights


def test_minibatch_discrimination_after_two_layers_builds_and_trains(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            "data=digits",
            "logger=csv",
            "tricks=[minibatch_discrimination]",
            "max_steps=3",
            "batch_size=8",
            "tricks.minibatch_discrimination.layers=[0,1]",
            "tricks.minibatch_discrimination.n_kernels=6",
            "sample_every=3",
            "ckpt_every=3",
        ]
    )
    module = build(cfg)
    assert sorted(module.D.inserted.keys()) == ["0", "1"]
    before = module.D.inserted["0"][0].T.detach().clone()
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    mbd = LayerInsert([0, 1], lambda a: MinibatchDiscrimination(a, n_kernels=6, kernel_dim=3))
    d = DCGANDiscriminator((1, 8, 8), width=8, inserts=[mbd])
    assert d.blocks[1][0].in_channels == 8 + 6  # block 1 sees block 0's channels plus B similarity channels
    assert before.shape == (64 * 64, 6 * 5)


def test_feature_matching_over_two_layers_is_the_sum_of_the_single_layer_losses() -> None:
    torch.manual_seed(0)
    d = DCGANDiscriminator((1, 8, 8), width=8)
    real, fake = torch.randn(10, 1, 8, 8), torch.randn(12, 1, 8, 8)
    _, rf = d(real)
    _, ff = d(fake)
    both = FeatureMatching([0, 1]).generator(torch.zeros(12), real_feats=rf, fake_feats=ff)[0]
    first = FeatureMatching([0]).generator(torch.zeros(12), real_feats=rf[:1], fake_feats=ff[:1])[0]
    second = FeatureMatching([1]).generator(torch.zeros(12), real_feats=rf[1:], fake_feats=ff[1:])[0]
    assert both.item() == pytest.approx(first.item() + second.item(), rel=1e-6)
    module = build(compose_cfg([*TINY, "loss=feature_matching", "loss.layers=[0,-1]"]))
    assert module.objective.feature_layers == [0, -1]


@pytest.mark.parametrize("trick", TRICKS)
def test_every_trick_composes_with_every_arm(tmp_path: Path, trick: str) -> None:
    for arm in ARMS:
        summary = train(compose_cfg([*TINY, f"loss={arm}", f"tricks=[{trick}]", "max_steps=2"]), tmp_path / arm)
        assert summary["status"] == "completed" and summary["g_steps"] == 2


def test_salimans2016_experiment_and_one_override_ablation(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=salimans2016"])
    assert set(cfg.tricks) == {
        "minibatch_discrimination",
        "label_smoothing",
        "historical_averaging",
        "virtual_batch_norm",
        "batch_norm_d",
    }
    assert cfg.loss._target_.endswith("FeatureMatching")
    ablated = compose_cfg(["experiment=salimans2016", "~tricks.historical_averaging"])
    assert set(cfg.tricks) - set(ablated.tricks) == {"historical_averaging"}
    proc = run_cli(
        [
            "experiment=salimans2016",
            "data=ring8",
            "logger=csv",
            "max_steps=2",
            "sample_every=2",
            "ckpt_every=2",
            "log_every=1",
            "batch_size=8",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gauss1d_demo_writes_frames_and_an_animated_gif(tmp_path: Path) -> None:
    from PIL import Image

    cfg = compose_cfg(["data=gauss1d", "logger=csv", "max_steps=20", "data.frames=5", "log_every=5", "ckpt_every=20"])
    assert cfg.model.noise == "uniform" and cfg.model.z_dim == 1  # Figure 1: uniform noise, one variable
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    frames = sorted((tmp_path / "run" / "samples").glob("step_*.png"))
    assert [f.name for f in frames] == [f"step_{s:07d}.png" for s in (4, 8, 12, 16, 20)]
    with Image.open(tmp_path / "run" / "samples" / "demo.gif") as gif:
        assert gif.is_animated and gif.n_frames == 5
