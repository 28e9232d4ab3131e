"""The code in the documentation runs: README.md and every docs/*.md.

Each page is one test. Its ```python blocks run in order in one namespace
(a later block may use the names of an earlier one); its ```pycon blocks
(`>>>` prompts) run as doctests in the same namespace, so the output they
show is checked too. The current directory is a fresh temporary folder
holding a link `tests/golden` to the golden fixtures: a block may read
`tests/golden/...` and everything it writes lands in the temporary folder.

A block that cannot run on a CPU CI machine in reasonable time (it needs a
GPU, a download, a real 8B model, or minutes) carries, on the line just
before its fence, the marker

    <!-- docs-test: skip (why it cannot run here) -->

The page test does not run it; it is reported as a skipped test
`test_skipped_block[page:line]` with that reason (`pytest -rs` lists them).
A marker without a reason, an unknown `docs-test:` directive or a marker
that is not right before a python/pycon fence fails the page, and so does
a relative link to a file or heading that does not exist, or a block that
reaches into `jaxbnb._src` (docs use the public modules only).

A ```` ```python signature ```` block (the API reference's) is not run: each
`name(params) [-> result]` in it must match `inspect.signature` of the public
name (looked up in jaxbnb's public modules): the same parameter names in the
same order and kinds (`*`, `**`, keyword-only), a default where the code has
one, and equal defaults where the page writes a literal or a dotted name
such as `jnp.uint8`.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import importlib
import inspect
import io
import pathlib
import re
import sys
import traceback
import types

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
_SKIP = re.compile(r"^\s*skip\s*(?:\((?P<reason>.*)\))?\s*$")
_LANGS = {"python": "python", "py": "python", "python3": "python",
          "pycon": "pycon"}
_DOCTEST_FLAGS = (doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
                  | doctest.FAIL_FAST)


@dataclasses.dataclass(frozen=True)
class Block:
  """One runnable fenced block of a page."""

  page: str
  fence_line: int  # 1-based line of the opening fence
  lang: str  # "python", "pycon" or "signature"
  code: str  # dedented to the fence's indentation
  skip: str | None  # the reason of a skip marker, or None


def parse(page: str) -> tuple[list[Block], list[str]]:
  """The python, pycon and signature blocks of `page`, and its problems."""
  lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
  blocks, errors = [], []
  marker = None  # (line number, reason) of a marker on the previous line
  i = 0
  while i < len(lines):
    line = lines[i]
    m = _MARKER.match(line)
    if m:
      if marker is not None:
        errors.append(f"{page}:{marker[0]}: docs-test marker not followed "
                      "by a python or pycon fence")
      s = _SKIP.match(m["body"])
      if not s:
        errors.append(f"{page}:{i + 1}: unknown docs-test directive "
                      f"{m['body'].strip()!r}; the only one is "
                      "`<!-- docs-test: skip (reason) -->`")
        marker = None
      elif not (s["reason"] or "").strip():
        errors.append(f"{page}:{i + 1}: docs-test skip marker without a "
                      "reason; write `<!-- docs-test: skip (why) -->`")
        marker = None
      else:
        marker = (i + 1, s["reason"].strip())
      i += 1
      continue
    f = _FENCE.match(line)
    if not f:
      if marker is not None:
        errors.append(f"{page}:{marker[0]}: docs-test marker must be on the "
                      "line just before a python or pycon fence")
        marker = None
      i += 1
      continue
    indent, fence = f["indent"], f["fence"]
    info = f["info"].split() or [""]
    lang = _LANGS.get(info[0].lower())
    if lang == "python" and "signature" in info[1:]:
      lang = "signature"
    close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    j = i + 1
    while j < len(lines) and not close.match(lines[j]):
      j += 1
    if j == len(lines):
      errors.append(f"{page}:{i + 1}: unclosed code fence")
    body = [l[len(indent):] if l.startswith(indent) else l.lstrip()
            for l in lines[i + 1:j]]
    if lang is not None:
      blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n",
                          marker[1] if marker else None))
    if lang == "signature" and marker is not None:
      errors.append(f"{page}:{marker[0]}: a signature block is never run; "
                    "it needs no skip marker")
    elif lang is None and marker is not None:
      errors.append(f"{page}:{marker[0]}: docs-test marker before a "
                    f"{f['info'].strip() or 'plain'!r} fence; only python "
                    "and pycon blocks run")
    marker = None
    i = j + 1
  if marker is not None:
    errors.append(f"{page}:{marker[0]}: docs-test marker at the end of the "
                  "page")
  return blocks, errors


def _run_python(block: Block, namespace: dict) -> None:
  # Padding keeps the line numbers of tracebacks those of the markdown file.
  source = "\n" * block.fence_line + block.code
  code = compile(source, str(ROOT / block.page), "exec")
  try:
    exec(code, namespace)  # pylint: disable=exec-used
  except Exception as e:  # pylint: disable=broad-exception-caught
    # One line per frame (the page's lines, not the whole page), without
    # this function's frame.
    failure = "".join(traceback.format_exception(
        type(e), e, e.__traceback__.tb_next))
  else:
    return
  pytest.fail(f"python block at {block.page}:{block.fence_line} failed:\n"
              f"{failure}", pytrace=False)


def _run_pycon(block: Block, namespace: dict) -> None:
  test = doctest.DocTestParser().get_doctest(
      block.code, namespace, f"{block.page}:{block.fence_line}",
      str(ROOT / block.page), block.fence_line)
  test.globs = namespace  # get_doctest copies; the page shares one namespace
  out = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=_DOCTEST_FLAGS)
  runner.run(test, out=out.write, clear_globs=False)
  if runner.failures:
    pytest.fail(f"pycon block at {block.page}:{block.fence_line}:\n"
                f"{out.getvalue()}", pytrace=False)


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _prose(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line number, line) of a markdown file outside its fenced blocks."""
  out, fence = [], None
  for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    f = _FENCE.match(line)
    if fence is None and f:
      fence = f["fence"][0] * len(f["fence"])
    elif fence is not None and line.strip().startswith(fence) and (
        set(line.strip()) == {fence[0]}):
      fence = None
    elif fence is None:
      out.append((i, line))
  return out


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's anchors of the headings of a markdown file."""
  seen, out = {}, set()
  for _, line in _prose(path):
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    slug = re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def check_links(page: str) -> list[str]:
  """Relative links of `page` whose file or heading does not exist."""
  errors = []
  for number, line in _prose(ROOT / page):
    for m in _LINK.finditer(line):
      target = m["target"]
      if re.match(r"^[a-z]+:", target):
        continue  # https:, mailto:
      file, _, anchor = target.partition("#")
      path = (ROOT / page).parent / file if file else ROOT / page
      if not path.exists():
        errors.append(f"{page}:{number}: link to a missing file {target!r}")
      elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
        errors.append(f"{page}:{number}: link to a missing heading "
                      f"{target!r}")
  return errors


