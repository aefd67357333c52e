"""Peak resident memory per process of a shipped recipe on 2 CPU processes, DDP against FSDP2, side by side.

    python benchmarks/history/fsdp_memory.py [RECIPE] [ROUNDS] [key=value ...]

Defaults: recipes/cifar10_sid_n2ce.yaml, 2 rounds. The teacher is its random-weight stand-in (``STANDINS``) and the
data 256 random 32x32 images, written once under /tmp/fsdp-memory; each launch trains 2 iterations at batch 4 (2 per
process), checkpoints and exports. FSDP2 runs through tests/fsdp_on_cpu.py (Accelerate sets FSDP up only on
accelerators). The peak is ``/usr/bin/time``'s maximum resident set size over torchrun's children, i.e. the
largest process's peak. Rounds alternate the order of the two launches. Prints one JSON line per launch.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from n2ce_distill.benchmarks.train_step import STANDINS, random_images

ROOT = Path("/tmp/fsdp-memory")
REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


def inputs() -> list[str]:
    teacher, images = ROOT / "teacher", ROOT / "images"
    if not (teacher / "model_index.json").is_file() and not (teacher / "config.json").is_file():
        STANDINS["google/ddpm-cifar10-32"](teacher)
    if not images.is_dir():
        random_images(images, 32)
    return [f"teacher.path={teacher}", "data.name=image-folder", f"data.root={images}", "data.image_size=32"]


def launch(recipe: str, overrides: list[str], fsdp: bool, port: int) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(FSDP_ENV if fsdp else {})}
    program = [str(REPO / "tests" / "fsdp_on_cpu.py")] if fsdp else ["-m", "n2ce_distill.cli"]
    with tempfile.TemporaryDirectory() as run:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", str(TORCHRUN), "--nproc_per_node=2", f"--master_port={port}",
                               *program, "train", recipe, *overrides, "--output-dir", run],
                              capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"launch": "fsdp2" if fsdp else "ddp", "peak_rss_gib": round(peak_kib / 2**20, 3),
            "seconds": round(seconds, 1)}


def main(argv: list[str]) -> None:
    recipe = argv[0] if argv and argv[0].endswith(".yaml") else "recipes/cifar10_sid_n2ce.yaml"
    rest = argv[1:] if argv and argv[0].endswith(".yaml") else argv
    rounds = int(rest[0]) if rest and rest[0].isdigit() else 2
    extra = rest[1:] if rest and rest[0].isdigit() else rest
    ROOT.mkdir(parents=True, exist_ok=True)
    overrides = [*inputs(), "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2",
                 "train.sample_every=1000", "eval.fid_every=0", *extra]
    port = 29800
    for r in range(rounds):
        for fsdp in ((False, True) if r % 2 == 0 else (True, False)):
            port += 1
            print(json.dumps({"recipe": recipe, "round": r, **launch(recipe, overrides, fsdp, port)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
