"""The exercise mechanism: checks on known right and wrong answers, and student-version generation."""

from __future__ import annotations

import ast
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nbformat
import pytest
import torch
from torch import nn

import lab_utils.core.exercises.checks as checks
from lab_utils.commands.notebooks import make_student_versions, strip_solutions
from lab_utils.core.exercises.cases import Case
from lab_utils.core.exercises.checks import ExerciseFailed, check_function, check_module, check_value
from lab_utils.core.exercises.difference import difference
from labs.text_encoder import scaled_dot_product_attention
from labs.text_encoder.exercises import ATTENTION_HINT, attention_cases, check_attention


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    """Checks print and return False unless a test asks for strict mode."""
    monkeypatch.delenv("GENLAB_STRICT_CHECKS", raising=False)


def attention_from_scratch(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def last_line(capsys) -> str:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, f"a check prints exactly one line, got {lines}"
    return lines[0]


# --------------------------------------------------------------------------- attention check


def test_an_independent_solution_passes_and_the_reference_itself_fails(capsys):
    assert check_attention(attention_from_scratch)
    assert last_line(capsys) == f"✅ attention: passed ({len(attention_cases())} cases)"
    assert not check_attention(scaled_dot_product_attention)
    assert "calls the lab's `scaled_dot_product_attention`" in last_line(capsys)
    assert not check_attention(lambda q, k, v, mask=None: nn.functional.scaled_dot_product_attention(q, k, v, mask))
    assert "calls the lab's `torch.nn.functional.scaled_dot_product_attention`" in last_line(capsys)


def test_cases_cover_masks_and_multi_head():
    cases = attention_cases()
    masked = [case for case in cases if case.kwargs.get("mask") is not None]
    assert masked and all(case.kwargs["mask"].dtype == torch.bool for case in masked)
    assert any(case.args[0].dim() == 4 for case in masked), "a multi-head (B, H, T, d) case with a mask"
    assert any(case.args[0].shape[-2] != case.args[1].shape[-2] for case in cases), "Tq != Tk"
    for case in masked:  # the mask matters: ignoring it changes the answer
        q, k, v = case.args
        masked = scaled_dot_product_attention(q, k, v, case.kwargs["mask"])
        assert not torch.allclose(scaled_dot_product_attention(q, k, v), masked)


def test_wrong_scale_names_the_mistake(capsys):
    def unscaled(q, k, v, mask=None):
        return attention_from_scratch(q * math.sqrt(q.size(-1)), k, v, mask)

    assert not check_attention(unscaled)
    line = last_line(capsys)
    assert line.startswith("❌ attention: case 1/")
    assert "max abs error" in line and "sqrt(d_k)" in line


def test_ignored_mask_names_the_mistake(capsys):
    assert not check_attention(lambda q, k, v, mask=None: attention_from_scratch(q, k, v))
    line = last_line(capsys)
    assert "mask" in line and "ignores the mask" in line


def test_wrong_shape(capsys):
    assert not check_attention(lambda q, k, v, mask=None: attention_from_scratch(q, k, v, mask).transpose(-2, -1))
    line = last_line(capsys)
    assert "shape mismatch" in line and "got (2, 8, 5), expected (2, 5, 8)" in line
    assert "hint:" in line


def test_not_implemented_stub(capsys):
    def attention(q, k, v, mask=None):
        raise NotImplementedError("exercise: write your solution here")

    assert not check_attention(attention)
    assert last_line(capsys) == "❌ attention: not implemented yet — fill in the cell above and run this check again"


def test_other_exception_shows_type_message_and_hint(capsys, monkeypatch):
    monkeypatch.setattr(checks, "_FAILURES", {})  # a first failure: the hint's idea
    assert not check_attention(lambda q, k, v, mask=None: q @ k)
    line = last_line(capsys)
    assert "raised RuntimeError" in line and f"hint: {ATTENTION_HINT.idea}" in line


def test_strict_mode_raises_after_printing(capsys, monkeypatch):
    monkeypatch.setenv("GENLAB_STRICT_CHECKS", "1")
    with pytest.raises(ExerciseFailed, match="not implemented yet"):
        check_attention(lambda q, k, v, mask=None: (_ for _ in ()).throw(NotImplementedError()))
    assert last_line(capsys).startswith("❌")
    assert isinstance(ExerciseFailed("x"), AssertionError)
    assert check_attention(attention_from_scratch)  # a pass does not raise
    capsys.readouterr()


def test_in_place_student_does_not_corrupt_reference_or_cases(capsys):
    def in_place(q, k, v, mask=None):
        q.mul_(1 / math.sqrt(q.size(-1)))  # scales its input in place (and gets the right answer)
        scores = q @ k.transpose(-2, -1)
        if mask is not None:
            scores.masked_fill_(~mask, -1e9)
        out = scores.softmax(-1) @ v
        v.zero_()
        return out

    seen = []

    def reference(q, k, v, mask=None):
        seen.append(q.clone())
        return scaled_dot_product_attention(q, k, v, mask)

    cases = attention_cases()
    originals = [case.args[0].clone() for case in cases]
    assert check_function(in_place, reference, cases, name="attention")
    assert all(torch.equal(a, b) for a, b in zip(seen, originals)), "the reference saw the original inputs"
    assert all(torch.equal(case.args[0], q) for case, q in zip(cases, originals)), "the cases are untouched"
    capsys.readouterr()


# --------------------------------------------------------------------------- the structural comparison


class Pair(NamedTuple):
    mu: torch.Tensor
    logvar: torch.Tensor


@dataclass
class Out:
    recon: torch.Tensor
    loss: float


def test_difference_reports_the_field_and_kind():
    a = torch.ones(2, 3)
    assert difference(Pair(a, a), Pair(a, a)) is None
    assert "output.logvar: shape mismatch" in difference(Pair(a, a), Pair(a, torch.ones(3)))
    assert "output.mu" in difference((a + 1, a), Pair(a, a))  # a plain tuple is compared by field names
    assert "got a Pair without the field `recon`" in difference(Pair(a, a), Out(a, 1.0))
    assert "output.loss: got 1.5, expected 1" in difference(Out(a, 1.5), Out(a, 1.0))
    assert difference(Out(a, torch.tensor(1.0)), Out(a, 1.0)) is None  # 0-dim tensor for a number
    assert "dtype" in difference(torch.ones(3, dtype=torch.long), torch.ones(3))
    assert "entries differ" in difference(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert "NaN" in difference(torch.tensor([float("nan")]), torch.tensor([0.0]))
    assert "got a list" in difference([a], a)
    assert "output['b']" in difference({"a": a, "b": a}, {"a": a, "b": a + 1})
    assert "keys differ" in difference({"a": a}, {"a": a, "b": a})
    assert "output[1]" in difference([a, a], [a, a * 2])


def test_check_function_with_randomness_uses_the_same_seed(capsys):
    def reparameterize(mu, logvar):
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # z = mu + sigma * eps

    mu, logvar = torch.zeros(4, 3), torch.zeros(4, 3)
    state = torch.get_rng_state()
    assert check_function(reparameterize, reparameterize, [Case((mu, logvar))], name="reparameterize",
                          forbid=())  # the reference itself as the answer: nothing forbidden here
    assert torch.equal(torch.get_rng_state(), state), "the notebook's random stream is untouched"
    assert not check_function(lambda mu, logvar: mu + torch.exp(logvar) * torch.randn_like(mu), reparameterize,
                              [Case((mu, logvar + 1.0))], name="reparameterize", hint="sigma = exp(logvar / 2)")
    assert capsys.readouterr().out.strip().endswith("hint: sigma = exp(logvar / 2)")


def test_check_value(capsys):
    assert check_value(torch.tensor(0.5), torch.tensor(0.5), name="kl")
    assert not check_value(0.4, 0.5, name="kl", hint="closed form")
    assert "got 0.4, expected 0.5" in capsys.readouterr().out


class RefLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.proj(x))


def test_check_module(capsys):
    class Good(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            return torch.tanh(self.proj(x))

    class WrongNames(Good):
        def __init__(self, dim):
            super().__init__(dim)
            self.extra = nn.Linear(dim, 1)

    class WrongForward(Good):
        def forward(self, x):
            return self.proj(x)

    class Stub(nn.Module):
        def __init__(self, dim):
            raise NotImplementedError

    init, cases = Case((4,)), [Case((torch.randn(2, 4),))]
    assert check_module(Good, RefLayer, init, cases, name="layer")
    assert not check_module(WrongNames, RefLayer, init, cases, name="layer")
    assert "unexpected ['extra.weight', 'extra.bias']" in capsys.readouterr().out
    assert not check_module(WrongForward, RefLayer, init, cases, name="layer")
    assert "values differ" in capsys.readouterr().out
    assert not check_module(Stub, RefLayer, init, cases, name="layer")
    assert "not implemented yet" in capsys.readouterr().out


# --------------------------------------------------------------------------- one module per job


MACHINERY = Path(__file__).resolve().parent.parent / "lab_utils" / "core" / "exercises"


def test_the_check_machinery_is_one_module_per_job_and_each_name_has_one_home():
    """The package file imports nothing (each name is imported from its module), every module says its job in a
    docstring, and what a module exports (``__all__``) it defines itself: no name is re-exported from a second home."""
    package = ast.parse((MACHINERY / "__init__.py").read_text(encoding="utf-8"))
    assert not [node for node in ast.walk(package) if isinstance(node, (ast.Import, ast.ImportFrom))]
    homes: dict[str, str] = {}
    for path in sorted(MACHINERY.glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"lab_utils.core.exercises.{path.stem}")
        assert (module.__doc__ or "").strip(), f"{path.name} has no docstring saying its job"
        for name in module.__all__:
            value = getattr(module, name)
            if callable(value):  # a class or function says where it was defined; a constant is where it is assigned
                assert value.__module__ == module.__name__, f"{path.name} re-exports {name} from {value.__module__}"
            else:
                assert f"\n{name} = " in path.read_text(encoding="utf-8"), f"{path.name} re-exports {name}"
            assert name not in homes, f"{name} is exported by {homes[name]} and {path.name}"
            homes[name] = path.name
    assert {"difference", "forbidden", "Case", "Hint", "CheckSpec", "judge", "check_function"} <= set(homes)
    assert "compare" not in homes, "the value comparison is `difference`: `compare` is the `genlab compare` command"


# --------------------------------------------------------------------------- student versions


SOLUTION_CELL = """import math

def attention(q, k, v, mask=None):
    \"\"\"docstring stays\"\"\"
    # BEGIN SOLUTION
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return scores.softmax(-1) @ v
    # END SOLUTION

class Layer:
    def forward(self, x):
        if x is None:
            # BEGIN SOLUTION handle the empty input
            return 0
            # END SOLUTION
        return x"""


def write_notebook(path, *sources, markdown="# A title"):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(markdown))
    for source in sources:
        cell = nbformat.v4.new_code_cell(source)
        cell.execution_count = 3
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="old output\n")]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_strip_solutions_keeps_indentation_and_removes_markers():
    student = strip_solutions(SOLUTION_CELL)
    assert "BEGIN SOLUTION" not in student and "END SOLUTION" not in student
    assert "scores" not in student and "return 0" not in student
    assert '    """docstring stays"""\n    raise NotImplementedError("exercise: write your solution here")\n' in student
    assert '            raise NotImplementedError("exercise: handle the empty input")\n        return x' in student
    compile(student, "<student>", "exec")  # still valid Python
    assert strip_solutions("x = 1\n") == "x = 1\n"


