"""The dependency direction: the core package `cascade` never imports the stage presets package `stages`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imports every module of `cascade` with `stages` blocked: any import of it, at module level or inside a
# function that runs at import time, raises ImportError naming the importer.
_PROBE = """
import importlib, pkgutil, sys

class BlockStages:
    def find_spec(self, name, path=None, target=None):
        if name == "stages" or name.startswith("stages."):
            raise ImportError(f"cascade imported {name!r}")
        return None

sys.meta_path.insert(0, BlockStages())
import cascade
names = sorted(m.name for m in pkgutil.iter_modules(cascade.__path__, "cascade."))
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_cascade_imports_without_stages():
    done = subprocess.run([sys.executable, "-c", _PROBE], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 20  # every module was imported, not an empty package


def test_no_function_level_stages_import_in_cascade():
    """Imports inside functions run late; the source itself must not name the package."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "cascade").glob("*.py")
                 if any(line.strip().startswith(("import stages", "from stages"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
