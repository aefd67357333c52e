from n2ce_distill.benchmarks import BENCHMARKS


def test_dxmi_toy_quick_compares_the_three_objectives(tmp_path):
    table = BENCHMARKS["dxmi_toy"](quick=True, out=tmp_path)
    for variant in ("DxMI cd", "DxMI nce", "DxMI n2ce (M=100)", "DDIM 4 steps"):
        assert f"| {variant} |" in table
    assert "iterations to reach" in table
    assert (tmp_path / "dxmi_toy.png").is_file()
