"""Peak resident memory per process of a shipped recipe on 2 CPU processes, DDP against FSDP2, side by side.

    python benchmarks/history/fsdp_memory.py [RECIPE] [ROUNDS] [key=value ...]

Defaults: recipes/cifar10_sid_n2ce.yaml, 2 rounds. The teacher is its random-weight stand-in (``STANDINS``) and the
data 256 random 32x32 images, written once under /tmp/fsdp-memory; each launch trains 2 iterations at batch 4 (2 per
process), checkpoints and exports. FSDP2 runs through tests/fsdp_on_cpu.py (Accelerate sets FSDP up only on
accelerators), once with Accelerate's default NO_WRAP (each network one unit) and once with each ResnetBlock2D
its own unit (TRANSFORMER_BASED_WRAP). Each rank's peak is its ``VmHWM``, polled from /proc. Each round runs the
three launches in a new order. Prints one JSON line per launch.
"""
import json
import os
import random
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
LAUNCHES = {"ddp": None, "fsdp2": FSDP_ENV,
            "fsdp2-blocks": {**FSDP_ENV, "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                             "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResnetBlock2D"}}


def inputs() -> list[str]:
    teacher, images = ROOT / "teacher", ROOT / "images"
    if not (teacher / "model_index.json").is_file() and not (teacher / "config.json").is_file():
        STANDINS["google/ddpm-cifar10-32"](teacher)
    if not images.is_dir():
        random_images(images, 32)
    return [f"teacher.path={teacher}", "data.name=image-folder", f"data.root={images}", "data.image_size=32"]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _rank_and_peak(pid: int) -> tuple[int, int] | None:
    """The process's ``LOCAL_RANK`` and its peak resident KiB so far (``VmHWM``), or None once it has gone."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"LOCAL_RANK=")), None)
    peak = re.search(r"VmHWM:\s+(\d+) kB", status)
    return None if rank is None or peak is None else (rank, int(peak.group(1)))


def launch(recipe: str, overrides: list[str], name: str, port: int) -> dict:
    """One launch; each rank's peak as last read from /proc every 0.2 s (rank 0 also gathers the whole state
    dicts for the checkpoint and writes the export; rank 1's peak is training's)."""
    fsdp = LAUNCHES[name]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(fsdp or {})}
    program = [str(REPO / "tests" / "fsdp_on_cpu.py")] if fsdp else ["-m", "n2ce_distill.cli"]
    peaks: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as run, tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen([str(TORCHRUN), "--nproc_per_node=2", f"--master_port={port}", *program, "train",
                                 recipe, *overrides, "--output-dir", run], stdout=log, stderr=log, env=env)
        while proc.poll() is None:
            for child in _children(proc.pid):
                seen = _rank_and_peak(child)
                if seen is not None:
                    peaks[seen[0]] = max(peaks.get(seen[0], 0), seen[1])
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(log.read()[-3000:].decode())
    return {"launch": name, "seconds": round(seconds, 1),
            **{f"peak_rank{rank}_gib": round(kib / 2**20, 3) for rank, kib in sorted(peaks.items())}}


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
        for name in random.Random(r).sample(list(LAUNCHES), len(LAUNCHES)):
            port += 1
            print(json.dumps({"recipe": recipe, "round": r, **launch(recipe, overrides, name, port)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
