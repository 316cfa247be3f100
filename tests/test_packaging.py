"""A built wheel ships every subpackage of kernels/ and layer_selection/ and every recipe (setuptools drops unlisted ones silently)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_subpackage(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("salaconvert-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"salaconvert/__init__.py"}
    for folder, package in (("kernels", "salaconvert/kernels"), ("layer_selection", "salaconvert/layer_selection"),
                            ("src/salaconvert", "salaconvert")):
        for init in (ROOT / folder).rglob("__init__.py"):
            expected.add(f"{package}/{init.relative_to(ROOT / folder).as_posix()}")
    expected |= {f"salaconvert/recipes/{y.relative_to(ROOT / 'recipes').as_posix()}" for y in (ROOT / "recipes").rglob("*.yaml")}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels`
