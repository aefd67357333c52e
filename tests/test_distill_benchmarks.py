import json

import pytest

from n2ce_distill.benchmarks import BENCHMARKS
from n2ce_distill.benchmarks.distill import fid_log_report


def test_dxmi_toy_quick_compares_the_three_objectives(tmp_path):
    table = BENCHMARKS["dxmi_toy"](quick=True, out=tmp_path)
    for variant in ("DxMI cd", "DxMI nce", "DxMI n2ce (M=100)", "DDIM 4 steps"):
        assert f"| {variant} |" in table
    assert "iterations to reach" in table
    assert (tmp_path / "dxmi_toy.png").is_file()


def _write_log(run, entries):
    run.mkdir(parents=True)
    (run / "fid.jsonl").write_text("".join(json.dumps({"step": s, "fid": f, "extractor": "digits"}) + "\n" for s, f in entries))
    return run


def test_fid_log_report_aggregates_seeds(tmp_path):
    """Final/best over seeds, a resumed run's re-logged step (the later entry wins), iterations to reach."""
    a = _write_log(tmp_path / "a0", [(100, 9.0), (200, 5.0), (300, 4.0), (200, 6.0)])
    b = _write_log(tmp_path / "a1", [(100, 7.0), (200, 3.0), (300, 6.0)])
    c = _write_log(tmp_path / "c0", [(100, 20.0), (200, 10.0), (300, 8.0)])
    table = fid_log_report({"A": [a, b], "C": [c]}, tmp_path / "out", "t", {"teacher": 1.5}, reach=5.0)
    summary = table.split("\n\n")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in summary.splitlines()}
    # finals 4 and 6: mean 5, std sqrt(2); bests 4 (step 300) and 3 (step 200)
    assert rows["A"].startswith("| A | 300 | 5 | 1.41 | 4.000, 6.000 | 3.5 | 300, 200 |")
    assert rows["C"].startswith("| C | 300 | 8 | 0 | 8.000 | 8 | 300 |")
    assert "| A | 8 | 4.5 | 5 |" in table  # seed means at 100, 200 (6 and 3: the first <= 5), 300
    assert "iterations to reach 5.000: A: 200; C: not reached" in table
    assert (tmp_path / "out" / "t.png").is_file()


def test_fid_log_report_names_the_bad_file(tmp_path):
    run = _write_log(tmp_path / "r", [(100, 9.0)])
    (run / "fid.jsonl").write_text('{"step": 100, "fid": 9.0}\n{"step": 200}\n')
    with pytest.raises(ValueError, match=r"r/fid.jsonl:2: not a FID log entry"):
        fid_log_report({"A": [run]}, tmp_path, "t")
    with pytest.raises(FileNotFoundError, match=r"missing/fid.jsonl: no FID log"):
        fid_log_report({"A": [tmp_path / "missing"]}, tmp_path, "t")
    with pytest.raises(ValueError, match="B: no run folders"):
        fid_log_report({"B": []}, tmp_path, "t")
