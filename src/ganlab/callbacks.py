"""Callbacks that act every N *generator* steps: sample grids, checkpoints, a quiet progress report.

Evaluation is :class:`ganlab.metrics.callback.Evaluation` (the ``metrics`` config group).

In a DDP run every rank runs every callback at the same generator steps (their collectives meet), and rank 0 alone
writes files, logs and prints.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ganlab.checkpoint import all_finite
from ganlab.errors import Diverged, Interrupted
from ganlab.tasks.gan import GANModule
from ganlab.threads import Governor
from ganlab.util import chunked, eval_mode, is_due, log_to_all


def _due(module: GANModule, every: int) -> bool:
    """Whether the generator step just completed is due for an action taken every ``every`` steps."""
    return is_due(module.g_step, every, module.max_steps)


_SCATTER_MARGINS = {"left": 0.14, "right": 0.97, "bottom": 0.08, "top": 0.93}
_DENSITY_MARGINS = {"left": 0.08, "right": 0.97, "bottom": 0.09, "top": 0.92}


def save_preview(module: GANModule, samples: torch.Tensor, path: Path) -> None:
    """Write the preview the data set declares (``data.evaluation.preview``) to ``path``: an image grid
    (``grid``), a scatter plot over the real data (``scatter``, 2-D points) or Goodfellow et al.'s Figure 1
    (``density``, 1-D: p_data, p_g and D(x)). One preview; :class:`Previews` draws a run's series."""
    Previews(module).save(samples, path)


