"""Any folder of images (searched recursively), held in memory as ``uint8 [N, C, R, R]``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ganlab.data.base import EvalSpec, InMemoryData
from ganlab.errors import DataUnavailable, UserError
from ganlab.metrics.protocol import INCEPTION_EXTRACTOR

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def find_images(path: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``path`` (recursively, suffix case-insensitive), sorted for a stable order."""
    root = Path(path)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_square_image(file: str | os.PathLike[str], resolution: int, channels: int) -> np.ndarray:
    """Read one image, convert it to RGB (``channels=3``) or L (``channels=1``), scale its shorter side to
    ``resolution`` and crop the centre square: ``uint8 [C, R, R]``."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    with Image.open(file) as img:
        img.draft(mode, (resolution, resolution))  # JPEG: decode at a reduced scale still >= resolution
        img = img.convert(mode)
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        # Resizing the centred square box is "shorter side -> R, then centre crop" in a single filter pass.
        img = img.resize(
            (resolution, resolution),
            resample=Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageFolder(InMemoryData):
    """The images in a folder and its sub-folders (png, jpg, jpeg, bmp, webp), unlabelled.

    Each image is converted to RGB (or grey for ``channels=1``), its shorter side scaled to ``resolution`` and
    its centre square cropped. A fraction ``test_fraction`` is held out by a permutation seeded with
    ``split_seed`` (files are sorted first, so the split depends only on the folder's contents and the seed).
    """

    name = "folder"
    kind = "image"
    num_classes = None
    evaluation = EvalSpec(features=INCEPTION_EXTRACTOR)  # FID/IS/KID/PR on 2,000 samples

    def __init__(
        self,
        path: str,
        resolution: int = 64,
        channels: int = 3,
        test_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), not {channels}")
        if resolution < 1:
            raise UserError(f"data.resolution must be positive, not {resolution}")
        if not 0.0 <= test_fraction < 1.0:
            raise UserError(f"data.test_fraction must be in [0, 1), not {test_fraction}")
        self.path, self.resolution, self.channels = str(path), resolution, channels
        self.test_fraction, self.split_seed = test_fraction, split_seed

    def load(self) -> tuple[Tensor, None, Tensor, None]:
        if not os.path.isdir(self.path):
            raise DataUnavailable(
                f"image folder {self.path} does not exist: set data.path to a folder of "
                f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images"
            )
        files = find_images(self.path)
        if not files:
            raise DataUnavailable(
                f"no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) found under {self.path}: "
                "put images there (sub-folders are searched) or set data.path=..."
            )
        r = self.resolution
        out = np.empty((len(files), self.channels, r, r), dtype=np.uint8)
        for i, file in enumerate(files):
            try:
                out[i] = load_square_image(file, r, self.channels)
            except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError is an OSError
                reason = " ".join(str(err).split()) or type(err).__name__
                raise DataUnavailable(f"could not read image {file} ({reason}): remove or replace it") from None
        x = torch.from_numpy(out)

        n = len(files)
        n_test = round(n * self.test_fraction)
        if self.test_fraction > 0:
            n_test = max(n_test, 1)
        n_test = min(n_test, n - 1)  # keep at least one training image
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
        return x[train_idx], None, x[test_idx], None
