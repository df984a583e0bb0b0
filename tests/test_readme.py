"""README.md and .ci/run stay in step: CI runs exactly README's set-up and test commands."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_commands():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln for ln in lines if ln.startswith((".venv/bin/", "python3 -m venv"))]


def test_ci_runs_readme_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = _ci_commands()
    assert len(commands) == 2, commands  # set-up, then tests
    for command in commands:
        assert command in readme, f"README.md lacks the CI command: {command}"


def test_setup_installs_cpu_torch_first():
    setup = _ci_commands()[0]
    assert setup.index("torch==2.13.0") < setup.index("-e "), "the CPU torch wheel must be installed first"
