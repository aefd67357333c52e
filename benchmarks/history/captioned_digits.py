"""FID, per-prompt FID and prompt fidelity of text-conditioned samplers on captioned digits: each source is
prompted with "the digit zero" ... "the digit nine" equally often (prompt k names digit k, so the prompts act as
the reference's classes), and the shipped digits classifier says whether each sample shows the digit its prompt
names. One markdown row per source.

    python benchmarks/history/captioned_digits.py SOURCE [SOURCE ...] [--num-samples N] [--guidance-scale W]

A SOURCE is a student pipeline or run folder, or TEACHER@STEPS[:euler].
"""
import argparse
import time

from n2ce_distill.data import DIGIT_NAMES
from n2ce_distill.evaluation import resolve_source
from n2ce_distill.fid import evaluate_classes

parser = argparse.ArgumentParser()
parser.add_argument("sources", nargs="+")
parser.add_argument("--num-samples", type=int, default=1000)
parser.add_argument("--guidance-scale", type=float)
args = parser.parse_args()
prompts = [f"the digit {name}" for name in DIGIT_NAMES]
print("| source | FID | mean per-prompt FID | prompt fidelity | seconds |\n| --- | --- | --- | --- | --- |")
for spec in args.sources:
    start = time.perf_counter()
    label, source = resolve_source(spec, prompts=prompts, guidance_scale=args.guidance_scale)
    source.num_classes = len(prompts)  # prompt k is digit k's class
    metrics = evaluate_classes(source, "digits", num_samples=args.num_samples, batch_size=500, extractor="digits")
    print(f"| {label} | {metrics['fid']:.3f} | {metrics['fid_class_mean']:.3f} | {metrics['label_fidelity']:.3f} | "
          f"{time.perf_counter() - start:.0f} |", flush=True)
