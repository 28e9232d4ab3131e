"""The mutation check's table still fits the source (tests/mutation.py).

Running the mutants takes minutes (`python -m tests.mutation`); this only
checks, in milliseconds, that every mutant still applies exactly once, so a
refactor that moves mutated code fails the normal suite too.
"""

import pytest

from tests import mutation


def test_every_mutant_applies_exactly_once():
  mutation.check_table()


def test_the_table_covers_every_layer():
  paths = {"/".join(m.path.split("/")[:3]) for m in mutation.MUTANTS}
  layers = {p.split("/")[2] if p.startswith("jaxbnb/") else p.split("/")[0]
            for p in paths}
  assert {"quant", "layers", "models", "optim", "pallas_kernels"} <= layers
  assert len(mutation.MUTANTS) >= 16


def test_a_stale_mutant_fails_loudly(tmp_path):
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "a_test.py").write_text("")
  (tmp_path / "a.py").write_text("x = 1\nx = 1\ny = 2\n")
  ok = mutation.Mutant("ok", "a.py", "y = 2", "y = 3", ("tests/a_test.py",))
  mutation.check_table([ok], root=tmp_path)
  for old, count in (("z = 3", 0), ("x = 1", 2)):
    stale = mutation.Mutant("stale", "a.py", old, "w", ("tests/a_test.py",))
    with pytest.raises(mutation.StaleMutant, match=f"occurs {count} times"):
      mutation.check_table([stale], root=tmp_path)
  no_test = mutation.Mutant("no-test", "a.py", "y = 2", "y = 3",
                            ("tests/b_test.py",))
  with pytest.raises(mutation.StaleMutant, match="not found"):
    mutation.check_table([no_test], root=tmp_path)
  with pytest.raises(mutation.StaleMutant, match="duplicate"):
    mutation.check_table([ok, ok], root=tmp_path)


def test_mutants_apply_to_a_copy_only(tmp_path):
  m = mutation.MUTANTS[0]
  with pytest.raises(AssertionError, match="working tree"):
    mutation.apply(m, mutation.ROOT)
  src = tmp_path / m.path
  src.parent.mkdir(parents=True)
  original = (mutation.ROOT / m.path).read_text(encoding="utf-8")
  src.write_text(original, encoding="utf-8")
  mutation.apply(m, tmp_path)
  assert src.read_text(encoding="utf-8") == original.replace(m.old, m.new)
  assert (mutation.ROOT / m.path).read_text(encoding="utf-8") == original


def test_baseline_selection_is_the_union():
  a = mutation.Mutant("a", "p", "o", "n", ("t.py::x", "u.py::y"))
  b = mutation.Mutant("b", "p", "o", "n", ("t.py", "u.py::y", "v.py::z[1]"))
  assert mutation.baseline_selection([a, b]) == ["u.py::y", "t.py",
                                                 "v.py::z[1]"]
