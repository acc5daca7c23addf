"""A small CNN for 8x8 digits: the domain feature extractor behind offline FID/IS/KID and the stacked-mode counts.

Inception-v3 on this CPU runs at about 7 images/s and knows nothing about 8x8 grey digits, so digits and stacked
digits are evaluated with this classifier instead (DESIGN §5). It is trained on the digits TRAIN split only (the
360 held-out test images measure its accuracy), seeded, in a few seconds on two CPU cores::

    python -m ganlab.metrics.classifier          # trains, prints test accuracy, writes weights/digits_cnn.{pt,json}

The weights ship with the package (``weights/digits_cnn.pt``, under 300 kB); ``digits_cnn.json`` records the
accuracy, the seed and the sha256 of the weights file, which is also part of every reference-statistics cache
key. Retraining with the same seed rewrote the same file bit for bit here (same torch, same sha256).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "digits_cnn.pt"
FEATURE_DIM = 64  # width of the penultimate layer: the FID/KID/PRC feature ("features")
INPUT_SIZE = 8  # the network's native resolution; other sizes are area-resized to it (e.g. MNIST's 28x28)
MIN_ACCURACY = 0.97


@contextlib.contextmanager
def one_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the enclosed CPU work on one intra-op thread (restored afterwards; a no-op for GPU work).

    This network's ops (a batch of 8x8 images) are too small to amortise a thread pool. Measured on the 2-core
    lab machine while other jobs ran: 2,000 images through the feature layers took 0.12 s on one thread and
    6.5 s on two, and 10 training epochs 2.5 s against 50 s, because the pool's threads wait on each other.
    """
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DigitsClassifier(nn.Module):
    """Conv net for 1-channel 8x8 digits with 10 classes.

    Input: ``uint8 [N, 1, H, W]`` (0..255) or floating ``[N, 1, H, W]`` already scaled to [0, 1]. Inputs that
    are not 8x8 are area-averaged to 8x8 first (sklearn's digits were made the same way, from 32x32 bitmaps).

    :meth:`features` returns the penultimate layer *before* its ReLU: the pre-activations have no dead units, so
    their covariance is full rank and FID's matrix square root stays well conditioned. The last layer has no
    bias, so its output is literally torch-fidelity's ``logits_unbiased``.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),  # [N,32,8,8]
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),  # [N,64,8,8]
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N,64,4,4]
            nn.Conv2d(64, 64, 3, padding=1),  # [N,64,4,4]
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N,64,2,2]
            nn.Flatten(),  # [N,256]
            nn.Dropout(0.25),
            nn.Linear(256, feature_dim),  # [N,F] pre-activation = the "features" output
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.25), nn.Linear(feature_dim, num_classes, bias=False))

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """uint8 0..255 (or float 0..1) ``[N,1,H,W]`` -> float32 ``[N,1,8,8]`` in [0, 1]."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"DigitsClassifier expects [N, 1, H, W] images, got {tuple(x.shape)}")
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.adaptive_avg_pool2d(x, INPUT_SIZE)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate pre-activations ``[N, F]``."""
        return self.body(self.prepare(x))

    def logits_from_features(self, f: Tensor) -> Tensor:
        """Class logits ``[N, 10]`` from :meth:`features`."""
        return self.head(f)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, 10]``."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """Predicted class ``int64 [N]`` (eval mode, batched, on the model's device)."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        with one_thread(dev):
            out = [self(chunk.to(dev)).argmax(1).cpu() for chunk in x.split(batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Random translation by -1..1 pixels (zero fill) per image: the usual digits augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=g)
    dy = torch.randint(0, 3, (n,), generator=g)
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 1, h, w + 2)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 1, h, w)
    return out.gather(3, cols)


def train_classifier(
    x: Tensor,
    y: Tensor,
    *,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` on ``uint8 [N,1,H,W]`` images ``x`` and labels ``y`` (seeded, CPU).

    Adam with a cosine schedule and ±1-pixel shifts; the result is returned in eval mode.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    xs = DigitsClassifier.prepare(x)  # [N,1,8,8] float, once
    y = y.long()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(xs) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    with one_thread():  # also makes the result independent of the caller's thread count
        for _ in range(epochs):
            perm = torch.randperm(len(xs), generator=g)
            for idx in perm.split(batch_size):
                xb = _shift(xs[idx], g)
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def accuracy(model: DigitsClassifier, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return float((model.predict(x) == y.cpu()).float().mean())


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_and_save(path: str | os.PathLike[str] = DEFAULT_WEIGHTS, *, seed: int = 0) -> dict[str, object]:
    """Train on the digits TRAIN split, write ``path`` (state dict) and ``path`` with ``.json`` (the record)."""
    from ganlab.data.digits import load_digits_uint8

    t0 = time.perf_counter()
    train_x, train_y, test_x, test_y = load_digits_uint8()
    model = train_classifier(train_x, train_y, seed=seed)
    seconds = time.perf_counter() - t0
    record: dict[str, object] = {
        "test_accuracy": round(accuracy(model, test_x, test_y), 4),
        "train_accuracy": round(accuracy(model, train_x, train_y), 4),
        "n_train": len(train_x),
        "n_test": len(test_x),
        "seed": seed,
        "train_seconds": round(seconds, 2),
        "torch": torch.__version__,
        "feature_dim": FEATURE_DIM,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain state dict of tensors loads with weights_only=True.
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    record["sha256"] = sha256_file(path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _cache_root() -> Path:
    return Path(os.environ.get("GANLAB_CACHE", Path.home() / ".cache" / "ganlab"))


def resolve_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to use: ``path`` if given (must exist), else the shipped file.

    If the shipped file is missing (a broken install), it is trained once and cached: next to the package if that
    is writable, otherwise under ``$GANLAB_CACHE`` (default ``~/.cache/ganlab``).
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            from ganlab.errors import UserError

            raise UserError(f"digits classifier weights not found: {p}")
        return p
    if DEFAULT_WEIGHTS.is_file():
        return DEFAULT_WEIGHTS
    fallback = _cache_root() / "digits_cnn.pt"
    if fallback.is_file():
        return fallback
    try:
        train_and_save(DEFAULT_WEIGHTS)
        return DEFAULT_WEIGHTS
    except OSError:
        train_and_save(fallback)
        return fallback


def load_digits_classifier(
    path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> DigitsClassifier:
    """The trained classifier (eval mode, no grad) from ``path`` or the shipped weights (:func:`resolve_weights`)."""
    model = DigitsClassifier()
    state = torch.load(resolve_weights(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)


def main(argv: list[str] | None = None) -> None:
    """CLI: train, report held-out accuracy, write the shipped weights and their record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args(argv)
    record = train_and_save(args.out, seed=args.seed)
    print(
        f"digits CNN: test accuracy {record['test_accuracy']:.4f} ({record['n_test']} held out), "
        f"train {record['train_accuracy']:.4f}, {record['train_seconds']} s, seed {record['seed']}"
    )
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} kB, sha256 {record['sha256'][:16]}...)")
    if record["test_accuracy"] < MIN_ACCURACY:
        raise SystemExit(f"test accuracy {record['test_accuracy']:.4f} is below {MIN_ACCURACY}")


if __name__ == "__main__":
    main()
