"""``n2ce-distill``: train, sample, fid, bench and demo.

Bad input exits with code 2 and one line naming the culprit; nothing is written before the recipe
and its paths have been validated.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
from pathlib import Path

from .errors import InputError

__all__ = ["main"]

USAGE_ERROR = 2
SAMPLE_OUTPUTS = ("images", "samples.npy", "labels.json", "grid.png")  # what `sample` writes into --out


def _say(line: str) -> None:
    """One line on stderr in one write: ``print`` writes the text and its newline apart on an unbuffered (piped)
    stderr, so the lines of processes launched together (torchrun) ran into one another."""
    sys.stderr.write(line + "\n")


def _recipe(args: argparse.Namespace):
    """The command's recipe with its overrides, each key it leaves unread named on stderr."""
    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    for line in recipe.unused_keys():
        _say(f"n2ce-distill {args.command}: note: {line}")
    return recipe


def _train(args: argparse.Namespace) -> None:
    import yaml

    from .trainer import NonFiniteError, Trainer

    recipe = _recipe(args)
    output_dir = Path(args.output_dir or Path("runs") / Path(args.recipe).stem)
    trainer = Trainer(recipe, output_dir, resume=args.resume, overwrite=args.overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    try:
        final = trainer.train()
    except NonFiniteError as exc:  # exit code 1: a run that went wrong, not bad input
        _say(f"n2ce-distill train: error: {exc}")
        raise SystemExit(1) from None
    print(f"exported {final}")


def _sample(args: argparse.Namespace) -> None:
    import json

    import numpy as np
    import torch
    from PIL import Image

    from .evaluation import resolve_source
    from .fid_inputs import to_uint8
    from .visualize import save_samples

    out = _output_folder(args.out)
    earlier = [out / name for name in SAMPLE_OUTPUTS if (out / name).exists()]
    if earlier and not args.overwrite:  # new images beside old ones would be read by fid as one sample
        raise InputError(f"--out {str(out)!r}: holds an earlier sample ({earlier[0].name}); choose a new folder or "
                         "pass --overwrite to replace it")
    _, source = resolve_source(args.source, class_labels=args.class_labels, guidance_scale=args.guidance_scale,
                               prompts=_read_prompts(args.prompts))
    generator = torch.Generator().manual_seed(args.seed)
    labels = source.labels(args.num_samples)  # None for an unconditional source
    chunks, remaining = [], args.num_samples
    while remaining > 0:
        wanted = None if labels is None else labels[len(labels) - remaining:][:args.batch_size]
        chunks.append(source(min(args.batch_size, remaining), generator, wanted).cpu())
        remaining -= len(chunks[-1])
    samples = torch.cat(chunks)
    for path in earlier:  # --overwrite: the earlier sample goes only once the new one is drawn
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if labels is not None:  # image i was drawn for class labels[i]
        (out / "labels.json").write_text(json.dumps(labels.tolist()) + "\n")
    save_samples(samples[:256], out / "grid.png")
    if samples.dim() == 2:  # 2-D points: an array file, no pickle
        np.save(out / "samples.npy", samples.numpy(), allow_pickle=False)
        print(f"wrote {len(samples)} points to {out / 'samples.npy'} and a scatter plot to {out / 'grid.png'}")
        return
    images = out / "images"  # a folder `n2ce-distill fid` reads as it is
    images.mkdir(exist_ok=True)
    for index, image in enumerate(to_uint8(samples, rgb=False)):
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(images / f"{index:06d}.png")
    print(f"wrote {len(samples)} images to {images} and a grid to {out / 'grid.png'}")


def _fid(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_inputs

    table = evaluate_inputs(
        args.inputs, args.ref, num_samples=args.num_samples, out=Path(args.out), batch_size=args.batch_size,
        seed=args.seed, extractor=args.extractor, inception_weights=args.inception_weights, kid=args.kid, prc=args.prc,
        guidance_scale=args.guidance_scale, prompts=_read_prompts(args.prompts),
    )
    print(table)


def _read_prompts(path: str | None) -> list[str] | None:
    """The prompts of ``--prompts FILE`` (one per line, in order, blank lines skipped)."""
    from .data import read_prompts

    return None if path is None else read_prompts(path, "--prompts")


def _bench(args: argparse.Namespace) -> None:
    from .benchmarks import BENCHMARKS

    name = args.name.replace("-", "_")  # mle-gradient and mle_gradient both work
    if name not in BENCHMARKS:
        raise InputError(f"bench: unknown benchmark {args.name!r}; choose from {sorted(BENCHMARKS)}")
    run = BENCHMARKS[name]
    takes_args = "args" in inspect.signature(run).parameters
    if args.args and not takes_args:
        raise InputError(f"bench {name}: takes no arguments, got {' '.join(args.args)!r}")
    if takes_args and not args.args:
        raise InputError(f"bench {name}: needs a recipe, e.g. bench {name} recipes/digits_dxmi_n2ce.yaml")
    out = _output_folder(args.out or f"bench-output/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(run(quick=args.quick, out=out, args=args.args) if takes_args else run(quick=args.quick, out=out))
    print(f"plots in {out}")


def _output_folder(path: str) -> Path:
    """``--out`` as a folder to write into, refused at startup where it is an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r}: exists and is not a folder")
    return out


def _config(args: argparse.Namespace) -> None:
    import yaml

    print(yaml.safe_dump(_recipe(args).resolved(), sort_keys=False), end="")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    print(run_demo(Path(args.out), quick=args.quick))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _labels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class indices separated by commas, got {text!r}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("n2ce-distill")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (naming the argument) and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the empty ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="n2ce-distill", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    command = lambda name, text: sub.add_parser(  # noqa: E731
        name, help=text, description=text, formatter_class=_Help)

    train = command("train", "train a recipe (teacher, dxmi, sid or dmd2)")
    train.add_argument("recipe", help="YAML recipe (recipes/*.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. critic.objective=nce")
    train.add_argument("--output-dir", help="run folder (default: runs/<recipe name>)")
    train.add_argument("--resume", help="'latest' or a checkpoint folder")
    train.add_argument("--overwrite", action="store_true",
                       help="delete an earlier run in --output-dir and start over (without it such a folder is refused)")
    train.set_defaults(run=_train)

    config = command("config", "print the resolved recipe (defaults filled in, overrides applied) as YAML")
    config.add_argument("recipe", help="YAML recipe")
    config.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    config.set_defaults(run=_config)

    sample = command("sample", "draw samples from an exported pipeline, a run or a teacher (PATH@STEPS)")
    sample.add_argument("source", help="pipeline folder, run folder (its final pipeline/) or TEACHER@STEPS[:euler]")
    sample.add_argument("--num-samples", type=_positive, default=64, help="how many samples")
    sample.add_argument("--batch-size", type=_positive, default=256, help="samples per call")
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    sample.add_argument("--class-labels", type=_labels, metavar="K[,K...]",
                        help="classes to draw, cycled over the samples (a class-conditional source; default: every "
                        "class equally often); labels.json lists each image's class")
    sample.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance (default: none for a teacher, the distilled one for a student)")
    sample.add_argument("--prompts", metavar="FILE", help="a text-conditioned student's prompts, one per line, cycled "
                        "over the samples; labels.json lists each image's line (from 0)")
    sample.add_argument("--out", required=True, help="output folder: images/ (PNG, readable by fid) and grid.png")
    sample.add_argument("--overwrite", action="store_true",
                        help="replace an earlier sample in --out (without it such a folder is refused)")
    sample.set_defaults(run=_sample)

    fid = command("fid", "FID of runs, pipelines, teachers (PATH@STEPS) or image folders")
    fid.add_argument("inputs", nargs="+", help="run folders, pipeline folders, TEACHER@STEPS[:euler], image folders "
                     "(2-D toys: .npy points or a sample output folder)")
    fid.add_argument("--ref", required=True, help="digits | cifar10-train | image folder | .npz statistics; or a 2-D toy "
                     "(8gaussians | spirals | checkerboard: SW2, and exact NLL for 8gaussians)")
    fid.add_argument("--num-samples", type=_positive,
                     help="samples per input (default: 10000 from samplers, every image of a folder)")
    fid.add_argument("--extractor", choices=("auto", "digits", "inception-v3-compat"),
                     help="feature extractor (default: the one --ref implies; auto: from the samples' shape)")
    fid.add_argument("--batch-size", type=_positive, default=500, help="samples per batch")
    fid.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    fid.add_argument("--inception-weights", help="local weights for inception-v3-compat (no download)")
    fid.add_argument("--guidance-scale", type=float, help="classifier-free guidance of conditional inputs (default: "
                     "none for teachers, the distilled one for students)")
    fid.add_argument("--prompts", metavar="FILE", help="text-conditioned inputs' prompts, one per line, cycled")
    fid.add_argument("--kid", action="store_true", help="also kernel inception distance")
    fid.add_argument("--prc", action="store_true", help="also precision / recall")
    fid.add_argument("--out", default="fid-output", help="folder for fid.csv, fid.json and fid.png")
    fid.set_defaults(run=_fid)

    from .benchmarks import BENCHMARKS  # names only: a benchmark's module is imported when it runs

    bench = command("bench", "run a benchmark: " + ", ".join(BENCHMARKS) + " (hyphens work too)")
    bench.add_argument("name", help="benchmark name")
    bench.add_argument("args", nargs="*", help="what the benchmark takes: train_step RECIPE [key=value ...]")
    bench.add_argument("--quick", action="store_true", help="a small version that runs in a minute or two")
    bench.add_argument("--out", help="folder for the plots (default: a new bench-output/NAME-TIME, so a run never "
                       "overwrites the plots shipped in benchmarks/)")
    bench.set_defaults(run=_bench)

    demo = command("demo", "distil the shipped digits teacher into a 4-step sampler and report FID")
    demo.add_argument("--out", default="demo-output", help="output folder")
    demo.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .checkpoints import CheckpointError
    from .errors import InputError

    try:
        args.run(args)
    except (InputError, CheckpointError, FileNotFoundError) as exc:  # bad input: one line; anything else is a bug
        _say(f"n2ce-distill {args.command}: error: {exc}")
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
