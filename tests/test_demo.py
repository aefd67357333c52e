from n2ce_distill.demo import run_demo


def test_quick_demo_trains_evaluates_and_draws(tmp_path):
    report = run_demo(tmp_path, quick=True)
    for row in ("teacher DDIM 4 steps", "untrained student 4 steps", "student DxMI+N²CE 4 steps"):
        assert row in report
    assert (tmp_path / "student_samples.png").is_file()
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "results.md").read_text().startswith("|")
    assert "trained 4 of the recipe's 2000 iterations" in report  # a shortened run says so
