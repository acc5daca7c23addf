"""Data sets: generated mixtures, digits, torchvision sets read from files written in the official formats,
image folders and stacked digits. Nothing here touches the network."""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from ganlab.data import (
    CIFAR10,
    MNIST,
    Digits,
    Grid25,
    ImageFolder,
    Ring8,
    StackedDigits,
    StackedMNIST,
    load_digits_uint8,
)
from ganlab.errors import DataUnavailable

# ----------------------------------------------------------------------------------------------------------
# 2-D mixtures (PacGAN, Lin et al. 2018)


def test_ring8_matches_pacgan() -> None:
    data = Ring8(n_train=20_000, n_test=100)
    data.setup()
    assert data.kind == "points" and data.num_classes == 8
    c = data.centers
    assert c.shape == (8, 2)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(8))
    angles = sorted(round(math.degrees(math.atan2(y, x))) % 360 for x, y in c.tolist())
    assert angles == [0, 45, 90, 135, 180, 225, 270, 315]
    assert data.std == 0.01
    dev = data.train_x - c[data.train_y]
    assert dev.std().item() == pytest.approx(0.01, rel=0.05)
    assert set(data.train_y.tolist()) == set(range(8))
    assert data.train_x.shape == (20_000, 2) and data.test_x.shape == (100, 2)


def test_grid25_matches_pacgan() -> None:
    data = Grid25(n_train=20_000, n_test=100)
    data.setup()
    assert data.num_classes == 25
    centers = {tuple(p) for p in data.centers.tolist()}
    assert centers == {(float(x), float(y)) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)}
    assert data.std == 0.05
    dev = data.train_x - data.centers[data.train_y]
    assert dev.std().item() == pytest.approx(0.05, rel=0.05)
    # every point is nearest to its own label's centre (modes are 40 std apart)
    nearest = torch.cdist(data.train_x, data.centers).argmin(dim=1)
    assert torch.equal(nearest, data.train_y)


def test_mixtures_are_fixed_by_data_seed() -> None:
    a, b = Ring8(n_train=500, n_test=50), Ring8(n_train=500, n_test=50)
    a.setup()
    b.setup()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    c = Grid25(n_train=500, n_test=50, data_seed=7)
    d = Grid25(n_train=500, n_test=50)
    c.setup()
    d.setup()
    assert not torch.equal(c.train_x, d.train_x)


# sha256 of train_x, train_y, test_x, test_y (100,000 + 2,500 points) as generated before the mixtures became
# parameters: published results depend on these pools, so the presets must keep them bit for bit
PRESET_POOLS = {
    "ring8": "1536d6935f4f08e36e31a2dee5fec7b861c2c7be44a114453edec968345051bd",
    "grid25": "c6d218c79780f7762843709ebfcd926725c6f9b8d7f6d3e3f87fafcc9cccab33",
}


@pytest.mark.parametrize("preset", sorted(PRESET_POOLS))
def test_mixture_presets_keep_their_published_pools_bit_for_bit(preset: str) -> None:
    import hashlib

    from hydra.utils import instantiate

    from conftest import compose_cfg

    data = instantiate(compose_cfg([f"data={preset}"]).data)
    data.setup()
    digest = hashlib.sha256()
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        digest.update(t.numpy().tobytes())
    assert digest.hexdigest() == PRESET_POOLS[preset]
    assert data.name == preset


