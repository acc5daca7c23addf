"""torchvision data sets held in memory: MNIST, Stacked MNIST (1,000 modes) and CIFAR-10.

Each is read with ``download=False`` first; only when that fails and ``download`` is true is a download tried.
Anything that goes wrong (no network, a mirror down, a bad checksum, a corrupt file) becomes one
:class:`~ganlab.errors.DataUnavailable` line that says which files were expected where and how to put them
there by hand: no urllib stack trace reaches the user.

torchvision's ``.data`` / ``.targets`` are converted to tensors directly (no per-item PIL round trip).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ganlab.data.base import EvalSpec, InMemoryData
from ganlab.errors import DataUnavailable, UserError
from ganlab.metrics.protocol import INCEPTION_EXTRACTOR
from ganlab.metrics.stacked import StackedModes

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _short_reason(err: BaseException, limit: int = 160) -> str:
    """One line describing ``err``: its type and the most specific line of its message, truncated."""
    reason = getattr(err, "reason", None)  # urllib.error.URLError keeps the cause here
    text = str(reason) if reason is not None else str(err)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    # torchvision's multi-mirror RuntimeError ends with the last mirror's error: the most useful line.
    line = lines[-1] if lines else "no details"
    line = f"{type(err).__name__}: {line}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load_torchvision(
    dataset_cls: Any, root: str, download: bool, title: str, folder: str, files: tuple[str, ...], manual: str
) -> tuple[Any, Any]:
    """Return the train and test splits of a torchvision data set, or raise a one-line ``DataUnavailable``.

    ``folder`` is where the ``files`` are expected (relative to ``root``); ``manual`` is the manual step.
    """
    where = os.path.join(root, folder)

    def build(dl: bool) -> tuple[Any, Any]:
        # A download of the training split fetches the whole archive, so the test split never downloads.
        return dataset_cls(root, train=True, download=dl), dataset_cls(root, train=False, download=False)

    try:
        return build(False)
    except Exception as err:
        first = err
    missing = [f for f in files if not os.path.isfile(os.path.join(where, f))]
    if not missing:
        raise DataUnavailable(
            f"{title} in {where} could not be read ({_short_reason(first)}): delete {where} and "
            f"{'run again to download it' if download else manual}"
        ) from None
    if not download:
        shown = "" if len(missing) == len(files) else f" (missing {', '.join(missing)})"
        raise DataUnavailable(
            f"{title} is not in {where}{shown} and downloading is off (data.download=false): {manual}"
        ) from None
    try:
        return build(True)
    except Exception as err:
        raise DataUnavailable(
            f"{title} is not in {where} and could not be downloaded ({_short_reason(err)}): {manual}"
        ) from None


def _pad_mnist(x: Tensor, resolution: int) -> Tensor:
    """``uint8 [N, 28, 28]`` -> ``uint8 [N, 1, R, R]``; R = 32 adds 2 zero pixels on each side."""
    x = x.to(torch.uint8).unsqueeze(1)
    if resolution == 32:
        x = F.pad(x, (2, 2, 2, 2), value=0)
    return x.contiguous()


def _check_mnist_resolution(resolution: int) -> None:
    if resolution not in (28, 32):
        raise UserError(f"MNIST resolution must be 28 (native) or 32 (zero-padded), not {resolution}")


class MNIST(InMemoryData):
    """MNIST digits: 60,000 train / 10,000 test grey images in 10 classes, ``uint8 [N, 1, R, R]``.

    ``resolution=32`` (the default) pads the native 28x28 with 2 zero pixels on each side; 28 keeps it native.
    Files are expected as ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.
    """

    name = "mnist"
    kind = "image"
    num_classes = 10
    evaluation = EvalSpec(features=INCEPTION_EXTRACTOR)  # FID/IS/KID/PR on 2,000 samples

    def __init__(self, root: str = "data", download: bool = True, resolution: int = 32) -> None:
        super().__init__()
        _check_mnist_resolution(resolution)
        self.root, self.download, self.resolution = str(root), download, resolution

    def _manual(self) -> str:
        where = os.path.join(self.root, "MNIST", "raw")
        return (
            f"download {', '.join(f + '.gz' for f in _MNIST_FILES)} from {_MNIST_URL}, gunzip them into "
            f"{where}/ (or set data.root=...)"
        )

    def load_mnist(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """MNIST as ``(train_x, train_y, test_x, test_y)`` at ``self.resolution``."""
        from torchvision import datasets

        train, test = _load_torchvision(
            datasets.MNIST,
            self.root,
            self.download,
            "MNIST",
            os.path.join("MNIST", "raw"),
            _MNIST_FILES,
            self._manual(),
        )
        return (
            _pad_mnist(train.data, self.resolution),
            torch.as_tensor(train.targets).long(),
            _pad_mnist(test.data, self.resolution),
            torch.as_tensor(test.targets).long(),
        )

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.load_mnist()


class StackedMNIST(MNIST):
    """Stacked MNIST (Metz et al. 2017, PacGAN): three random MNIST digits as the 3 channels of one image.

    Label ``100*d0 + 10*d1 + d2``: 1,000 modes. ``n_train`` examples are stacked from the MNIST train split
    and ``n_test`` from the test split with a generator seeded by ``data_seed``, so the data set never
    depends on the run's seed. Stored ``uint8 [N, 3, R, R]``.
    """

    name = "stacked_mnist"
    num_classes = 1000
    # PacGAN Table 2 counts modes among 26,000 samples; no shipped classifier for 28x28 digits, so one is
    # trained once from the labels
    evaluation = EvalSpec(samples=26_000, features=INCEPTION_EXTRACTOR, modes=StackedModes(from_labels=True))

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        resolution: int = 32,
        n_train: int = 60_000,
        data_seed: int = 1234,
        n_test: int = 10_000,
    ) -> None:
        super().__init__(root=root, download=download, resolution=resolution)
        self.n_train, self.n_test, self.data_seed = n_train, n_test, data_seed

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        train_x, train_y, test_x, test_y = self.load_mnist()
        g = torch.Generator().manual_seed(self.data_seed)
        sx, sy = stack_three(train_x, train_y, self.n_train, g)
        tx, ty = stack_three(test_x, test_y, self.n_test, g)
        return sx, sy, tx, ty


def stack_three(x: Tensor, y: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stack ``n`` triples of single-channel images drawn uniformly from ``x`` as channels.

    Returns ``uint8 [n, 3, H, W]`` and labels ``100*y0 + 10*y1 + y2`` (int64).
    """
    if x.shape[1] != 1:
        raise ValueError(f"stack_three needs single-channel images, got shape {tuple(x.shape)}")
    idx = torch.randint(len(x), (n, 3), generator=generator)
    images = x[idx.flatten(), 0].reshape(n, 3, *x.shape[2:]).contiguous()
    digits = y[idx].long()
    labels = 100 * digits[:, 0] + 10 * digits[:, 1] + digits[:, 2]
    return images, labels


