"""Sample a saved model without training: ``python src/generate.py <run folder or .ckpt> n=1000``.

What is written follows the data set's declared preview kind (``data.evaluation.preview``), never its name:

- ``grid`` (images): one PNG per sample in ``images/`` (``000000.png``...), the first samples as ``grid.png``;
- ``scatter`` / ``density`` (2-D / 1-D points): ``samples.npz`` (``x``: ``float32 [n, D]``; ``interpolation``:
  ``[steps, D]``) and ``grid.png``, the preview the training draws (a scatter over the real data, or p_g against
  p_data with D(x));
- always ``interpolation.png``: G along a path between two seeded noise vectors (spherical interpolation for a
  Gaussian prior, whose mass lies near a sphere; linear for the uniform prior), ``steps`` points.

Into ``<run>/generated/n<n>_seed<seed>/`` by default (a new name when it exists) or ``out=<folder>``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ganlab.errors import UserError

KEYS = {"n": int, "seed": int, "steps": int, "out": str}  # the key=value arguments and their types


def slerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between two noise vectors ``[D]`` at fractions ``t [steps]`` -> ``[steps, D]``."""
    cos = torch.dot(z0 / z0.norm(), z1 / z1.norm()).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if float(omega.abs()) < 1e-6:  # (anti)parallel vectors: the sphere's path is the straight one
        return lerp(z0, z1, t)
    t = t[:, None]
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def lerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation ``[D], [D], [steps] -> [steps, D]``."""
    return z0 + t[:, None] * (z1 - z0)


def interpolation_noise(module: Any, seed: int, steps: int) -> Tensor:
    """``[steps, z_dim]`` noise from the first to the second of two seeded draws from the module's prior."""
    g = torch.Generator().manual_seed(seed)
    z0, z1 = module.prior.sample((2, module.z_dim), g)
    t = torch.linspace(0.0, 1.0, steps)
    path = slerp(z0, z1, t) if module.prior.kind == "normal" else lerp(z0, z1, t)
    return path.to(module.device)


def _check_out(out: str) -> Path:
    """``out=``: a new or empty folder (earlier samples are never overwritten); checked before the model loads."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"out={out}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"out={out}: the folder is not empty (nothing is overwritten: choose a new folder)")
    return path


def _out_dir(run_dir: Path, out: str | None, n: int, seed: int) -> Path:
    if out:
        return _check_out(out)
    path, k = run_dir / "generated" / f"n{n}_seed{seed}", 2
    while path.exists():
        path, k = run_dir / "generated" / f"n{n}_seed{seed}-{k}", k + 1
    return path


def generate(
    target: str | Path, *, n: int = 64, seed: int = 0, steps: int = 9, out: str | None = None
) -> dict[str, Any]:
    """Write ``n`` samples, a grid and an interpolation strip of ``steps`` points; return what was written."""
    from ganlab.evaluate import load_run

    if n < 1 or steps < 2:
        raise UserError(f"n must be >= 1 and steps >= 2 (got n={n}, steps={steps})")
    if out:
        _check_out(out)  # before the model is built
    run = load_run(target)
    folder = _out_dir(run.run_dir, out, n, seed)
    try:
        return _write(run.module, folder, n, seed, steps)
    except OSError as exc:
        where = exc.filename or folder
        raise UserError(f"{where}: cannot write ({exc.strerror or exc})") from None


def _write(module: Any, folder: Path, n: int, seed: int, steps: int) -> dict[str, Any]:
    from ganlab.callbacks import save_preview

    folder.mkdir(parents=True, exist_ok=True)
    samples = module.sample(n, seed=seed)
    path = module.sample(z=interpolation_noise(module, seed, steps))
    preview = module.data.evaluation.preview
    written: dict[str, Any] = {"folder": str(folder), "preview": preview, "n": n, "g_step": module.g_step}
    if preview == "grid":
        import torchvision

        images = folder / "images"
        images.mkdir(exist_ok=True)
        pixels = module.data.to_uint8(samples).cpu()  # [n, C, H, W]
        for i, img in enumerate(pixels):
            torchvision.io.write_png(img, str(images / f"{i:06d}.png"))
        written["images"] = str(images)
        save_preview(module, samples[: module.data.n_preview], folder / "grid.png")
        _image_strip(module, path, folder / "interpolation.png")
    else:
        import numpy as np

        np.savez(folder / "samples.npz", x=samples.cpu().numpy(), interpolation=path.cpu().numpy())
        written["npz"] = str(folder / "samples.npz")
        save_preview(module, samples, folder / "grid.png")
        _point_path(module, path, folder / "interpolation.png")
    written["grid"] = str(folder / "grid.png")
    written["interpolation"] = str(folder / "interpolation.png")
    return written


def _image_strip(module: Any, images: Tensor, path: Path) -> None:
    """One row of generated images along the latent path."""
    import torchvision

    img = module.data.to_uint8(images).float().cpu() / 255.0
    scale = max(1, 64 // img.shape[-1])  # small images (8x8 digits) upscaled with nearest neighbours
    if scale > 1:
        img = torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest")
    torchvision.utils.save_image(img, path, nrow=len(img), padding=2, pad_value=1.0)


def _point_path(module: Any, points: Tensor, path: Path) -> None:
    """The latent path's images: over the real data for 2-D points, against the path's fraction for 1-D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points.float().cpu()
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    if pts.shape[1] >= 2:
        real = module.real_pool[:2000].float().cpu()
        ax.scatter(real[:, 0], real[:, 1], s=2, c="0.7", label="real")
        ax.plot(pts[:, 0], pts[:, 1], "-o", c="tab:red", ms=4, label="G(z) along the path")
        ax.set_aspect("equal")
    else:
        ax.plot(torch.linspace(0, 1, len(pts)), pts[:, 0], "-o", c="tab:green", ms=4, label="G(z) along the path")
        ax.set_xlabel("fraction of the path")
    ax.set_title(f"latent interpolation, generator step {module.g_step}")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parse(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in pairs:
        key, sep, value = text.partition("=")
        if not sep or key not in KEYS:
            raise UserError(f"unknown argument {text!r}: use {', '.join(f'{k}=...' for k in KEYS)}")
        try:
            out[key] = KEYS[key](value)
        except ValueError:
            raise UserError(f"{key} must be an integer (got {value!r})") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; bad input exits 2 with one line."""
    parser = argparse.ArgumentParser(
        prog="generate.py", description="Sample a run's checkpoint: sample files, a grid and a latent interpolation."
    )
    parser.add_argument("run", help="a run folder (its checkpoints/last.ckpt) or a .ckpt file inside a run folder")
    parser.add_argument(
        "args", nargs="*", help="n=<samples> (64), seed=<noise seed> (0), steps=<interpolation points> (9), out=<dir>"
    )
    args = parser.parse_args(argv)
    try:
        written = generate(args.run, **_parse(args.args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = written.get("images") or written.get("npz")
    print(
        f"{written['n']} samples of generator step {written['g_step']}: {what}; grid and interpolation in "
        f"{written['folder']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
