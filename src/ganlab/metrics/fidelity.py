"""FID, IS, KID and precision/recall through torch-fidelity, with reference statistics cached under our own key.

Protocol (every number's name states its sample count, e.g. ``fid2k`` for 2,000 generated samples, ``fid500``
for 500; see :func:`protocol_name`):

- ``fid<n>``: Fréchet distance between the generated samples' features and those of the *whole* reference split
  (torch-fidelity's eigenvalue formula, float64 statistics).
- ``is<n>`` / ``is<n>_std``: Inception Score of the generated samples, torch-fidelity's protocol: samples
  shuffled with ``RandomState(2020)``, 10 equal splits, mean and std of exp(E KL(p(y|x) || p(y))) over splits.
  Each split's marginal p(y) comes from n/10 samples, so IS cannot exceed about n/10: with 1,000 classes
  (stacked digits) ``is1k`` tops out near 100, ``is10k`` near 1,000.
- ``kid<n>`` / ``kid<n>_std``: KID, cubic polynomial kernel, 100 subsets of ``min(kid_subset_size, n, n_real)``.
- ``precision<n>`` / ``recall<n>``: Kynkäänniemi et al. 2019, k = 3, the n generated samples against a fixed
  (seed 0) subset of ``min(n, n_real)`` reference samples, because the k-NN radii depend on the set sizes: sets of
  equal size when the reference is the larger; all of a smaller reference otherwise (digits: 2,000 samples
  against the 1,437 training images; on samples and references from one distribution, 0.619 / 0.607 against
  0.618 / 0.610 at equal sizes, measured with 64-d Gaussians).

Feature extractors: ``inception-v3-compat`` (torch-fidelity's port of the TF Inception-v3 used for published
numbers) for natural images, and ``digits-cnn`` (:class:`DigitsFeatureExtractor`, registered here) for digits and
stacked digits: offline and CPU-fast. Grey images are repeated to 3 channels for Inception.

Reference statistics cache. torch-fidelity keys its cache by the *names* of the input and the extractor only (a
reused name with other weights gave FID 1049 instead of 0.002; DESIGN §9), so we never let it name anything: the
reference input's ``input2_cache_name`` is ours, a digest of (dataset name, split, extractor, sha256 of the
extractor's weights file, sha256 of the reference images, their number, torch-fidelity's version). The features
land in ``cache_dir`` (default ``$GANLAB_CACHE/fidelity``, ``GANLAB_CACHE`` defaulting to ``~/.cache/ganlab``)
and are computed once per key; :data:`REFERENCE_PASSES` counts the passes over reference images per key.

Two routes give these numbers: :func:`compute_fidelity` (torch-fidelity end to end, any extractor) and, for the
digits CNN, the evaluator's :func:`digits_pass` + :func:`fidelity_from_pass` (one CNN pass per evaluation shared
with the stacked mode count, the reference kept per run, pruned precision/recall; see the section at the end).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http.client
import json
import os
import re
import urllib.error
import uuid
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ganlab.errors import UserError
from ganlab.metrics.classifier import load_digits_classifier, one_thread, resolve_weights, sha256_file
from ganlab.metrics.protocol import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, protocol_name

INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
SUBSET_SEED = 0
IS_SPLITS = 10  # torch-fidelity's default, passed explicitly as part of the protocol
CACHE_FORMAT = 1  # bump when what is cached under a key changes meaning

#: Passes over reference images (feature extraction of the real split), per cache key. A cached key stays at 1.
REFERENCE_PASSES: Counter[str] = Counter()


# --------------------------------------------------------------------------------------------------------------
# The digits feature extractor
# --------------------------------------------------------------------------------------------------------------
class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor wrapping :class:`~ganlab.metrics.classifier.DigitsClassifier`.

    Input: ``uint8 [N, C, H, W]`` with C = 1 (digits) or up to 3 (stacked digits, one digit per channel).
    Features:

    - ``features``: the classifier's penultimate pre-activations of each channel, concatenated: ``[N, 64 C]``.
      Returned as float64 so FID/KID statistics carry no float32 rounding.
    - ``logits_unbiased``: log-probabilities over the ``10**C`` digit tuples, the per-channel log-softmaxes added
      (index ``100 a + 10 b + c`` for C = 3): IS over 1,000 classes for stacked digits, over 10 for digits.

    Weights come from ``feature_extractor_weights_path`` (the shipped ones when None).
    """

    FEATURES = ("features", "logits_unbiased")

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        super().__init__(name, features_list)
        self.net = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return DigitsFeatureExtractor.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
        vassert(x.dim() == 4 and 1 <= x.shape[1] <= 3, f"Expecting [N, C<=3, H, W] images, got {tuple(x.shape)}")
        n, c, h, w = x.shape
        out: dict[str, Tensor] = {}
        with one_thread(x.device):
            f = self.net.features(x.reshape(n * c, 1, h, w))  # [N*C, F], channel j of image i at row i*C + j
            if "features" in self.features_list:
                out["features"] = f.reshape(n, -1).double()  # [N, C*F]
            if "logits_unbiased" in self.features_list:
                out["logits_unbiased"] = joint_log_probs(self.net.logits_from_features(f).view(n, c, -1))
        # torch-fidelity zips the tuple with self.features_list, whose order is not the declared one (§9).
        return tuple(out[k] for k in self.features_list)


def joint_log_probs(logits: Tensor) -> Tensor:
    """Per-channel class logits ``[N, C, 10]`` -> float64 log-probabilities ``[N, 10**C]`` of the digit tuples.

    The per-channel log-softmaxes added, the first channel most significant (index ``100 a + 10 b + c``).
    """
    n, c, _ = logits.shape
    logp = F.log_softmax(logits.double(), dim=-1)  # [N, C, 10]
    joint = logp[:, 0]
    for j in range(1, c):  # [N, 10^j] (+) [N, 10] -> [N, 10^(j+1)]
        joint = (joint[:, :, None] + logp[:, j, None, :]).reshape(n, -1)
    return joint


