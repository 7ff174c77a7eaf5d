"""Prints the runtime dependencies of pyproject.toml pinned at their lower bounds.

Used by ``make test-min``: the declared minimum versions must pass the suite.
"""
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
pins = []
for requirement in project["dependencies"]:
  match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
  if not match:
    raise SystemExit(f"pyproject.toml: {requirement!r} has no plain lower bound")
  pins.append(f"{match[1]}=={match[2]}")
print(" ".join(pins))
