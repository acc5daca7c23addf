"""The GAN as a LightningModule with manual optimisation: Goodfellow et al.'s Algorithm 1 with pluggable parts.

A *generator step* is the phases of a :class:`~ganlab.schedule.Schedule` (``d_steps`` discriminator updates, each on
a fresh real minibatch and fresh noise, then one generator update). Lightning's ``global_step`` counts optimizer
steps under manual optimisation (``schedule.optimizer_steps`` per generator step); every budget and interval of this
project counts generator steps (``g_step``) instead, and both are logged.

One ``training_step`` call runs one generator step, or up to ``steps_per_call`` of them (:meth:`steps_this_call`):
Lightning's loop around a call costs a fixed ~0.2-0.7 ms on this CPU, several per cent of a 2-D MLP step (Keras's
``steps_per_execution`` answers the same cost). A call never runs past a step at which one of the run's callbacks
acts (each declares its ``step_cadence``), so every sample, evaluation and checkpoint lands on the step it would
without it, and the numbers are the same bits: each step draws from its own ``(seed, step, rank)`` stream.

All randomness of generator step ``s`` (real-batch indices, noise) comes from a random stream seeded with
``(seed, s, rank)``, so a resumed run draws exactly the batches an uninterrupted one would, and each process of a
DDP run draws its own (rank 0's stream is the single-process stream).

Several processes (DDP, ``trainer.devices``/``trainer.num_nodes``): the module is *not* wrapped in
``DistributedDataParallel`` (see :mod:`ganlab.ddp`). After each update's backward, the updated player's gradients
are averaged over the ranks by hand (one flat all-reduce); the frozen player's are neither computed nor sent.
``batch_size`` is per rank: one update sees ``world_size x batch_size`` real and fake examples.

The module owns backward, stepping and logging; the objectives (:mod:`ganlab.losses`) are pure functions and the
tricks (:mod:`ganlab.tricks`) act only through their hooks.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ganlab.errors import Diverged
from ganlab.losses import Objective
from ganlab.nets.base import batch_parts, normalise_layers
from ganlab.nets.prior import Prior
from ganlab.schedule import Schedule
from ganlab.tricks.base import Player, Trick
from ganlab.util import all_reduce_mean_, broadcast_, eval_mode, frozen_norm_stats, gather_rows, is_due, log_to_all


def _rng_seed(seed: int, step: int, rank: int = 0) -> int:
    # A simple mix of (seed, step, rank) into 63 bits: distinct steps, seeds and ranks give distinct streams. The rank
    # term is 0 for rank 0, so one process (and rank 0 of a DDP run) draws exactly the stream of (seed, step).
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + 1) % (2**63 - 1)


class GANModule(pl.LightningModule):
    """Generator ``G``, discriminator ``D`` and the alternating k:1 schedule.

    Args:
        generator: maps ``[n, z_dim]`` noise to samples; must have a ``z_dim`` attribute.
        discriminator: ``x -> (logits [n], list of hidden features)``.
        objective: D's and G's objectives (an :class:`~ganlab.losses.Objective`: the arm).
        data: the in-memory data set (its training tensor is sampled by index).
        d_steps: k, discriminator updates per generator update.
        batch_size: m, examples per real batch and per fake batch.
        max_steps: training budget in generator steps.
        optim_g, optim_d: Adam settings (``lr``, ``betas``) of each player.
        seed: seeds the sampling stream and the fixed noise of the sample grids.
        log_every: log scalars every this many generator steps (never per step: logging costs more than a
            small model's step).
        n_fixed: number of fixed-noise samples for the sample grid (default: the data set's ``n_preview``).
        tricks: pluggable :class:`~ganlab.tricks.base.Trick` objects (a trick may wrap G here).
        noise: the prior of z, ``normal`` or ``uniform`` (on [-1, 1]).
        lr_decay: ``none`` or ``linear``: both learning rates fall linearly to 0 at ``max_steps`` (a function of
            ``g_step``, so a resumed run continues the same schedule).
        lr_decay_from: the fraction of ``max_steps`` the linear decay starts at (constant before; 0: from the
            first step).
        max_loss: a loss whose magnitude exceeds this counts as divergence, like a NaN (an exploded run would
            otherwise "complete" with a loss of 1e35).
        steps_per_call: generator steps per ``training_step`` call at most (see the module docstring); 1 in a
            run with a callback that does not declare its ``step_cadence``; ``auto``: see
            :func:`resolve_steps_per_call`.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        objective: Objective,
        data: Any,
        *,
        d_steps: int = 1,
        batch_size: int = 64,
        max_steps: int = 1000,
        optim_g: Mapping[str, Any] | None = None,
        optim_d: Mapping[str, Any] | None = None,
        seed: int = 0,
        log_every: int = 50,
        n_fixed: int | None = None,
        tricks: Sequence[Trick] = (),
        noise: str = "normal",
        lr_decay: str = "none",
        lr_decay_from: float = 0.0,
        max_loss: float = 1e6,
        steps_per_call: int | str = 1,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.prior = Prior(noise)
        self.tricks = list(tricks)
        for trick in self.tricks:
            generator = trick.wrap_generator(generator, self.prior)
        self.G, self.D, self.objective, self.data = generator, discriminator, objective, data
        if objective.feature_layers is not None and hasattr(discriminator, "blocks"):  # fail now, not at a G step
            n_blocks = len(discriminator.blocks)
            objective.feature_layers = normalise_layers(objective.feature_layers, n_blocks, "loss.layers")
        self.schedule = Schedule.alternating(d_steps)
        self.batch_size, self.max_steps = int(batch_size), int(max_steps)
        self.optim_g, self.optim_d = dict(optim_g or {}), dict(optim_d or {})
        self.seed, self.log_every = int(seed), int(log_every)
        self.z_dim = int(generator.z_dim)
        data.setup()
        # The training set moves with the module (to the GPU when there is one); not saved in checkpoints.
        self.register_buffer("real_pool", data.train_x, persistent=False)
        if lr_decay not in ("none", "linear"):
            raise ValueError(f"model.lr_decay must be none or linear (got {lr_decay!r})")
        if not 0.0 <= float(lr_decay_from) < 1.0:
            raise ValueError(f"model.lr_decay_from must be in [0, 1) (got {lr_decay_from!r})")
        self.lr_decay, self.lr_decay_from = lr_decay, float(lr_decay_from)
        fixed = self.prior.sample((n_fixed or data.n_preview, self.z_dim), torch.Generator().manual_seed(self.seed))
        self.register_buffer("fixed_z", fixed)
        self.real_target = 1.0
        for trick in self.tricks:
            if trick.real_target is not None:
                self.real_target = float(trick.real_target)
            trick.setup(self)
        self.g_step = 0  # completed generator updates
        self.d_updates = 0  # completed discriminator updates
        self.last_logged: dict[str, float] = {}
        self.max_loss = float(max_loss)
        if steps_per_call != "auto" and int(steps_per_call) < 1:
            raise ValueError(f"model.steps_per_call must be >= 1 or auto (got {steps_per_call!r})")
        self.steps_per_call: int | str = steps_per_call if steps_per_call == "auto" else int(steps_per_call)
        self._cadences: tuple[int, ...] = ()  # the intervals a call must not run past (set at the start of training)
        self._call_steps = 1  # steps_per_call, or 1 where a callback does not declare its cadence
        self._last_step = self.max_steps  # and the Trainer's own budget, where that is smaller (set at the start)
        # per player: a device flag (any bad loss since the last check) and the latest loss, read only at
        # log/checkpoint boundaries, so the hot loop never syncs with the host for them
        self._bad: dict[str, Tensor] = {}
        self._latest: dict[str, Tensor] = {}
        # decided at the start of training: see backward_is_plain and step_is_plain
        self._direct_backward = self._direct_step = False
        self._pending: dict[str, list[Tensor]] = {}  # detached losses not yet folded into the two above
        self._trainable_params: tuple[nn.Module, nn.Module, list[Tensor], list[Tensor]] | None = None
        self._looks_across: bool | None = None  # feature matching's joint pass: batch_parts needed (cached)
        # this process's place in a DDP run (set in ``setup`` from the Trainer; one process: rank 0 of 1)
        self.rank, self.world_size = 0, 1

    # Plain Python attributes written several times a step: Lightning's ``_current_fx_name`` (twice per hook call,
    # ~20 writes a step) and the step counters. None is ever a parameter, buffer or submodule, so nn.Module's
    # ``__setattr__`` bookkeeping (dict look-ups and isinstance checks: 2.6-4.4 us a write against 0.3-0.6 us)
    # is skipped for them.
    _PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "g_step", "d_updates"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in GANModule._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- helpers ----------------------------------------------------------------------------------------------
    def step_rng(self, step: int) -> torch.Generator:
        """The random stream of generator step ``step`` of this rank, on this module's device."""
        return torch.Generator(device=self.device).manual_seed(_rng_seed(self.seed, step, self.rank))

    def real_batch(self, idx: Tensor) -> Tensor:
        """Gather real examples by index and map them to model space."""
        return self.data.to_model(self.real_pool[idx])

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        *,
        seed: int | None = None,
        z: Tensor | None = None,
        chunk: int = 500,
        gather: bool = False,
    ) -> Tensor:
        """Generate ``n`` samples (model space) from seeded noise, or from ``z``; G in eval mode.

        ``gather`` (a collective in a DDP run: every rank must call it): each rank generates its share of the same
        noise and every rank returns all the samples, with G's buffers (batch-norm statistics) taken from rank 0
        first, so every rank holds what one process with rank 0's state would generate."""
        if z is None:
            g = torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)
            z = self.prior.sample((n, self.z_dim), g)

        def generate(noise: Tensor) -> Tensor:
            with eval_mode(self.G):
                return torch.cat([self.G(part) for part in noise.split(chunk)])

        if gather and self.world_size > 1:
            broadcast_(self.G.buffers())
            return gather_rows(generate, z, self.rank, self.world_size)
        return generate(z)

    def sync_buffers(self) -> None:
        """DDP: every rank takes rank 0's buffers of G and D (batch-norm running statistics), as
        ``DistributedDataParallel(broadcast_buffers=True)`` would; they are used only in eval mode (sampling,
        evaluation), so this runs before those and before each checkpoint (every rank then holds what the checkpoint
        holds, and a resumed run continues exactly). A collective; nothing with one process."""
        if self.world_size > 1:
            broadcast_([*self.G.buffers(), *self.D.buffers()])

    def task_metrics(self) -> dict[str, float]:
        """Metrics of the task itself, computed at every evaluation (the semi-supervised task's test error);
        nothing for the plain generative game."""
        return {}

    def _set_trainable(self, player: Player) -> None:
        # Only the updated player's parameters collect gradients: a G update never pays for D's weight grads.
        # The parameter lists are cached (walking both module trees twice a step, and requires_grad_() on every
        # parameter, cost ~0.1 ms a step: 1-2 % of a digits step) and a flag is written only where it changes.
        cached = self._trainable_params
        if cached is None or cached[0] is not self.D or cached[1] is not self.G:
            cached = (self.D, self.G, list(self.D.parameters()), list(self.G.parameters()))
            self._trainable_params = cached
        for params, on in ((cached[2], player == "D"), (cached[3], player == "G")):
            for p in params:
                if p.requires_grad is not on:
                    p.requires_grad = on

    def _flag_bad_loss(self, player: Player, loss: Tensor) -> None:
        # queued and checked in one stacked operation at the next check (or every 64 updates, which bounds the
        # queue): five small tensor ops per update were ~2 % of a digits step
        queue = self._pending.setdefault(player, [])
        queue.append(loss.detach())
        if len(queue) >= 64:
            self._fold_pending(player)

    def _fold_pending(self, player: Player) -> None:
        values = torch.stack(self._pending.pop(player))  # [n] losses in update order
        bad = ~torch.isfinite(values) | (values.abs() > self.max_loss)
        any_bad = bad.any()
        first_bad = values[bad.int().argmax()]  # argmax gives the first True (index 0 when none)
        value = torch.where(any_bad, first_bad, values[-1])
        if player not in self._bad:
            self._bad[player], self._latest[player] = any_bad, value
        else:  # keep the first bad value since the last check: a device-side select, no host sync
            self._latest[player] = torch.where(self._bad[player], self._latest[player], value)
            self._bad[player] = self._bad[player] | any_bad

    def assert_finite(self) -> None:
        """Raise :class:`~ganlab.errors.Diverged` if any loss since the last check was NaN/inf or beyond
        ``max_loss`` (one host sync; called before logging and saving, so a checkpoint never holds weights updated
        from such a loss). In a DDP run the flags of every rank are combined (a collective): all ranks stop
        together, whichever rank saw the bad loss."""
        for player in list(self._pending):
            self._fold_pending(player)
        if self.world_size > 1:
            names: list[Player] = ["D", "G"]
            no = torch.zeros((), dtype=torch.bool, device=self.device)
            flags_t = torch.stack([self._bad.get(n, no) for n in names]).int()
            torch.distributed.all_reduce(flags_t, op=torch.distributed.ReduceOp.MAX)
            flags = flags_t.tolist()
        elif not self._bad:
            return
        else:
            names = list(self._bad)
            flags = torch.stack([self._bad[n] for n in names]).tolist()
        bad = [n for n, f in zip(names, flags, strict=True) if f]
        if bad:
            player = bad[0]
            here = player in self._bad and bool(self._bad[player])  # False: another rank's loss (DDP)
            value = f" = {float(self._latest[player]):.4g}" if here else " on another rank"
            raise Diverged(
                f"loss/{player.lower()}{value} by generator step {self.g_step} "
                f"(non-finite or beyond max_loss={self.max_loss:g})",
                self.g_step,
            )
        self._bad.clear()
        self._latest.clear()

    @staticmethod
    def _grad_norm(net: nn.Module) -> Tensor:
        grads = [p.grad.detach().flatten() for p in net.parameters() if p.grad is not None]
        return torch.cat(grads).norm() if grads else torch.zeros((), device=next(net.parameters()).device)

    def _penalties(self, player: Player, net: nn.Module) -> Tensor | None:
        terms = [t for t in (trick.penalty(player, net) for trick in self.tricks) if t is not None]
        return torch.stack(terms).sum() if terms else None

    # -- the schedule -----------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        for _ in range(self.steps_this_call()):
            self.generator_step(opt_g, opt_d)

    def steps_this_call(self) -> int:
        """How many generator steps the next ``training_step`` call runs: ``steps_per_call``, cut short at the next
        multiple of each callback cadence and at the budget (so every callback sees each step it acts on, and a
        Trainer with a budget of its own stops where it would with one step a call)."""
        n = min(self._call_steps, self._last_step - self.g_step)
        for every in self._cadences:
            n = min(n, every - self.g_step % every)
        return max(n, 1)

    def generator_step(self, opt_g: Any, opt_d: Any) -> None:
        """One generator step: the schedule's updates on this step's own real batches and noise."""
        updates = self.schedule.updates
        m = self.batch_size
        log_now = is_due(self.g_step + 1, self.log_every, self.max_steps)
        rng = self.step_rng(self.g_step)
        # one fresh real batch and one fresh noise batch per update slot (a G update uses its real batch only for
        # feature statistics)
        idx = torch.randint(len(self.real_pool), (len(updates), m), generator=rng, device=self.device)
        z = self.prior.sample((len(updates), m, self.z_dim), rng)
        logs: dict[str, Tensor] = {}
        player = None
        for update in updates:
            if update.player != player:
                player = update.player
                self._set_trainable(player)
            if player == "D":
                logs.update(self._d_update(opt_d, self.real_batch(idx[update.slot]), z[update.slot], log_now))
            else:
                logs.update(self._g_update(opt_g, idx[update.slot], z[update.slot], log_now))
        self.g_step += 1
        if self.lr_decay == "linear":
            self._set_lr(self.lr_factor(), (opt_g, opt_d))
        if log_now:
            logs["lr/g"] = torch.tensor(opt_g.param_groups[0]["lr"], device=self.device)  # stacked with the rest
            self._log(logs)

    def lr_factor(self) -> float:
        """The learning rates' multiplier after ``g_step`` updates: 1 until ``lr_decay_from * max_steps``, then
        linear to 0 at ``max_steps`` (``lr_decay=linear``)."""
        start = self.lr_decay_from * self.max_steps
        if self.g_step <= start:
            return 1.0
        return max(0.0, (self.max_steps - self.g_step) / (self.max_steps - start))

    def _set_lr(self, factor: float, optimizers: Sequence[Any] | None = None) -> None:
        """Both learning rates at ``factor`` times the configured ones (``optimizers``: G's and D's, when the
        caller already holds them)."""
        for opt, cfg in zip(optimizers or self.optimizers(), (self.optim_g, self.optim_d), strict=True):
            for group in opt.param_groups:
                group["lr"] = self._base_lr(cfg) * factor

    def gan_logit(self, d_out: Tensor) -> Tensor:
        """D's real/fake logit from its output (the semi-supervised D overrides this: logsumexp of K logits)."""
        return d_out

    def _backward(self, loss: Tensor) -> None:
        """Every update's backward: ``loss.backward()`` where Lightning's would do nothing more (see
        :func:`backward_is_plain`), else ``manual_backward``."""
        if self._direct_backward:
            loss.backward()
        else:
            self.manual_backward(loss)

    def _step(self, opt: Any) -> None:
        """Every update's optimizer step: the bare step between Lightning's own step counters where its
        ``LightningOptimizer.step`` would do nothing more (see :func:`step_is_plain`), else that."""
        if self._direct_step:
            opt._on_before_step()
            opt.optimizer.step()
            opt._on_after_step()
        else:
            opt.step()

    def _apply_update(self, player: Player, opt: Any, loss: Tensor, logs: dict[str, Tensor], log_now: bool) -> None:
        """What every update shares: the objective's value as ``loss/d`` or ``loss/g``, trick penalties (logged
        apart as ``penalty/d``, ``penalty/g``), backward, the deferred finiteness flag, the gradient norm (log
        steps only), the optimizer step and the trick hooks."""
        net = self.D if player == "D" else self.G
        name = player.lower()
        logs[f"loss/{name}"] = loss.detach()
        penalty = self._penalties(player, net)
        if penalty is not None:
            loss = loss + penalty
            logs[f"penalty/{name}"] = penalty.detach()
        opt.zero_grad(set_to_none=True)
        self._backward(loss)
        if self.world_size > 1:
            # DDP by hand: the updated player's gradients, averaged over the ranks in one flat all-reduce (the
            # frozen player has none to send; see ganlab.ddp for why the module is not wrapped in DDP)
            params = self._trainable_params[2 if player == "D" else 3]  # cached by _set_trainable
            all_reduce_mean_([p.grad for p in params if p.grad is not None], self.world_size)
        self._flag_bad_loss(player, loss)
        if log_now:
            logs[f"grad_norm/{name}"] = self._grad_norm(net)
        self._step(opt)
        if player == "D":
            self.d_updates += 1
        for trick in self.tricks:
            trick.after_update(player, net)

    def _d_update(self, opt: Any, real: Tensor, z: Tensor, log_now: bool) -> dict[str, Tensor]:
        with torch.no_grad():
            fake = self.G(z)
        real_logit = self.gan_logit(self.D(real)[0])
        with frozen_norm_stats(self.D):  # D's batch-norm running statistics come from real batches only
            fake_logit = self.gan_logit(self.D(fake)[0])
        loss, logs = self.objective.discriminator(real_logit, fake_logit, real_target=self.real_target)
        if log_now:
            logs["D(x)"] = torch.sigmoid(real_logit.detach()).mean()
        self._apply_update("D", opt, loss, logs, log_now)
        return logs

    def _g_update(self, opt: Any, real_idx: Tensor, z: Tensor, log_now: bool) -> dict[str, Tensor]:
        fake = self.G(z)
        layers = self.objective.feature_layers
        kwargs: dict[str, Any] = {}
        with frozen_norm_stats(self.D):  # G's passes never shape D's batch-norm running statistics
            if layers is None:
                d_out, _ = self.D(fake)
            else:
                d_out, real_feats, fake_feats = self._joint_features(self.real_batch(real_idx), fake)
                kwargs = {"fake_feats": [fake_feats[i] for i in layers], "real_feats": [real_feats[i] for i in layers]}
        fake_logit = self.gan_logit(d_out)
        loss, logs = self.objective.generator(fake_logit, g_step=self.g_step, **kwargs)
        if log_now:
            logs["D(G(z))"] = torch.sigmoid(fake_logit.detach()).mean()
        self._apply_update("G", opt, loss, logs, log_now)
        return logs

    def _joint_features(self, real: Tensor, fake: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Feature matching's view of D: ONE pass over ``[real; fake]``, split after. ``(fake's D output, real
        features, fake features)``.

        With batch norm in D, separate passes would normalise real and fake each by its own batch statistics and
        hide a shift of location or scale: a fake cloud 20 units from ring8 costs 0.076 that way against 99.7
        with no batch norm. One joint pass normalises both with the same statistics (138); D's norm in eval mode
        (running statistics of real data) would also see it, but amplified (2,340: ring8's small spread divides
        the distance) and with 15x the noise floor between two real batches, and it depends on running averages
        D never trained through. Without batch norm the joint pass gives the same features and fake logits as two
        passes: a layer that looks across the batch (minibatch discrimination) compares real with real and fake
        with fake only (:func:`batch_parts`), as the paper computes it per batch."""
        m = len(real)
        if self._looks_across is None:  # once: whether D has a layer that looks across the batch
            self._looks_across = any(hasattr(layer, "parts") for layer in self.D.modules())
        with batch_parts(self.D, (m, len(fake))) if self._looks_across else nullcontext():
            d_out, feats = self.D(torch.cat([real, fake]))
        return d_out[m:], [f[:m] for f in feats], [f[m:] for f in feats]

    def _log(self, logs: Mapping[str, Tensor]) -> None:
        self.assert_finite()
        names = list(logs)
        stacked = torch.stack([logs[n].float() for n in names])
        if self.world_size > 1:  # the mean over the ranks: the losses of the global batch, the same on every rank
            stacked = stacked.to(self.device)
            all_reduce_mean_([stacked], self.world_size)
        values = stacked.tolist()  # one host sync per log interval
        metrics = dict(zip(names, values, strict=True))
        metrics["step/g"], metrics["step/d"] = self.g_step, self.d_updates
        self.last_logged.update(metrics)
        log_to_all(self.trainer.loggers, metrics, self.g_step)

    # -- Lightning plumbing -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.rank, self.world_size = int(self.trainer.global_rank), int(self.trainer.world_size)

    def train_dataloader(self) -> Any:
        return self.data.train_dataloader()  # one tick per generator step; real batches are sampled above

    @staticmethod
    def _base_lr(cfg: Mapping[str, Any]) -> float:
        """A player's configured learning rate (the start of the decay schedule)."""
        return float(cfg.get("lr", 2e-4))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        def adam(params: Any, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=self._base_lr(cfg), betas=tuple(cfg.get("betas", (0.5, 0.999))))

        return [adam(self.G.parameters(), self.optim_g), adam(self.D.parameters(), self.optim_d)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ganlab"] = {
            "g_step": self.g_step,
            "d_updates": self.d_updates,
            "torch_rng": torch.get_rng_state(),
            "threads": torch.get_num_threads(),  # model.threads=auto resumes with it (reductions depend on it)
            "tricks": [trick.state_dict() for trick in self.tricks],
        }

    def _on_before_batch_transfer(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's per-step batch transfer (three hook dispatches and a walk of the batch: ~0.7 % of a ring8
        step in a py-spy profile) is skipped, here and in :meth:`_apply_batch_transfer_handler`: the batch is a
        host integer tick the module never reads; its real batches are drawn on its device from ``real_pool``.
        (Should Lightning rename these methods, the transfer simply runs again; ``test_module`` notices.)"""
        return batch

    _apply_batch_transfer_handler = _on_before_batch_transfer

    def on_train_start(self) -> None:  # after the callbacks' on_train_start, which may set their cadences
        self._direct_backward = backward_is_plain(self.trainer, self)
        self._direct_step = step_is_plain(self.trainer, self)
        cadences = step_cadences(self.trainer.callbacks)
        self._cadences = cadences or ()
        self._call_steps = resolve_steps_per_call(self.steps_per_call, self.device) if cadences is not None else 1
        budget = self.trainer.max_steps  # in optimizer steps; -1: none
        self._last_step = self.max_steps if budget < 0 else min(self.max_steps, budget // self.schedule.optimizer_steps)
        if self.lr_decay == "linear":  # also after a resume: the optimizer state holds the saved lr anyway
            self._set_lr(self.lr_factor())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["ganlab"]
        self.g_step, self.d_updates = int(state["g_step"]), int(state["d_updates"])
        torch.set_rng_state(state["torch_rng"])
        for trick, trick_state in zip(self.tricks, state["tricks"], strict=True):
            trick.load_state_dict(trick_state)


AUTO_STEPS_PER_CALL = 10  # steps a call for steps_per_call=auto on an accelerator


def resolve_steps_per_call(setting: int | str, device: torch.device) -> int:
    """``model.steps_per_call``: a number as it is; ``auto`` (the conv nets' default) gives
    :data:`AUTO_STEPS_PER_CALL` on a GPU and 1 on the CPU. On an H200 a digits DCGAN step takes ~7 ms, and
    Lightning's fixed cost a call is several per cent of it (paired against the plain loop: 0.974 with 10 steps a
    call, 0.927 and 0.954 with 1). On the CPU a conv step takes 20 ms to seconds, so the call's cost does not show,
    while each step more a call is a step more before a SIGTERM stops the run (up to ~20 s at 10 steps of 32x32)."""
    if setting == "auto":
        return AUTO_STEPS_PER_CALL if torch.device(device).type != "cpu" else 1
    return int(setting)


def step_cadences(callbacks: Sequence[pl.Callback]) -> tuple[int, ...] | None:
    """The generator-step intervals at which ``callbacks`` act, from each one's ``step_cadence`` (a tuple of
    intervals; empty: it may act after any call, as a signal handler does); None when one of them does not declare
    it (a callback written for one Lightning batch per generator step), and then each call runs one step. In a DDP
    run they must be the same on every rank: a callback's collectives (the preemption flags, the checkpoint) then
    meet at the same calls."""
    out: set[int] = set()
    for cb in callbacks:
        cadence = getattr(cb, "step_cadence", None)
        if cadence is None:
            return None
        out.update(int(every) for every in cadence if every)
    return tuple(sorted(out))


def _hooked(trainer: pl.Trainer, module: pl.LightningModule, hook: str) -> bool:
    """Whether the module or one of the run's callbacks implements the Lightning hook ``hook``."""
    from pytorch_lightning.utilities.model_helpers import is_overridden

    if is_overridden(hook, module, parent=pl.LightningModule):
        return True
    return any(is_overridden(hook, cb, parent=pl.Callback) for cb in trainer.callbacks)