# The public modules, in the order a bare name is looked up.
_PUBLIC = ("jaxbnb.functional", "jaxbnb.nnx", "jaxbnb.linen",
           "jaxbnb.models", "jaxbnb.convert", "jaxbnb.optim", "jaxbnb")
_KINDS = {inspect.Parameter.POSITIONAL_ONLY: "positional",
          inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
          inspect.Parameter.VAR_POSITIONAL: "*args",
          inspect.Parameter.KEYWORD_ONLY: "keyword-only",
          inspect.Parameter.VAR_KEYWORD: "**kwargs"}
_NO_DEFAULT = object()


def _split_signature(text: str) -> tuple[str, str] | None:
  """`name(params) -> ...` -> (name, params), or None if it is not one."""
  m = re.match(r"([A-Za-z_][\w.]*)\(", text)
  if not m:
    return None
  depth, quote = 0, None
  for i in range(m.end() - 1, len(text)):
    c = text[i]
    if quote:
      quote = None if c == quote else quote
    elif c in "'\"":
      quote = c
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth == 0:
        return m[1], text[m.end():i]
  return None


def _documented(params: str) -> list[tuple[str, str, object]]:
  """(name, kind, default source or _NO_DEFAULT) of a documented list."""
  args = ast.parse(f"def _f({params}): pass").body[0].args
  out = []
  positional = args.posonlyargs + args.args
  pos_defaults = [_NO_DEFAULT] * (len(positional) - len(args.defaults))
  pos_defaults += [ast.unparse(d) for d in args.defaults]
  out += [(a.arg, "positional", d) for a, d in zip(positional, pos_defaults)]
  if args.vararg:
    out.append((args.vararg.arg, "*args", _NO_DEFAULT))
  out += [(a.arg, "keyword-only",
           _NO_DEFAULT if d is None else ast.unparse(d))
          for a, d in zip(args.kwonlyargs, args.kw_defaults)]
  if args.kwarg:
    out.append((args.kwarg.arg, "**kwargs", _NO_DEFAULT))
  return out


