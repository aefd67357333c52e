r"""FLOP accounting of one training iteration of any recipe, against the machine's measured peak.

``n2ce-distill bench train_step RECIPE [key=value ...] [--quick] [--out DIR]`` builds the recipe's trainer (in a
scratch folder), warms it up, then, in fp32 and in bf16 autocast:

* counts the FLOPs of one iteration with :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and
  convolutions, forward and backward; elementwise work is not counted), split into phases: each stretch that
  ends with an ``update(term, ...)`` call is phase ``term`` (its forward passes, backward and optimiser step),
  and a stretch a method marks with :meth:`~n2ce_distill.methods.Method.phase` (DxMI's ``trajectory``) is its own;
* times the same phases over repeated iterations (the device synchronised at each boundary), median per phase;
* times a large square matmul in the same dtype in the same process: the peak the achieved FLOP/s are a
  fraction of;
* does the same for sampling a batch from the EMA network (what the exported pipeline runs).

Teachers that live on the hub are replaced by a randomly initialised model of the same architecture where one is
known (:data:`STANDINS`), and image data that is not on disk by random images of the recipe's size, so a run costs
what the recipe costs per iteration, offline. ``--quick`` uses batch 8 and fewer repetitions.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import RecipeConfig, load_recipe, read_recipe
from ..errors import InputError
from ..reporting import markdown_table

__all__ = ["STANDINS", "peak_flops", "PhaseClock", "run"]


def _ddpm_cifar10(path: Path) -> Path:
    """google/ddpm-cifar10-32's UNet and scheduler configuration (35.7M parameters), random weights."""
    from diffusers import DDPMScheduler, UNet2DModel

    from ..denoisers import VPDenoiser

    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6, downsample_padding=0,
    )
    VPDenoiser(unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)).save_pretrained(path)
    return path


STANDINS: dict[str, Callable[[Path], Path]] = {"google/ddpm-cifar10-32": _ddpm_cifar10}  # hub id -> writer


def _random_images(path: Path, size: int, count: int = 256) -> Path:
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:04d}.png")
    return path


