"""Paired speed of eager and fast-path training against an old commit: each round runs every variant once, in a
fresh process and a new random order (iteration_speed.py beside this file), and every ratio pairs two variants of
the same round; a markdown table gives each variant's s/it per round and the median [range] of each ratio.

    python benchmarks/history/compile_speed.py OLD_CHECKOUT RECIPE ROUNDS N WARMUP

RECIPE is a path inside each checkout (the schema may differ between commits; the settings should not). Variants:
old eager, new eager (this checkout), new ``train.compile=true``, new compile + ``train.channels_last=true``.
"""
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

old, recipe, rounds, n, warm = sys.argv[1:]
here = Path(__file__).resolve()
new = str(here.parents[2])
variants = {"old eager": (old, []), "new eager": (new, []), "compiled": (new, ["train.compile=true"]),
            "compiled + channels_last": (new, ["train.compile=true", "train.channels_last=true"])}
times = {name: [] for name in variants}
for round_ in range(int(rounds)):
    order = random.Random(round_).sample(list(variants), len(variants))
    for name in order:
        checkout, overrides = variants[name]
        out = subprocess.run([sys.executable, str(here.with_name("iteration_speed.py")), checkout,
                              str(Path(checkout) / recipe), n, warm,
                              *overrides], capture_output=True, text=True, check=True, cwd=new)
        times[name].append(json.loads(out.stdout.strip().splitlines()[-1])["s_per_it"])
        print(f"round {round_}: {name} {times[name][-1]:.3f} s/it", file=sys.stderr, flush=True)


def paired(a: str, b: str) -> str:
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"


print(f"{recipe}: s/it per round (median of {n} after {warm} warm-up)\n")
print("| variant | s/it | / old eager | / new eager |\n| --- | --- | --- | --- |")
for name in variants:
    print(f"| {name} | {', '.join(f'{t:.3f}' for t in times[name])} | {paired(name, 'old eager')} | "
          f"{paired(name, 'new eager')} |")
