"""Sample previews: the scatter preview drawn over a kept background has the pixels of a full draw, and a run's
later previews show their own samples and step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import TINY, compose_cfg
from ganlab.callbacks import Previews, save_preview
from ganlab.pipeline import build


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGBA"))


def test_a_kept_scatter_background_draws_the_pixels_of_a_full_draw(tmp_path: Path) -> None:
    module = build(compose_cfg(TINY))
    assert module.data.evaluation.preview == "scatter"
    kept = Previews(module)
    first = module.sample(z=module.fixed_z)
    second = first + torch.tensor([1.0, -0.5])  # G's cloud moved
    n = len(first)
    lim = float(module.real_pool[: 2 * n].abs().max()) * 1.3
    second[:40, 0] = lim  # some points on the frame's right edge: they must lie above it, as in a full draw
    second[:40, 1] = torch.linspace(-lim, lim, 40)
    module.g_step = 10
    kept.save(first, tmp_path / "kept_10.png")
    module.g_step = 20
    kept.save(second, tmp_path / "kept_20.png")  # the same background, G's points and the title drawn anew
    assert kept._scatter is not None
    kept._scatter.fig.savefig(tmp_path / "full_20.png")  # the same figure drawn in full by matplotlib
    save_preview(module, second, tmp_path / "fresh_20.png")  # a figure of its own
    kept_10, kept_20, full_20, fresh_20 = (
        _pixels(tmp_path / f"{name}.png") for name in ("kept_10", "kept_20", "full_20", "fresh_20")
    )
    assert kept_20.shape == (400, 450, 4)
    assert np.array_equal(kept_20, full_20) and np.array_equal(kept_20, fresh_20)
    # and each preview shows its own: G's points (tab:red) where they fell, the step in the title band above the
    # axes (the top 7 % of the figure)
    red = [np.all(img[..., :3] == (214, 39, 40), axis=-1) for img in (kept_10, kept_20)]
    assert red[0].sum() > 100 and red[1].sum() > 100 and (red[0] != red[1]).sum() > 100
    title = [img[:25] for img in (kept_10, kept_20)]
    assert (title[0] != 255).any() and not np.array_equal(title[0], title[1])