def test_rings_and_grids_are_parameters_and_their_modes_are_measured() -> None:
    from hydra.utils import instantiate

    from conftest import compose_cfg
    from ganlab.data.toy import Ring
    from ganlab.metrics.evaluator import build_evaluator

    ring = instantiate(compose_cfg(["data=ring", "data.n_modes=5", "data.radius=3", "data.std=0.1"]).data)
    ring.setup()
    assert ring.num_classes == 5 and ring.name == "ring5_r3_std0.1"
    torch.testing.assert_close(ring.centers.norm(dim=1), torch.full((5,), 3.0))
    assert (ring.train_x - ring.centers[ring.train_y]).std().item() == pytest.approx(0.1, rel=0.05)
    grid = instantiate(compose_cfg(["data=grid", "data.side=3", "data.spacing=1.5"]).data)
    grid.setup()
    assert {tuple(p) for p in grid.centers.tolist()} == {(x, y) for x in (-1.5, 0.0, 1.5) for y in (-1.5, 0.0, 1.5)}
    for data, k in ((ring, 5), (grid, 9)):
        evaluate = build_evaluator(data, n_samples=500, device=torch.device("cpu"))
        perfect = evaluate(data.test_x[:500])
        assert perfect["modes500"] == k and perfect["hq_fraction500"] > 0.98 and perfect["reverse_kl500"] < 0.05
        collapsed = evaluate(data.centers[:1].repeat(500, 1))
        assert collapsed["modes500"] == 1 and collapsed["reverse_kl500"] == pytest.approx(math.log(k))
    with pytest.raises(ValueError, match="radius must be > 0"):
        Ring(n_modes=4, radius=0)


# ----------------------------------------------------------------------------------------------------------
# sklearn digits


def test_digits_split_range_and_conversions() -> None:
    data = Digits()
    data.setup()
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == torch.uint8
    assert data.train_x.min().item() == 0 and data.train_x.max().item() == 255
    assert data.shape == (1, 8, 8)
    m = data.to_model(data.train_x)
    assert m.dtype == torch.float32
    assert m.min().item() == -1.0 and m.max().item() == 1.0
    assert torch.equal(data.to_uint8(m), data.train_x)
    assert set(data.test_y.tolist()) == set(range(10))


# ----------------------------------------------------------------------------------------------------------
# torchvision sets from files in the official formats


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every torchvision download fail at once, as offline; returns the URLs that were tried."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist

    tried: list[str] = []

    def fail(url: str, *args: object, **kwargs: object) -> None:
        tried.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fail)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)
    return tried


