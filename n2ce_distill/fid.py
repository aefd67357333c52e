"""FID (and optionally KID, precision/recall) of a sample source against a reference, via torch-fidelity.

    FID = |mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2))

between Gaussians (mu, S) fitted to features of source samples and reference images (SPEC section 7).
Sources are callables ``generate(batch_size, generator) -> Tensor[B, C, H, W] in [-1, 1]`` (streamed
through torch-fidelity's generative-model input: one batch in memory at a time) or image folders.
References are named datasets (``NAMED_REFERENCES``), image folders, or ``.npz`` files with mu/sigma.

Extractors: ``"digits"`` (the small CNN shipped in ``assets/``, offline) and torch-fidelity's
``"inception-v3-compat"`` (the standard protocol); ``"auto"`` picks digits for 1x8x8 data. Inception
weights are never downloaded: pass ``inception_weights`` (torch-fidelity's
``feature_extractor_weights_path``) or have them in torch.hub's checkpoint folder.

Reference statistics are cached in ``cache_dir`` (torch-fidelity's cache) under a name built from the
dataset name (or a hash of a folder's listing) and a hash of the extractor weights, so a reference is
loaded once per extractor. Evaluation is deterministic for a seed and leaves the caller's global RNG
state (torch, numpy, random) untouched: torch-fidelity's DataLoader draws from the global generator.
"""

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch_fidelity import calculate_metrics
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_input_id_to_statistics_cached, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from .feature_extractors import DIGITS_EXTRACTOR_DIR, register_digits_extractor
from .fid_inputs import (
    NAMED_REFERENCES,
    Generate,
    check_path,
    file_hash,
    image_shape,
    preserved_rng,
    reference_input,
    source_input,
)

__all__ = [
    "NAMED_REFERENCES",
    "evaluate_samples",
    "fid_table",
    "plot_fid_curve",
    "save_reference_stats",
    "write_rows",
]

INCEPTION = "inception-v3-compat"
KEY_FID = "frechet_inception_distance"


def _resolve_extractor(extractor: str, data, seed: int, device: torch.device, weights) -> tuple[str, str, str]:
    """(registered name, weights path to pass on, cache tag naming the weights)."""
    if extractor == "auto":
        extractor = "digits" if image_shape(data, seed, device) == (1, 8, 8) else INCEPTION
    if extractor == "digits":
        register_digits_extractor()
        path = Path(weights) if weights is not None else DIGITS_EXTRACTOR_DIR
        path = path / "model.safetensors" if path.is_dir() else path
        return extractor, str(path), file_hash(check_path(path, "digits extractor weights"))
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        known = ", ".join(FEATURE_EXTRACTORS_REGISTRY)
        raise ValueError(f"unknown feature extractor {extractor!r}; known: auto, {known}")
    if weights is None and extractor == INCEPTION:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
        weights = cached if cached.is_file() else None
    if weights is None:
        raise FileNotFoundError(
            f"no weights for feature extractor {extractor!r}: this package never downloads them; pass "
            f"inception_weights=<path> (for {INCEPTION}: the file at {URL_INCEPTION_V3})"
        )
    return extractor, str(weights), file_hash(check_path(weights, f"{extractor} weights"))


def _fidelity_kwargs(name, weights, device, batch_size, seed, cache_dir, verbose) -> dict:
    return dict(
        feature_extractor=name, feature_extractor_weights_path=weights, cuda=device.type == "cuda",
        batch_size=batch_size, rng_seed=seed, cache=True, verbose=verbose,
        cache_root=None if cache_dir is None else str(cache_dir),
        # no DataLoader worker processes: decoding is cheap next to feature extraction, and forking
        # 4 workers (torch-fidelity's choice) costs more than it saves on small sets and small machines
        save_cpu_ram=True,
    )  # fmt: skip


def evaluate_samples(
    source: Generate | str | Path,
    ref: str | Path,
    *,
    num_samples: int | None,
    batch_size: int = 256,
    extractor: str = "auto",
    seed: int = 0,
    kid: bool = False,
    prc: bool = False,
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    verbose: bool = False,
) -> dict:
    """FID of ``source`` against ``ref``; KID (``kid``/``kid_std``) and ``precision``/``recall``/``f_score`` on request.

    ``num_samples``: samples drawn from a callable source; for a folder, its first ``num_samples``
    images in sorted order (None: all). ``cache_dir`` None uses torch-fidelity's default
    ($TORCH_HOME/fidelity_cache). Returns a dict with the metrics, ``extractor``, ``num_samples``, ``seconds``.
    """
    start = time.perf_counter()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    with preserved_rng(device):
        name, weights, tag = _resolve_extractor(extractor, source, seed, device, inception_weights)
        rgb = name != "digits"
        input2, cache_name, n_ref, stats = reference_input(ref, rgb, tag)
        if stats is not None and (kid or prc):
            raise ValueError("KID and precision/recall need reference images, not a statistics file")
        # seed the global generators too (restored on exit), for sources that ignore ``generator``
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        input1, n = source_input(source, num_samples, rgb, seed, device)
        kwargs = _fidelity_kwargs(name, weights, device, batch_size, seed, cache_dir, verbose)
        kwargs.update(input1=input1, input1_model_num_samples=n)
        if stats is None:
            kwargs.update(input2=input2, input2_cache_name=cache_name, fid=True, kid=kid, prc=prc)
            kwargs.update(kid_subset_size=min(1000, n, n_ref))
            raw = calculate_metrics(**kwargs)
        else:
            raw = {KEY_FID: _fid_against_stats(stats, name, kwargs)}
    out = {"fid": raw[KEY_FID]}
    names = {"kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std"}
    out.update({names.get(k, k): float(v) for k, v in raw.items() if k != KEY_FID})
    return {**out, "extractor": name, "num_samples": n, "seconds": time.perf_counter() - start}


