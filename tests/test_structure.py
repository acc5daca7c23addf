"""Each decision has one home: the schedule is data, an arm that changes D's loss and a structural trick are each a
yaml and a class (no edit to the training code), the tricks sit below the training loop, and there is one list of
arms that every recipe, W&B sweep and loss yaml agrees with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from conftest import CONF, ROOT, TINY, comparison_arms
from ganlab.errors import UserError
from ganlab.losses import Objective
from ganlab.pipeline import build, train
from ganlab.schedule import Phase, Schedule
from ganlab.tricks.base import LayerInsert, Trick

# -- the schedule ------------------------------------------------------------------------------------------------


def test_the_schedule_unrolls_its_phases_into_consecutive_slots() -> None:
    s = Schedule.alternating(3)
    assert [(u.player, u.slot) for u in s.updates] == [("D", 0), ("D", 1), ("D", 2), ("G", 3)]
    assert s.optimizer_steps == 4 and s.count("D") == 3 and s.count("G") == 1
    reordered = Schedule((Phase("G", 1), Phase("D", 2)))
    assert [(u.player, u.slot) for u in reordered.updates] == [("G", 0), ("D", 1), ("D", 2)]
    with pytest.raises(ValueError):
        Schedule((Phase("D", 2),))  # no G phase: the budget could never advance
    with pytest.raises(ValueError):
        Phase("D", 0)


def test_the_lightning_budget_is_read_from_the_schedule(tmp_path: Path) -> None:
    summary = train(_cfg([*TINY, "d_steps=2", "max_steps=4"]), tmp_path / "run")
    assert summary["g_steps"] == 4 and summary["d_updates"] == 8
    assert summary["global_step"] == 4 * Schedule.alternating(2).optimizer_steps == 12


# -- an arm that changes D's objective, from a yaml alone -----------------------------------------------------------


class Hinge(Objective):
    """A test-only arm (Lim & Ye 2017): D minimises E relu(1 - l(x)) + E relu(1 + l(G(z))), G minimises -E l(G(z))."""

    calls: ClassVar[list[tuple[Tensor, Tensor, Tensor]]] = []

    def discriminator(self, real_logits: Tensor, fake_logits: Tensor, *, real_target: float = 1.0):
        loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        Hinge.calls.append((real_logits.detach().clone(), fake_logits.detach().clone(), loss.detach().clone()))
        return loss, {}

    def generator(self, fake_logits: Tensor, **_: object):
        loss = -fake_logits.mean()
        return loss, {}


class ConstantFeature(nn.Module):
    """Appends one feature equal to ``value`` to every example (the smallest structural change one can see)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.extra_features = value, 1

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([h, h.new_full((h.shape[0], 1, *h.shape[2:]), self.value)], dim=1)


class ConstantFeatureD(Trick):
    """A test-only structural trick: a layer inserted into D and group norm as D's normalisation."""

    def __init__(self, layers: list[int], value: float) -> None:
        self.layers, self.value = layers, value

    def network_args(self, player: str) -> dict:
        if player != "D":
            return {}
        return {
            "inserts": [LayerInsert(self.layers, lambda _: ConstantFeature(self.value))],
            "norm": lambda features, dims: nn.GroupNorm(1, features),
        }


def _cfg(overrides: list[str], search: Path | None = None):
    extra = [f"hydra.searchpath=[file://{search}]"] if search is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *extra])


def test_an_arm_that_changes_ds_loss_is_a_yaml_and_a_class(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "loss").mkdir(parents=True)
    (conf / "loss" / "hinge.yaml").write_text("_target_: test_structure.Hinge\n")
    Hinge.calls.clear()
    summary = train(_cfg([*TINY, "loss=hinge", "d_steps=2", "max_steps=3", "log_every=1"], conf), tmp_path / "run")
    assert summary["status"] == "completed"
    assert len(Hinge.calls) == 3 * 2  # the module asked the arm for D's loss at every D update
    real, fake, loss = Hinge.calls[-1]
    expected = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    assert loss.item() == pytest.approx(expected.item())
    assert summary["final"]["loss/d"] == pytest.approx(loss.item())  # what D minimised is what was logged


def test_a_structural_trick_is_a_yaml_and_a_class(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "tricks").mkdir(parents=True)
    (conf / "tricks" / "constant_feature.yaml").write_text(
        "# @package tricks.constant_feature\n_target_: test_structure.ConstantFeatureD\nlayers: [0]\nvalue: 3.0\n"
    )
    for data in ("ring8", "digits"):
        cfg = _cfg([*TINY, f"data={data}", "tricks=[constant_feature]", "max_steps=2"], conf)
        module = build(cfg)
        inserted = module.D.inserted["0"][0]
        assert isinstance(inserted, ConstantFeature) and inserted.value == 3.0
        assert any(isinstance(m, nn.GroupNorm) for m in module.D.modules())
        assert not any(isinstance(m, nn.GroupNorm) for m in module.G.modules())  # D's trick leaves G alone
        h = module.D.blocks[0](module.real_batch(torch.arange(4)))
        assert torch.all(inserted(h)[:, -1] == 3.0)
        assert train(cfg, tmp_path / data)["status"] == "completed"


def test_two_tricks_that_set_the_same_norm_are_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="both set D's norm"):
        build(_cfg([*TINY, "tricks=[batch_norm_d]", "+tricks.again._target_=ganlab.tricks.BatchNormD"]))


def test_tricks_and_nets_import_nothing_of_the_training_loop() -> None:
    code = (
        "import sys, ganlab.tricks, ganlab.nets, ganlab.losses, ganlab.schedule; "
        "bad = [m for m in sys.modules if m.startswith(('pytorch_lightning', 'ganlab.tasks', 'ganlab.pipeline'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_model_yamls_read_no_trick_settings() -> None:
    for path in (CONF / "model").glob("*.yaml"):
        assert "tricks." not in path.read_text(), path.name


# -- one list of arms --------------------------------------------------------------------------------------------


def test_every_arm_of_the_list_has_its_loss_yaml_and_every_recipe_runs_the_list() -> None:
    arms = comparison_arms()
    assert len(arms) == len(set(arms)) >= 4
    for arm in arms:
        assert (CONF / "loss" / f"{arm}.yaml").is_file(), arm
    for recipe in sorted((CONF / "sweep").glob("arms_*.yaml")):
        spec = yaml.safe_load(recipe.read_text())
        assert "arms" in spec.get("defaults", []), f"{recipe.name} must take its loss axis from conf/sweep/arms.yaml"
        assert "loss" not in spec["hydra"]["sweeper"]["params"], recipe.name


def test_every_wandb_sweep_over_arms_runs_exactly_the_list() -> None:
    arms = comparison_arms()
    for path in sorted((ROOT / "sweeps").glob("wandb_arms_*.yaml")):
        values = yaml.safe_load(path.read_text())["parameters"]["loss"]["values"]
        assert values == arms, f"{path.name} runs {values}, the list is {arms}"
