"""CI must run exactly the README's test command."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme if line.startswith("    pip install")]
    assert len(commands) >= 2, "README must open with the install+run and install+test commands"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert ci == [commands[1]]
    assert "pytest" in commands[1] and "python -m fxfuse demo" in commands[0]
