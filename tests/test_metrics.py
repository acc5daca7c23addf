"""Evaluation: torch-fidelity numbers against an independent numpy/scipy computation on the same features, the
digits CNN's accuracy, PacGAN's mode metrics on hand-made sets, the reference-statistics cache, offline errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from ganlab.data import Digits, Ring8, StackedDigits, load_digits_uint8
from ganlab.data.base import EvalSpec, InMemoryData
from ganlab.errors import UserError
from ganlab.metrics import fidelity as fm
from ganlab.metrics.classifier import DEFAULT_WEIGHTS, accuracy, load_digits_classifier, sha256_file
from ganlab.metrics.evaluator import Evaluator, build_evaluator
from ganlab.metrics.modes import mode_coverage
from ganlab.metrics.stacked import channel_classifier_from_labels, classify_channels, stacked_mode_stats


@pytest.fixture(scope="module")
def digits():
    return load_digits_uint8()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANLAB_CACHE", str(tmp_path / "cache"))


def _noise(n: int, seed: int = 0, c: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, 8, 8), generator=g, dtype=torch.uint8)


def _features(x: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """Our extractor called directly, batched as torch-fidelity batches (64), as float64 numpy."""
    ext = fm.DigitsFeatureExtractor(fm.DIGITS_EXTRACTOR, layers).eval()
    with torch.no_grad():
        outs = [ext(b) for b in x.split(64)]
    return {name: torch.cat([o[i] for o in outs]).numpy() for i, name in enumerate(layers)}


# -- the classifier --------------------------------------------------------------------------------------------
def test_shipped_classifier_accuracy_and_record(digits):
    _, _, test_x, test_y = digits
    model = load_digits_classifier()
    acc = accuracy(model, test_x, test_y)
    assert acc >= 0.97
    record = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert record["sha256"] == sha256_file(DEFAULT_WEIGHTS)
    assert abs(record["test_accuracy"] - acc) < 1e-3
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000


def test_extractor_returns_features_in_requested_order(digits):
    x = digits[2][:10]
    a = _features(x, ["features", "logits_unbiased"])
    b = _features(x, ["logits_unbiased", "features"])
    assert a["features"].shape == (10, 64) and a["logits_unbiased"].shape == (10, 10)
    np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["logits_unbiased"], b["logits_unbiased"])
    # Stacked: per-channel features side by side, log-probabilities over the 1,000 triples.
    s = _features(torch.cat([x, x.flip(0), x], dim=1), ["logits_unbiased", "features"])
    assert s["features"].shape == (10, 192) and s["logits_unbiased"].shape == (10, 1000)
    np.testing.assert_allclose(np.exp(s["logits_unbiased"]).sum(1), 1.0, rtol=1e-9)


# -- torch-fidelity against numpy/scipy ------------------------------------------------------------------------
def _fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _inception_score(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> float:
    logits = logits[np.random.RandomState(seed).permutation(len(logits))]
    logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    p, n, scores = np.exp(logp), len(logits), []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        py = p[sl].mean(0)
        scores.append(np.exp((p[sl] * (logp[sl] - np.log(py))).sum(1).mean()))
    return float(np.mean(scores))


def _kid(f1: np.ndarray, f2: np.ndarray, m: int, subsets: int = 100, seed: int = 2020) -> float:
    rng, d, vals = np.random.RandomState(seed), f1.shape[1], []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        )
    return float(np.mean(vals))


def test_fid_kid_is_equal_numpy_scipy_on_the_same_features(digits):
    train_x, _, test_x, _ = digits
    fake = torch.cat([test_x, _noise(140)])  # 500 samples: real digits plus some noise, so FID is not tiny
    got = fm.compute_fidelity(fake, train_x, cache_key_parts=("digits", "train"), prc=False)
    ff = _features(fake, ["features", "logits_unbiased"])
    fr = _features(train_x, ["features"])["features"]
    assert got["fid500"] == pytest.approx(_fid(ff["features"], fr), rel=1e-6)
    assert got["is500"] == pytest.approx(_inception_score(ff["logits_unbiased"]), rel=1e-4)
    assert got["kid500"] == pytest.approx(_kid(ff["features"], fr, m=500), rel=1e-6)


def test_kid_plan_is_torch_fidelitys_kid_with_the_reference_sums_kept(tmp_path, monkeypatch):
    """Same subsets, same kernel, same estimator as ``kid_features_to_metric``; the reference side is computed once
    per size and read back from the cache by a new reference (a new run)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(0)
    real = load_digits_uint8()[0][:400]
    ref = fm.DigitsReference(real, cache_dir=tmp_path, cache_key_parts=("digits", "train"))
    fake = 1.5 * ref.features(len(real))[:300] + torch.randn(300, 64, generator=g, dtype=torch.float64)
    for m in (50, 300):
        want = kid_features_to_metric(fake, ref.features(len(real)), kid_subset_size=m, verbose=False)
        got = ref.kid_plan(len(fake), m)(fake, ref.features(len(real)))
        assert got[0] == pytest.approx(want[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-9)
        assert got[1] == pytest.approx(want[torch_fidelity.KEY_METRIC_KID_STD], rel=1e-9)
    assert got[0] > 0.1  # not a trivial case: the generated side differs
    monkeypatch.setattr(fm.KidPlan, "draw", lambda *a, **k: pytest.fail("the reference's KID sums were recomputed"))
    again = fm.DigitsReference(real, cache_dir=tmp_path, cache_key_parts=("digits", "train"))
    assert again.kid_plan(len(fake), 300)(fake, again.features(len(real))) == got


def test_fid_and_is_order_real_noise_and_collapse(digits):
    train_x, _, test_x, _ = digits
    kw = {"cache_key_parts": ("digits", "train"), "kid": False, "prc": False}
    real = fm.compute_fidelity(test_x, train_x, **kw)["fid360"]
    noise = fm.compute_fidelity(_noise(360), train_x, **kw)["fid360"]
    one = fm.compute_fidelity(test_x[:1].repeat(360, 1, 1, 1), train_x, **kw)["fid360"]
    assert real < 5.0
    assert noise > 50 * real and one > 50 * real
    assert real < noise < one  # a single repeated digit is further from the data than noise is (measured)
    is_real = fm.compute_fidelity(train_x, train_x, isc=True, fid=False, kid=False, prc=False)["is1437"]
    is_one = fm.compute_fidelity(train_x[:1].repeat(500, 1, 1, 1), train_x, isc=True, fid=False, kid=False, prc=False)
    assert 7.0 < is_real <= 10.0
    assert is_one["is500"] < 1.5


# -- mode metrics ----------------------------------------------------------------------------------------------
def test_mode_coverage_on_hand_made_ring_points():
    centers, std = Ring8.centers, Ring8.std
    counts = [1, 2, 3, 4, 10]  # samples exactly on 5 of the 8 centres
    pts = torch.cat([centers[i].repeat(c, 1) for i, c in enumerate(counts)])
    out = mode_coverage(pts, centers, std)  # 20 samples: every name says so
    p = np.array(counts) / sum(counts)
    assert set(out) == {"modes20", "hq_fraction20", "reverse_kl20"}
    assert out["modes20"] == 5 and out["hq_fraction20"] == 1.0
    assert out["reverse_kl20"] == pytest.approx(float((p * np.log(8 * p)).sum()), rel=1e-12)
    # Low-quality samples count in hq_fraction only; 3 std is the boundary.
    off = torch.stack([centers[5] + torch.tensor([2.9 * std, 0.0]), centers[6] + torch.tensor([0.0, 3.1 * std])])
    out2 = mode_coverage(torch.cat([pts, off]), centers, std)
    assert out2["modes22"] == 6 and out2["hq_fraction22"] == pytest.approx(21 / 22)
    far = torch.tensor([[0.0, 0.0], [3.0, 3.0], [-0.5, 0.2]])
    out3 = mode_coverage(far, centers, std)
    assert out3 == {"modes3": 0.0, "hq_fraction3": 0.0, "reverse_kl3": math.log(8)}
    uniform = mode_coverage(centers.repeat(3, 1), centers, std)
    assert uniform["modes24"] == 8 and uniform["reverse_kl24"] == pytest.approx(0.0, abs=1e-12)


def test_evaluator_on_ring8_and_on_points_without_modes():
    data = Ring8(n_train=1000, n_test=2500)
    ev = build_evaluator(data, n_samples=2500, device="cpu", inception_weights=None)
    data.setup()
    out = ev(data.test_x)
    assert set(out) == {"modes2500", "hq_fraction2500", "reverse_kl2500"}  # PacGAN's 2,500-sample protocol
    assert out["modes2500"] == 8 and out["hq_fraction2500"] > 0.99 and out["reverse_kl2500"] < 0.01
    collapsed = ev(Ring8.centers[:1].repeat(2500, 1))
    assert collapsed["modes2500"] == 1 and collapsed["reverse_kl2500"] == pytest.approx(math.log(8))
    # the protocol's sample count is the data set's own when none is given
    assert build_evaluator(data, device="cpu").n_samples == 2500

    class Line(InMemoryData):
        name, kind = "line", "points"

        def load(self):
            return torch.randn(10, 1), None, torch.randn(10, 1), None

    assert build_evaluator(Line(), n_samples=10, device="cpu", inception_weights=None)(torch.randn(10, 1)) == {}


# -- stacked digits --------------------------------------------------------------------------------------------
def test_stacked_mode_stats_real_triples_and_collapse(digits):
    _, _, test_x, test_y = digits
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(test_x), (10_000, 3), generator=g)
    images = test_x[idx.flatten(), 0].reshape(10_000, 3, 8, 8)
    triples = classify_channels(images, load_digits_classifier())
    assert (triples == test_y[idx]).float().mean() > 0.97
    out = stacked_mode_stats(triples)
    assert set(out) == {"stacked_modes10k", "stacked_kl10k"}
    assert out["stacked_modes10k"] >= 990 and out["stacked_kl10k"] < 0.1  # KL of 10 draws per mode: ~0.05
    collapsed = stacked_mode_stats(triples[:1].repeat(500, 1))
    assert collapsed == {"stacked_modes500": 1.0, "stacked_kl500": pytest.approx(math.log(1000))}
    # Mode indices work too and agree with triples.
    assert stacked_mode_stats(triples[:, 0] * 100 + triples[:, 1] * 10 + triples[:, 2]) == out


