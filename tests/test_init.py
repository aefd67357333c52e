"""The package's lazy exports: every name in __all__ resolves, and the objectives import torch only."""

import subprocess
import sys

import n2ce_distill


def test_every_export_resolves_to_its_module():
    assert sorted(n2ce_distill._EXPORTS) == sorted(n2ce_distill.__all__)
    for name, module in n2ce_distill._EXPORTS.items():
        value = getattr(n2ce_distill, name)
        assert value.__module__ == f"n2ce_distill.{module}", name
    assert set(n2ce_distill.__all__) <= set(dir(n2ce_distill))


def test_unknown_name_is_an_attribute_error():
    try:
        n2ce_distill.NoSuchThing
    except AttributeError as error:
        assert "NoSuchThing" in str(error)
    else:
        raise AssertionError("no AttributeError")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_objectives_cost_torch_and_nothing_heavy():
    heavy = {"diffusers", "accelerate", "torch_fidelity", "transformers", "scipy", "matplotlib", "sklearn"}
    assert "torch" in _imported_after("from n2ce_distill import N2CE, critic_diagnostics, suggest_M")
    assert not heavy & _imported_after("from n2ce_distill import N2CE, NCE, critic_diagnostics, suggest_M, waymarks")
    assert not heavy & _imported_after("import n2ce_distill.cli")  # --help parses before importing the stack
    assert "diffusers" in _imported_after("from n2ce_distill import FewStepPipeline")
