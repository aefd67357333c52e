"""FID (and optionally KID, precision/recall) of a sample source against a reference, via torch-fidelity.

    FID = |mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2))

between Gaussians (mu, S) fitted to features of source samples and reference images (SPEC section 7).
Sources are callables ``generate(batch_size, generator) -> Tensor[B, C, H, W] in [-1, 1]`` (streamed
through torch-fidelity's generative-model input: one batch in memory at a time) or image folders.
References are named datasets (``NAMED_REFERENCES``), image folders, or ``.npz`` files with mu/sigma.
:func:`evaluate_classes` scores a class-conditional source class by class against the matching images of a
labelled named reference (per-class FID), and, on digits, measures label fidelity: the share of samples that
the shipped digits classifier assigns to the class they were drawn for.

Extractors: ``"digits"`` (the small CNN shipped in ``assets/``, offline) and torch-fidelity's
``"inception-v3-compat"`` (the standard protocol); ``"auto"`` picks digits for 1x8x8 data. Inception
weights are never downloaded: pass ``inception_weights`` (torch-fidelity's
``feature_extractor_weights_path``) or have them in torch.hub's checkpoint folder.

No pickle is ever executed on load. torch-fidelity's own cache loads pickles (``torch.load(...,
weights_only=False)``), so it is never used: reference features are cached by this module as ``.npz``
files (read with ``allow_pickle=False``) in ``cache_dir`` (default ``$TORCH_HOME/n2ce_distill_fid``), under
a name built from the dataset name (or a hash of a folder's listing) and a hash of the extractor weights,
so a reference is extracted once per extractor. Extractor weights other than the shipped safetensors
ones are read with ``weights_only=True`` (or from safetensors) and handed to torch-fidelity as a
tensors-only copy written here, since its extractors would otherwise unpickle the user's file.
Evaluation is deterministic for a seed and leaves the caller's global RNG state (torch, numpy, random)
untouched: torch-fidelity's DataLoader draws from the global generator.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from .errors import InputError
from .feature_extractors import DIGITS_EXTRACTOR_DIR, register_digits_extractor
from .fid_inputs import (
    NAMED_REFERENCES,
    ClassReference,
    Generate,
    check_path,
    file_hash,
    image_shape,
    preserved_rng,
    reference_input,
    source_input,
    to_uint8,
)

__all__ = [
    "NAMED_REFERENCES",
    "evaluate_classes",
    "evaluate_samples",
    "save_reference_stats",
]

INCEPTION = "inception-v3-compat"
KEY_FID = "frechet_inception_distance"


def _cache_root(cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()).parent / "n2ce_distill_fid"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _tensors_only_copy(weights: Path, scratch: Path) -> Path:
    """The extractor weights read without unpickling code (safetensors, or ``torch.load`` with
    ``weights_only=True``) and re-saved in the fresh folder ``scratch``, so that torch-fidelity's own
    ``torch.load`` meets only the tensors written here (a copy kept across calls could be swapped)."""
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (whatever the reason, the file is not a plain state dict)
        raise InputError(f"extractor weights {str(weights)!r}: not a tensors-only state dict "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"extractor weights {str(weights)!r}: expected a state dict of tensors")
    copy = scratch / "weights.pt"
    torch.save(state, copy)
    return copy


def _resolve_extractor(extractor: str, data, seed: int, device: torch.device, weights,
                       scratch: Path) -> tuple[str, str, str]:
    """(registered name, weights path to pass on, cache tag naming the weights)."""
    if extractor == "auto":
        extractor = "digits" if image_shape(data, seed, device) == (1, 8, 8) else INCEPTION
    if extractor == "digits":
        register_digits_extractor()  # it reads safetensors itself
        path = Path(weights) if weights is not None else DIGITS_EXTRACTOR_DIR
        path = path / "model.safetensors" if path.is_dir() else path
        return extractor, str(path), file_hash(check_path(path, "digits extractor weights"))
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        known = ", ".join(FEATURE_EXTRACTORS_REGISTRY)
        raise InputError(f"unknown feature extractor {extractor!r}; known: auto, {known}")
    if weights is None and extractor == INCEPTION:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
        weights = cached if cached.is_file() else None
    if weights is None:
        raise FileNotFoundError(
            f"no weights for feature extractor {extractor!r}: this package never downloads them; pass "
            f"inception_weights=<path> (for {INCEPTION}: the file at {URL_INCEPTION_V3})"
        )
    path = check_path(weights, f"{extractor} weights")
    if path.is_dir():
        raise InputError(f"{extractor} weights {str(path)!r}: a folder; pass the weights file itself")
    return extractor, str(_tensors_only_copy(path, scratch)), file_hash(path)


def _fidelity_kwargs(name, weights, device, batch_size, seed, verbose) -> dict:
    return dict(
        feature_extractor=name, feature_extractor_weights_path=weights, cuda=device.type == "cuda",
        batch_size=batch_size, rng_seed=seed, verbose=verbose,
        cache=False,  # torch-fidelity's cache unpickles what it finds: this module caches features as .npz
        # no DataLoader worker processes: decoding is cheap next to feature extraction, and forking
        # 4 workers (torch-fidelity's choice) costs more than it saves on small sets and small machines
        save_cpu_ram=True,
    )  # fmt: skip


def _feature_extractor(name: str, kwargs: dict):
    """The extractor with every layer FID, KID and precision/recall read, so that one cached file serves all
    three; returns it and the layer of each metric."""
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layers = {metric: cls.get_default_feature_layer_for_metric(metric) for metric in ("fid", "kid", "prc")}
    return create_feature_extractor(name, sorted(set(layers.values())), **kwargs), layers


def _reference_features(fe, cache_root: Path, cache_name: str, kwargs: dict) -> dict[str, torch.Tensor]:
    """Features of input2, read from ``cache_root/<cache_name>-features.npz`` when extracted before."""
    path = cache_root / f"{cache_name}-features.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            return {key: torch.from_numpy(stored[key]) for key in stored.files}
    features = extract_featuresdict_from_input_id(2, fe, **kwargs)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **{key: value.cpu().numpy() for key, value in features.items()})
    tmp.rename(path)  # a killed run never leaves a half-written cache entry under the real name
    return features


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
    images in sorted order (None: all). ``cache_dir`` None uses ``$TORCH_HOME/n2ce_distill_fid``.
    Returns a dict with the metrics, ``extractor``, ``num_samples``, ``seconds``.
    """
    start = time.perf_counter()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cache_root = _cache_root(cache_dir)
    with preserved_rng(device), tempfile.TemporaryDirectory() as scratch:
        name, weights, tag = _resolve_extractor(extractor, source, seed, device, inception_weights, Path(scratch))
        rgb = name != "digits"
        input2, cache_name, n_ref, stats = reference_input(ref, rgb, tag)
        if stats is not None and (kid or prc):
            raise InputError("KID and precision/recall need reference images, not a statistics file")
        # seed the global generators too (restored on exit), for sources that ignore ``generator``
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        input1, n = source_input(source, num_samples, rgb, seed, device)
        kwargs = _fidelity_kwargs(name, weights, device, batch_size, seed, verbose)
        kwargs.update(input1=input1, input1_model_num_samples=n, input2=input2)
        fe, layers = _feature_extractor(name, kwargs)
        mine = extract_featuresdict_from_input_id(1, fe, **kwargs)
        theirs = None if stats is not None else _reference_features(fe, cache_root, cache_name, kwargs)
        out = {"fid": _fid(mine, theirs, stats, name, layers["fid"], verbose)}
        if kid:
            kwargs.update(kid_subset_size=min(1000, n, n_ref))
            raw = kid_featuresdict_to_metric(mine, theirs, layers["kid"], **kwargs)
            out |= {"kid": float(raw["kernel_inception_distance_mean"]), "kid_std": float(raw["kernel_inception_distance_std"])}
        if prc:
            out |= {k: float(v) for k, v in prc_featuresdict_to_metric(mine, theirs, layers["prc"], **kwargs).items()}
    return {**out, "extractor": name, "num_samples": n, "seconds": time.perf_counter() - start}


