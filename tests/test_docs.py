"""Every example in the docstrings and every Python block of the README runs."""
import doctest
import pathlib
import re

import pytest

import eco_optax
from eco_optax import (alias, checkpoint, memory, moments, nnx, quantize, rules, transform,
                       tree)

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", [eco_optax, alias, checkpoint, memory, moments, nnx,
                                    quantize, rules, transform, tree],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 or module in (rules,), f"{module.__name__} has no examples"
  assert result.failed == 0


def _readme_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_python_blocks_run(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  exec(compile(_readme_blocks()[index], f"README.md block {index}", "exec"), {})
