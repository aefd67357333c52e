"""The diagnostic scripts: critic_probe (offline critic accuracy) and fid_curves (runs' FID logs)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def probe_recipe(recipe_file, vp_teacher):
    return recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"},
                        "teacher": {"path": str(vp_teacher)},
                        "critic": {"channels": [8, 16], "num_res_blocks": 2},
                        "optim": {"critic": {"lr": 1e-3}}, "train": {"batch_size": 64}})


def test_critic_probe_separates_an_untrained_teacher_from_digits(probe_recipe, vp_teacher, capsys):
    """An untrained 2-step teacher draws noise, not digits: the held-out accuracy must be high on both sides."""
    rc = load_script("critic_probe").main([f"{vp_teacher}@2", "--recipe", str(probe_recipe),
                                           "--steps", "60", "--num-samples", "300"])
    assert rc == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [15, 30, 45, 60]
    acc_data, acc_samples = (float(x) for x in rows[-1].split("|")[3:5])
    assert acc_data > 0.9 and acc_samples > 0.9


def test_critic_probe_bad_input_is_one_line(probe_recipe, tmp_path, capsys):
    assert load_script("critic_probe").main([str(tmp_path), "--recipe", str(probe_recipe)]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err
    assert load_script("critic_probe").main([str(tmp_path), "--recipe", str(probe_recipe), "optim.critic.lr=-1"]) == 2
    assert "optim.critic.lr" in capsys.readouterr().err


def test_fid_curves_reads_globs_and_reports_bad_logs(tmp_path, capsys):
    for seed, fids in enumerate([(8.0, 4.0), (6.0, 2.0)]):
        run = tmp_path / f"run_s{seed}"
        run.mkdir()
        (run / "fid.jsonl").write_text("".join(json.dumps({"step": 100 * (i + 1), "fid": f}) + "\n" for i, f in enumerate(fids)))
    script = load_script("fid_curves")
    assert script.main([f"A={tmp_path}/run_s*", "--reach", "3.5", "--baseline", "teacher=1.5", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| A | 200 | 3 | 1.41 | 4.000, 2.000 |" in out
    assert "iterations to reach 3.500: A: 200" in out
    # at equal iterations: only the entries up to step 100 count
    assert script.main([f"A (M=50)={tmp_path}/run_s*", "--max-step", "100", "--out", str(tmp_path / "out")]) == 0
    assert "| A (M=50) | 100 | 7 | 1.41 | 8.000, 6.000 |" in capsys.readouterr().out
    assert script.main([f"A={tmp_path}/run_s*", "--max-step", "50", "--out", str(tmp_path)]) == 2
    assert "no FID entry at or before step 50" in capsys.readouterr().err
    assert script.main([f"B={tmp_path}/nothing*", "--out", str(tmp_path)]) == 2
    assert "B: no run folders" in capsys.readouterr().err


def _critic_log(run, values):
    """A TensorBoard log as the trainer writes it: critic/* scalars at the given steps."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "logs" / "n2ce-distill"))
    for step, (regime, rms) in values.items():
        for field, value in {"regime": regime, "logit_rms": rms, "logit_gap": 2 * rms, "acc_data": 0.5,
                             "acc_noise": 1.0}.items():
            writer.add_scalar(f"critic/{field}", value, step)
    writer.close()


def test_regime_report_windows_over_seeds(tmp_path, capsys):
    script = load_script("regime_report")
    _critic_log(tmp_path / "a_s0", {10: (0, 0.01), 20: (2, 3.0), 30: (1, 1.0)})
    _critic_log(tmp_path / "a_s1", {10: (0, 0.03), 20: (2, 5.0), 30: (2, 2.0)})
    assert script.main([f"chasm run={tmp_path}/a_s*", "--window", "20"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[1] for r in rows] == ["1-20", "21-40"]
    assert rows[0][2] == "50 / 0 / 50" and float(rows[0][3]) == pytest.approx(2.01)
    assert rows[1][2] == "0 / 50 / 50" and float(rows[1][4]) == pytest.approx(3.0)


def test_regime_report_bad_input_is_one_line(tmp_path, capsys):
    script = load_script("regime_report")
    assert script.main([f"x={tmp_path}/none*"]) == 2
    assert "x: no run folders" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert script.main([f"x={tmp_path}/empty"]) == 2
    assert "no TensorBoard log" in capsys.readouterr().err
    assert script.main([f"x={tmp_path}/empty", "--window", "0"]) == 2
