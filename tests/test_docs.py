"""Every example in the docstrings and every Python block of the README and docs/ runs."""
import doctest
import pathlib
import re

import pytest

import eco_optax
from eco_optax import (alias, baselines, checkpoint, memory, moments, nnx, quantize, rules,
                       serialization, step, train_state, transform, tree, wrappers)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("module", [eco_optax, alias, checkpoint, memory, moments, nnx,
                                    quantize, rules, serialization, train_state, transform,
                                    tree, wrappers, baselines, step],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 or module in (rules, baselines, step), (
      f"{module.__name__} has no examples")
  assert result.failed == 0


def _blocks():
  return [(page.name, i, block) for page in PAGES
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(),
                                               flags=re.S))]


@pytest.mark.parametrize("page,index,block", _blocks(), ids=lambda x: str(x)[:20])
def test_python_blocks_run(page, index, block, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  exec(compile(block, f"{page} block {index}", "exec"), {})