def _fid_against_stats(stats: dict, name: str, kwargs: dict) -> float:
    if "extractor" in stats and str(stats["extractor"]) != name:
        raise ValueError(f"statistics were computed with extractor {stats['extractor']}, not {name}")
    layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    fe = create_feature_extractor(name, [layer], **kwargs)
    mine = fid_input_id_to_statistics_cached(1, fe, layer, **kwargs)
    if stats["mu"].shape != mine["mu"].shape:
        raise ValueError(f"statistics have dimension {stats['mu'].shape[0]}, extractor {name} {mine['mu'].shape[0]}")
    theirs = {k: stats[k].astype(mine[k].dtype) for k in ("mu", "sigma")}
    return fid_statistics_to_metric(mine, theirs, kwargs["verbose"])[KEY_FID]


def save_reference_stats(
    ref: str | Path,
    path: str | Path,
    *,
    extractor: str = "auto",
    inception_weights: str | Path | None = None,
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """Write FID statistics (mu, sigma, extractor, num_images) of a named dataset or folder to ``path`` (.npz)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    with preserved_rng(device):
        name, weights, tag = _resolve_extractor(extractor, ref, 0, device, inception_weights)
        input1, cache_name, n_ref, stats = reference_input(ref, name != "digits", tag)
        if stats is not None:
            raise ValueError(f"{ref} already holds statistics")
        kwargs = _fidelity_kwargs(name, weights, device, batch_size, 0, cache_dir, False)
        kwargs.update(input1=input1, input1_cache_name=cache_name)
        layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        stats = fid_input_id_to_statistics_cached(1, create_feature_extractor(name, [layer], **kwargs), layer, **kwargs)
    path = Path(path).with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=stats["mu"], sigma=stats["sigma"], extractor=name, num_images=n_ref)
    return path


# ---- reporting: a row is a dict with label, step (int, or None for a baseline), fid, and optionally
# kid / precision / recall (plus any other keys, kept by the CSV/JSON writers)

METRIC_COLUMNS = ("fid", "kid", "precision", "recall")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fid_table(rows: list[dict]) -> str:
    """Markdown table of rows; the lowest FID is in bold."""
    cols = ["label", "step"] + [c for c in METRIC_COLUMNS if any(r.get(c) is not None for r in rows)]
    best = min((r["fid"] for r in rows if r.get("fid") is not None), default=None)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = [_fmt(r.get(c)) for c in cols]
        if best is not None and r.get("fid") == best:
            cells[cols.index("fid")] = f"**{cells[cols.index('fid')]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows as CSV (``.csv``: label, step, metrics first, then other keys) or JSON (``.json``)."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"write_rows writes .csv or .json files, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2, default=float) + "\n")
        return path
    keys = list(dict.fromkeys(["label", "step", *METRIC_COLUMNS, *(k for r in rows for k in r)]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in keys if any(k in r for r in rows)])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_fid_curve(rows: list[dict], path: str | Path, title: str = "FID during training") -> Path:
    """PNG of FID against training step, one line per label, best checkpoint of each starred;
    baselines (step None) are dashed horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    curves = [r for r in rows if r.get("step") is not None and r.get("fid") is not None]
    for label in dict.fromkeys(r["label"] for r in curves):
        pts = sorted((r["step"], r["fid"]) for r in curves if r["label"] == label)
        (line,) = ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        step, fid = min(pts, key=lambda p: p[1])
        ax.scatter([step], [fid], marker="*", s=180, color=line.get_color(), edgecolor="k", zorder=3,
                   label=f"best {label}: {fid:.3g} @ step {step}")  # fmt: skip
    for r in rows:
        if r.get("step") is None and r.get("fid") is not None:
            ax.axhline(r["fid"], ls="--", lw=1, color="gray")
            ax.annotate(f"{r['label']} ({r['fid']:.3g})", (0.01, r["fid"]), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize=8, color="gray")  # fmt: skip
    ax.set(xlabel="training step", ylabel="FID", title=title)
    if curves:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
