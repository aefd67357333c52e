"""Command-line behaviour: exit codes, one-line errors, nothing written on bad input, end-to-end commands."""

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

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
        ("optim.sampler.lr=-1", "optim.sampler.lr"),
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


def test_train_sample_fid_round_trip(dxmi_recipe, vp_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(dxmi_recipe), "train.max_steps=2", "train.checkpoint_every=1", *TINY, "--output-dir", str(run)]) == 0
    assert (run / "recipe.yaml").is_file() and (run / "pipeline" / "model_index.json").is_file()
    assert main(["sample", str(run), "--num-samples", "5", "--batch-size", "2", "--out", str(tmp_path / "s")]) == 0
    images = sorted((tmp_path / "s" / "images").glob("*.png"))
    assert len(images) == 5 and (tmp_path / "s" / "grid.png").is_file()
    fid_out = tmp_path / "fid"
    code = main(["fid", str(run), str(run / "pipeline"), "--ref", "digits",
                 "--num-samples", "64", "--batch-size", "32", "--out", str(fid_out)])
    assert code == 0
    capsys.readouterr()
    rows = json.loads((fid_out / "fid.json").read_text())
    # one curve per run (its checkpoints share a label), then its final export and the pipeline given alone
    assert [(r["label"], r["step"]) for r in rows] == [("run", 1), ("run", 2), ("run final pipeline/", None),
                                                     ("pipeline", None)]
    assert [r["num_samples"] for r in rows] == [64] * 4 and all(r["fid"] > 0 for r in rows)
    assert {r["extractor"] for r in rows} == {"digits"}  # implied by --ref digits
    assert (fid_out / "fid.csv").is_file() and (fid_out / "fid.png").is_file()
    # the sampled folder is read whole by default; more samples than it holds is an error, not a silent cut
    assert main(["fid", str(tmp_path / "s" / "images"), "--ref", "digits", "--out", str(fid_out)]) == 0
    assert json.loads((fid_out / "fid.json").read_text())[0]["num_samples"] == 5
    assert main(["fid", str(tmp_path / "s" / "images"), "--ref", "digits", "--num-samples", "6", "--out", str(fid_out)]) == 2
    assert "holds 5 images" in capsys.readouterr().err
    # the sample's own folder reads as its images/, not as its grid.png
    score = json.loads((fid_out / "fid.json").read_text())[0]["fid"]
    assert main(["fid", str(tmp_path / "s"), "--ref", "digits", "--out", str(fid_out)]) == 0
    row = json.loads((fid_out / "fid.json").read_text())[0]
    assert row["num_samples"] == 5 and row["fid"] == pytest.approx(score)
    # a teacher with a number of steps samples too; a pipeline given a number of steps is not a teacher
    assert main(["sample", f"{vp_teacher}@2", "--num-samples", "3", "--out", str(tmp_path / "t")]) == 0
    assert len(list((tmp_path / "t" / "images").glob("*.png"))) == 3
    assert main(["sample", f"{tmp_path / 'nowhere'}@2", "--out", str(tmp_path / "u")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "u").exists()


def test_sample_into_an_earlier_sample_needs_overwrite_and_into_a_file_is_refused(vp_teacher, tmp_path, capsys):
    out, source = tmp_path / "s", f"{vp_teacher}@2"
    assert main(["sample", source, "--num-samples", "3", "--out", str(out)]) == 0
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main(["sample", source, "--num-samples", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an earlier sample" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written  # two new images never joined three old
    assert main(["sample", source, "--num-samples", "2", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    (tmp_path / "a-file").write_text("kept")
    assert main(["sample", source, "--num-samples", "2", "--out", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip().endswith("exists and is not a folder")
    assert (tmp_path / "a-file").read_text() == "kept"


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
    assert main(["config", str(dxmi_recipe), "critic.objective=nce", "optim.sampler.lr=3e-5"]) == 0
    import yaml

    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["critic"]["objective"] == "nce" and resolved["optim"]["sampler"]["lr"] == 3e-5
    assert resolved["method"]["tau1"] == 0.1  # defaults filled in
    assert main(["config", str(dxmi_recipe), "critic.objectiv=nce"]) == 2


def test_benchmark_names_come_from_the_registry_and_take_hyphens(capsys, monkeypatch):
    from n2ce_distill.benchmarks import BENCHMARKS

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help to the terminal: keep each name on one line
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listed = capsys.readouterr().out.replace("\n", " ")
    assert all(name in listed for name in BENCHMARKS), listed
    # listing the names for --help imports no benchmark module
    code = ("import sys; from n2ce_distill.cli import _parser; _parser(); "
            "print([m for m in sys.modules if m.startswith('n2ce_distill.benchmarks.')])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    assert main(["bench", "mle-gradient-nope", "--quick"]) == 2
    assert "unknown benchmark 'mle-gradient-nope'" in capsys.readouterr().err


def _broken_teacher(vp_teacher, tmp_path, how):
    import shutil

    broken = tmp_path / f"teacher-{how}"
    shutil.copytree(vp_teacher, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "config":
        (broken / "unet" / "config.json").write_text("{not json")
    elif how == "no-weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return broken


@pytest.mark.parametrize("how", ["config", "no-weights", "truncated"])
def test_a_broken_teacher_is_one_line_naming_teacher_path(recipe_file, vp_teacher, tmp_path, capsys, how):
    teacher = _broken_teacher(vp_teacher, tmp_path, how)
    recipe = recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"}, "teacher": {"path": str(teacher)}})
    out = tmp_path / "run"
    assert main(["train", str(recipe), *TINY, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"teacher.path {str(teacher)!r}: cannot load the teacher" in err
    assert not out.exists()


def test_unreachable_hub_id_is_one_line_with_a_way_out(dxmi_recipe, tmp_path, capsys, monkeypatch):
    from n2ce_distill import denoisers

    monkeypatch.setattr(denoisers, "_hub_reachable", lambda timeout=3.0: False)  # the offline CI machine, at once
    # print warnings to stderr as a user's shell would (pytest would otherwise collect them out of sight)
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
    out = tmp_path / "run"
    assert main(["train", str(dxmi_recipe), "teacher.path=nobody/no-such-teacher", *TINY, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "teacher.path 'nobody/no-such-teacher'" in err
    assert "the hub cannot be reached" in err and "huggingface-cli download nobody/no-such-teacher" in err
    assert not out.exists()


@pytest.mark.parametrize("override, culprit", [
    ("optim.sampler.lr=[1,", "override 'optim.sampler.lr=[1,': not a valid YAML value"),
    ("optim.critic.lr=1e38", "optim.critic.lr: Input should be less than or equal to 1"),
    ("optim.value.lr=2", "optim.value.lr"),
    ("optim.sampler.lr=5", "optim.sampler.lr"),
    ("train.log_with=tensorbored", "train.log_with: unknown tracker 'tensorbored'; Accelerate knows aim, tensorboard"),
    ("train.log_with=swanlab", "train.log_with: tracker 'swanlab' is not installed"),
])
def test_more_bad_overrides_are_one_line(dxmi_recipe, tmp_path, capsys, override, culprit):
    assert main(["train", str(dxmi_recipe), override, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_recipe_paths_resolve_next_to_the_recipe_from_any_folder(vp_teacher, tmp_path, monkeypatch):
    import shutil

    import yaml

    from n2ce_distill.config import load_recipe

    project = tmp_path / "project"
    shutil.copytree(vp_teacher, project / "assets" / "teacher")
    (project / "recipes").mkdir()
    recipe = project / "recipes" / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "dxmi"}, "data": {"name": "digits"},
                                      "teacher": {"path": "../assets/teacher"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Path(load_recipe(recipe).teacher.path).resolve() == (project / "assets" / "teacher").resolve()
    # an override is typed on the command line: relative to the working directory
    shutil.copytree(vp_teacher, elsewhere / "mine")
    assert load_recipe(recipe, ["teacher.path=mine"]).teacher.path == "mine"


def test_startup_checks_of_reference_output_folder_and_resume(dxmi_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(dxmi_recipe), "eval.fid_every=5", "eval.ref=no-such-ref", *TINY, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.ref: unknown reference 'no-such-ref'" in err and not out.exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root ignores permissions: nothing to test there
            assert main(["train", str(dxmi_recipe), *TINY, "--output-dir", str(locked / "run")]) == 2
            assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert main(["train", str(dxmi_recipe), "train.max_steps=1", *TINY, "--output-dir", str(out)]) == 0
    capsys.readouterr()
    # a checkpoint of other networks: refused in one line (the recipe key that differs is caught first)
    assert main(["train", str(dxmi_recipe), "train.max_steps=2", "critic.channels=[8, 32]", *TINY[:1], "critic.num_res_blocks=2",
                 "train.sample_every=1000", "--output-dir", str(out), "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "critic.channels: cannot change on resume" in err


def test_bench_writes_a_fresh_folder_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "mle_gradient", "--quick"]) == 0
    (folder,) = (tmp_path / "bench-output").iterdir()
    assert folder.name.startswith("mle_gradient-") and (folder / "mle_gradient.png").is_file()
    assert capsys.readouterr().out.rstrip().endswith(f"plots in {Path('bench-output') / folder.name}")
    assert not (tmp_path / "benchmarks").exists()


def test_an_internal_error_keeps_its_traceback(monkeypatch, tmp_path):
    """Only bad input is one line and exit 2: a ValueError from a bug propagates (traceback, exit 1)."""
    from n2ce_distill import evaluation

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(evaluation, "evaluate_inputs", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["fid", str(tmp_path), "--ref", "digits"])
    result = subprocess.run([sys.executable, "-m", "n2ce_distill.cli", "bench", "no-such-bench"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1  # bad input stays one line


def test_config_names_an_ignored_objective_parameter(dxmi_recipe, capsys):
    assert main(["config", str(dxmi_recipe), "critic.M=5", "critic.objective=nce"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "n2ce-distill config: note: critic.M: not used by objective 'nce'; ignored\n"
    assert "objective: nce" in captured.out


class _WriteLog(io.StringIO):
    """A stderr that keeps each ``write`` call apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_each_stderr_line_is_one_write(dxmi_recipe, tmp_path, monkeypatch):
    """Processes launched together (torchrun) share one unbuffered stderr: a line written as text and newline apart
    can run into another process's line, so every note and error goes out as one whole line in one write."""
    from n2ce_distill.trainer import NonFiniteError, Trainer

    def diverges(self):
        raise NonFiniteError("step 1: loss_critic is nan")

    stderr = _WriteLog()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["config", str(dxmi_recipe), "critic.M=5", "critic.objective=nce"]) == 0  # a note
    assert main(["train", str(dxmi_recipe), "critic.M=0", "--output-dir", str(tmp_path / "bad")]) == 2  # bad input
    monkeypatch.setattr(Trainer, "train", diverges)
    with pytest.raises(SystemExit) as exit_info:  # a run that went wrong: exit code 1, still one line
        main(["train", str(dxmi_recipe), "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    assert [text.split(": ")[1] for text in stderr.writes] == ["note", "error", "error"]
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in stderr.writes), stderr.writes
    assert stderr.writes[-1] == "n2ce-distill train: error: step 1: loss_critic is nan\n"


def test_more_usage_errors_of_bench_and_sample(tmp_path, vp_teacher, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["bench", "mle_gradient", "--quick", "--out", str(tmp_path / "a-file")]) == 2
    assert main(["sample", f"{vp_teacher}@0", "--num-samples", "2", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("exists and is not a folder") and err[1].endswith("with STEPS >= 1") and len(err) == 2
    assert not (tmp_path / "s").exists()