def _public(name: str):
  """The object a documented name refers to, from the public modules."""
  for module in _PUBLIC:
    obj = importlib.import_module(module)
    try:
      for part in name.split("."):
        obj = getattr(obj, part)
    except AttributeError:
      continue
    return obj
  return None


def _actual(obj) -> list[tuple[str, str, object]]:
  if inspect.isclass(obj):
    params = list(inspect.signature(obj.__init__).parameters.values())[1:]
    if any(c.__module__.startswith("flax.linen") for c in obj.__mro__[1:]):
      params = [p for p in params if p.name not in ("parent", "name")]
  else:
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self":
      params = params[1:]
  return [(p.name, _KINDS[p.kind],
           _NO_DEFAULT if p.default is p.empty else p.default)
          for p in params]


def _default_differs(source: str, actual) -> bool:
  """Whether a documented default (source text) differs from the code's."""
  try:
    value = ast.literal_eval(source)
  except ValueError:
    if not re.fullmatch(r"[A-Za-z_][\w.]*", source):
      return False  # an expression such as an initializer call: not compared
    value = eval(source, {"jnp": jnp, "np": np})  # pylint: disable=eval-used
    return value is not actual
  return type(value) is not type(actual) or value != actual


def _check_signatures(block: Block) -> list[str]:
  """Problems of the signatures in a `python signature` block."""
  where = f"{block.page}:{block.fence_line}"
  chunks = []
  for line in block.code.splitlines():
    if line and not line[0].isspace():
      chunks.append(line)
    elif line.strip() and chunks:
      chunks[-1] += "\n" + line
  if not chunks:
    return [f"{where}: empty signature block"]
  errors = []
  for chunk in chunks:
    split = _split_signature(chunk)
    if split is None:
      errors.append(f"{where}: not a signature: {chunk.splitlines()[0]!r}")
      continue
    name, params = split
    obj = _public(name)
    if obj is None:
      errors.append(f"{where}: {name} is not a public name of "
                    f"{', '.join(_PUBLIC)}")
      continue
    doc, code = _documented(params), _actual(obj)
    if [d[:2] for d in doc] != [c[:2] for c in code]:
      errors.append(f"{where}: {name}: documented parameters "
                    f"{[d[:2] for d in doc]}, the code has "
                    f"{[c[:2] for c in code]}")
      continue
    for (pname, _, d), (_, _, c) in zip(doc, code):
      if (d is _NO_DEFAULT) != (c is _NO_DEFAULT):
        errors.append(f"{where}: {name}: `{pname}` "
                      f"{'has no' if d is _NO_DEFAULT else 'has a'} default "
                      f"on the page, the code {c!r}")
      elif d is not _NO_DEFAULT and _default_differs(d, c):
        errors.append(f"{where}: {name}: `{pname}` defaults to {d} on the "
                      f"page, to {c!r} in the code")
  return errors


@pytest.mark.parametrize("page", PAGES)
def test_page(page, tmp_path, monkeypatch):
  blocks, errors = parse(page)
  errors += check_links(page)
  for block in blocks:
    if block.lang == "signature":
      errors += _check_signatures(block)
    elif "_src" in block.code:
      errors.append(f"{page}:{block.fence_line}: the block uses jaxbnb's "
                    "private `_src`; docs use the public modules")
  if errors:
    pytest.fail("\n".join(errors), pytrace=False)
  blocks = [b for b in blocks if b.lang != "signature"]
  runnable = [b for b in blocks if b.skip is None]
  if not runnable:
    if blocks:
      pytest.skip(f"{page}: every block is marked skip")
    return
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "golden").symlink_to(ROOT / "tests" / "golden")
  monkeypatch.chdir(tmp_path)
  name = "docs_" + re.sub(r"\W", "_", page)
  module = types.ModuleType(name)  # classes defined by blocks live here
  sys.modules[name] = module
  mode = jaxbnb.get_kernel_mode()
  try:
    for block in runnable:
      run = _run_python if block.lang == "python" else _run_pycon
      run(block, module.__dict__)
  finally:
    jaxbnb.set_kernel_mode(mode)
    del sys.modules[name]


