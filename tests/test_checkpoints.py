import json

import pytest
import torch

from n2ce_distill.checkpoints import (
    CheckpointError,
    atomic_write_dir,
    list_checkpoints,
    load_module,
    read_json,
    remove_run,
    resolve,
    run_artefacts,
    save_checkpoint,
    save_module,
)


class _SingleProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def _write(payload):
    def write(tmp):
        (tmp / "payload.json").write_text(json.dumps(payload))

    return write


def test_save_prunes_oldest_and_keeps_newest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, _write({"step": step}), total_limit=2, accelerator=_SingleProcess())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert resolve(tmp_path, "latest").name == "checkpoint-40"
    save_checkpoint(tmp_path, 50, _write({"step": 50}), total_limit=1, accelerator=_SingleProcess())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [50]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A lower step than the checkpoints already there (a run restarted at step 0) is kept; the oldest go."""
    for step in (500, 600):
        save_checkpoint(tmp_path, step, _write({"step": step}), total_limit=5, accelerator=_SingleProcess())
    save_checkpoint(tmp_path, 1, _write({"step": 1}), total_limit=2, accelerator=_SingleProcess())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 600]
    save_checkpoint(tmp_path, 2, _write({"step": 2}), total_limit=1, accelerator=_SingleProcess())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]


def test_run_artefacts_and_remove_run_touch_only_what_a_run_writes(tmp_path):
    for name in ("checkpoint-3", "pipeline", "samples", "logs", "mine"):
        (tmp_path / name).mkdir()
    for name in ("fid.jsonl", "recipe.yaml", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in run_artefacts(tmp_path)] == ["checkpoint-3", "fid.jsonl", "logs", "pipeline", "samples"]
    remove_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt", "recipe.yaml"]
    assert run_artefacts(tmp_path) == [] and run_artefacts(tmp_path / "absent") == []


def test_a_crash_during_save_leaves_previous_checkpoints_intact(tmp_path):
    save_checkpoint(tmp_path, 1, _write({"step": 1}), total_limit=3, accelerator=_SingleProcess())

    def dies_half_way(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, dies_half_way, total_limit=1, accelerator=_SingleProcess())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert read_json(resolve(tmp_path, "latest") / "payload.json") == {"step": 1}
    # the next save at that step cleans the leftover temporary folder
    save_checkpoint(tmp_path, 2, _write({"step": 2}), total_limit=3, accelerator=_SingleProcess())
    assert not list(tmp_path.glob(".tmp-*"))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]


def test_resolve_latest_without_checkpoints_and_bad_paths(tmp_path):
    assert resolve(tmp_path, "latest") is None
    (tmp_path / "checkpoint-notanumber").mkdir()
    (tmp_path / ".tmp-checkpoint-5").mkdir()
    assert resolve(tmp_path, "latest") is None
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve(tmp_path, str(tmp_path / "missing"))


def test_atomic_write_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "best"
    atomic_write_dir(target, _write({"v": 1}))
    with pytest.raises(RuntimeError):
        atomic_write_dir(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert read_json(target / "payload.json") == {"v": 1}
    atomic_write_dir(target, _write({"v": 2}))
    assert read_json(target / "payload.json") == {"v": 2}


def test_module_round_trip_and_corruption_is_named(tmp_path):
    module = torch.nn.Linear(3, 2)
    path = tmp_path / "ema.safetensors"
    save_module(module, path)
    other = torch.nn.Linear(3, 2)
    load_module(other, path)
    assert torch.equal(other.weight, module.weight)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CheckpointError, match="ema.safetensors: truncated or corrupted"):
        load_module(other, path)
    with pytest.raises(CheckpointError, match="file missing"):
        load_module(other, tmp_path / "nope.safetensors")


def test_corrupted_json_is_named(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json: corrupted JSON"):
        read_json(path)
