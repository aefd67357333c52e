r"""FLOP accounting of one training iteration of any recipe, against the machine's measured peak.

``n2ce-distill bench train_step RECIPE [key=value ...] [--quick] [--out DIR]`` builds the recipe's trainer (in a
scratch folder), moves it past every warm-up (:func:`steady_step`), warms it up, then, in fp32 and in bf16
autocast (or only in the precision a ``train.mixed_precision=...`` override names):

* counts the FLOPs of one iteration (averaged over a :attr:`~n2ce_distill.methods.Method.cycle` where the work
  differs between iterations, as DMD2's generator turns do) with :class:`torch.utils.flop_counter.FlopCounterMode`
  (matmuls and convolutions, forward and backward; elementwise work is not counted), split into phases: each stretch that
  ends with an ``update(term, ...)`` call is phase ``term`` (its forward passes, backward and optimiser step),
  and a stretch a method marks with :meth:`~n2ce_distill.methods.Method.phase` (DxMI's ``trajectory``) is its own;
* times the same phases over repeated iterations (the device synchronised at each boundary), median per phase;
* times a large square matmul in the same dtype in the same process: the peak the achieved FLOP/s are a
  fraction of;
* does the same for sampling a batch from the EMA network (what the exported pipeline runs).

Teachers that live on the hub, or that a teacher recipe has not yet trained, are replaced by a randomly
initialised model of the same architecture where one is known (:data:`STANDINS`), and image data that is not on
disk by random images of the recipe's size (in one class folder per teacher class when the recipe reads labels),
so a run costs what the recipe costs per iteration, offline. ``--quick`` uses batch 8 (a ``train.batch_size``
override wins) and fewer repetitions.
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

from ..config import RecipeConfig, load_recipe, parse_overrides, read_recipe
from ..errors import InputError
from ..reporting import markdown_table

__all__ = ["STANDINS", "peak_flops", "PhaseClock", "random_images", "run", "steady_step"]


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


def _cm_edm_imagenet64(path: Path) -> Path:
    """dg845/diffusers-cm_edm_imagenet64_ema's net: EDM's class-conditional ADM for ImageNet-64 (296M parameters,
    1000 classes, no null class) as diffusers' consistency-model ports configure it; random weights, c_noise "cm"."""
    from diffusers import UNet2DModel

    from ..denoisers import EDMDenoiser

    unet = UNet2DModel(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=3, block_out_channels=(192, 384, 576, 768),
        attention_head_dim=64, num_class_embeds=1000, resnet_time_scale_shift="scale_shift",
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        downsample_type="resnet", upsample_type="resnet", attn_norm_num_groups=32,
    )
    EDMDenoiser(unet, c_noise="cm").save_pretrained(path)
    return path


def _cifar10_cond_teacher(path: Path) -> Path:
    """The net ``recipes/cifar10_cond_teacher.yaml`` trains (the conditional CIFAR-10 recipes' teacher), untrained:
    built by the teacher method from that recipe, so the stand-in follows the recipe."""
    from ..methods.teacher import TeacherTraining
    from ..shipped import shipped

    recipe = load_recipe(shipped("recipes", "cifar10_cond_teacher.yaml"))
    TeacherTraining(recipe, (3, 32, 32), num_classes=10).nets.read["denoiser"].save_pretrained(path)
    return path