def evaluate_classes(
    source,
    ref: str,
    *,
    num_samples: int,
    batch_size: int = 256,
    extractor: str = "auto",
    seed: int = 0,
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    **overall,
) -> dict:
    """FID, per-class FID and label fidelity of a class-conditional ``source`` (``source(n, generator,
    class_labels)`` with ``num_classes``) against a labelled named reference. ``num_samples // K`` samples are drawn
    for each class ``c`` and scored against the reference's images of class ``c``; all of them together (exactly
    class-balanced) give the overall FID (and KID, precision/recall through ``overall``, as in
    :func:`evaluate_samples`). Adds ``fid_per_class`` (K values), ``fid_class_mean``, and on digits
    ``label_fidelity`` (the share of samples the shipped classifier puts in their class) with
    ``label_fidelity_per_class``."""
    from .feature_extractors import load_digits_net, uint8_to_digits_input
    from .fid_inputs import load_named_labels

    classes = source.num_classes
    if ref not in NAMED_REFERENCES:
        raise InputError(f"--ref {ref}: per-class metrics need a labelled named reference ({', '.join(NAMED_REFERENCES)})")
    reference_classes = int(load_named_labels(ref).max()) + 1
    if reference_classes != classes:
        raise InputError(f"--ref {ref}: has {reference_classes} classes, the source draws {classes}")
    per_class = num_samples // classes
    if per_class < 2:
        raise InputError(f"--num-samples {num_samples}: fewer than 2 per class for {classes} classes")
    classifier = load_digits_net() if NAMED_REFERENCES[ref][0] == (1, 8, 8) else None
    start, generator = time.perf_counter(), torch.Generator().manual_seed(seed)
    common = dict(batch_size=batch_size, extractor=extractor, seed=seed, inception_weights=inception_weights,
                  cache_dir=cache_dir, device=device)
    every, fids, fidelity = [], [], []
    for label in range(classes):
        wanted = torch.full((per_class,), label, dtype=torch.long)
        samples = torch.cat([source(len(chunk), generator, chunk).cpu() for chunk in wanted.split(batch_size)])
        every.append(samples)
        fids.append(evaluate_samples(_replay(samples), ClassReference(ref, label), num_samples=per_class, **common)["fid"])
        if classifier is not None:
            with torch.no_grad():
                predicted = classifier(uint8_to_digits_input(to_uint8(samples, rgb=False)))[1].argmax(1)
            fidelity.append(float((predicted == label).float().mean()))
    out = evaluate_samples(_replay(torch.cat(every)), ref, num_samples=per_class * classes, **common, **overall)
    out |= {"fid_class_mean": float(np.mean(fids)), "fid_per_class": fids, "seconds": time.perf_counter() - start}
    if fidelity:
        out |= {"label_fidelity": float(np.mean(fidelity)), "label_fidelity_per_class": fidelity}
    return out


