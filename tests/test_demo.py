from n2ce_distill.demo import load_demo_recipe, run_demo


def test_quick_demo_trains_evaluates_and_draws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any folder: the shipped recipe and teacher are found wherever one runs
    report = run_demo(tmp_path, quick=True)
    for row in ("teacher DDIM 4 steps", "untrained student 4 steps", "student DxMI+N²CE 4 steps"):
        assert row in report
    assert (tmp_path / "student_samples.png").is_file()
    assert f"sample grid: {tmp_path / 'student_samples.png'}\n" in report
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "results.md").read_text().startswith("|")
    full_steps = load_demo_recipe().train.max_steps
    assert full_steps > 4
    assert f"trained 4 of the recipe's {full_steps} iterations" in report  # a shortened run says so
