"""Crash-safe checkpoint folders and safe weight files.

A checkpoint is written into ``.tmp-checkpoint-<step>`` and renamed to ``checkpoint-<step>`` only once
complete, so a kill during a save leaves every earlier checkpoint intact and never leaves a
half-written folder under a real name. Weights are read only from safetensors; a truncated or
corrupted file raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "RUN_ARTEFACTS",
    "atomic_write_dir",
    "remove_run",
    "run_artefacts",
    "list_checkpoints",
    "load_module",
    "read_json",
    "resolve",
    "save_checkpoint",
    "save_module",
    "verify",
]

_NAME = re.compile(r"^checkpoint-(\d+)$")
# what a training run writes into its folder (anything else there is the user's and is never touched; the
# run's recipe.yaml is rewritten at every start and may be the user's own recipe, so it is not listed)
RUN_ARTEFACTS = ("checkpoint-*", ".tmp-checkpoint-*", "pipeline", ".tmp-pipeline", "best", ".tmp-best", "samples",
                 "logs", "fid.jsonl")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupted; the message names the file."""


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder with ``write`` then swap it in place of ``target``."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def run_artefacts(run_dir: Path) -> list[Path]:
    """The files and folders of an earlier run in ``run_dir`` (empty for a new or unrelated folder)."""
    run_dir = Path(run_dir)
    return sorted(path for pattern in RUN_ARTEFACTS for path in run_dir.glob(pattern))


def remove_run(run_dir: Path) -> None:
    """Delete an earlier run's artefacts (:data:`RUN_ARTEFACTS`) from ``run_dir``, nothing else."""
    for path in run_artefacts(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir`` as ``(step, path)``, oldest first."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve(run_dir: Path, which: str) -> Path | None:
    """``"latest"`` -> newest complete checkpoint (None when there is none); otherwise a path."""
    if which == "latest":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(which)
    if not path.is_dir():
        raise CheckpointError(f"--resume {which!r}: no such checkpoint folder")
    return path


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], total_limit: int | None, accelerator) -> Path:
    """Write ``checkpoint-<step>`` atomically on every process, then prune the oldest beyond ``total_limit``.

    ``write`` runs on every process (Accelerate's ``save_state`` needs all of them); only the main
    process renames and prunes. The checkpoint just written is never pruned.
    """
    run_dir = Path(run_dir)
    target = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():  # re-saving a step after a resume: the new one replaces it atomically
            shutil.rmtree(target)
        tmp.rename(target)
        if total_limit is not None:
            # the checkpoint just written always stays, whatever the steps of the others
            others = [path for _, path in list_checkpoints(run_dir) if path != target]
            for old in others[: max(len(others) - (max(total_limit, 1) - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def verify(folder: Path) -> None:
    """Check every weight and state file of a checkpoint before anything is loaded from it.

    safetensors headers are validated against the file size (catches truncation); other torch files
    must load with ``weights_only=True`` (no pickled code runs; Accelerate's loader allow-lists the
    numpy types its RNG states hold).
    """
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: truncated or corrupted safetensors file ({exc})") from None
    for path in sorted([*folder.glob("*.bin"), *folder.glob("*.pkl")]):
        try:
            accelerate_load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (any failure means the file cannot be trusted)
            raise CheckpointError(f"{path}: unreadable with weights_only=True ({type(exc).__name__}: {str(exc)[:120]})") from None


def save_module(module: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_module(module: torch.nn.Module, path: Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupted safetensors file ({exc})") from None
    module.load_state_dict(state)


def read_json(path: Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupted JSON ({exc.msg})") from None
