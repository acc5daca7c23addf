"""Checkpoints as data: loaded with ``weights_only=True`` (never as code), checked against the run's config before a
resume, and never written with a non-finite parameter or optimizer state.

A checkpoint records the *fingerprint* of its run: the settings a resumed run must share with it (data, networks,
objective, tricks, task, batch size, k). A resume under other settings is refused in one line that lists the keys
that differ; learning rates, budgets, intervals and loggers may change.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ganlab.errors import UserError

# model keys that do not change what the networks are (a resumed run may change them)
_FREE_MODEL_KEYS = frozenset({"optim_g", "optim_d", "threads", "lr_decay", "lr_decay_from", "steps_per_call"})
# data keys that say where files live, not what the data is
_FREE_DATA_KEYS = frozenset({"root", "download", "frames"})


def fingerprint(cfg: DictConfig, batch_size: int, d_steps: int) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint, flattened to dotted keys (``batch_size`` and
    ``d_steps`` as the run resolved them: the config may leave them to the data set)."""
    node = OmegaConf.to_container(cfg, resolve=True)
    parts = {
        "data": {k: v for k, v in (node.get("data") or {}).items() if k not in _FREE_DATA_KEYS},
        "model": {k: v for k, v in node["model"].items() if k not in _FREE_MODEL_KEYS},
        "loss": node.get("loss"),
        "tricks": node.get("tricks") or {},
        "task": node.get("task"),
        "batch_size": int(batch_size),
        "d_steps": int(d_steps),
    }
    return _flatten(parts)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): obj}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key (checkpoint -> now)`` for every fingerprint key whose value differs (or exists on one side only)."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            show = ["absent" if v is missing else repr(v) for v in (a, b)]
            out.append(f"{key} ({show[0]} -> {show[1]})")
    return out


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint as data. A file that is not a checkpoint, or one that would run code to load, is a
    one-line :class:`UserError`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # the file names a Python callable to run while loading: never load it
            raise UserError(
                f"resume: {path} asks to run code ({found.group(1)}) when loaded: refused (checkpoints load as data)"
            ) from None
        raise UserError(f"resume: {path} is not a readable checkpoint (not a torch checkpoint)") from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"resume: {path} is not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "ganlab" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"resume: {path} is not a checkpoint of this project")
    return ckpt


def check_compatible(ckpt: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, listing the keys."""
    saved = ckpt.get("ganlab_fingerprint")
    if saved is None:
        raise UserError(f"resume: {path} records no settings to check (written by an older version of the project)")
    diff = differences(saved, current)
    if diff:
        raise UserError(f"resume: the config differs from the checkpoint's in {'; '.join(diff)}")


def check_weights(ckpt: Mapping[str, Any], module: nn.Module, path: Path) -> None:
    """Refuse a checkpoint whose weights do not fit ``module`` (same settings, but networks built by another
    version of the code), in one line naming the first tensors that differ: before a resume writes anything, and
    before an evaluation or sampling loads them."""
    saved = ckpt.get("state_dict")
    if not isinstance(saved, Mapping):
        return  # no weights to compare here: Lightning's load says what is missing
    own = module.state_dict()
    diff = [f"{k} {list(saved[k].shape)} in the checkpoint, {list(v.shape)} here" for k, v in own.items()
            if k in saved and torch.is_tensor(saved[k]) and saved[k].shape != v.shape]  # fmt: skip
    diff += [f"{k} missing from the checkpoint" for k in own if k not in saved]
    diff += [f"{k} unknown here" for k in saved if k not in own]
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UserError(
            f"{path} holds networks of another shape ({'; '.join(diff[:3])}{more}): written by another version of "
            "the networks (its summary.json names the git_commit that wrote it); use that version, or train a new run"
        )


def all_finite(nets: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether every parameter, buffer and optimizer state tensor is finite (one host sync per device: on a GPU,
    Adam keeps its ``step`` counts on the CPU beside the moments on the GPU)."""
    tensors = [t for net in nets for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
    for opt in optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def read_checkpoint_step(path: Path) -> int | None:
    """The generator step of the checkpoint at ``path``, or None when there is none (or it is unreadable)."""
    if not path.is_file():
        return None
    try:
        return int(load(path)["ganlab"]["g_step"])
    except (UserError, KeyError, TypeError, ValueError):
        return None