@pytest.mark.parametrize("source, problem", [
    ("# BEGIN SOLUTION\nx = 1\n", "has no `# END SOLUTION`"),
    ("x = 1\n# END SOLUTION\n", "without a `# BEGIN SOLUTION`"),
    ("# BEGIN SOLUTION\n  # BEGIN SOLUTION\nx\n# END SOLUTION\n# END SOLUTION\n", "nested"),
])
def test_unbalanced_markers(source, problem):
    with pytest.raises(ValueError, match=problem):
        strip_solutions(source)


def test_make_student_versions(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    write_notebook(src / "01_a.ipynb", SOLUTION_CELL, "print('no exercise here')",
                   markdown="Markdown may mention\n# BEGIN SOLUTION\nand is left alone")
    write_notebook(src / "02_b.ipynb", "x = 1")
    written = make_student_versions(src, tmp_path / "out")
    assert [p.name for p in written] == ["01_a.ipynb", "02_b.ipynb"]
    nb = nbformat.read(written[0], as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "Student version" in nb.cells[0].source
    assert "generated" in nb.cells[0].source and "01_a.ipynb" in nb.cells[0].source
    assert "# BEGIN SOLUTION" in nb.cells[1].source  # markdown untouched
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code[0].source == strip_solutions(SOLUTION_CELL)
    assert code[1].source == "print('no exercise here')"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    source_nb = nbformat.read(src / "01_a.ipynb", as_version=4)
    assert "# BEGIN SOLUTION" in source_nb.cells[1].source and source_nb.cells[1].outputs, "source untouched"


def test_make_student_versions_names_the_bad_notebook_and_cell(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    write_notebook(src / "00_ok.ipynb", SOLUTION_CELL)
    write_notebook(src / "03_bad.ipynb", "x = 1", "# BEGIN SOLUTION\ny = 2\n")
    with pytest.raises(ValueError, match=r"03_bad\.ipynb, cell 2 .*line 1 has no"):
        make_student_versions(src, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written when a notebook is malformed"
    with pytest.raises(FileNotFoundError):
        make_student_versions(tmp_path / "missing", tmp_path / "out")