def factored_inception_score(
    logits: Tensor, splits: int = IS_SPLITS, shuffle: bool = True, rng_seed: int = 2020
) -> tuple[float, float]:
    """torch-fidelity's ``isc_features_to_metric`` of :func:`joint_log_probs` ``(logits)``, without the ``[N, 10**C]``
    joint array: p(y|x) is a product over the C channels, so its entropy is the sum of the channels' entropies, and
    the split's marginal p(y) and the cross term sum_y p(y|x) log p(y) are two einsums over ``[n, 10]`` factors.
    The same value up to float64 rounding (``tests/test_metrics.py``: 1e-9); on 26,000 stacked samples the joint
    array is 208 MB of float64 that torch-fidelity's route passes over about ten times (0.54 s of a 7.9 s CPU
    evaluation, profiled).

    The rows are shuffled with ``RandomState(rng_seed)`` and cut in ``splits`` equal parts, as there.
    """
    n, c, _ = logits.shape
    logp = F.log_softmax(logits.double(), dim=-1)  # [N, C, 10]
    if shuffle:
        logp = logp[torch.from_numpy(np.random.RandomState(rng_seed).permutation(n)).to(logp.device)]
    p = logp.exp()
    letters = "abcdefghij"[:c]
    joint = ",".join(f"i{x}" for x in letters)  # "ia,ib,ic": the joint p(y|x), never materialised
    scores = []
    for i in range(splits):
        part, lpart = p[i * n // splits : (i + 1) * n // splits], logp[i * n // splits : (i + 1) * n // splits]
        factors = [part[:, j] for j in range(c)]
        q = torch.einsum(f"{joint}->{letters}", *factors) / len(part)  # [10] * C: the split's marginal p(y)
        cross = torch.einsum(f"{joint},{letters}->i", *factors, q.log())  # sum_y p(y|x) log p(y)
        entropy = (part * lpart).sum((1, 2))  # sum_y p(y|x) log p(y|x)
        scores.append((entropy - cross).mean().exp())
    values = torch.stack(scores).cpu().numpy()  # one read of the device for the 10 splits
    return float(np.mean(values)), float(np.std(values))


if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)


# --------------------------------------------------------------------------------------------------------------
# Names, keys, caches
# --------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$GANLAB_CACHE/fidelity``; ``GANLAB_CACHE`` defaults to ``~/.cache/ganlab``."""
    return Path(os.environ.get("GANLAB_CACHE", Path.home() / ".cache" / "ganlab")) / "fidelity"


_FILE_SHA: dict[tuple[str, int, int], str] = {}
_DATA_SHA: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so a 100 MB Inception file is hashed once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        _FILE_SHA[key] = sha256_file(path)
    return _FILE_SHA[key]


