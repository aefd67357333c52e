"""Command-line behaviour: exit codes, one-line errors, nothing written on bad input, end-to-end commands."""

import json
import subprocess
import sys

import pytest
import torch

from n2ce_distill.cli import main

TINY = ["train.batch_size=8", "critic.channels=[8, 16]", "critic.num_res_blocks=2", "train.sample_every=1000"]


@pytest.fixture
def dxmi_recipe(recipe_file, vp_teacher):
    return recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"}, "teacher": {"path": str(vp_teacher)}})


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("critic.objectiv=nce", "critic.objectiv: unknown key; did you mean 'critic.objective'?"),
        ("critic.M=0", "critic.M"),
        ("method.num_steps=0", "method.num_steps"),
        ("train.lr=-1", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("teacher.path=./no/such/teacher", "teacher.path: folder './no/such/teacher' not found"),
        ("data.name=image-folder", "data.root"),
    ],
)
def test_bad_recipes_exit_2_with_one_line_and_write_nothing(dxmi_recipe, tmp_path, capsys, override, culprit):
    out = tmp_path / "run"
    assert main(["train", str(dxmi_recipe), override, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_teacher_shape_mismatch_is_named(recipe_file, toy_teacher, tmp_path, capsys):
    recipe = recipe_file({"method": {"name": "dxmi"}, "data": {"name": "digits"}, "teacher": {"path": str(toy_teacher)}})
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.image_size: data samples have shape (1, 8, 8)" in err and "expects (2,)" in err
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_train_sample_fid_round_trip(dxmi_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(dxmi_recipe), "train.max_steps=2", "train.checkpoint_every=1", *TINY, "--output-dir", str(run)]) == 0
    assert (run / "recipe.yaml").is_file() and (run / "pipeline" / "model_index.json").is_file()
    assert main(["sample", str(run / "pipeline"), "--num-samples", "5", "--batch-size", "2", "--out", str(tmp_path / "s")]) == 0
    samples = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert samples.shape == (5, 1, 8, 8) and (tmp_path / "s" / "grid.png").is_file()
    fid_out = tmp_path / "fid"
    code = main(["fid", str(run), str(run / "pipeline"), "--ref", "digits",
                 "--num-samples", "64", "--batch-size", "32", "--out", str(fid_out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "checkpoint-1" in table and "checkpoint-2" in table
    rows = json.loads((fid_out / "fid.json").read_text())
    assert [r["step"] for r in rows] == [1, 2, None] and all(r["fid"] > 0 for r in rows)
    assert (fid_out / "fid.csv").is_file() and (fid_out / "fid.png").is_file()


def test_train_into_an_earlier_run_needs_resume_or_overwrite(dxmi_recipe, tmp_path, capsys):
    run, args = tmp_path / "run", ["train", str(dxmi_recipe), "train.max_steps=1", *TINY]
    assert main([*args, "--output-dir", str(run)]) == 0
    written = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main([*args, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == written  # nothing rewritten, nothing lost
    assert main([*args, "--output-dir", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]


def test_fid_input_errors(tmp_path, capsys):
    assert main(["fid", str(tmp_path / "missing"), "--ref", "digits", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "t").mkdir()
    assert main(["fid", f"{tmp_path / 't'}@x", "--ref", "digits", "--out", str(tmp_path / "o")]) == 2
    assert "PATH@STEPS" in capsys.readouterr().err


def test_bench_unknown_name(capsys):
    assert main(["bench", "nope", "--quick"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "n2ce_distill.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "fid" in result.stdout


def test_usage_errors_are_one_line_exit_2(capsys):
    for argv in (["sample", "x", "--out", "y", "--batch-size", "0"], ["sample", "x", "--out", "y", "--num-samples", "-3"],
                 ["fid", "x", "--ref", "digits", "--num-samples", "0"], ["nope"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err, argv


def test_version_and_resolved_config(dxmi_recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("n2ce-distill ")
    assert main(["config", str(dxmi_recipe), "critic.objective=nce", "train.lr=3e-5"]) == 0
    import yaml

    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["critic"]["objective"] == "nce" and resolved["train"]["lr"] == 3e-5
    assert resolved["method"]["tau1"] == 0.1  # defaults filled in
    assert main(["config", str(dxmi_recipe), "critic.objectiv=nce"]) == 2


def test_benchmark_names_match_the_registry_and_take_hyphens(capsys):
    from n2ce_distill.benchmarks import BENCHMARKS
    from n2ce_distill.cli import _BENCHMARK_NAMES

    assert sorted(_BENCHMARK_NAMES) == sorted(BENCHMARKS)
    assert main(["bench", "mle-gradient-nope", "--quick"]) == 2
    assert "unknown benchmark 'mle-gradient-nope'" in capsys.readouterr().err
