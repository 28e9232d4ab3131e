"""The package layout: dependencies point one way, no cycles, a lean core.

Reads the source with `ast` (every import, at module level or inside a
function) and checks the rules docs/architecture.md states:

* `jaxbnb._src` subpackages import only downwards:
  tools -> train -> io -> models -> layers -> quant -> pallas_kernels, with optim
  beside layers (it may import quant only);
* no import cycle between jaxbnb's modules, counting function-level imports;
* function-level imports only for optional heavy third-party packages;
* no module uses another module's private names;
* `pallas_kernels` never imports jaxbnb;
* importing the core (`jaxbnb`, `jaxbnb.functional`, `jaxbnb.optim`) does
  not import Flax, and nothing public imports transformers, tokenizers,
  gguf or torch until a feature needs it.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "jaxbnb" / "_src"

# Lower rank may not import higher rank; same rank only within a package.
RANK = {"pallas_kernels": 0, "quant": 1, "optim": 2, "layers": 2,
        "models": 3, "io": 4, "train": 5, "tools": 6}
# Packages that may be imported inside a function: optional and heavy.
LAZY_OK = {"torch", "bitsandbytes", "gguf", "matplotlib", "transformers",
           "tokenizers", "scipy", "tqdm", "orbax", "jinja2", "safetensors",
           "peft", "jaxlib", "argparse"}


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _sources():
  files = sorted((ROOT / "jaxbnb").rglob("*.py"))
  files += sorted((ROOT / "pallas_kernels").rglob("*.py"))
  return {_module_name(p): p for p in files}


SOURCES = _sources()


def _in_functions(tree) -> set[int]:
  """ids of the nodes inside a function body."""
  inside = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      inside.update(id(n) for n in ast.walk(node) if n is not node)
  return inside


def _imports(path: pathlib.Path):
  """Yields (imported module, names, at module level?) for every import."""
  tree = ast.parse(path.read_text())
  inside = _in_functions(tree)
  top = {id(n) for n in ast.walk(tree)} - inside
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, (), id(node) in top
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = tuple(a.name for a in node.names)
      yield node.module, names, id(node) in top


def _resolve(module: str, names) -> list[str]:
  """The jaxbnb/pallas_kernels modules an import statement loads."""
  out = []
  if module in SOURCES:
    out.append(module)
  for n in names:
    if f"{module}.{n}" in SOURCES:
      out.append(f"{module}.{n}")
  return out


def _graph():
  graph = {}
  for name, path in SOURCES.items():
    deps = set()
    for module, names, _ in _imports(path):
      deps.update(d for d in _resolve(module, names) if d != name)
    graph[name] = deps
  return graph


def _layer(module: str) -> str | None:
  parts = module.split(".")
  if parts[0] == "pallas_kernels":
    return "pallas_kernels"
  if parts[:2] == ["jaxbnb", "_src"] and len(parts) > 2:
    return parts[2]
  return None  # the public modules re-export; they sit above everything


def test_every_src_module_is_in_a_known_subpackage():
  for name in SOURCES:
    layer = _layer(name)
    if name.startswith("jaxbnb._src.") :
      assert layer in RANK, f"{name}: not in one of {sorted(RANK)}"


def test_dependencies_point_one_way():
  bad = []
  for name, deps in _graph().items():
    src = _layer(name)
    if src is None:
      continue
    for dep in deps:
      dst = _layer(dep)
      if dst is None:
        if src != "tools":  # only the tools sit above the public API
          bad.append(f"{name} imports the public module {dep}")
      elif dst != src and RANK[dst] >= RANK[src]:
        bad.append(f"{name} ({src}) imports {dep} ({dst})")
  assert not bad, "\n".join(bad)


def test_pallas_kernels_is_a_leaf():
  for name, deps in _graph().items():
    if name.startswith("pallas_kernels"):
      assert not [d for d in deps if d.startswith("jaxbnb")], name


def test_no_import_cycle():
  graph = _graph()
  state = {}
  stack = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for d in sorted(graph.get(n, ())):
      if state.get(d) == 1:
        cycle = stack[stack.index(d):] + [d]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if d not in state:
        visit(d)
    stack.pop()
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      visit(n)


def test_function_level_imports_only_for_optional_heavy_packages():
  bad = []
  for name, path in SOURCES.items():
    for module, names, top in _imports(path):
      if top:
        continue
      root = module.split(".")[0]
      if root in ("jaxbnb", "pallas_kernels"):
        bad.append(f"{name}: function-level import of {module} {names}")
      elif root not in LAZY_OK and root != "__future__":
        bad.append(f"{name}: function-level import of {module}")
  assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
  bad = []
  for name, path in SOURCES.items():
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for a in node.names:
          target = f"{node.module}.{a.name}"
          if target in SOURCES:
            aliases[a.asname or a.name] = target
          elif (node.module in SOURCES and a.name.startswith("_")
                and not a.name.startswith("__")):
            bad.append(f"{name}: imports {node.module}.{a.name}")
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name in SOURCES:
            aliases[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        bad.append(f"{name}: uses {aliases[node.value.id]}.{node.attr}")
  assert not bad, "\n".join(bad)


def _loaded_after(code: str) -> set[str]:
  out = subprocess.run(
      [sys.executable, "-c",
       code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in "
       "sys.modules})))"],
      cwd=ROOT, capture_output=True, text=True, check=True)
  return set(out.stdout.split())


def test_optax_user_never_imports_flax_or_transformers():
  loaded = _loaded_after("import jaxbnb, jaxbnb.functional, jaxbnb.optim")
  assert not loaded & {"flax", "transformers", "tokenizers", "gguf", "torch",
                       "orbax"}, sorted(loaded)


def test_models_and_convert_import_no_optional_packages():
  loaded = _loaded_after("import jaxbnb.models, jaxbnb.convert, jaxbnb.nnx, "
                         "jaxbnb.linen")
  assert "flax" in loaded  # the check sees imports at all
  assert not loaded & {"transformers", "tokenizers", "gguf", "torch",
                       "jinja2", "orbax"}, sorted(loaded)
