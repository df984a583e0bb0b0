"""The dependency direction, one rule per subpackage, read from the source (module-level and function-level
imports alike), plus an import of every module with `stages` blocked.

Floors, lowest first: diffusion → nets → data → pipeline → evaluation → training → harness; a floor never
imports one above it, and some floors are kept apart from floors below them too (`LATERAL`). The root modules
(`config`, `checkpoint`, `errors`, `checks`, `atomic`, `imageops`, `device`, `locks`, `summary`,
`ema_profiles`) serve every floor; `cli` is the tools' edge. The package `cascade` never imports the preset package `stages`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cascade"

FLOORS = ("diffusion", "nets", "data", "pipeline", "evaluation", "training", "harness")
# Beyond "nothing from above": the math knows no checkpoint, data knows no model, sampling reads no shards,
# evaluation (below the trainer, whose in-training quality it scores) never imports the trainer either.
LATERAL = {"diffusion": ("checkpoint",), "data": ("diffusion", "nets"), "pipeline": ("data",)}
# What each folder may not import (besides `stages`, which no module of `cascade` imports).
FORBIDDEN = {floor: (*FLOORS[i + 1 :], "cli", *LATERAL.get(floor, ())) for i, floor in enumerate(FLOORS)}
ROOT_MODULES = ("config", "checkpoint", "errors", "checks", "atomic", "imageops", "device", "locks", "summary",
                "ema_profiles")
# The root modules serve every floor: they may import the diffusion math and the network builder, no more.
ROOT_FORBIDDEN = ("data", "training", "pipeline", "evaluation", "harness", "cli")


def _imports(path: Path) -> set[str]:
    """Every `cascade.*` module a source file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "cascade":  # `from cascade import checkpoint`
                found |= {f"cascade.{a.name}" for a in node.names}
    return {m for m in found if m == "cascade" or m.startswith(("cascade.", "stages"))}


def _violations(files, forbidden) -> list[str]:
    bad = []
    for path in files:
        for mod in sorted(_imports(path)):
            parts = mod.split(".")
            if parts[0] == "stages" or (len(parts) > 1 and parts[1] in forbidden):
                bad.append(f"{path.name} imports {mod}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_each_folder_imports_only_floors_below_it(folder):
    files = sorted((PACKAGE / folder).glob("*.py"))
    assert files, f"cascade/{folder} holds no module"
    assert _violations(files, FORBIDDEN[folder]) == []


def test_root_modules_import_no_floor_above_the_networks():
    files = [PACKAGE / f"{name}.py" for name in ROOT_MODULES]
    assert _violations(files, ROOT_FORBIDDEN) == []


def test_every_module_lives_in_a_known_place():
    """A new folder or root module needs its rule above."""
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FORBIDDEN)
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "cli"}
    assert root == set(ROOT_MODULES)


def test_the_probe_sees_an_import_it_should_refuse(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cascade.training.trainer import train_stage\n    import stages\n"
                   "from cascade import checkpoint\n")
    assert _imports(bad) == {"cascade", "cascade.checkpoint", "cascade.training.trainer", "stages"}
    assert _violations([bad], FORBIDDEN["pipeline"]) == ["bad.py imports cascade.training.trainer",
                                                          "bad.py imports stages"]


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
names = sorted(m.name for m in pkgutil.walk_packages(cascade.__path__, "cascade."))
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_cascade_imports_without_stages():
    done = subprocess.run([sys.executable, "-c", _PROBE], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 40  # every module was imported, not an empty package