class Previews:
    """A run's previews of ``module``'s samples (:func:`save_preview`, one at a time).

    The scatter preview is drawn in full once: its axes, ticks, real points and frame never change within a run,
    so they are kept as a rendered background, and each preview restores it, draws G's points, the legend and the
    title over it and writes the pixels (on ring8 ~25 ms a preview, against ~60 ms for a full redraw of a kept
    figure and ~100-180 ms for a fresh one: most of that is tick and text layout). G's points lie above the frame
    (zorder 2.6), so drawing them last gives exactly the pixels of a full draw (tested)."""

    def __init__(self, module: GANModule) -> None:
        self.module = module
        self._scatter: _ScatterCanvas | None = None

    def save(self, samples: torch.Tensor, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        preview = self.module.data.evaluation.preview
        if preview == "grid":
            _save_image_grid(self.module, samples, path)
        elif preview == "scatter":
            if self._scatter is None or self._scatter.n != len(samples):
                self._scatter = _ScatterCanvas(self.module.real_pool[: len(samples) * 2].float().cpu())
            self._scatter.save(samples.float().cpu(), f"generator step {self.module.g_step}", path)
        else:
            fig, ax = _figure(6, 3.5)
            _figure1(self.module, samples, ax)
            ax.set_title(f"generator step {self.module.g_step}")
            ax.legend(loc="upper right", fontsize=7)
            fig.subplots_adjust(**_DENSITY_MARGINS)
            fig.savefig(path)


class _ScatterCanvas:
    """G's points over the real ones (``real``: ``2n`` points), rendered onto a kept background."""

    def __init__(self, real: torch.Tensor) -> None:
        self.n = len(real) // 2
        self.fig, self.ax = _figure(4.5, 4)
        ax = self.ax
        ax.scatter(real[:, 0], real[:, 1], s=2, c="0.7", label="real")
        self.fake = ax.scatter(real[:0, 0], real[:0, 1], s=2, c="tab:red", label="G(z)", zorder=2.6)
        lim = float(real.abs().max()) * 1.3
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        self.legend = ax.legend(loc="upper right", fontsize=7)
        # fixed margins that fit the tick labels and title: tight_layout would draw the figure once more
        self.fig.subplots_adjust(**_SCATTER_MARGINS)
        # the background: everything but what each preview draws over it (G's points, the legend, the title)
        self.fake.set_visible(False)
        self.legend.set_visible(False)
        self.fig.canvas.draw()
        self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)
        self.fake.set_visible(True)
        self.legend.set_visible(True)

    def save(self, fake: torch.Tensor, title: str, path: Path) -> None:
        from PIL import Image

        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        self.fake.set_offsets(fake.numpy())
        self.ax.title.set_text(title)
        for artist in (self.fake, self.legend, self.ax.title):  # the order of a full draw (zorder 2.6, 5, title)
            self.ax.draw_artist(artist)
        width, height = canvas.get_width_height()
        Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(
            path, dpi=(self.fig.dpi, self.fig.dpi)
        )


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A figure on its own Agg canvas, outside pyplot's registry (nothing to close, nothing kept by pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save_image_grid(module: GANModule, samples: torch.Tensor, path: Path) -> None:
    import torchvision

    img = module.data.to_uint8(samples).float() / 255.0
    # small images (8x8 digits) are upscaled with nearest neighbours so a grid is readable
    scale = max(1, 64 // img.shape[-1])
    if scale > 1:
        img = torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest")
    torchvision.utils.save_image(img, path, nrow=int(len(img) ** 0.5), padding=2, pad_value=1.0)


@torch.no_grad()
def _figure1(module: GANModule, samples: torch.Tensor, ax: Any) -> None:
    """Goodfellow et al. 2014, Figure 1: p_data (black, dotted), p_g (green) and D(x) (blue, dashed).

    The axes fit what they draw: x covers p_data's +-4 std and all but the outer 0.1 % of the samples; y runs to
    the highest of the histogram, the pdf and D(x)'s range [0, 1]. D runs in eval mode in chunks of the training
    batch size (its view of a point must not depend on the 400 grid points around it)."""
    data = module.data
    lo, hi = data.mean - 4 * data.std, data.mean + 4 * data.std
    fake = samples.float().cpu().squeeze(1)
    lo, hi = min(lo, float(fake.quantile(0.001))), max(hi, float(fake.quantile(0.999)))
    grid = torch.linspace(lo, hi, 400)
    pdf = torch.exp(-0.5 * ((grid - data.mean) / data.std) ** 2) / (data.std * (2 * torch.pi) ** 0.5)
    with eval_mode(module.D):
        logits = chunked(lambda x: module.gan_logit(module.D(x)[0]), grid[:, None].to(module.device), module.batch_size)
    d_of_x = torch.sigmoid(logits).cpu()
    ax.plot(grid, pdf, "k:", lw=2, label="p_data")
    heights, _, _ = ax.hist(
        fake.numpy(), bins=80, range=(lo, hi), density=True, color="tab:green", alpha=0.5, label="p_g"
    )
    ax.plot(grid, d_of_x, "b--", lw=2, label="D(x)")
    ax.axhline(0.5, color="0.6", lw=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.05 * max(1.0, float(heights.max()), float(pdf.max())))


def save_gif(frames: list[Path], path: Path, ms_per_frame: int = 150) -> None:
    """Assemble PNG frames into an animated GIF (the last frame held longer)."""
    from PIL import Image

    images = [Image.open(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    durations = [ms_per_frame] * (len(images) - 1) + [1500]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


class SampleGrid(pl.Callback):
    """Every ``every`` generator steps: samples from the fixed noise, saved as ``samples/step_XXXXXXX.png`` and
    logged to W&B as ``samples``.

    Data sets with a ``frames`` attribute (the 1-D demo) get at least that many frames per run and, at the end,
    ``samples/demo.gif``, also logged to W&B; those with a ``frame_metrics(samples)`` method (the 1-D demo's
    Kolmogorov-Smirnov distance to p_data, ``ks5k``) have it logged at every frame, at the generator step.
    """

    def __init__(self, run_dir: Path, every: int) -> None:
        self.dir, self.every = Path(run_dir) / "samples", every
        self._previews: Previews | None = None

    @property
    def step_cadence(self) -> tuple[int, ...]:
        """Acts every ``every`` generator steps: a ``training_step`` call never runs past one of them
        (``GANModule.steps_this_call``)."""
        return (self.every,)

    def on_train_start(self, trainer: pl.Trainer, module: GANModule) -> None:
        frames = getattr(module.data, "frames", None)
        if frames:
            self.every = max(1, min(self.every, module.max_steps // frames))

    def _log(self, trainer: pl.Trainer, key: str, path: Path, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key, [str(path)], step=step)

    def on_train_batch_end(self, trainer: pl.Trainer, module: GANModule, *args: Any) -> None:
        if not _due(module, self.every):
            return
        samples = module.sample(z=module.fixed_z, gather=True)  # DDP: each rank its share, all on every rank
        if trainer.is_global_zero:
            path = self.dir / f"step_{module.g_step:07d}.png"
            if self._previews is None or self._previews.module is not module:
                self._previews = Previews(module)
            self._previews.save(samples, path)
            self._log(trainer, "samples", path, module.g_step)
        frame_metrics = getattr(module.data, "frame_metrics", None)  # the 1-D demo: p_g's distance to p_data
        if frame_metrics is not None:  # on every rank (the same samples): every rank holds the same values
            values = frame_metrics(samples)
            module.last_logged.update(values)
            log_to_all(trainer.loggers, values, module.g_step)

    def on_train_end(self, trainer: pl.Trainer, module: GANModule) -> None:
        if getattr(module.data, "frames", None) and trainer.is_global_zero:
            frames = sorted(self.dir.glob("step_*.png"))
            if frames:
                gif = self.dir / "demo.gif"
                save_gif(frames, gif)
                self._log(trainer, "demo", gif, module.g_step)


class ThreadGovernor(pl.Callback):
    """The record of a run's thread count, and with ``watch`` (``model.threads=auto``, see
    :func:`ganlab.threads.governed`) on a one-process CPU run its governor: after each ``training_step`` call the
    :class:`~ganlab.threads.Governor` may look at the cores again (every ``WINDOW_S`` seconds) and change torch's
    thread count. Every change is kept as ``[generator step, count]`` in ``changes``, which travels in the
    checkpoint and ends in ``summary.json`` (``thread_changes``). Every run has one, watched or not, so a resume
    keeps the earlier changes whatever its own setting, and a resume on another count than the checkpoint's
    (a fixed ``model.threads``, an ``OMP_NUM_THREADS``) is itself recorded as a change at its first step.

    It comes first among the callbacks, so an evaluation or a preview at the same step runs on the new count."""

    step_cadence = ()  # any call's end will do

    def __init__(self, watch: bool = False) -> None:
        self.watch = watch
        self.governor: Governor | None = None
        self.changes: list[list[int]] = []
        self._saved: int | None = None  # a resumed run's count at its checkpoint

    def on_load_checkpoint(self, trainer: pl.Trainer, module: GANModule, checkpoint: dict[str, Any]) -> None:
        self._saved = checkpoint.get("ganlab", {}).get("threads")

    def on_train_start(self, trainer: pl.Trainer, module: GANModule) -> None:
        count = torch.get_num_threads()
        if self._saved is not None and self._saved != count:
            self.changes.append([module.g_step, count])
        # DDP ranks split the node's cores between them (OMP_NUM_THREADS per rank); a GPU run's threads only feed it
        if self.watch and trainer.world_size == 1 and module.device.type == "cpu":
            self.governor = Governor(count)

    def on_train_batch_end(self, trainer: pl.Trainer, module: GANModule, *args: Any) -> None:
        if self.governor is None:
            return
        count = self.governor.poll()
        if count is not None:
            torch.set_num_threads(count)
            self.changes.append([module.g_step, count])

    def state_dict(self) -> dict[str, Any]:
        return {"changes": [list(change) for change in self.changes]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.changes = [list(change) for change in state_dict.get("changes", [])]


class PeriodicCheckpoint(pl.Callback):
    """``checkpoints/last.ckpt`` every ``every`` generator steps and at the end, with the run's fingerprint (the
    settings a resume must share, :func:`ganlab.checkpoint.fingerprint`).

    It never saves a broken state: a non-finite loss since the last check (``assert_finite``) or a non-finite
    parameter or optimizer state raises :class:`~ganlab.errors.Diverged` instead, so ``last.ckpt`` is always the
    last good state. The write is atomic (a kill while saving leaves the previous ``last.ckpt``), and a failed
    write leaves no temporary file. DDP: every rank takes part (the checks and Lightning's save are collectives,
    and every rank first takes rank 0's buffers, so each holds what the file holds); rank 0 writes.
    """

    def __init__(self, run_dir: Path, every: int, fingerprint: dict[str, Any] | None = None) -> None:
        self.path, self.every, self.fingerprint = Path(run_dir) / "checkpoints" / "last.ckpt", every, fingerprint
        self.saved_step: int | None = None  # the generator step of the newest last.ckpt written by this run

    @property
    def step_cadence(self) -> tuple[int, ...]:
        return (self.every,)

    def save(self, trainer: pl.Trainer, module: GANModule) -> None:
        module.assert_finite()
        module.sync_buffers()
        if not all_finite([module.G, module.D], list(trainer.optimizers)):
            raise Diverged(
                f"diverged at generator step {module.g_step}: non-finite weights or optimizer state "
                "(not saved; last.ckpt is the last good state)",
                module.g_step,
            )
        tmp = self.path.with_suffix(".tmp")
        writer = trainer.is_global_zero
        try:
            trainer.save_checkpoint(tmp)  # every rank dumps its state, rank 0 writes, then a barrier
            if writer:
                tmp.replace(self.path)  # atomic: a kill during saving leaves the previous last.ckpt intact
        finally:
            if writer:
                tmp.unlink(missing_ok=True)
        self.saved_step = module.g_step

    def on_save_checkpoint(self, trainer: pl.Trainer, module: GANModule, checkpoint: dict[str, Any]) -> None:
        if self.fingerprint is not None:
            checkpoint["ganlab_fingerprint"] = self.fingerprint

    def on_train_batch_end(self, trainer: pl.Trainer, module: GANModule, *args: Any) -> None:
        if _due(module, self.every):
            self.save(trainer, module)


class Preemption(pl.Callback):
    """SIGTERM and SIGUSR2 (what SLURM sends before a time limit or a preemption) stop the run *between*
    generator steps: at the end of the ``training_step`` call they arrived in (one step, or up to
    ``model.steps_per_call`` short ones: ~0.1 s of a 2-D MLP run) the checkpoint of that step is written, then
    :class:`~ganlab.errors.Interrupted` ends the run (exit code 3, ``status: interrupted``). A signal in the run's
    last step stops nothing: that step's evaluation and checkpoint are done, so the run ends ``completed``.

    The handlers installed before ours (submitit's requeue on USR2) are kept in ``previous``; the pipeline calls
    them once the run's record is written. Lightning's own SIGTERM handler is replaced at train start: it would
    raise mid-loop, before the step's checkpoint.

    DDP: a signal may reach one rank only (``kill`` of rank 0) or the ranks at different steps (SLURM), but they
    must stop at the same step. Each rank's flag is combined with the others' by an all-reduce on the CPU (a gloo
    group: no device sync) that is started after each step and read after the next one, so the loop never waits
    for it and every rank stops one call after the first rank saw the signal (every rank runs the same steps
    in each call).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
    step_cadence = ()  # any call's end will do: a signal stops the run after the call it arrived in

    def __init__(self, checkpoint: PeriodicCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self._group: Any = None  # DDP: the gloo process group of the flags
        self._flag: torch.Tensor | None = None
        self._work: Any = None  # the all-reduce started after the previous step

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def install(self) -> None:
        """Catch the signals (first call: remember the handlers that were there)."""
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if sig not in self.previous:
                self.previous[sig] = current
            signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _agreed(self, trainer: pl.Trainer, *, now: bool) -> int | None:
        """The signal that stops the run here, the same on every rank (one process: this process's own)."""
        if trainer.world_size == 1:
            return self.signum
        import torch.distributed as dist

        agreed = 0
        if self._work is not None:
            self._work.wait()
            agreed, self._work = int(self._flag[0]), None
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        if now:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            agreed = max(agreed, int(flag[0]))
        elif not agreed:
            self._flag, self._work = flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed or None

    def _stop_if_asked(self, trainer: pl.Trainer, module: GANModule, *, now: bool = False) -> None:
        signum = self._agreed(trainer, now=now)
        if signum is None or module.g_step >= module.max_steps:
            return  # the last step is done (evaluated and saved): the run completes instead of stopping
        if self.checkpoint.saved_step != module.g_step:
            self.checkpoint.save(trainer, module)
        name = signal.Signals(signum).name
        raise Interrupted(f"{name} at generator step {module.g_step}", signum, module.g_step)

    def on_train_start(self, trainer: pl.Trainer, module: GANModule) -> None:
        self.install()
        if trainer.world_size > 1 and self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # every rank creates it here, in the same order
        self._stop_if_asked(
            trainer, module, now=True
        )  # a signal during start-up: stop at the step training starts from

    def on_train_batch_end(self, trainer: pl.Trainer, module: GANModule, *args: Any) -> None:
        self._stop_if_asked(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: GANModule) -> None:
        if self._work is not None:  # the last step's flags: nothing left to stop
            self._work.wait()
            self._work = None


class StepProgress(pl.Callback):
    """Progress in generator steps: a tqdm bar on a terminal, otherwise about 20 plain lines per run (a
    redrawn bar would write megabytes into a CI or SLURM log)."""

    def __init__(self, lines: int = 20) -> None:
        self.lines = lines
        self.bar = None
        self.print_every = 0  # a plain line every this many steps (set at the start of training)
        self.postfix_every = 0  # the bar's loss fields: at each log step

    @property
    def step_cadence(self) -> tuple[int, ...]:
        # both, whether this process draws a bar or not: every rank of a DDP run must cut its calls alike
        return (self.print_every, self.postfix_every)

    def on_train_start(self, trainer: pl.Trainer, module: GANModule) -> None:
        self.t0, self.step0 = time.perf_counter(), module.g_step
        self.print_every, self.postfix_every = max(1, module.max_steps // self.lines), module.log_every
        if sys.stdout.isatty() and trainer.is_global_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=module.max_steps, initial=module.g_step, unit="G step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer: pl.Trainer, module: GANModule, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        if self.bar is not None:
            self.bar.update(module.g_step - self.bar.n)  # the steps of this training_step call
            if _due(module, self.postfix_every):
                self.bar.set_postfix(self._fields(module), refresh=False)
        elif _due(module, self.print_every):
            rate = (module.g_step - self.step0) / max(time.perf_counter() - self.t0, 1e-9)
            fields = "".join(f"{k} {v} " for k, v in self._fields(module).items())  # none before the first log
            print(f"[G step {module.g_step}/{module.max_steps}] {fields}| {rate:.1f} G steps/s", flush=True)

    @staticmethod
    def _fields(module: GANModule) -> dict[str, str]:
        keys = ("loss/d", "loss/g", "D(x)", "D(G(z))")
        return {k: f"{module.last_logged[k]:.3f}" for k in keys if k in module.last_logged}

    def on_train_end(self, trainer: pl.Trainer, module: GANModule) -> None:
        if self.bar is not None:
            self.bar.close()