def test_stacked_digits_evaluator_end_to_end():
    data = StackedDigits(n_train=3000, n_test=1000)
    ev = build_evaluator(data, n_samples=500, device="cpu", inception_weights=None)
    data.setup()
    real = ev(data.test_x)  # the first 500 are used
    collapsed = ev(data.test_x[:1].repeat(500, 1, 1, 1))
    # 500 draws of 1000 modes: 1000 (1 - e^-0.5) = 393
    assert real["stacked_modes500"] > 330 and collapsed["stacked_modes500"] == 1
    assert real["fid500"] < 0.05 * collapsed["fid500"]
    # IS over the 1,000 triples; each of the 10 splits holds 50 samples, so IS cannot exceed about 50 here.
    assert 30 < real["is500"] <= 50 and collapsed["is500"] < 1.5
    assert {"kid500", "precision500", "recall500", "stacked_kl500"} <= set(real)


def test_stacked_labels_train_a_channel_classifier(tmp_path):
    data = StackedDigits(n_train=1000, n_test=500)
    data.setup()
    clf = channel_classifier_from_labels(data, tmp_path, epochs=6)
    pred = classify_channels(data.test_x, clf)
    digits = torch.stack([data.test_y // 100, data.test_y // 10 % 10, data.test_y % 10], dim=1)
    assert (pred == digits).float().mean() > 0.9
    assert len(list((tmp_path / "classifiers").glob("stacked_digits-*.pt"))) == 1


# -- one CNN pass per evaluation --------------------------------------------------------------------------------
def _stacked(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return images[torch.randint(len(images), (n * 3,), generator=g), 0].reshape(n, 3, 8, 8)


@pytest.mark.parametrize(("n_real", "n"), [(900, 400), (300, 400)])  # reference subset for PR / whole reference
def test_shared_pass_gives_the_numbers_of_separate_computations(digits, n_real, n):
    """The evaluator's single digits-CNN pass (mode labels, FID/IS/KID/PR features, cached reference, pruned k-NN)
    against the separate computations it replaces: classify_channels + torch-fidelity's own route."""
    train_x, _, test_x, _ = digits

    class Stacked(InMemoryData):
        name = "stacked_few"
        evaluation = EvalSpec(samples=n, features=fm.DIGITS_EXTRACTOR, modes=StackedDigits.evaluation.modes)

        def load(self):
            return _stacked(train_x, n_real, 1), None, _stacked(test_x, 100, 2), None

    data = Stacked()
    data.setup()
    fake = _stacked(test_x, n, 3)
    fake[: n // 4] = _noise(n // 4, seed=4, c=3)  # off the data: precision < 1
    fake[n // 4 : n // 4 + 20] = fake[n // 4]  # duplicates: ties in the k-NN radii
    ev = build_evaluator(data, kid_subset_size=100)
    assert ev.shares_digits_cnn()
    shared = ev(fake)
    separate = stacked_mode_stats(classify_channels(fake, load_digits_classifier()))
    separate |= fm.compute_fidelity(fake, data.train_x, kid_subset_size=100, cache_key_parts=("stacked_few", "train"))
    assert list(shared) == list(separate)  # same names, same order
    for key, value in separate.items():
        assert shared[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert 0 < shared[f"precision{n}"] < 1 and 0 < shared[f"recall{n}"] < 1  # not a degenerate case
    assert shared[f"stacked_modes{n}"] > 50
    assert ev(fake) == shared  # the reference kept by the evaluator gives the same numbers again


@pytest.mark.parametrize(("n_real", "n"), [(900, 400), (300, 400)])  # reference subset for PR / whole reference
def test_the_dense_route_a_gpu_takes_gives_the_cpu_routes_numbers(digits, tmp_path, n_real, n):
    """``fidelity_from_pass(dense=True)``, the route on a GPU (torch KID batched over subsets, IS from the logits on
    the device, the whole distance matrix for precision/recall), run here on the CPU against the CPU route (numpy
    KID, pruned k-NN): the same numbers up to the order of float64 sums."""
    train_x, _, test_x, _ = digits
    ref = fm.DigitsReference(_stacked(train_x, n_real, 1), cache_dir=tmp_path, cache_key_parts=("few", "train"))
    fake = _stacked(test_x, n, 3)
    fake[: n // 4] = _noise(n // 4, seed=4, c=3)  # off the data: precision < 1
    fake[n // 4 : n // 4 + 20] = fake[n // 4]  # duplicates: ties in the k-NN radii
    passed = fm.digits_pass(fake, ref.net)
    cpu = fm.fidelity_from_pass(passed, ref, kid_subset_size=100)
    assert cpu == fm.fidelity_from_pass(passed, ref, kid_subset_size=100, dense=False)  # the CPU's default
    dense = fm.fidelity_from_pass(passed, ref, kid_subset_size=100, dense=True)
    assert list(dense) == list(cpu)
    for key, value in cpu.items():
        assert dense[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert 0 < cpu[f"precision{n}"] < 1 and 0 < cpu[f"recall{n}"] < 1 and cpu[f"kid{n}"] > 0.01


@pytest.mark.parametrize(("n", "c"), [(1003, 3), (500, 1), (40, 2)])
def test_the_factored_inception_score_is_torch_fidelitys(n, c):
    """IS from the per-channel factors against torch-fidelity's ``isc_features_to_metric`` of the materialised
    ``[N, 10**C]`` joint log-probabilities: same shuffle, same splits (N need not divide by 10), same value."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    g = torch.Generator().manual_seed(n)
    logits = 3 * torch.randn(n, c, 10, generator=g)
    logits[: n // 3, :, 0] += 6  # a favoured class on part of the rows: the splits' marginals differ
    want = isc_features_to_metric(fm.joint_log_probs(logits), fm.IS_SPLITS, True, 2020)
    got = fm.factored_inception_score(logits, fm.IS_SPLITS, True, 2020)
    assert got[0] == pytest.approx(want[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-9)
    assert got[1] == pytest.approx(want[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-7)
    assert got[1] > 1e-3 * got[0]  # the splits differ: the std is not a trivial 0


def test_kid_on_a_device_is_the_numpy_kid(digits):
    """``KidPlan.on_device`` (what a GPU runs) against ``__call__``'s numpy on the same subsets, several subsets a
    batched product or one."""
    g = torch.Generator().manual_seed(0)
    real = fm.DigitsReference(digits[0][:400]).features(400)
    fake = 1.5 * real[:300] + torch.randn(300, 64, generator=g, dtype=torch.float64)
    plan = fm.KidPlan.draw(len(fake), real, 50)
    want = plan(fake, real)
    for subsets in (1, 7, 100):
        got = plan.on_device(fake, real, subsets=subsets)
        assert got == pytest.approx(want, rel=1e-9)
    assert want[0] > 0.1
    # the reference side's sums, as KidPlan.draw computes them from a GPU's features
    torch.testing.assert_close(fm.KidPlan._kernel_sums(real[plan.real_rows]), plan.real_sums, rtol=1e-12, atol=0)


@pytest.mark.parametrize("degree", [3, 2])
def test_kid_kernel_sums_in_blocks_of_rows_are_the_whole_kernels_sums(degree, monkeypatch):
    """KID's kernel sums taken a block of rows at a time (the generated side from the diagonal on, each block twice
    less its square on the diagonal) against the whole kernel at once: any block size, one dividing m or not; the
    protocol's cubic kernel and another degree torch-fidelity allows."""
    monkeypatch.setitem(torch_fidelity.defaults.DEFAULTS, "kid_kernel_poly_degree", degree)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(300, 24, generator=g, dtype=torch.float64), torch.rand(300, 24, generator=g, dtype=torch.float64)
    k_xx, k_xy = (x @ x.T / 24 + 1) ** degree, (x @ y.T / 24 + 1) ** degree
    want_xx, want_xy = float(k_xx.sum() - k_xx.diagonal().sum()), float(k_xy.sum())
    for rows in (1, 7, 128, 300, 1000):
        assert fm.KidPlan._kernel_sum(x.numpy(), rows=rows) == pytest.approx(want_xx, rel=1e-13)
        assert fm.KidPlan._kernel_sum(x.numpy(), y.numpy(), rows=rows) == pytest.approx(want_xy, rel=1e-13)


def test_the_cnn_pass_gives_the_same_bits_on_any_thread_count_and_batch():
    """The evaluator's pass (the run's threads, batches of 256) and torch-fidelity's route (one thread, batches of
    64) share cached reference features, so they must agree bit for bit, not just closely."""
    from ganlab.metrics.classifier import one_thread

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (700, 3, 8, 8), dtype=np.uint8))
    net = load_digits_classifier()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fast = fm.digits_pass(images, net)
        with one_thread():
            slow = fm.digits_pass(images, net, batch_size=64)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(fast.features, slow.features) and torch.equal(fast.logits, slow.logits)


def test_small_bound_columns_are_the_minima_of_the_groups_with_the_smallest_minima():
    g = torch.randn(5, 16 * 20 + 7, generator=torch.Generator().manual_seed(0))
    got = fm._group_minima(g, 6, group=16)
    groups = 20
    for row, cols in zip(g, got, strict=True):
        members = row[: 16 * groups].view(16, groups)  # group r: columns r, r + 20, ..., r + 300
        best = members.amin(0).topk(6, largest=False).indices
        assert sorted(cols.tolist()) == sorted((members[:, best].argmin(0) * groups + best).tolist())
        assert torch.equal(row[cols].sort().values, members.amin(0).topk(6, largest=False).values.sort().values)
    assert torch.equal(fm._group_minima(g[:, :40], 6, group=16), g[:, :40].topk(6, largest=False).indices)


def test_pruned_knn_radii_are_exact_when_the_bound_is_tight():
    """Features inside the bound's subspace: the bound is the distance, so a radius bound one neighbour too small
    (or the row itself counted twice) would leave the true k-th neighbour out of the candidates."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(900, 8, generator=g, dtype=torch.float64)
    x[100:130] = x[100]  # duplicates: radius 0 for these rows
    bound = fm.DistanceBound.principal(x.mean(0), torch.cov(x.T), dims=8)
    dense = fm.knn_radii(x, rows=256)
    for rows in (64, 128, 1000):
        assert torch.allclose(fm.knn_radii(x, rows=rows, bound=bound), dense, rtol=1e-12, atol=1e-6)
    assert (dense[100:130] < 1e-6).all() and (dense[:100] > 0.1).all()


def test_pruned_knn_and_precision_recall_equal_the_full_distance_matrix(monkeypatch):
    """The lower-bound pruning skips pairs but never changes a radius or a precision/recall decision."""
    g = torch.Generator().manual_seed(0)
    centres = 8 * torch.randn(30, 64, generator=g, dtype=torch.float64)
    real = centres[torch.randint(30, (700,), generator=g)] + torch.randn(700, 64, generator=g, dtype=torch.float64)
    fake = centres[torch.randint(20, (600,), generator=g)] + 1.3 * torch.randn(600, 64, generator=g).double()
    fake[:150] = fake[0]  # a collapsed part: its block is dense (computed whole), its radii are 0
    mean, cov = real.mean(0), torch.cov(real.T)
    bound = fm.DistanceBound.principal(mean, cov, dims=8)
    whole = []  # row blocks computed whole (too many candidates)
    monkeypatch.setattr(fm, "_cdist", lambda a, b, f=fm._cdist: whole.append(len(a)) or f(a, b))
    for x, blocks in ((real, 0), (fake, 2)):  # the collapsed rows fill two of fake's three blocks of 256
        left, right = bound.factors(x)
        assert ((left @ right.T).clamp_min(0).sqrt() <= torch.cdist(x, x).float() + 1e-4).all()  # a lower bound
        dense = fm.knn_radii(x, rows=256)
        whole.clear()
        assert torch.allclose(fm.knn_radii(x, rows=256, bound=bound), dense, rtol=1e-12, atol=1e-6)
        assert len(whole) == blocks
    real_r, fake_r = fm.knn_radii(real), fm.knn_radii(fake)
    dense = fm.precision_recall(fake, real, fake_r, real_r, rows=256)
    whole.clear()
    assert fm.precision_recall(fake, real, fake_r, real_r, rows=256, bound=bound) == dense
    assert not whole  # every block pruned
    assert 0 < dense[0] < 1 and 0 < dense[1] < 1
    # torch-fidelity's own implementation (four distance matrices) agrees
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    assert calculate_precision_recall_part(fake, real) == pytest.approx(dense, abs=0)


def test_interim_evaluations_are_named_by_their_own_sample_count():
    data = Ring8(n_train=1000, n_test=2500)
    ev = build_evaluator(data, device="cpu")
    assert (ev.n_samples, ev.interim_samples) == (2500, 2500)  # no cheaper count declared: the protocol
    data.setup()
    ev = Evaluator(2500, interim_samples=500, modes=ev.modes)
    assert set(ev(data.test_x, n_samples=ev.interim_samples)) == {"modes500", "hq_fraction500", "reverse_kl500"}
    assert set(ev(data.test_x)) == {"modes2500", "hq_fraction2500", "reverse_kl2500"}
    with pytest.raises(ValueError, match="needs 2500 samples"):
        ev(data.test_x[:600])

    @dataclasses.dataclass(frozen=True)
    class Spec(EvalSpec):
        interim_samples: int | None = None

    class Declared(Ring8):
        evaluation = Spec(samples=2500, modes=Ring8.evaluation.modes, preview="scatter", interim_samples=500)

    assert build_evaluator(Declared(n_train=1000, n_test=2500)).interim_samples == 500
    assert build_evaluator(Declared(n_train=1000, n_test=2500), n_samples=800).interim_samples == 800


# -- the reference cache ---------------------------------------------------------------------------------------
def test_reference_statistics_are_computed_once_and_keyed_by_weights(digits, tmp_path):
    data = Digits()
    fakes = [_noise(500, seed=1), _noise(500, seed=2)]
    before = sum(fm.REFERENCE_PASSES.values())
    ev = build_evaluator(data, n_samples=500, device="cpu", inception_weights=None)
    first = ev(fakes[0])
    passes = sum(fm.REFERENCE_PASSES.values()) - before
    assert passes == 2  # the train split for FID/KID, its fixed 500-sample subset for precision/recall
    ev(fakes[1])
    again = build_evaluator(data, n_samples=500, device="cpu", inception_weights=None)(fakes[0])
    assert sum(fm.REFERENCE_PASSES.values()) - before == passes  # second and third evaluations: all cached
    assert again == first
    assert set(first) == {"fid500", "is500", "is500_std", "kid500", "kid500_std", "precision500", "recall500"}
    cache = tmp_path / "cache" / "fidelity"
    n_files = len(list(cache.iterdir()))
    assert not list(cache.glob("tmp-fake-*"))  # the generated features shared between calls are removed

    # Same name, other weights: a new cache entry and a different number, never the stale one.
    state = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    state["body.10.weight"] = state["body.10.weight"] * 1.5
    other = tmp_path / "other_cnn.pt"
    torch.save(state, other)
    kw = {"cache_key_parts": ("digits", "train"), "isc": False, "kid": False, "prc": False}
    default = fm.compute_fidelity(fakes[0], data.train_x, **kw)
    changed = fm.compute_fidelity(fakes[0], data.train_x, weights_path=other, **kw)
    assert len(list(cache.iterdir())) > n_files
    assert default["fid500"] == pytest.approx(first["fid500"], rel=1e-12)
    assert changed["fid500"] != pytest.approx(default["fid500"], rel=1e-3)
    # A modified copy of the reference data is another entry as well.
    shutil.rmtree(cache)
    before = sum(fm.REFERENCE_PASSES.values())
    fm.compute_fidelity(fakes[0], data.train_x, **kw)
    fm.compute_fidelity(fakes[0], data.train_x.flip(0)[:1000], **kw)
    assert sum(fm.REFERENCE_PASSES.values()) - before == 2


def test_protocol_names():
    assert fm.protocol_name("fid", 2000) == "fid2k"
    assert fm.protocol_name("fid", 50_000) == "fid50k"
    assert fm.protocol_name("is", 500) == "is500"
    assert fm.protocol_name("kid", 2500) == "kid2500"
    assert fm.protocol_name("modes", 2500) == "modes2500"  # exact integers unless a whole number of thousands
    assert fm.protocol_name("stacked_kl", 26_000) == "stacked_kl26k"


# -- Inception offline -----------------------------------------------------------------------------------------
class _Tiny(InMemoryData):
    name, kind = "tiny_rgb", "image"
    evaluation = EvalSpec(features=fm.INCEPTION_EXTRACTOR)

    def load(self):
        return _noise(20, c=3), None, _noise(20, seed=1, c=3), None


def test_missing_inception_weights_file_is_a_one_line_user_error(tmp_path):
    missing = tmp_path / "nowhere" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(UserError) as e:
        fm.compute_fidelity(_noise(20, c=3), _noise(20, c=3), extractor=fm.INCEPTION_EXTRACTOR, weights_path=missing)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "metrics.inception_weights=" in msg
    with pytest.raises(UserError):  # at build time, before any training
        build_evaluator(_Tiny(), n_samples=20, device="cpu", inception_weights=str(missing))


def test_offline_inception_download_is_a_user_error_with_advice(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent/torch_home")  # no cached weights
    with pytest.raises(UserError) as e:  # the preflight fetch fails while the evaluator is built: before training
        build_evaluator(_Tiny(), n_samples=20, device="cpu", inception_weights=None)
    msg = str(e.value)
    assert "\n" not in msg and "metrics.inception_weights=" in msg and "name resolution" in msg


def test_inception_path_with_a_local_weights_file(tmp_path, monkeypatch):
    """The Inception route end to end, offline: random weights written to a file, grey images repeated to RGB.

    FID is left out: its 2048x2048 eigendecomposition alone takes seconds on this CPU; it is the same code path.
    """
    with monkeypatch.context() as m:  # build the network without its download, then save it as "local weights"
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tf_inception.FeatureExtractorInceptionV3(fm.INCEPTION_EXTRACTOR, ["2048"])
    torch.manual_seed(0)
    for mod in net.modules():  # He init keeps a signal through ~90 layers (the default init fades to constants)
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)

    def no_download(*args, **kwargs):
        raise AssertionError("a local weights file must not trigger a download")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    fake, real = _noise(10, seed=4), _noise(4, seed=5)  # grey 8x8; Inception: ~7 images/s on this CPU
    kw = {"extractor": fm.INCEPTION_EXTRACTOR, "weights_path": weights, "cache_key_parts": ("mnist", "train")}
    before = sum(fm.REFERENCE_PASSES.values())
    out = fm.compute_fidelity(fake, real, fid=False, prc=False, **kw)
    assert set(out) == {"is10", "is10_std", "kid10", "kid10_std"}
    assert all(math.isfinite(v) for v in out.values()) and out["is10"] >= 1.0 - 1e-9 and out["kid10"] != 0.0
    assert sum(fm.REFERENCE_PASSES.values()) - before == 1


def test_precision_and_recall_fractions_are_torch_fidelitys_float32_means_whatever_the_device() -> None:
    # torch-fidelity reports mask.float().mean() on the CPU: the correctly rounded float32 count / n. A GPU's float32
    # mean gave 918 of 1,000 one ulp away (0.91800004 against 0.91799998), so _fraction divides on the host.
    for n in (7, 1000, 2000, 26_000):
        for count in sorted({0, 1, n // 3, 918 % (n + 1), n - 1, n}):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[:count] = True
            assert fm._fraction(mask) == mask.float().mean().item(), (count, n)
    assert fm._fraction(torch.arange(1000) < 918) == 0.9179999828338623 != 0.918  # the float32 value, not float64's
