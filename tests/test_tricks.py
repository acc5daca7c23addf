"""Each Improved-GAN trick does what the paper says, survives checkpoints, and composes with every loss arm."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CONF, TINY, compose_cfg, fit_in_process
from ganlab.losses import FeatureMatching
from ganlab.nets import DCGANDiscriminator, DCGANGenerator, MLPGenerator, Prior
from ganlab.pipeline import build, train
from ganlab.tricks import (
    AveragedGenerator,
    HistoricalAveraging,
    LabelSmoothing,
    LayerInsert,
    MinibatchDiscrimination,
    VirtualBatchNormG,
)

TRICKS = sorted(p.stem for p in (CONF / "tricks").glob("*.yaml"))
ARMS = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))


def _spy_on_backward(module) -> list[tuple[str, float]]:
    """Record (player, value) of every loss the module back-propagates."""
    seen: list[tuple[str, float]] = []
    backward = module._backward  # every update's backward (Lightning's manual_backward or loss.backward())

    def spy(loss):
        player = "G" if next(module.G.parameters()).requires_grad else "D"  # only the updated player's do
        seen.append((player, loss.item()))
        return backward(loss)

    module._backward = spy
    return seen


def test_label_smoothing_changes_only_the_real_side_targets() -> None:
    module = build(compose_cfg([*TINY, "tricks=[label_smoothing]", "tricks.label_smoothing.alpha=0.8"]))
    assert module.real_target == 0.8
    assert build(compose_cfg(TINY)).real_target == 1.0
    with pytest.raises(ValueError):
        LabelSmoothing(alpha=1.5)
    # the loss a D update minimises uses alpha on the real side (and only there)
    calls = []
    inner = module.objective.discriminator

    def spy(real_logits, fake_logits, **kwargs):
        loss, logs = inner(real_logits, fake_logits, **kwargs)
        calls.append((real_logits.detach(), fake_logits.detach(), loss.detach()))
        return loss, logs

    module.objective.discriminator = spy
    backward = _spy_on_backward(module)
    fit_in_process(module, 2)
    assert len(calls) == 2
    for (real, fake, loss), (_, minimised) in zip(calls, [b for b in backward if b[0] == "D"], strict=True):
        expected = (0.8 * F.softplus(-real) + 0.2 * F.softplus(real)).mean() + F.softplus(fake).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert minimised == pytest.approx(expected.item(), rel=1e-6)


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
    # in training, what each update back-propagates is its objective plus the penalty
    module = build(compose_cfg([*TINY, "tricks=[historical_averaging]", "tricks.historical_averaging.weight=50"]))
    objective = module.objective
    inner_d, inner_g = objective.discriminator, objective.generator
    values: list[float] = []
    objective.discriminator = lambda *a, **k: _record(values, inner_d(*a, **k))
    objective.generator = lambda *a, **k: _record(values, inner_g(*a, **k))
    backward = _spy_on_backward(module)
    fit_in_process(module, 3)
    trick = module.tricks[0]
    assert len(values) == len(backward) == 6
    penalties = [minimised - value for (_, minimised), value in zip(backward, values, strict=True)]
    assert penalties[:2] == [0.0, 0.0]  # each player's first update: theta equals its own history
    assert all(p > 1e-6 for p in penalties[2:])  # later ones pay for drifting
    d_now = trick.penalty("D", module.D).item()  # after the last D update the running mean moved on: > 0
    assert d_now > 0


def _record(values: list[float], result):
    values.append(result[0].item())
    return result


def test_historical_average_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    common = [
        *TINY,
        "tricks=[historical_averaging]",
        "tricks.historical_averaging.weight=10",
        "ckpt_every=3",
        "seed=1",
        "model.lr_decay=none",
    ]
    full = train(compose_cfg([*common, "max_steps=6"]), tmp_path / "full")
    train(compose_cfg([*common, "max_steps=3"]), tmp_path / "a")
    resumed = train(compose_cfg([*common, "max_steps=6", f"resume={tmp_path / 'a'}"]), tmp_path / "b")
    assert resumed["final"] == full["final"]  # the penalty after resuming uses the restored running mean
    assert full["final"]["penalty/d"] > 0 and full["final"]["penalty/g"] > 0
    plain = train(compose_cfg([c for c in common if not c.startswith("tricks")] + ["max_steps=6"]), tmp_path / "p")
    assert plain["final"]["loss/d"] != full["final"]["loss/d"]  # the penalty changed the updates
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
    # the output by hand (Salimans et al. §3.5): statistics of the reference batch R (N examples) combined with the
    # example's own, weighted 1/(N + 1): mu = (N mu_R + x) / (N + 1), E[x^2] = (N E_R[x^2] + x^2) / (N + 1)
    first = bare.stem[:2] if net == "dcgan" else bare.net[:1]  # everything before the first normalisation
    vbn = bare.stem[2] if net == "dcgan" else bare.net[1]
    with torch.no_grad():
        h_ref, h = first(g.z_ref), first(z)
        dims = (0, 2, 3) if net == "dcgan" else (0,)
        own = (2, 3) if net == "dcgan" else ()
        n = len(h_ref)
        mu_x = h.mean(dim=own, keepdim=True) if own else h
        sq_x = h.pow(2).mean(dim=own, keepdim=True) if own else h.pow(2)
        mu = (n * h_ref.mean(dim=dims, keepdim=True) + mu_x) / (n + 1)
        sq = (n * h_ref.pow(2).mean(dim=dims, keepdim=True) + sq_x) / (n + 1)
        expected = (h - mu) / torch.sqrt(sq - mu**2 + vbn.eps)
        g(z)  # refreshes the reference statistics, then normalises z
        got = []
        handle = vbn.register_forward_hook(lambda mod, args, out: got.append(out))
        g(z)
        handle.remove()
    shape = (1, -1, 1, 1) if net == "dcgan" else (1, -1)
    expected = expected * vbn.weight.detach().view(shape) + vbn.bias.detach().view(shape)
    torch.testing.assert_close(got[-1], expected, atol=1e-5, rtol=1e-4)


def test_virtual_batch_norm_reference_batch_comes_from_the_configured_prior() -> None:
    module = build(compose_cfg([*TINY, "tricks=[virtual_batch_norm]", "model.noise=uniform", "model.z_dim=4"]))
    z_ref = module.G.z_ref
    assert z_ref.shape == (64, 4)
    assert z_ref.min() >= -1.0 and z_ref.max() <= 1.0  # U[-1, 1], not N(0, 1)
    assert z_ref.abs().max() > 0.9 and z_ref.std() < 0.7  # and spread like it (U[-1, 1] has std 0.58)
    normal = build(compose_cfg([*TINY, "tricks=[virtual_batch_norm]", "model.z_dim=4"])).G.z_ref
    assert normal.abs().max() > 1.0


def test_minibatch_discrimination_after_two_layers_builds_and_trains(tmp_path: Path) -> None:
    common = ["logger=csv", "tricks=[minibatch_discrimination]", "max_steps=3", "batch_size=8", "sample_every=3"]
    cfg = compose_cfg(
        [
            *common,
            "data=ring8",
            "tricks.minibatch_discrimination.layers=[0,1]",
            "tricks.minibatch_discrimination.n_kernels=6",
        ]
    )
    module = build(cfg)
    assert sorted(module.D.inserted.keys()) == ["0", "1"]
    assert module.D.blocks[1][0].in_features == 128 + 6  # block 1 sees block 0's 128 units plus B features
    assert train(cfg, tmp_path / "mlp")["status"] == "completed"
    # a conv D: the layer flattens, so it follows the last block and the head sees c*4*4 + B flat features; T
    # reads the map's position average (c = 128 features, as the authors' GlobalPoolLayer), not its c*4*4 values
    cfg = compose_cfg([*common, "data=digits", "tricks.minibatch_discrimination.n_kernels=6", "ckpt_every=3"])
    module = build(cfg)
    layer = module.D.inserted[str(len(module.D.blocks) - 1)][0]
    assert layer.T.shape == (128, 6, 5) and module.D.head[-1].in_features == 128 * 4 * 4 + 6
    assert train(cfg, tmp_path / "conv")["status"] == "completed"
    mbd = LayerInsert([0, 1], lambda a: MinibatchDiscrimination(a, n_kernels=6, kernel_dim=3))
    with pytest.raises(ValueError, match="only follow the last hidden block"):
        DCGANDiscriminator((1, 8, 8), width=8, inserts=[mbd])


@pytest.mark.parametrize(
    ("data", "layers"), [("digits", "[-1]"), ("ring8", "[-1]"), ("ring8", "[0,1]")], ids=["dcgan", "mlp", "mlp-0,1"]
)
def test_an_arm_with_an_inserted_layer_starts_from_the_same_nets_as_the_others(data: str, layers: str) -> None:
    # the same seed, the same G and the same D weights wherever the base D has them (an inserted layer only adds:
    # its own parameters and the weights of the inputs it appends to the next block or the head)
    nets = {}
    for arm in ("non_saturating", "minibatch_discrimination"):
        pl.seed_everything(0, verbose=False)
        extra = [f"tricks.minibatch_discrimination.layers={layers}"] if arm != "non_saturating" else []
        nets[arm] = build(compose_cfg(["logger=csv", f"data={data}", f"loss={arm}", *extra]))
    base, md = nets["non_saturating"], nets["minibatch_discrimination"]
    for a, b in zip(base.G.state_dict().values(), md.G.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    wide = md.D.state_dict()
    for name, weight in base.D.state_dict().items():
        assert torch.equal(weight, wide[name][tuple(slice(0, n) for n in weight.shape)]), name
    assert len(wide) > len(base.D.state_dict())  # the layer's own parameters


def test_feature_matchings_one_pass_compares_real_and_fake_apart_in_minibatch_discrimination() -> None:
    # Salimans et al. compute o(x) per batch: the joint [real; fake] pass must give what two passes give
    torch.manual_seed(0)
    layer_0 = ["tricks=[minibatch_discrimination]", "tricks.minibatch_discrimination.layers=[0]"]
    module = build(compose_cfg([*TINY, "loss=feature_matching", *layer_0]))
    real, fake = torch.randn(8, 2), torch.randn(8, 2) + 1.0
    module.D(real)  # the layer's data-dependent start, on a real batch as in training
    with torch.no_grad():
        fake_out, real_feats, fake_feats = module._joint_features(real, fake)
        (_, apart_real), (apart_out, apart_fake) = module.D(real), module.D(fake)
    torch.testing.assert_close(fake_out, apart_out)
    for joint, apart in zip([*real_feats, *fake_feats], [*apart_real, *apart_fake], strict=True):
        torch.testing.assert_close(joint, apart)


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
    assert module.objective.feature_layers == [0, len(module.D.blocks) - 1]  # the module's indices: -1 resolved


@pytest.mark.parametrize("trick", TRICKS)
def test_every_trick_composes_with_every_arm(trick: str) -> None:
    # the module each composed config builds takes two generator steps under Lightning (a run's records, previews
    # and evaluation are the same for every trick: test_records.py, test_cli.py and the salimans2016 test below)
    for arm in ARMS:
        module = build(compose_cfg([*TINY, f"loss={arm}", f"tricks=[{trick}]", "max_steps=2"]))
        fit_in_process(module, 2)
        assert module.g_step == 2 and module.d_updates == 2 * module.schedule.count("D")
        assert all(torch.isfinite(p).all() for p in module.parameters())


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
    args = ["experiment=salimans2016", "data=ring8", "logger=csv", "max_steps=2", "sample_every=2", "ckpt_every=2",
            "log_every=1", "batch_size=8"]  # fmt: skip
    summary = train(compose_cfg(args), tmp_path / "run")  # the experiment trains (in this process)
    assert summary["status"] == "completed" and summary["g_steps"] == 2
    from omegaconf import OmegaConf

    assert set(OmegaConf.load(tmp_path / "run" / "config.yaml").tricks) == set(cfg.tricks)  # all five in the record


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


def _g_losses(module) -> list[float]:
    """Record the value of every G objective the module evaluates."""
    values: list[float] = []
    inner = module.objective.generator
    module.objective.generator = lambda *a, **k: _record(values, inner(*a, **k))
    return values


def test_feature_matching_sees_a_shifted_cloud_through_batch_norm_in_d() -> None:
    """Separate train-mode passes let batch norm re-centre real and fake each: a fake cloud 20 units from the data
    then cost ~0.08 in feature matching against ~100 without batch norm. One joint pass sees it."""
    losses = {}
    for tricks in ("[]", "[batch_norm_d]"):
        torch.manual_seed(0)
        cfg = [*TINY, "loss=feature_matching", f"tricks={tricks}", "batch_size=256", "model.discriminator.width=128"]
        module = build(compose_cfg(cfg))
        with torch.no_grad():
            module.G.net[-1].bias.add_(torch.tensor([20.0, 0.0]))  # every fake lands ~20 units right of the ring
        values = _g_losses(module)
        fit_in_process(module, 1)
        losses[tricks] = values[0]
    assert losses["[]"] > 10
    assert losses["[batch_norm_d]"] > 0.2 * losses["[]"]  # same order as without batch norm, not ~1e-3 of it


def test_d_batch_norm_statistics_come_from_real_batches_only() -> None:
    for loss in ("non_saturating", "feature_matching"):
        module = build(compose_cfg([*TINY, "tricks=[batch_norm_d]", f"loss={loss}", "d_steps=2"]))
        bns = [m for m in module.D.modules() if isinstance(m, nn.BatchNorm1d)]
        assert bns
        with torch.no_grad():
            module.G.net[-1].bias.add_(100.0)  # fakes far away: any fake pass would drag the running mean
        fit_in_process(module, 3)
        assert module.d_updates == 6
        # one update per D step's real pass: not the fake pass, not the G step's passes
        assert all(int(bn.num_batches_tracked) == module.d_updates for bn in bns)
        assert bns[0].running_mean.abs().max() < 5.0


def test_equilibrium_runs_d_in_training_size_chunks() -> None:
    """eval/D(x_test) must not depend on how many examples are evaluated at once (minibatch discrimination)."""
    from ganlab.metrics.callback import Evaluation

    module = build(compose_cfg([*TINY, "tricks=[minibatch_discrimination]", "batch_size=16"]))
    module.D.train()(module.real_batch(torch.arange(16)))  # the layer's data-dependent start
    fake = module.sample(64, seed=1)
    values = Evaluation(eval_every=10).equilibrium(module, fake)
    real = module.data.to_model(module.data.test_x[:64])
    with torch.no_grad():
        module.D.eval()
        chunked = torch.cat([torch.sigmoid(module.D(part)[0]) for part in real.split(16)])
        whole = torch.sigmoid(module.D(real)[0])
        module.D.train()
    assert values["eval/D(x_test)"] == pytest.approx(chunked.mean().item(), rel=1e-6)
    assert values["eval/D(x_test)"] != pytest.approx(whole.mean().item(), rel=1e-6)
    # no held-out split (data=folder data.test_fraction=0): none of the three, not NaNs
    module.data.test_x = module.data.test_x[:0]
    assert Evaluation(eval_every=10).equilibrium(module, fake) == {}


def test_ema_of_g_follows_its_recursion_samples_the_average_and_trains_the_live_weights(tmp_path: Path) -> None:
    common = [*TINY, "tricks=[ema]", "tricks.ema.decay=0.5", "model.lr_decay=none", "seed=3", "ckpt_every=2"]
    module = build(compose_cfg([*common, "max_steps=4"]))
    wrapped = module.G
    assert isinstance(wrapped, AveragedGenerator)
    live = wrapped.inner
    history = [[p.detach().clone() for p in live.parameters()]]
    spy = module.tricks[0].after_update

    def record(player, net):
        spy(player, net)
        if player == "G":
            history.append([p.detach().clone() for p in live.parameters()])

    module.tricks[0].after_update = record
    fit_in_process(module, 4)
    # by hand: ema_0 = theta_0; ema_t = b_t ema_{t-1} + (1 - b_t) theta_t, b_t = min(decay, (1 + t) / (10 + t))
    expected = history[0]
    for t, theta in enumerate(history[1:], start=1):
        b = min(0.5, (1 + t) / (10 + t))
        expected = [b * e + (1 - b) * p for e, p in zip(expected, theta, strict=True)]
    assert len(history) == 5 and int(wrapped.updates) == 4
    for got, want, now in zip(wrapped.averaged(), expected, history[-1], strict=True):
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, now)  # the average is not the live weights
    assert len(list(wrapped.parameters())) == len(history[0])  # the average is never trained
    z = torch.randn(5, module.z_dim)
    averaged_g = MLPGenerator((2,), z_dim=module.z_dim, width=16)
    with torch.no_grad():
        for p, e in zip(averaged_g.parameters(), expected, strict=True):
            p.copy_(e)
    torch.testing.assert_close(module.sample(z=z), averaged_g(z))  # what users see: the average
    wrapped.train()
    torch.testing.assert_close(wrapped(z), live(z))  # what the game trains: the live weights
    # the average is checkpointed: a resumed run ends where an uninterrupted one does
    full = train(compose_cfg([*common, "max_steps=4"]), tmp_path / "full")
    train(compose_cfg([*common, "max_steps=2"]), tmp_path / "a")
    resumed = train(compose_cfg([*common, "max_steps=4", f"resume={tmp_path / 'a'}"]), tmp_path / "b")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert [k for k in a if k.startswith("G.ema")] and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == full["final"]


def test_spectral_norm_bounds_every_d_layer_and_leaves_g_alone() -> None:
    module = build(compose_cfg([*TINY, "tricks=[spectral_norm]"]))
    layers = [m for m in module.D.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 4  # 3 hidden + the output layer
    module.D.train()
    x = torch.randn(32, 2)
    for _ in range(30):  # one power iteration per training pass
        module.D(x)
    module.D.eval()
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.02)
    assert not any(hasattr(m, "parametrizations") for m in module.G.modules())