def backward_is_plain(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether Lightning's ``manual_backward`` would do nothing but ``loss.backward()`` in this run: a precision
    plugin that neither scales the loss (fp16's GradScaler) nor changes the backward, a model not wrapped in
    ``DistributedDataParallel`` (ganlab's DDP strategy never wraps it) and no callback or module hook on the
    backward. Then the training step calls ``loss.backward()`` itself: the wrapper's two hook dispatches cost
    ~0.1 ms per update on this CPU, ~4 % of a ring8 step."""
    from pytorch_lightning.plugins.precision import MixedPrecision, Precision
    from torch.nn.parallel import DistributedDataParallel

    plugin, kind = trainer.precision_plugin, type(trainer.precision_plugin)
    return (
        getattr(plugin, "scaler", None) is None
        and kind.backward is Precision.backward
        and kind.pre_backward in (Precision.pre_backward, MixedPrecision.pre_backward)
        and kind.post_backward is Precision.post_backward
        and not isinstance(trainer.strategy.model, DistributedDataParallel)
        and type(module).backward is pl.LightningModule.backward
        and not any(_hooked(trainer, module, hook) for hook in ("on_before_backward", "on_after_backward"))
    )


def step_is_plain(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether a LightningOptimizer's ``step()`` would do nothing but the optimizer's ``step()`` between its two
    progress counters in this run: no loss scaler, no strategy or precision plugin that changes the step (DDP's
    model averaging), no ``on_before_optimizer_step`` hook, no gradient clipping. Then the training step calls
    the counters and the bare step itself: Lightning's closure, its hook dispatch and three wrappers cost
    ~0.3 ms per update on this CPU, ~3 % of a ring8 step. The counters (``_on_before_step``/``_on_after_step``,
    which the manual-optimisation loop installs and ``trainer.global_step`` counts) must be there."""
    from pytorch_lightning.plugins.precision import MixedPrecision, Precision
    from pytorch_lightning.strategies import DDPStrategy, Strategy

    plugin, strategy = trainer.precision_plugin, trainer.strategy
    return (
        getattr(plugin, "scaler", None) is None
        and type(plugin).optimizer_step in (Precision.optimizer_step, MixedPrecision.optimizer_step)
        and type(strategy).optimizer_step in (Strategy.optimizer_step, DDPStrategy.optimizer_step)
        and getattr(strategy, "_model_averager", None) is None
        and not trainer.gradient_clip_val
        and not _hooked(trainer, module, "on_before_optimizer_step")
        and all(
            callable(getattr(opt, "_on_before_step", None)) and callable(getattr(opt, "_on_after_step", None))
            for opt in module.optimizers(use_pl_optimizer=True)
        )
    )


# Lightning asks for training_step's signature at every step (does it take batch_idx?). inspect returns a function's
# __signature__ as it is instead of building it again (36 -> 9 us a call; PEP 362).
GANModule.training_step.__signature__ = inspect.signature(GANModule.training_step)  # type: ignore[attr-defined]