def _offline(recipe_path: str, overrides: list[str], scratch: Path) -> list[str]:
    """Overrides that replace a hub teacher by its stand-in and missing image data by random images, unless the
    user's overrides set them (theirs come last and win)."""
    raw = read_recipe(recipe_path, overrides)  # not validated: an image folder that is missing would not be
    extra = []
    teacher = (raw.get("teacher") or {}).get("path", "")
    if teacher in STANDINS and not Path(teacher).exists():
        extra.append(f"teacher.path={STANDINS[teacher](scratch / 'teacher')}")
    data = raw.get("data") or {}
    if data.get("name") in ("cifar10", "image-folder") and not Path(str(data.get("root"))).is_dir():
        size = data.get("image_size") or 32
        extra += ["data.name=image-folder", f"data.root={_random_images(scratch / 'images', size)}", f"data.image_size={size}"]
    return extra + list(overrides)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``fn()`` with the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(dtype: torch.dtype, device: torch.device, size: int, reps: int) -> float:
    """FLOP/s of a ``size``-square matmul in ``dtype`` (median of ``reps`` after one warm-up)."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    times = [_seconds(lambda: a @ b, device) for _ in range(reps + 1)][1:]
    return 2 * size**3 / statistics.median(times)


class PhaseClock:
    """Splits one training iteration into phases for FLOPs (``counter`` given) or seconds (``counter=None``).

    ``with clock.installed(trainer):`` wraps the trainer's update callback and the method's
    :meth:`~n2ce_distill.methods.Method.phase` so that every boundary records the running total, and restores
    both afterwards."""

    def __init__(self, device: torch.device, counter: FlopCounterMode | None = None):
        self.device, self.counter = device, counter
        self.totals: dict[str, float] = defaultdict(float)
        self._mark = self._now()

    def _now(self) -> float:
        if self.counter is not None:
            return float(self.counter.get_total_flops())
        _sync(self.device)
        return time.perf_counter()

    def close(self, label: str) -> None:
        now = self._now()
        self.totals[label] += now - self._mark
        self._mark = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.close("other")  # whatever ran since the last boundary
        yield
        self.close(name)

    @contextmanager
    def installed(self, trainer) -> Iterator[None]:
        update = trainer._update

        def timed_update(term: str, loss: torch.Tensor, clip: float | None = None) -> None:
            update(term, loss, clip)
            self.close(term)

        trainer._update, trainer.method.phase = timed_update, self.phase
        try:
            yield
        finally:
            del trainer._update, trainer.method.phase  # the instance attributes: the class's methods again


def _iteration_phases(trainer, counter: FlopCounterMode | None) -> dict[str, float]:
    """Per phase totals of one iteration, and ``"iteration"``: the whole (the EMA update and anything after the
    last update is ``"other"``)."""
    clock = PhaseClock(trainer.accelerator.device, counter)
    with clock.installed(trainer):
        trainer.iteration()
    clock.close("other")
    return dict(clock.totals) | {"iteration": sum(clock.totals.values())}


@contextmanager
def _fresh_accelerator_state() -> Iterator[None]:
    """Accelerate keeps one mixed-precision setting per process: each precision here gets a fresh one, and
    none is left behind for the next trainer of this process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _measure(recipe: RecipeConfig, scratch: Path, reps: int, warmup: int, peak_size: int) -> tuple[list[list], dict]:
    from ..trainer import Trainer

    trainer = Trainer(recipe, scratch / f"run-{recipe.train.mixed_precision}")
    device = trainer.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        trainer.iteration()
    with FlopCounterMode(display=False) as counter:
        flops = _iteration_phases(trainer, counter)
    seconds: dict[str, list[float]] = defaultdict(list)
    for _ in range(reps):
        for label, value in _iteration_phases(trainer, None).items():
            seconds[label].append(value)

    generator = torch.Generator(device).manual_seed(0)
    batch = recipe.train.batch_size

    def sample() -> None:
        with torch.no_grad(), trainer.accelerator.autocast():
            trainer.method.generate(trainer.ema.ema_model, batch, generator)

    with FlopCounterMode(display=False) as counter:
        sample()
    flops[f"sampling ({batch})"] = float(counter.get_total_flops())
    seconds[f"sampling ({batch})"] = [_seconds(sample, device) for _ in range(max(1, reps // 2))]
    trainer._check_finite()  # a benchmark of a run that went non-finite is no benchmark
    dtype = torch.bfloat16 if recipe.train.mixed_precision == "bf16" else torch.float32
    peak = peak_flops(dtype, device, peak_size, reps=5)
    order = [p for p in flops if p not in ("other", "iteration") and not p.startswith("sampling")]
    rows = []
    for label in [*order, "other", "iteration", f"sampling ({batch})"]:
        f, s = flops.get(label, 0.0), statistics.median(seconds[label])
        rows.append([recipe.train.mixed_precision, label, f / 1e9, s * 1e3, f / s / 1e9, 100 * f / s / peak])
    facts = {"peak": peak, "memory": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return rows, facts


def run(quick: bool, out: Path, args: list[str]) -> str:
    if not args:
        raise InputError("bench train_step: needs a recipe, e.g. bench train_step recipes/digits_dxmi_n2ce.yaml")
    recipe_path, overrides = args[0], args[1:]
    reps, warmup = (3, 1) if quick else (10, 3)
    device_is_gpu = torch.cuda.is_available()
    peak_size = 8192 if device_is_gpu else (1024 if quick else 2048)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        offline = _offline(recipe_path, overrides, scratch)
        for precision in ("no", "bf16"):
            recipe = load_recipe(recipe_path, [
                *offline, f"train.mixed_precision={precision}", "eval.fid_every=0", "train.max_steps=1000000",
                "train.checkpoint_every=1000000", "train.sample_every=1000000", "train.log_every=1000000",
                *(["train.batch_size=8"] if quick else []),
            ])
            with _fresh_accelerator_state():
                precision_rows, facts = _measure(recipe, scratch, reps, warmup, peak_size)
            rows += precision_rows
            memory = f", peak memory {facts['memory']:.2f} GiB" if facts["memory"] is not None else ""
            notes.append(f"{'fp32' if precision == 'no' else 'bf16'} peak ({peak_size}-square matmul): "
                         f"{facts['peak'] / 1e9:.1f} GFLOP/s{memory}")
    device = torch.cuda.get_device_name() if device_is_gpu else f"CPU, {torch.get_num_threads()} threads"
    headers = ["precision", "phase", "GFLOP", "ms (median)", "GFLOP/s", "% of peak"]
    return (f"**{Path(recipe_path).name}** {' '.join(overrides)} (batch {recipe.train.batch_size}, {device}; "
            f"median of {reps} iterations after {warmup} warm-up; the iteration row is the median of whole iterations)\n\n" + markdown_table(headers, rows)
            + "\n\n" + "; ".join(notes) + ". FLOPs count matmuls and convolutions (forward and backward).")
