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
  (seed 0) subset of ``min(n, n_real)`` reference samples, because the k-NN radii depend on the set sizes.

Feature extractors: ``inception-v3-compat`` (torch-fidelity's port of the TF Inception-v3 used for published
numbers) for natural images, and ``digits-cnn`` (:class:`DigitsFeatureExtractor`, registered here) for digits and
stacked digits: offline and CPU-fast. Grey images are repeated to 3 channels for Inception.

Reference statistics cache. torch-fidelity keys its cache by the *names* of the input and the extractor only (a
reused name with other weights gave FID 1049 instead of 0.002; DESIGN §9), so we never let it name anything: the
reference input's ``input2_cache_name`` is ours, a digest of (dataset name, split, extractor, sha256 of the
extractor's weights file, sha256 of the reference images, their number, torch-fidelity's version). The features
land in ``cache_dir`` (default ``$GANLAB_CACHE/fidelity``, ``GANLAB_CACHE`` defaulting to ``~/.cache/ganlab``)
and are computed once per key; :data:`REFERENCE_PASSES` counts the passes over reference images per key.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import urllib.error
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

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
                logp = F.log_softmax(self.net.logits_from_features(f).double(), dim=1).view(n, c, -1)  # [N,C,10]
                joint = logp[:, 0]
                for j in range(1, c):  # [N, 10^j] (+) [N, 10] -> [N, 10^(j+1)], first channel most significant
                    joint = (joint[:, :, None] + logp[:, j, None, :]).reshape(n, -1)
                out["logits_unbiased"] = joint
        # torch-fidelity zips the tuple with self.features_list, whose order is not the declared one (§9).
        return tuple(out[k] for k in self.features_list)


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