def tensor_digest(x: Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes; memoised on storage, shape and version counter.

    The version counter changes with every in-place write, so a mutated tensor is hashed again.
    """
    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), str(x.dtype), str(x.device), x._version)
    if key not in _DATA_SHA:
        h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|".encode())
        h.update(x.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
        _DATA_SHA[key] = h.hexdigest()
    return _DATA_SHA[key]


def preflight(extractor: str, weights_path: str | os.PathLike[str] | None) -> None:
    """Make sure an extractor's weights are at hand *before* training starts, as data, not code.

    Inception without a local file: fetch torch-fidelity's download into torch's hub cache now (offline, that
    fails in a fraction of a second with the one-line advice, instead of after the first training interval). A
    local weights file, which torch-fidelity itself would unpickle with ``weights_only=False``, is first read here
    with ``weights_only=True``: a file that asks to run code is refused.
    """
    weights_identity(extractor, weights_path)
    if weights_path is not None:
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise UserError(
                f"metrics.inception_weights: {weights_path} is not a plain weights file ({first})"
            ) from None
        return
    if extractor == INCEPTION_EXTRACTOR:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        if not cached.is_file():
            with _download_advice(extractor, None):
                torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False, weights_only=True)


def weights_identity(extractor: str, weights_path: str | os.PathLike[str] | None) -> tuple[str | None, str]:
    """``(path to pass to torch-fidelity or None, identity string for the cache key)`` of an extractor's weights.

    A given path must exist (:class:`UserError` otherwise). Without one, the digits CNN uses the shipped file and
    Inception torch-fidelity's download, identified by its URL (the file name carries the hash prefix).
    """
    if weights_path is not None and not Path(weights_path).is_file():
        if extractor == INCEPTION_EXTRACTOR:
            raise UserError(
                f"Inception weights not found: {weights_path} "
                f"(set metrics.inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE}, from {URL_INCEPTION_V3})"
            )
        raise UserError(f"feature extractor weights not found: {weights_path}")
    if extractor == DIGITS_EXTRACTOR:
        path = resolve_weights(weights_path)
        return str(path), "sha256:" + file_digest(path)
    if weights_path is not None:
        return str(weights_path), "sha256:" + file_digest(weights_path)
    if extractor == INCEPTION_EXTRACTOR:
        return None, "url:" + URL_INCEPTION_V3
    return None, "default:" + extractor


def reference_cache_name(parts: Sequence[str], extractor: str, weights_id: str, real: Tensor) -> str:
    """The cache entry name of a reference set: readable prefix + digest of everything the features depend on."""
    payload = {
        "parts": list(parts),
        "extractor": extractor,
        "weights": weights_id,
        "data": tensor_digest(real),
        "n": len(real),
        "torch_fidelity": torch_fidelity.__version__,
        "format": CACHE_FORMAT,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9_.]+", "_", "-".join([*parts, extractor]))
    return f"{readable}-{digest}"


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------
class _Images(Dataset):
    """Bare uint8 ``[C, H, W]`` items (what torch-fidelity accepts), counting reads; optional grey -> RGB."""

    def __init__(self, x: Tensor, rgb: bool = False) -> None:
        self.x, self.rgb, self.reads = x, rgb, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        self.reads += 1
        item = self.x[i]
        return item.expand(3, -1, -1).contiguous() if self.rgb else item


def _check_images(x: Tensor, what: str) -> Tensor:
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be uint8 [N, C, H, W] images, got {getattr(x, 'dtype', '')} {got}")
    return x.detach().cpu()


def _reference_subset(real: Tensor, m: int) -> Tensor:
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return real[torch.randperm(len(real), generator=g)[:m]]


@contextlib.contextmanager
def _download_advice(extractor: str, weights_path: str | None):
    """Turn an offline download failure of the Inception weights into a one-line :class:`UserError`."""
    try:
        yield
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        if extractor != INCEPTION_EXTRACTOR or weights_path is not None:
            raise
        reason = str(getattr(e, "reason", e)).replace("\n", " ")
        raise UserError(
            f"could not download the Inception-v3 weights ({reason}); fetch {URL_INCEPTION_V3} on a machine "
            f"with internet and set metrics.inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE}"
        ) from None


def _small_blas(extractor: str) -> contextlib.AbstractContextManager:
    """One BLAS thread for the digits CNN's small features (KID's 1000 x 64 products, 64 x 64 covariances).

    Measured on the 2-core lab machine with other jobs running: the metrics tests took 15 s with OpenBLAS's two
    threads and 4 s with one. Inception's 2048-wide features keep the threads (its FID eigendecomposition uses
    them). threadpoolctl comes with scikit-learn.
    """
    if extractor != DIGITS_EXTRACTOR:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# --------------------------------------------------------------------------------------------------------------
# The one entry point
# --------------------------------------------------------------------------------------------------------------
def compute_fidelity(
    fake: Tensor,
    real: Tensor,
    *,
    extractor: str = DIGITS_EXTRACTOR,
    weights_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    kid_subset_size: int = 1000,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_key_parts: Sequence[str] | None = None,
    isc: bool = True,
    fid: bool = True,
    kid: bool = True,
    prc: bool = True,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID/IS/KID/precision/recall of ``fake`` against ``real`` (both ``uint8 [N, C, H, W]``) via torch-fidelity.

    Args:
        extractor: ``"digits-cnn"`` or ``"inception-v3-compat"`` (any registered torch-fidelity name works).
        weights_path: the extractor's weights (``metrics.inception_weights`` for Inception); a missing file is a
            :class:`UserError`. None: the shipped digits CNN, or torch-fidelity's Inception download (offline, a
            failed download is a :class:`UserError` that says how to pass the file).
        device: where the extractor runs; torch-fidelity's ``cuda=`` is set from it (its default would be True).
        kid_subset_size: requested KID subset size, capped at both sample counts.
        cache_dir: where reference features live (default :func:`default_cache_dir`).
        cache_key_parts: names the reference, e.g. ``("digits", "train")``; None computes without caching.
        isc, fid, kid, prc: which metrics.

    Returns:
        ``{fid<n>, is<n>, is<n>_std, kid<n>, kid<n>_std, precision<n>, recall<n>}`` (those requested), n = len(fake),
        named by :func:`protocol_name`; the protocol is in this module's docstring.
    """
    fake, real = _check_images(fake, "generated samples"), _check_images(real, "reference images")
    n, n_real = len(fake), len(real)
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"generated {tuple(fake.shape[1:])} and reference {tuple(real.shape[1:])} differ in shape")
    if n < 2 or n_real < 2:
        raise ValueError("fidelity metrics need at least 2 generated and 2 reference samples")
    if not (isc or fid or kid or prc):
        return {}
    if isc and n < IS_SPLITS:
        raise ValueError(f"IS splits the samples in {IS_SPLITS}: it needs at least {IS_SPLITS}, got {n}")
    path, weights_id = weights_identity(extractor, weights_path)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    rgb = extractor == INCEPTION_EXTRACTOR and fake.shape[1] == 1

    # Precision/recall compare k-NN balls of sets of equal size, so a larger reference enters them as a fixed
    # subset of n (its own cache entry). IS goes into that same call: torch-fidelity extracts every requested
    # layer from both inputs, and IS logits of a whole reference (50k x 1,000 for stacked digits) are waste.
    # The generated samples' features are shared between the two calls through a temporary cache entry.
    key = reference_cache_name(cache_key_parts, extractor, weights_id, real) if cache_key_parts else None
    off = {"isc": False, "fid": False, "kid": False, "prc": False}
    calls: list[tuple[Tensor, dict[str, bool], str | None]] = []  # (reference, metrics, cache name)
    if n_real <= n:
        calls.append((real, {"isc": isc, "fid": fid, "kid": kid, "prc": prc}, key))
    else:
        if isc or prc:
            sub_key = None if key is None else f"{key}-sub{n}"
            calls.append((_reference_subset(real, n), {**off, "isc": isc, "prc": prc}, sub_key))
        if fid or kid:
            calls.append((real, {**off, "fid": fid, "kid": kid}, key))
    fake_name = f"tmp-fake-{uuid.uuid4().hex}" if len(calls) > 1 else None

    common = {
        "cuda": torch.device(device).type == "cuda",
        "feature_extractor": extractor,
        "feature_extractor_weights_path": path,
        "kid_subset_size": min(kid_subset_size, n, n_real),
        "isc_splits": IS_SPLITS,
        "save_cpu_ram": True,  # no DataLoader worker processes (4 of them on 2 cores)
        "batch_size": batch_size,
        "cache_root": str(cache_root),
        "cache": True,
        "verbose": False,
    }
    raw: dict[str, float] = {}
    try:
        for ref, which, name in calls:
            ref_ds = _Images(ref, rgb)
            with _download_advice(extractor, path), _small_blas(extractor):
                raw.update(
                    torch_fidelity.calculate_metrics(
                        input1=_Images(fake, rgb),
                        input2=ref_ds if (which["fid"] or which["kid"] or which["prc"]) else None,
                        input1_cache_name=fake_name,
                        input2_cache_name=name,
                        **which,
                        **common,
                    )
                )
            if ref_ds.reads:
                REFERENCE_PASSES[name or "<uncached>"] += 1
    finally:
        if fake_name is not None:  # the generated samples' features were cached only to share them
            for p in cache_root.glob(f"{fake_name}-*"):
                p.unlink(missing_ok=True)

    out: dict[str, float] = {}
    if fid:
        out[protocol_name("fid", n)] = raw[torch_fidelity.KEY_METRIC_FID]
    if isc:
        out[protocol_name("is", n)] = raw[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out[protocol_name("is", n) + "_std"] = raw[torch_fidelity.KEY_METRIC_ISC_STD]
    if kid:
        out[protocol_name("kid", n)] = raw[torch_fidelity.KEY_METRIC_KID_MEAN]
        out[protocol_name("kid", n) + "_std"] = raw[torch_fidelity.KEY_METRIC_KID_STD]
    if prc:
        out[protocol_name("precision", n)] = raw[torch_fidelity.KEY_METRIC_PRECISION]
        out[protocol_name("recall", n)] = raw[torch_fidelity.KEY_METRIC_RECALL]
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------------
# The digits CNN's route: one pass per evaluation, shared by the mode count and every fidelity metric
# --------------------------------------------------------------------------------------------------------------
# torch-fidelity's route above runs the CNN once per call and, for stacked digits, the mode count ran it again: with
# 26,000 samples (78,000 channels) that was most of a run (README, Speed). The evaluator instead runs the CNN once over
# the generated samples (:func:`digits_pass`), takes the mode labels from the same logits, and computes FID/IS/KID with
# torch-fidelity's own functions on those features, against a :class:`DigitsReference` whose features, FID statistics
# and precision/recall radii are computed once (and cached on disk). Same protocol, same numbers: the CNN's features are
# bit for bit those of torch-fidelity's route (batches of 64 on one thread; :func:`digits_pass` runs batches of 256 on
# the run's threads), the reference features are torch-fidelity's own cache entries, and precision/recall is
# torch-fidelity's k-NN test (k = 3, float64 distances by the same formula) on the pairs that a proven lower bound does
# not rule out (:class:`DistanceBound`). Only the order in which a distance's float64 terms are added can differ (about
# 1e-13 of it), so a decision could change only for a sample within that of a ball's edge; the end-of-run numbers of a
# 26,000-sample stacked-digits run came out identical to the last digit.
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k
PRC_ROWS = 2048  # rows of a distance block: 2,048 x 26,000 float64 is 0.4 GB
# Rows of a lower-bound block: 128 x 26,000 float32 (13 MB) stays in this machine's 36 MB cache between the
# product that writes it and the scans that read it. Measured, one thread, 26,000 stacked-digits samples:
# k-NN radii + precision/recall 7.0 s in blocks of 128-256 rows against 12.7 s in blocks of 2,048.
BOUND_ROWS = 128
BOUND_GROUP = 16  # columns per group when looking for small bounds (_group_minima)
KID_ROWS = 128  # kernel rows at a time in KidPlan._kernel_sum: 128 x 1,000 float64 is 1 MB


class DigitsPass:
    """The digits CNN's outputs on every channel of ``uint8 [N, C, H, W]`` images (:func:`digits_pass`).

    ``features``: float64 ``[N, 64 C]``, the extractor's ``features`` (FID/KID/precision/recall); ``logits``:
    float32 ``[N, C, 10]`` per-channel class logits, from which come the mode labels (:attr:`labels`, what
    :func:`~ganlab.metrics.stacked.classify_channels` predicts) and IS (:func:`factored_inception_score`, the
    value torch-fidelity gets from the extractor's ``logits_unbiased``, :func:`joint_log_probs`).
    """

    def __init__(self, features: Tensor, logits: Tensor) -> None:
        self.features, self.logits = features, logits

    def __len__(self) -> int:
        return len(self.features)

    @property
    def labels(self) -> Tensor:
        """Predicted digit of every channel, ``int64 [N, C]``."""
        return self.logits.argmax(-1)


_PREPACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> oneDNN copy of its body, or None


def _features_fn(net: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """``net.features``, on CPU through a copy of the body with oneDNN-prepacked weights (``torch.utils.mkldnn``).

    Measured on 8x8 images, one thread, a loaded 2-core machine: 24,576 channels in 2.0 s against 3.4 s plainly,
    and 26,000 stacked samples in 5.8 s against 10.0 s, with bit-identical features. The copy is used only if it
    matches the plain network on a probe batch; otherwise (or off CPU, or without oneDNN) the plain network runs.
    """
    if net not in _PREPACKED:
        fast = None
        if next(net.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                with warnings.catch_warnings():  # its modules are TorchScript ones, which warn of deprecation
                    warnings.simplefilter("ignore", FutureWarning)
                    from torch.utils import mkldnn as onednn

                    body = onednn.to_mkldnn(copy.deepcopy(net.body).eval())
                g = torch.Generator().manual_seed(0)
                probe = torch.randint(0, 256, (192, 1, 8, 8), generator=g, dtype=torch.uint8)
                with torch.inference_mode():
                    same = torch.allclose(body(net.prepare(probe).to_mkldnn()).to_dense(), net.features(probe))
                fast = body if same else None
            except (ImportError, AttributeError, RuntimeError):  # a torch without it: the plain network
                fast = None
        _PREPACKED[net] = fast
    fast = _PREPACKED[net]
    if fast is None:
        return net.features
    return lambda x: fast(net.prepare(x).to_mkldnn()).to_dense()


def digits_pass(images: Tensor, net: torch.nn.Module, *, batch_size: int = 256) -> DigitsPass:
    """Run the digits CNN ``net`` once over every channel of ``images`` (``uint8 [N, C, H, W]``).

    ``batch_size`` images per forward; channels of a batch go through the network together; no autograd,
    prepacked weights (:func:`_features_fn`), the caller's intra-op threads (a run's ``model.threads``).
    The features are bit for bit those of torch-fidelity's route (batches of 64 on one thread,
    ``tests/test_metrics.py``). Measured on the 2-core lab machine, 26,000 stacked samples: 5.7 s on one
    thread in batches of 64, 4.2 s on two in batches of 256 (~2x when the machine is idle); beside two
    CPU-bound processes two threads in batches of 256 cost 1.2x one thread, while in batches of 64 they cost
    1.6x, which is why the batch grew with the threads.
    """
    images = _check_images(images, "images")
    c, h, w = images.shape[1:]
    dev = next(net.parameters()).device
    features = _features_fn(net)
    feats, logits = [], []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            f = features(chunk.to(dev).reshape(-1, 1, h, w))  # [b*C, F], channel j of image i at row i*C + j
            feats.append(f.reshape(len(chunk), -1).double().cpu())
            logits.append(net.logits_from_features(f).view(len(chunk), c, -1).cpu())
    if not feats:
        return DigitsPass(torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, c, 10))
    return DigitsPass(torch.cat(feats), torch.cat(logits))


def _cdist(a: Tensor, b: Tensor) -> Tensor:
    """``cdist(a, b)`` as torch-fidelity's precision/recall computes it (``calc_cdist_part``: ``torch.cdist``
    against ``b`` in blocks of 10,000 columns), left on ``a``'s device where that function moves each block to the
    CPU: the same values, without a copy of every distance off the GPU."""
    size = torch_fidelity.defaults.DEFAULTS["prc_batch_size"]
    return torch.cat([torch.cdist(a, part) for part in b.split(size)], dim=1)


class DistanceBound:
    """Cheap lower bounds of the distances between features, to skip the pairs that cannot matter.

    ``||a(x) - a(y)|| <= ||x - y||`` for ``a(x) = [P^T (x - mu), ||r(x)||]``, ``r(x) = (x - mu) - P P^T (x - mu)``
    and orthonormal ``P``: the projected part of the difference is kept and the rest is bounded below by the
    difference of the residual norms (reverse triangle inequality). ``P`` holds the reference's top ``dims``
    principal directions: 32 of the 192 stacked-digits dimensions carry 99 % of the variance, and the bound ruled
    out all but about 1 in 10,000 pairs of a 26,000-sample evaluation (measured). The bounds are one float32
    matrix product of ``dims + 3``-wide rows whose squared norms are scaled by ``1 - SLACK``: the rounding of
    float32 (under 1e-5 of those norms) can then never lift a bound above the true distance.
    """

    SLACK = 1e-4

    def __init__(self, mean: Tensor, basis: Tensor) -> None:
        self.mean, self.basis = mean.double(), basis.double()

    @classmethod
    def principal(cls, mean, covariance, dims: int = 32) -> DistanceBound:
        """From a mean and covariance (e.g. the reference's FID statistics): the top ``dims`` eigenvectors."""
        _, vectors = torch.linalg.eigh(torch.as_tensor(covariance, dtype=torch.float64))
        return cls(torch.as_tensor(mean, dtype=torch.float64), vectors[:, -dims:])

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(left [n, dims+3], right [n, dims+3])``, float32: ``left[i] . right[j]`` bounds ``||x_i - x_j||^2``."""
        centred = x.double() - self.mean
        z = centred @ self.basis
        a = torch.cat([z, (centred - z @ self.basis.T).norm(dim=1, keepdim=True)], dim=1)
        sq = a.pow(2).sum(1, keepdim=True) * (1 - self.SLACK)
        one = torch.ones_like(sq)
        return torch.cat([-2 * a, sq, one], dim=1).float(), torch.cat([a, one, sq], dim=1).float()


class _Pairs:
    """Exact distances of chosen pairs ``(i, j)`` of rows of ``x`` and ``y``, by torch.cdist's matrix formula."""

    CHUNK = 1 << 16

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y
        self.xn, self.yn = x.pow(2).sum(1), y.pow(2).sum(1)
        # float64 rounding of that formula, as a distance: under 1e-6 of the largest norm (the clamp at 0 of
        # nearly equal points makes it a square root of the squared norms' rounding)
        self.tolerance = 1e-6 * float(torch.cat([self.xn, self.yn]).max().sqrt())

    def __call__(self, i: Tensor, j: Tensor) -> Tensor:
        out = torch.empty(len(i), dtype=torch.float64)
        for s in range(0, len(i), self.CHUNK):
            ii, jj = i[s : s + self.CHUNK], j[s : s + self.CHUNK]
            dot = (self.x[ii] * self.y[jj]).sum(1)
            out[s : s + self.CHUNK] = (self.xn[ii] + self.yn[jj] - 2 * dot).clamp_min(0).sqrt()
        return out

    def threshold(self, radii: Tensor) -> Tensor:
        """float32 squared bound above which a pair is provably farther than ``radii`` (as computed here)."""
        return ((radii * (1 + 1e-6) + self.tolerance) ** 2).float()


DENSE_FRACTION = 0.05  # a block with more candidate pairs than this is computed whole, as torch-fidelity does


def _candidates(mask) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """Row and column indices of a boolean numpy ``[b, n]`` mask (numpy's scan is 4x torch's here), or
    ``(None, None)`` when more than :data:`DENSE_FRACTION` of it is set."""
    flat = np.flatnonzero(mask)
    if len(flat) > DENSE_FRACTION * mask.size:
        return None, None
    flat = torch.from_numpy(flat)
    return flat // mask.shape[1], flat % mask.shape[1]


def _group_minima(g: Tensor, want: int, group: int = BOUND_GROUP) -> Tensor:
    """Columns of ``g [b, n]`` with small values, ``want`` per row: the minima of the ``want`` groups (columns
    ``r, r + n/group, r + 2 n/group, ...``) whose minima are smallest, each row's minimum of its own group.

    Any columns do for an upper bound of a k-NN radius; small ones make it tight. A strided ``amin`` plus a
    ``topk`` over ``n/group`` groups costs an eighth of a ``topk`` over ``n`` columns here (1.1 + 0.9 ms against
    8.7 ms for 128 x 26,000 on one thread). Columns past the last whole group are not looked at.
    """
    b, n = g.shape
    groups = n // group
    if groups < want:
        return g.topk(min(want, n), dim=1, largest=False).indices
    strided = g[:, : groups * group].view(b, group, groups)  # [i, t, r] = column t * groups + r
    top = strided.amin(dim=1).topk(want, dim=1, largest=False).indices  # [b, want] groups r
    members = strided.gather(2, top[:, None, :].expand(b, group, want))  # [b, group, want]
    return members.argmin(dim=1) * groups + top


def knn_radii(
    features: Tensor,
    k: int = PRC_NEIGHBORHOOD,
    rows: int | None = None,
    bound: DistanceBound | None = None,
) -> Tensor:
    """Distance of every row of ``features`` to its k-th nearest other row (the row itself is the 0-th).

    torch-fidelity's ``kthvalue(k + 1)`` of the full distance matrix, in blocks of ``rows`` rows (default
    :data:`PRC_ROWS`, or :data:`BOUND_ROWS` with a bound). With ``bound``, only the pairs whose lower bound does
    not exceed an upper bound of the row's radius are computed: the same value, up to the float64 rounding of
    the distances themselves. The upper bound is the (k+1)-th smallest exact distance from the row to itself and
    to ``2 (k + 1)`` columns of small bound (:func:`_group_minima`): any such set holds one.
    """
    n, rows = len(features), rows or (PRC_ROWS if bound is None else BOUND_ROWS)
    if bound is None:
        return torch.cat(
            [_cdist(b, features).topk(k + 1, dim=1, largest=False).values[:, -1] for b in features.split(rows)]
        )
    left, right = bound.factors(features)
    right_t = right.T.contiguous()  # a contiguous right operand: the product is 1.5x faster (measured)
    pairs = _Pairs(features, features)
    out = []
    for start in range(0, n, rows):
        block = torch.arange(start, min(start + rows, n))
        g = left[block] @ right_t  # [b, n] lower bounds of squared distances
        cand = _group_minima(g, 2 * (k + 1))
        near = pairs(block[:, None].expand_as(cand).reshape(-1), cand.reshape(-1)).view(cand.shape)
        near[cand == block[:, None]] = torch.inf  # the row itself enters once, below
        near = torch.cat([pairs(block, block)[:, None], near], dim=1)
        upper = near.topk(min(k + 1, near.shape[1]), dim=1, largest=False).values[:, -1]
        i, j = _candidates(g.numpy() <= pairs.threshold(upper).numpy()[:, None])
        del g
        if i is None:  # too many candidates: the whole block, as torch-fidelity computes it
            out.append(_cdist(features[block], features).topk(k + 1, dim=1, largest=False).values[:, -1])
            continue
        counts = torch.bincount(i, minlength=len(block))
        d = pairs(block[i], j)
        padded = torch.full((len(block), int(counts.max())), torch.inf, dtype=torch.float64)
        padded[i, torch.arange(len(i)) - (counts.cumsum(0) - counts)[i]] = d  # row i's candidates, left-aligned
        out.append(padded.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def precision_recall(
    fake: Tensor,
    real: Tensor,
    fake_radii: Tensor,
    real_radii: Tensor,
    rows: int | None = None,
    bound: DistanceBound | None = None,
) -> tuple[float, float]:
    """Kynkäänniemi et al.'s precision (fakes inside some real k-NN ball) and recall (reals inside some fake ball).

    torch-fidelity's ``calculate_precision_recall_part`` computes the fake-to-real and the real-to-fake distances;
    they are one matrix, computed here once in blocks of ``rows`` fakes (default :data:`PRC_ROWS`, or
    :data:`BOUND_ROWS` with a bound). With ``bound``, only the pairs whose lower bound reaches one of the two
    balls are computed.
    """
    rows = rows or (PRC_ROWS if bound is None else BOUND_ROWS)
    inside_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # real j within some fake's ball
    precise = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)  # fake i within some real's ball
    if bound is not None:
        left, right_t = bound.factors(fake)[0], bound.factors(real)[1].T.contiguous()
        pairs = _Pairs(fake, real)
        real_thr, fake_thr = pairs.threshold(real_radii).numpy(), pairs.threshold(fake_radii)
    for start in range(0, len(fake), rows):
        block = torch.arange(start, min(start + rows, len(fake)))
        if bound is not None:
            g = (left[block] @ right_t).numpy()  # [b, n_real] lower bounds of squared distances
            i, j = _candidates((g <= real_thr[None, :]) | (g <= fake_thr[block].numpy()[:, None]))
            del g
            if i is not None:
                d = pairs(block[i], j)
                precise[block[i[d <= real_radii[j]]]] = True
                inside_fake[j[d <= fake_radii[block[i]]]] = True
                continue
        part = slice(start, start + rows)  # the block as a slice: no index tensor to copy to a GPU
        d = _cdist(fake[part], real)  # [b, n_real]
        precise[part] = (d <= real_radii).any(dim=1)
        inside_fake |= (d <= fake_radii[part][:, None]).any(dim=0)
    return _fraction(precise), _fraction(inside_fake)


def _fraction(mask: Tensor) -> float:
    """The share of True in ``mask`` as torch-fidelity reports it, ``mask.float().mean()`` on the CPU: the float32
    quotient of the count by the length, correctly rounded. A GPU's float32 mean can land one ulp away (the H200
    gave 0.91800004 for 918 of 1,000, the CPU 0.91799998), so the count is read and divided here on either device.
    """
    return float(np.float32(mask.sum().item()) / np.float32(mask.numel()))


class KidPlan:
    """torch-fidelity's KID subsets for ``n_fake`` generated and ``n_real`` reference samples, with the reference
    side's kernel sums, so an evaluation computes only the generated side and the cross terms.

    ``kid_features_to_metric`` draws, per subset, ``m`` generated rows then ``m`` reference rows without replacement
    from ``np.random.RandomState(rng_seed)``; the draws depend on the sizes only, so they are drawn once here, in
    the same order. The reference's off-diagonal kernel sum of each subset is the same at every evaluation of that
    size (a third of KID's products), and is kept (and cached on disk by :class:`DigitsReference`). Measured on
    26,000 stacked-digits samples against the 50,000 reference rows, one thread: 0.84 s against 1.82 s for
    torch-fidelity's loop at ``m = 500``, 3.3 s against 5.9 s at 1,000; the values agree to 1e-9
    (``tests/test_metrics.py``): the products are float64 as there, only summed in another order.
    """

    def __init__(self, fake_rows: Tensor, real_rows: Tensor, real_sums: Tensor) -> None:
        self.fake_rows, self.real_rows, self.real_sums = fake_rows, real_rows, real_sums

    @staticmethod
    def _kernel_sum(x: np.ndarray, y: np.ndarray | None = None, rows: int = KID_ROWS) -> float:
        """``sum_ij k(x_i, y_j)``, or without ``y`` the off-diagonal sum of ``k(x_i, x_j)``, for float64
        ``[m, d]`` rows; ``k(a, b) = (a . b * gamma + coef0) ** degree``, torch-fidelity's polynomial kernel (numpy's
        float64 products here ran 1.4x torch's).

        Over the whole ``[m, m]`` kernel at once, the elementwise passes cost more than its product; here they are
        few and in cache: ``rows`` rows of the kernel at a time (``rows x m`` float64 stays in a core's L2),
        ``gamma`` folded into one side of the product, the affine map in place, and at degree 3 the sum of cubes as
        ``vdot(k * k, k)`` (one temporary; BLAS's dot adds the same products in another order); any other degree
        takes the same blocks with numpy's power. Without ``y`` the
        kernel is symmetric: each block of rows is taken from the diagonal on, counted twice, less its square block
        on the diagonal (counted once), so a little over half the kernel is computed. At m = 1,000, d = 192, one
        BLAS thread: the generated side 5.1 ms against 10.1 ms for the whole kernel at once (medians of 30,
        synthetic features); the sums agree to 1e-15 of their size."""
        defaults = torch_fidelity.defaults.DEFAULTS
        degree, coef0 = defaults["kid_kernel_poly_degree"], defaults["kid_kernel_poly_coef0"]
        gamma = defaults["kid_kernel_poly_gamma"] or 1.0 / x.shape[1]

        def power_sum(k: np.ndarray) -> float:  # sum of k ** degree; at degree 3 vdot(k * k, k), one temporary
            return float(np.vdot(k * k, k)) if degree == 3 else float((k**degree).sum())

        scaled = x * gamma
        total = trace = 0.0
        for start in range(0, len(x), rows):
            k = scaled[start : start + rows] @ (x[start:] if y is None else y).T
            k += coef0
            part = power_sum(k)
            if y is None:  # this block's rows from the diagonal on: twice, less the square on the diagonal once
                part = 2 * part - power_sum(k[:, : len(k)])
                trace += power_sum(np.diagonal(k))
            total += part
        return total - trace

    @staticmethod
    def _kernel_sums(x: Tensor, y: Tensor | None = None, subsets: int = 10) -> Tensor:
        """:meth:`_kernel_sum` of each of the ``[s, m, d]`` subsets with torch on their device, ``subsets`` of them a
        batched product (a GPU's route)."""
        defaults = torch_fidelity.defaults.DEFAULTS
        degree, coef0 = defaults["kid_kernel_poly_degree"], defaults["kid_kernel_poly_coef0"]
        gamma = defaults["kid_kernel_poly_gamma"] or 1.0 / x.shape[2]
        out = []
        for s in range(0, len(x), subsets):
            a = x[s : s + subsets]
            k = torch.bmm(a, (a if y is None else y[s : s + subsets]).transpose(1, 2)) * gamma + coef0
            k = k * k * k if degree == 3 else k**degree
            total = k.sum((1, 2))
            out.append(total if y is not None else total - k.diagonal(dim1=1, dim2=2).sum(1))
        return torch.cat(out)

    @classmethod
    def draw(cls, n_fake: int, real: Tensor, m: int) -> KidPlan:
        """The subsets torch-fidelity draws for ``n_fake`` samples against the float64 ``real`` features (their
        sums with numpy on CPU features, with :meth:`_kernel_sums` on a GPU's)."""
        defaults = torch_fidelity.defaults.DEFAULTS
        rng = np.random.RandomState(defaults["rng_seed"])
        rows = [(rng.choice(n_fake, m, replace=False), rng.choice(len(real), m, replace=False))
                for _ in range(defaults["kid_subsets"])]  # fmt: skip
        fake_rows, real_rows = (torch.from_numpy(np.stack([r[i] for r in rows])) for i in (0, 1))
        if real.device.type != "cpu":
            sums = cls._kernel_sums(real[real_rows.to(real.device)]).cpu()
        else:
            real_np = real.numpy()
            sums = torch.tensor([cls._kernel_sum(real_np[b]) for _, b in rows], dtype=torch.float64)
        return cls(fake_rows, real_rows, sums)

    def state(self) -> dict[str, Tensor]:
        return {"fake_rows": self.fake_rows, "real_rows": self.real_rows, "real_sums": self.real_sums}

    def on_device(self, fake: Tensor, real: Tensor, subsets: int = 10) -> tuple[float, float]:
        """:meth:`__call__` with torch on the features' device, ``subsets`` subsets a batched product: the same
        float64 products, summed in another order (``tests/test_metrics.py``: 1e-9 of the numpy route). On an H200
        the 100 subsets of 1,000 of a 26,000-sample evaluation took 0.05 s against 2.4 s of numpy on one core."""
        m, dev = self.fake_rows.shape[1], fake.device
        x, y = fake[self.fake_rows.to(dev)], real.to(dev)[self.real_rows.to(dev)]  # [100, m, d] each
        xx, xy = self._kernel_sums(x, subsets=subsets), self._kernel_sums(x, y, subsets=subsets)
        mmd = (xx + self.real_sums.to(dev, torch.float64)) / (m * (m - 1)) - 2 * xy / (m * m)
        values = mmd.cpu().numpy()  # the one copy back: 100 numbers
        return float(np.mean(values)), float(np.std(values))

    def __call__(self, fake: Tensor, real: Tensor) -> tuple[float, float]:
        """KID mean and standard deviation over the subsets, as ``kid_features_to_metric`` returns them: numpy
        on CPU features, :meth:`on_device` on a GPU's."""
        if fake.device.type != "cpu":
            return self.on_device(fake, real)
        m = self.fake_rows.shape[1]
        fake_np, real_np = fake.numpy(), real.numpy()
        mmd = np.empty(len(self.fake_rows))
        rows = zip(self.fake_rows.numpy(), self.real_rows.numpy(), self.real_sums.tolist(), strict=True)
        for s, (f, r, yy) in enumerate(rows):
            x = fake_np[f]
            xx, xy = self._kernel_sum(x), self._kernel_sum(x, real_np[r])
            mmd[s] = (xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)
        return float(np.mean(mmd)), float(np.std(mmd))


class DigitsReference:
    """The reference split seen by the digits CNN, computed once: features, FID statistics, k-NN radii.

    ``cache_key_parts`` (e.g. ``("digits", "train")``) names it in the cache exactly as :func:`compute_fidelity`
    does, so both routes read and write the same torch-fidelity cache entries (features), plus our own entry for
    the precision/recall radii; None keeps everything in memory. :data:`REFERENCE_PASSES` counts CNN passes over
    reference images, per cache name, as for :func:`compute_fidelity`.
    """

    def __init__(
        self,
        real: Tensor,
        *,
        weights_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,
        cache_key_parts: Sequence[str] | None = None,
        batch_size: int = 256,
    ) -> None:
        self.real = _check_images(real, "reference images")
        path, weights_id = weights_identity(DIGITS_EXTRACTOR, weights_path)
        self.net = load_digits_classifier(path, device=device)
        self.batch_size = batch_size
        self.cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        parts = cache_key_parts
        self.key = reference_cache_name(parts, DIGITS_EXTRACTOR, weights_id, self.real) if parts else None
        self._features: dict[int, Tensor] = {}  # m (rows of the reference used) -> features
        self._on_device: dict[int, Tensor] = {}  # the same on the network's device (a GPU's dense route)
        self._radii: dict[int, Tensor] = {}
        self._fid_stats: dict | None = None
        self._bound: DistanceBound | None = None
        self._kid: dict[tuple[int, int], KidPlan] = {}

    def _name(self, m: int) -> str | None:
        if self.key is None:
            return None
        return self.key if m == len(self.real) else f"{self.key}-sub{m}"

    def _load_or(self, file: str | None, compute) -> Tensor:
        if file is not None:
            path = self.cache_root / file
            if path.is_file():
                return torch.load(path, map_location="cpu", weights_only=True)
        value = compute()
        if file is not None:
            from torch_fidelity.utils_torch import torch_atomic_save

            self.cache_root.mkdir(parents=True, exist_ok=True)
            torch_atomic_save(value, str(self.cache_root / file))
        return value

    def images(self, m: int) -> Tensor:
        """The ``m`` reference images precision/recall uses: all of them, or the fixed subset of ``m``."""
        return self.real if m == len(self.real) else _reference_subset(self.real, m)

    def features(self, m: int) -> Tensor:
        """float64 ``[m, 64 C]`` features of :meth:`images` (torch-fidelity's cache entry of that name)."""
        if m not in self._features:
            name = self._name(m)

            def compute() -> Tensor:
                REFERENCE_PASSES[name or "<uncached>"] += 1
                return digits_pass(self.images(m), self.net, batch_size=self.batch_size).features

            file = None if name is None else f"{name}-{DIGITS_EXTRACTOR}-features-features.pt"
            self._features[m] = self._load_or(file, compute)
        return self._features[m]

    def fid_statistics(self) -> dict:
        """torch-fidelity's FID statistics (mean, covariance) of the whole reference."""
        if self._fid_stats is None:
            from torch_fidelity.metric_fid import fid_features_to_statistics

            self._fid_stats = fid_features_to_statistics(self.features(len(self.real)))
        return self._fid_stats

    @property
    def device(self) -> torch.device:
        """Where the network runs, and where :func:`fidelity_from_pass` computes by default."""
        return next(self.net.parameters()).device

    def device_features(self, m: int) -> Tensor:
        """:meth:`features` on :attr:`device`, copied there once per run (not at every evaluation)."""
        if m not in self._on_device:
            self._on_device[m] = self.features(m).to(self.device)
        return self._on_device[m]

    def radii(self, m: int) -> Tensor:
        """k-NN radii of :meth:`features` ``(m)`` among themselves (precision's balls): pruned on the CPU, the whole
        distance matrix on a GPU (the same values up to the float64 rounding of the distances)."""
        if m not in self._radii:
            name = self._name(m)
            file = None if name is None else f"{name}-{DIGITS_EXTRACTOR}-prc{PRC_NEIGHBORHOOD}-radii.pt"

            def compute() -> Tensor:
                if self.device.type != "cpu":
                    return knn_radii(self.device_features(m)).cpu()
                return knn_radii(self.features(m), bound=self.bound())

            with _small_blas(DIGITS_EXTRACTOR):
                self._radii[m] = self._load_or(file, compute)
        return self._radii[m]

    def kid_plan(self, n_fake: int, m: int) -> KidPlan:
        """KID's subsets for ``n_fake`` generated samples of subsets of ``m``, with the reference side's sums
        (:class:`KidPlan`), kept per run and cached on disk beside the radii."""
        if (n_fake, m) not in self._kid:
            n_real, name = len(self.real), self._name(len(self.real))
            defaults = torch_fidelity.defaults.DEFAULTS
            tag = f"kid{m}x{defaults['kid_subsets']}-n{n_fake}-seed{defaults['rng_seed']}"
            file = None if name is None else f"{name}-{DIGITS_EXTRACTOR}-{tag}.pt"
            real = self.device_features(n_real)  # on a GPU, the reference side's sums are computed there
            with _small_blas(DIGITS_EXTRACTOR):
                state = self._load_or(file, lambda: KidPlan.draw(n_fake, real, m).state())
            self._kid[(n_fake, m)] = KidPlan(**state)
        return self._kid[(n_fake, m)]

    def bound(self) -> DistanceBound:
        """Lower bounds of feature distances along the reference's principal directions (precision/recall)."""
        if self._bound is None:
            stats = self.fid_statistics()
            self._bound = DistanceBound.principal(stats["mu"], stats["sigma"])
        return self._bound


def fidelity_from_pass(
    fake: DigitsPass,
    reference: DigitsReference,
    *,
    kid_subset_size: int = 1000,
    isc: bool = True,
    fid: bool = True,
    kid: bool = True,
    prc: bool = True,
    dense: bool | None = None,
) -> dict[str, float]:
    """:func:`compute_fidelity`'s numbers (same names, same protocol) from a :func:`digits_pass` of the samples.

    ``dense``: IS, KID and precision/recall with torch on the reference network's device (a batched KID, the whole
    distance matrix), instead of the CPU route (numpy KID, pruned k-NN). The default: dense where that network
    is on a GPU. There the CPU route took 7.2 s (the reference's statistics built included) of a 23.8 s default
    ``stacked_digits`` run on an H200, where the GPU does the float64 products in milliseconds. Both give the same
    numbers up to the order of float64 sums (``tests/test_metrics.py``). FID's statistics stay numpy's on the CPU,
    as in torch-fidelity.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    n, n_real = len(fake), len(reference.real)
    if n < 2 or n_real < 2:
        raise ValueError("fidelity metrics need at least 2 generated and 2 reference samples")
    if isc and n < IS_SPLITS:
        raise ValueError(f"IS splits the samples in {IS_SPLITS}: it needs at least {IS_SPLITS}, got {n}")
    if fake.features.shape[1:] != reference.features(n_real).shape[1:]:
        raise ValueError("generated and reference images differ in shape")
    defaults = torch_fidelity.defaults.DEFAULTS
    dev = reference.device
    dense = dev.type != "cpu" if dense is None else dense
    features = fake.features.to(dev) if dense else fake.features
    out: dict[str, float] = {}
    with _small_blas(DIGITS_EXTRACTOR):
        if fid:
            stats = fid_features_to_statistics(fake.features)
            value = fid_statistics_to_metric(stats, reference.fid_statistics(), False)[torch_fidelity.KEY_METRIC_FID]
            out[protocol_name("fid", n)] = value
        if isc:
            logits = fake.logits.to(dev) if dense else fake.logits
            mean, std = factored_inception_score(logits, IS_SPLITS, defaults["samples_shuffle"], defaults["rng_seed"])
            out[protocol_name("is", n)] = mean
            out[protocol_name("is", n) + "_std"] = std
        if kid:
            m = min(kid_subset_size, n, n_real)
            plan = reference.kid_plan(n, m)
            if dense:
                mean, std = plan.on_device(features, reference.device_features(n_real))
            else:
                mean, std = plan(features, reference.features(n_real))
            out[protocol_name("kid", n)] = mean
            out[protocol_name("kid", n) + "_std"] = std
        if prc:
            m = min(n, n_real)
            bound = None if dense else reference.bound()
            precision, recall = precision_recall(
                features,
                reference.device_features(m) if dense else reference.features(m),
                knn_radii(features, bound=bound),
                reference.radii(m).to(features.device),
                bound=bound,
            )
            out[protocol_name("precision", n)] = precision
            out[protocol_name("recall", n)] = recall
    return {k: float(v) for k, v in out.items()}