class _Py2Str(str):
    """A Python 2 ``str``: pickled as a byte string (SHORT_BINSTRING), as in the official CIFAR files."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj: _Py2Str) -> None:
        data = obj.encode("latin1")
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str


def _py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _cifar_batch(n: int, offset: int) -> dict[str, object]:
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [(offset // 10 + 3 * i) % 10 for i in range(n)]  # differs between batches
    k = _Py2Str
    return {k("batch_label"): k("x"), k("labels"): labels, k("data"): data, k("filenames"): [k("f")] * n}


def _write_cifar(root: Path, n_per_batch: int = 2, n_test: int = 3) -> dict[str, dict[str, object]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(n_per_batch, 10 * i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n_test, 100)
    for name, batch in batches.items():
        (folder / name).write_bytes(_py2_pickle(batch))
    k = _Py2Str
    names = [k("airplane"), k("automobile")] + [k("c")] * 8
    meta = {k("label_names"): names, k("num_cases_per_batch"): n_per_batch}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))
    return batches


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks md5s of all CIFAR files (batches and meta): accept any file that exists."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_reads_official_format(tmp_path: Path, skip_md5: None, no_network: list[str]) -> None:
    batches = _write_cifar(tmp_path)
    # the official layout: read with encoding="bytes" the keys are b"data" / b"labels"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (2, 3072) and raw[b"labels"] == [1, 4]
    data = CIFAR10(root=str(tmp_path), download=True)
    data.setup()
    assert no_network == []  # the files were there: no download attempted
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.long
    assert data.train_x.is_contiguous()
    # row-major CHW: pixel (c, r, k) of row i is data[i, c*1024 + r*32 + k]
    b3 = batches["data_batch_3"]["data"]
    for c, r, k in [(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 17, 3)]:
        assert data.train_x[5, c, r, k].item() == b3[1, c * 1024 + r * 32 + k]  # batch 3, row 1 -> index 5
    assert torch.equal(data.train_x[4].flatten(), torch.from_numpy(b3[0]))
    tb = batches["test_batch"]["data"]
    assert torch.equal(data.test_x.reshape(3, -1), torch.from_numpy(tb))
    expected_train = [lab for i in range(1, 6) for lab in batches[f"data_batch_{i}"]["labels"]]
    assert data.train_y.tolist() == expected_train == [1, 4, 2, 5, 3, 6, 4, 7, 5, 8]
    assert data.test_y.tolist() == batches["test_batch"]["labels"]


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def _write_mnist(root: Path, n_train: int = 20, n_test: int = 6) -> tuple[np.ndarray, ...]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # every image distinct (random) and no zeros inside, so padding is visible
    tr_x = rng.integers(1, 256, size=(n_train, 28, 28), dtype=np.uint8)
    te_x = rng.integers(1, 256, size=(n_test, 28, 28), dtype=np.uint8)
    tr_y = np.arange(n_train) % 10
    te_y = (np.arange(n_test) * 3) % 10
    _write_idx_images(raw / "train-images-idx3-ubyte", tr_x)
    _write_idx_labels(raw / "train-labels-idx1-ubyte", tr_y)
    _write_idx_images(raw / "t10k-images-idx3-ubyte", te_x)
    _write_idx_labels(raw / "t10k-labels-idx1-ubyte", te_y)
    return tr_x, tr_y, te_x, te_y


def test_mnist_reads_idx_and_pads_to_32(tmp_path: Path, no_network: list[str]) -> None:
    tr_x, tr_y, te_x, te_y = _write_mnist(tmp_path)
    data = MNIST(root=str(tmp_path))
    data.setup()
    assert no_network == []
    assert data.train_x.shape == (20, 1, 32, 32) and data.test_x.shape == (6, 1, 32, 32)
    assert data.train_x.dtype == torch.uint8
    assert torch.equal(data.train_x[:, 0, 2:30, 2:30], torch.from_numpy(tr_x))
    assert torch.equal(data.test_x[:, 0, 2:30, 2:30], torch.from_numpy(te_x))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (data.train_x[:, 0][:, border] == 0).all()
    assert data.train_x[3, 0, 2, 2].item() == tr_x[3, 0, 0]
    assert data.train_x[3, 0, 29, 29].item() == tr_x[3, 27, 27]
    assert data.train_y.tolist() == tr_y.tolist() and data.test_y.tolist() == te_y.tolist()
    assert data.num_classes == 10

    native = MNIST(root=str(tmp_path), resolution=28)
    native.setup()
    assert torch.equal(native.train_x[:, 0], torch.from_numpy(tr_x))


@pytest.mark.parametrize("download", [True, False])
def test_missing_mnist_gives_one_line_advice(tmp_path: Path, no_network: list[str], download: bool) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataUnavailable) as info:
        MNIST(root=str(root), download=download).setup()
    msg = str(info.value)
    assert "\n" not in msg
    assert os.path.join(str(root), "MNIST", "raw") in msg
    assert "train-images-idx3-ubyte" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    if download:
        assert no_network, "a download should have been tried"
        assert "could not be downloaded" in msg and "no network" in msg
    else:
        assert no_network == []
        assert "download" in msg


@pytest.mark.parametrize("download", [True, False])
def test_missing_cifar10_gives_one_line_advice(tmp_path: Path, no_network: list[str], download: bool) -> None:
    with pytest.raises(DataUnavailable) as info:
        CIFAR10(root=str(tmp_path), download=download).setup()
    msg = str(info.value)
    assert "\n" not in msg
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg
    if download:
        assert no_network == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
        assert "could not be downloaded" in msg and "no network" in msg
    else:
        assert no_network == []


def test_unreadable_mnist_is_reported_not_downloaded(tmp_path: Path, no_network: list[str]) -> None:
    _write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataUnavailable, match="could not be read") as info:
        MNIST(root=str(tmp_path)).setup()
    assert "\n" not in str(info.value) and os.path.join(str(tmp_path), "MNIST", "raw") in str(info.value)
    assert no_network == []


def test_stacked_mnist_labels_match_channels(tmp_path: Path, no_network: list[str]) -> None:
    tr_x, tr_y, te_x, te_y = _write_mnist(tmp_path)
    data = StackedMNIST(root=str(tmp_path), n_train=200, n_test=30)
    data.setup()
    assert data.num_classes == 1000 and data.name == "stacked_mnist"
    assert data.train_x.shape == (200, 3, 32, 32) and data.test_x.shape == (30, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8
    splits = [(data.train_x, data.train_y, tr_x, tr_y), (data.test_x, data.test_y, te_x, te_y)]
    for x, y, pool_x, pool_y in splits:
        pool = torch.from_numpy(pool_x).reshape(len(pool_x), -1)
        inner = x[:, :, 2:30, 2:30].reshape(len(x), 3, -1)
        # index of the (unique) source image of each channel
        src = (inner[:, :, None, :] == pool[None, None]).all(-1).int().argmax(-1)
        assert torch.equal(pool[src.flatten()], inner.reshape(-1, 28 * 28))
        digits = torch.from_numpy(pool_y)[src]
        assert torch.equal(y, 100 * digits[:, 0] + 10 * digits[:, 1] + digits[:, 2])
    assert len(set(data.train_y.tolist())) > 50  # draws vary across examples and channels
    again = StackedMNIST(root=str(tmp_path), n_train=200, n_test=30)
    again.setup()
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


# ----------------------------------------------------------------------------------------------------------
# image folders


def _write_images(root: Path) -> None:
    from PIL import Image

    (root / "a" / "b").mkdir(parents=True)
    # wide image: red and blue strips outside the centre square (beyond the filter's reach) -> all green
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :5] = (255, 0, 0)
    wide[:, 5:35] = (0, 255, 0)
    wide[:, 35:] = (0, 0, 255)
    Image.fromarray(wide).save(root / "wide.png")
    Image.new("RGB", (17, 33), (10, 20, 30)).save(root / "a" / "tall.PNG")
    Image.new("L", (64, 64), 200).save(root / "a" / "b" / "grey.bmp")
    Image.new("RGB", (50, 40), (120, 60, 240)).save(root / "a" / "b" / "photo.jpg", quality=95)
    Image.new("RGBA", (24, 24), (1, 2, 3, 255)).save(root / "a" / "rgba.webp", lossless=True)
    (root / "notes.txt").write_text("not an image")


def test_image_folder_loads_crops_and_splits(tmp_path: Path) -> None:
    _write_images(tmp_path)
    data = ImageFolder(str(tmp_path), resolution=16, test_fraction=0.4, split_seed=3)
    data.setup()
    assert data.train_x.dtype == torch.uint8
    assert data.train_x.shape == (3, 3, 16, 16) and data.test_x.shape == (2, 3, 16, 16)
    assert data.train_y is None and data.test_y is None
    everything = torch.cat([data.train_x, data.test_x])
    means = {tuple(round(v) for v in img.float().mean(dim=(1, 2)).tolist()) for img in everything}
    assert (0, 255, 0) in means  # centre crop of the wide image keeps only green
    assert (10, 20, 30) in means and (200, 200, 200) in means and (1, 2, 3) in means
    assert any(abs(a - 120) <= 3 and abs(b - 60) <= 3 and abs(c - 240) <= 3 for a, b, c in means)  # jpeg

    same = ImageFolder(str(tmp_path), resolution=16, test_fraction=0.4, split_seed=3)
    same.setup()
    assert torch.equal(same.train_x, data.train_x) and torch.equal(same.test_x, data.test_x)
    other = [ImageFolder(str(tmp_path), resolution=16, test_fraction=0.4, split_seed=s) for s in range(6)]
    for o in other:
        o.setup()
    assert len({tuple(o.test_x.float().mean(dim=(1, 2, 3)).tolist()) for o in other}) > 1

    grey = ImageFolder(str(tmp_path), resolution=8, channels=1, test_fraction=0.2)
    grey.setup()
    assert grey.train_x.shape == (4, 1, 8, 8) and grey.test_x.shape == (1, 1, 8, 8)
    assert grey.shape == (1, 8, 8)


def test_image_folder_missing_or_empty(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(DataUnavailable, match="does not exist") as info:
        ImageFolder(str(missing)).setup()
    assert "\n" not in str(info.value) and str(missing) in str(info.value)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(DataUnavailable, match="no images") as info:
        ImageFolder(str(empty)).setup()
    assert "\n" not in str(info.value) and str(empty) in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# stacked digits


def test_stacked_digits_channels_are_digits_of_the_label() -> None:
    data = StackedDigits(n_train=300, n_test=60)
    data.setup()
    assert data.name == "stacked_digits" and data.kind == "image" and data.num_classes == 1000
    assert data.train_x.shape == (300, 3, 8, 8) and data.test_x.shape == (60, 3, 8, 8)
    assert data.train_x.dtype == torch.uint8
    tr_x, tr_y, te_x, te_y = load_digits_uint8()
    splits = [(data.train_x, data.train_y, tr_x, tr_y), (data.test_x, data.test_y, te_x, te_y)]
    for x, y, pool_x, pool_y in splits:
        assert ((y >= 0) & (y < 1000)).all()
        pool = pool_x.reshape(len(pool_x), 64)
        for ch, d in enumerate([y // 100, (y // 10) % 10, y % 10]):
            match = (x[:, ch].reshape(len(x), 1, 64) == pool[None]).all(-1)  # [N, pool]
            assert match.any(1).all(), "every channel is a real digit image of its pool"
            # some pool image equal to the channel has the digit the label encodes
            assert (match & (pool_y[None] == d[:, None])).any(1).all()
    assert len(set(data.train_y.tolist())) > 200
    again = StackedDigits(n_train=300, n_test=60)
    again.setup()
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_y, data.train_y)


# ----------------------------------------------------------------------------------------------------------
# How each data set is judged: its own declaration (EvalSpec), read by the evaluator, previews and report

_DATA_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "conf" / "data").glob("*.yaml"))


@pytest.mark.parametrize("config", _DATA_CONFIGS, ids=lambda p: p.stem)
def test_every_data_config_declares_its_evaluation(config: Path) -> None:
    import json

    from hydra.utils import get_class

    from conftest import compose_cfg
    from ganlab.data import EvalSpec, describe
    from ganlab.data.base import PREVIEWS
    from ganlab.metrics.protocol import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR

    cls = get_class(compose_cfg([f"data={config.stem}"]).data._target_)  # presets take theirs from defaults
    spec = cls.evaluation
    assert isinstance(spec, EvalSpec) and spec.preview in PREVIEWS
    assert spec.features in (None, DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR)
    assert spec.modes is None or callable(getattr(spec.modes, "prepare", None))
    assert spec.preview == "grid" or cls.kind == "points"  # scatter and density plots draw points
    record = describe(cls.__new__(cls))  # class attributes only: no files are read
    assert record["name"] == cls.name and record["preview"] == spec.preview
    assert json.loads(json.dumps(record)) == record  # goes into summary.json as is


def test_declarations_of_the_paper_protocols() -> None:
    from ganlab.data import Gauss1D, describe
    from ganlab.metrics.modes import MixtureModes
    from ganlab.metrics.stacked import StackedModes

    assert describe(Ring8()) == {
        "name": "ring8",
        "preview": "scatter",
        "features": None,
        "modes": "MixtureModes(radius_stds=3.0)",
        "eval_samples": 2500,
    }
    assert Grid25.evaluation == Ring8.evaluation  # PacGAN Table 1 for both mixtures
    assert Gauss1D.evaluation.preview == "density" and Gauss1D.evaluation.modes is None
    assert StackedDigits.evaluation.modes == StackedModes(from_labels=False)  # the shipped digits CNN
    assert StackedMNIST.evaluation.modes == StackedModes(from_labels=True)  # trained from the labels
    assert StackedDigits.evaluation.samples == StackedMNIST.evaluation.samples == 26_000  # PacGAN Table 2
    assert Digits.evaluation.features == "digits-cnn" and MNIST.evaluation.features == "inception-v3-compat"
    assert isinstance(Ring8.evaluation.modes, MixtureModes)


def test_the_grids_get_the_wide_mlp_and_the_rings_the_narrow_one() -> None:
    from conftest import compose_cfg

    for data, width in [("grid25", 256), ("grid", 256), ("ring8", 128), ("ring", 128)]:
        cfg = compose_cfg([f"data={data}"])
        assert cfg.model.generator.width == cfg.model.discriminator.width == width, data
        assert cfg.model.generator._target_.endswith("MLPGenerator") and cfg.model.lr_decay == "linear", data
    assert compose_cfg(["data=grid25", "model=mlp"]).model.generator.width == 128  # the command line still wins