def _sd15(path: Path) -> Path:
    """Stable Diffusion 1.5's architecture (its diffusers configs, restated): UNet2DConditionModel at 64x64 latents
    with 768-wide cross-attention (859.5M parameters), SD's AutoencoderKL, a CLIP ViT-L/14-sized text encoder (a
    character-level tokenizer stands in for CLIP's BPE vocabulary); random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..nets import save_text_to_image, sd15_scheduler, tiny_clip

    tokenizer, _ = tiny_clip(768, max_length=77)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return save_text_to_image(path, unet, sd15_scheduler(), tokenizer, encoder, vae)


# teacher path as a recipe writes it -> writer of a random-weight model of its architecture
STANDINS: dict[str, Callable[[Path], Path]] = {
    "google/ddpm-cifar10-32": _ddpm_cifar10,
    "dg845/diffusers-cm_edm_imagenet64_ema": _cm_edm_imagenet64,
    "../runs/cifar10-cond-teacher/pipeline": _cifar10_cond_teacher,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _sd15,
}


def random_images(path: Path, size: int, count: int = 256, classes: int | None = None,
                  caption_column: str | None = None) -> Path:
    """``count`` random RGB images: in ``classes`` class subfolders (at least one image each) when labelled, with a
    ``metadata.jsonl`` of captions in ``caption_column`` when captioned (the diffusers/datasets image-folder
    conventions)."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    folders = [path] if classes is None else [path / f"class{c:04d}" for c in range(classes)]
    files = []
    for i in range(max(count, len(folders))):
        folder = folders[i % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(files[-1])
    if caption_column is not None:
        (path / "metadata.jsonl").write_text("".join(
            json.dumps({"file_name": str(file.relative_to(path)), caption_column: f"a photo of thing number {i}"})
            + "\n" for i, file in enumerate(files)))
    return path


def _offline(recipe_path: str, overrides: list[str], scratch: Path) -> list[str]:
    """Overrides that replace a hub (or not yet trained) teacher by its stand-in and missing image data by random
    images (in class subfolders when the recipe reads labels), unless the user's overrides set them (theirs come
    last and win)."""
    from ..denoisers import load_denoiser

    raw = read_recipe(recipe_path, overrides)  # not validated: an image folder that is missing would not be
    extra = []
    teacher = (raw.get("teacher") or {}).get("path", "")
    if teacher in STANDINS and not Path(teacher).exists():
        teacher = str(STANDINS[teacher](scratch / "teacher"))
        extra.append(f"teacher.path={teacher}")
    data = raw.get("data") or {}
    root = Path(str(data.get("root")))
    if data.get("name") in ("cifar10", "image-folder") and not root.is_dir():
        size = data.get("image_size") or 32
        classes = None
        if data.get("labels"):  # as many classes as the teacher reads, so that the class-count check passes
            classes = load_denoiser(teacher).num_classes
        count = 256 if size <= 64 else 4  # what a run reads; 512-pixel images are slow to write
        images = random_images(scratch / "images", size, count, classes, data.get("caption_column"))
        extra += ["data.name=image-folder", f"data.root={images}", f"data.image_size={size}"]
    if data.get("name") == "prompts" and not root.is_file():
        prompts = scratch / "prompts.txt"
        prompts.write_text("".join(f"a photo of thing number {i}\n" for i in range(64)))
        extra.append(f"data.root={prompts}")
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
    """FLOP/s of a ``size``-square matmul in ``dtype``: the fastest of ``reps`` after one warm-up. A peak is the best
    the machine does; on shared CPU cores a median of a few reads far below it, and fractions of it exceed 100%."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    times = [_seconds(lambda: a @ b, device) for _ in range(reps + 1)][1:]
    return 2 * size**3 / min(times)


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


def steady_step(recipe: RecipeConfig, cycle: int) -> int:
    """The first step past every warm-up the recipe sets (each ``method.*_warmup_images`` counts the images of
    ``step x train.batch_size``), rounded up to the start of a :attr:`~n2ce_distill.methods.Method.cycle`: where
    the steady state that the recipe spends its schedule in begins."""
    images = max((value for key, value in recipe.method if key.endswith("_warmup_images")), default=0)
    step = -(-images // recipe.train.batch_size)
    return step + -step % cycle


def _iteration_phases(trainer, counter: FlopCounterMode | None) -> dict[str, float]:
    """Per phase totals of one iteration, averaged over one :attr:`~n2ce_distill.methods.Method.cycle` of
    iterations (from a step where one starts), and ``"iteration"``: the whole (the EMA update and anything after
    the last update is ``"other"``)."""
    cycle = trainer.method.cycle
    clock = PhaseClock(trainer.accelerator.device, counter)
    with clock.installed(trainer):
        for _ in range(cycle):
            trainer.iteration()
    clock.close("other")
    totals = {label: value / cycle for label, value in clock.totals.items()}
    return totals | {"iteration": sum(totals.values())}


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
    trainer.step = start = steady_step(recipe, trainer.method.cycle)
    for _ in range(warmup * trainer.method.cycle):
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
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[recipe.train.mixed_precision]
    peak = peak_flops(dtype, device, peak_size, reps=20)
    order = [p for p in flops if p not in ("other", "iteration") and not p.startswith("sampling")]
    rows = []
    for label in [*order, "other", "iteration", f"sampling ({batch})"]:
        f, s = flops.get(label, 0.0), statistics.median(seconds[label])
        rows.append([recipe.train.mixed_precision, label, f / 1e9, s * 1e3, f / s / 1e9, 100 * f / s / peak])
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    facts = {"peak": peak, "cycle": trainer.method.cycle, "start": start, "memory": memory}
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
        # one precision where the user's overrides name it (bf16 on a CPU without bf16 units costs hours on
        # full-size recipes), else both
        chosen = (parse_overrides(overrides).get("train") or {}).get("mixed_precision")
        for precision in ("no", "bf16") if chosen is None else (chosen,):
            recipe = load_recipe(recipe_path, [
                *(["train.batch_size=8"] if quick else []), *offline,  # the user's batch size wins
                f"train.mixed_precision={precision}", "eval.fid_every=0", "train.max_steps=1000000",
                "train.checkpoint_every=1000000", "train.sample_every=1000000", "train.log_every=1000000",
            ])
            with _fresh_accelerator_state():
                precision_rows, facts = _measure(recipe, scratch, reps, warmup, peak_size)
            rows += precision_rows
            memory = f", peak memory {facts['memory']:.2f} GiB" if facts["memory"] is not None else ""
            name = "fp32" if recipe.train.mixed_precision == "no" else recipe.train.mixed_precision
            notes.append(f"{name} peak ({peak_size}-square matmul, fastest of 20): "
                         f"{facts['peak'] / 1e9:.1f} GFLOP/s{memory}")
    cycle = facts["cycle"]
    unit = "iterations" if cycle == 1 else f"cycles of {cycle} iterations (phases per iteration: cycle means)"
    device = torch.cuda.get_device_name() if device_is_gpu else f"CPU, {torch.get_num_threads()} threads"
    headers = ["precision", "phase", "GFLOP", "ms (median)", "GFLOP/s", "% of peak"]
    return (f"**{Path(recipe_path).name}** {' '.join(overrides)} (batch {recipe.train.batch_size}, {device}; "
            f"median of {reps} {unit} after {warmup} warm-up, from step {facts['start']} (past the warm-ups); the "
            f"iteration row is the median of whole ones)\n\n" + markdown_table(headers, rows)
            + "\n\n" + "; ".join(notes) + ". FLOPs count matmuls and convolutions (forward and backward).")