class CIFAR10(InMemoryData):
    """CIFAR-10: 50,000 train / 10,000 test 32x32 colour images in 10 classes, ``uint8 [N, 3, 32, 32]``.

    Files are expected in ``<root>/cifar-10-batches-py/`` (the extracted official python archive).
    """

    name = "cifar10"
    kind = "image"
    num_classes = 10
    evaluation = EvalSpec(features=INCEPTION_EXTRACTOR)  # FID/IS/KID/PR on 2,000 samples

    def __init__(self, root: str = "data", download: bool = True) -> None:
        super().__init__()
        self.root, self.download = str(root), download

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from torchvision import datasets

        manual = f"download {_CIFAR10_URL} and extract it into {self.root}/ (or set data.root=...)"
        train, test = _load_torchvision(
            datasets.CIFAR10,
            self.root,
            self.download,
            "CIFAR-10",
            "cifar-10-batches-py",
            _CIFAR10_FILES,
            manual,
        )

        def convert(ds: Any) -> tuple[Tensor, Tensor]:
            # torchvision holds numpy uint8 [N, 32, 32, 3] (HWC) and a list of ints.
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous().to(torch.uint8)
            return x, torch.as_tensor(ds.targets, dtype=torch.long)

        return (*convert(train), *convert(test))