SKIPPED = [(b.page, b.fence_line, b.skip)
           for page in PAGES for b in parse(page)[0] if b.skip]


@pytest.mark.parametrize("page,line,reason", SKIPPED,
                         ids=[f"{p}:{l}" for p, l, _ in SKIPPED])
def test_skipped_block(page, line, reason):
  pytest.skip(f"{page}:{line}: {reason}")


def test_parser_finds_blocks_and_markers(tmp_path, monkeypatch):
  text = "\n".join([
      "# t", "```python", "a = 1", "```",
      "<!-- docs-test: skip (needs a GPU) -->", "```python", "gpu()", "```",
      "- item", "  ```pycon", "  >>> a + 1", "  2", "  ```",
      "```bash", "echo no", "```",
      "<!-- docs-test: skip -->", "```python", "x", "```",
      "<!-- docs-test: run -->", "```python", "y", "```",
      "<!-- docs-test: skip (r) -->", "text", "```python", "z", "```",
  ])
  (tmp_path / "p.md").write_text(text)
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  blocks, errors = parse("p.md")
  assert [(b.fence_line, b.lang, b.skip) for b in blocks] == [
      (2, "python", None), (6, "python", "needs a GPU"), (10, "pycon", None),
      (18, "python", None), (22, "python", None), (27, "python", None)]
  assert blocks[2].code == ">>> a + 1\n2\n"
  assert [e.split(": ", 1)[0] for e in errors] == ["p.md:17", "p.md:21",
                                                   "p.md:25"]


def test_link_and_signature_checks(tmp_path, monkeypatch):
  (tmp_path / "a.md").write_text("# Top\n\n## Sub `x` (y)\n\n```bash\n# no heading\n```\n")
  (tmp_path / "p.md").write_text(
      "[ok](a.md#sub-x-y) [ok](a.md) [web](https://x.org/#z) [self](#t)\n"
      "# T\n[bad](b.md) [bad](a.md#no-heading)\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  assert [e.split(": ", 1)[0] for e in check_links("p.md")] == ["p.md:3",
                                                               "p.md:3"]
  def check(code):
    return _check_signatures(Block("p.md", 1, "signature", code, None))
  assert not check('quantize_4bit(A, blocksize=None, compress_statistics=False,'
                   ' quant_type="fp4",\n    quant_storage=jnp.uint8) -> x\n')
  assert check('quantize_4bit(A, blocksize=64, compress_statistics=False,'
               ' quant_type="fp4", quant_storage=np.uint8)\n') == [
                   "p.md:1: quantize_4bit: `blocksize` defaults to 64 on the "
                   "page, to None in the code",
                   "p.md:1: quantize_4bit: `quant_storage` defaults to "
                   "np.uint8 on the page, to <class 'jax.numpy.uint8'> in the "
                   "code"]
  assert "keyword-only" in check("matmul_4bit(A, B, quant_state, bias=None,"
                                 " dtype=None)\n")[0]
  assert "not a public name" in check("no_such_function(a)\n")[0]
  assert "not a signature" in check("just text\n")[0]


def test_api_names_lists_match_the_modules():
  # Each "## `jaxbnb.X`" section's "Names:" paragraph lists exactly the
  # module's `__all__` (a name exported but never mentioned was missed).
  text = (ROOT / "docs" / "api.md").read_text()
  sections = re.findall(r"^## `(jaxbnb\.\w+)`\n\n(Names:.*?)\n\n", text,
                        re.S | re.M)
  assert {m for m, _ in sections} >= {"jaxbnb.linen", "jaxbnb.nnx"}
  for module, names in sections:
    listed = set(re.findall(r"`(\w+)`", names))
    want = set(importlib.import_module(module).__all__)
    assert listed == want, (module, sorted(want - listed),
                            sorted(listed - want))