def _replay(samples: torch.Tensor):
    """A source that hands out ``samples`` in order, so that the images classified are the images scored."""
    position = 0

    def draw(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        nonlocal position
        position += n
        return samples[position - n:position]

    draw.sample_shape = tuple(samples.shape[1:])
    return draw


def _fid(mine: dict, theirs: dict | None, stats: dict | None, name: str, layer: str, verbose: bool) -> float:
    """FID of the source's features against the reference's features, or against given statistics."""
    ours = fid_featuresdict_to_statistics(mine, layer)
    if theirs is not None:
        return float(fid_statistics_to_metric(ours, fid_featuresdict_to_statistics(theirs, layer), verbose)[KEY_FID])
    if "extractor" in stats and str(stats["extractor"]) != name:
        raise InputError(f"statistics were computed with extractor {stats['extractor']}, not {name}")
    if stats["mu"].shape != ours["mu"].shape:
        raise InputError(f"statistics have dimension {stats['mu'].shape[0]}, extractor {name} {ours['mu'].shape[0]}")
    given = {k: stats[k].astype(ours[k].dtype) for k in ("mu", "sigma")}
    return float(fid_statistics_to_metric(ours, given, verbose)[KEY_FID])


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
    cache_root = _cache_root(cache_dir)
    with preserved_rng(device), tempfile.TemporaryDirectory() as scratch:
        name, weights, tag = _resolve_extractor(extractor, ref, 0, device, inception_weights, Path(scratch))
        input2, cache_name, n_ref, stats = reference_input(ref, name != "digits", tag)
        if stats is not None:
            raise InputError(f"{ref} already holds statistics")
        kwargs = _fidelity_kwargs(name, weights, device, batch_size, 0, False) | {"input2": input2}
        fe, layers = _feature_extractor(name, kwargs)
        stats = fid_featuresdict_to_statistics(_reference_features(fe, cache_root, cache_name, kwargs), layers["fid"])
    path = Path(path).with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=stats["mu"], sigma=stats["sigma"], extractor=name, num_images=n_ref)
    return path
