"""The README's examples run, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def python_examples():
    """The README's Python blocks: the first runs anywhere, the second inside a quickstart's parent folder
    (tests/test_cli.py runs it after its quickstart)."""
    blocks = _blocks("python")
    assert len(blocks) == 2
    return blocks


def test_python_example_runs():
    exec(compile(python_examples()[0], "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    test_command = next(line for block in _blocks("bash") for line in block.splitlines() if "pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_quickstart_command_names_the_verb():
    assert any("sundae quickstart" in block and "pip install torch==2.13.0" in block for block in _blocks("bash"))
