"""What `pip install eco-optax` brings: the library, its runtime dependencies, nothing else."""
import pathlib
import subprocess
import sys
import zipfile

import eco_optax as eco

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_importing_the_library_loads_no_benchmark_or_checkpoint_packages():
  code = ("import sys, eco_optax, eco_optax.nnx; "
          "print(sorted({m.split('.')[0] for m in sys.modules}))")
  loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT / "tests").stdout
  for name in ("matplotlib", "tqdm", "orbax", "benchmarks", "examples"):
    assert f"'{name}'" not in loaded, name


def test_the_wheel_holds_the_library_and_its_license_only(tmp_path):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
  wheel, = tmp_path.glob("eco_optax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names}
  assert {t for t in tops if not t.endswith(".dist-info")} == {"eco_optax"}, tops
  assert "eco_optax/quantize.py" in names
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names


def test_every_name_in_all_exists_and_has_a_docstring():
  """`__all__` is the curated public API: each name is there and documented."""
  assert len(eco.__all__) == len(set(eco.__all__))
  for name in eco.__all__:
    assert hasattr(eco, name), name
    doc = getattr(eco, name).__doc__ or ""
    # a dataclass without a docstring gets its signature, "Name(field: type, ...)"
    assert doc.strip() and not doc.startswith(f"{name}("), name
  for module in ("baselines", "moments", "quantize", "rules", "step", "transform"):
    assert hasattr(eco, module), module            # attributes, though not in __all__
