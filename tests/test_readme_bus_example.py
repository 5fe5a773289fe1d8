"""The README's bus scripting example runs as written and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from model_helpers import one_torch_thread  # noqa: F401  (fixture)

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(60)]


def bus_example() -> str:
    section = README.read_text().split("## The entanglement bus", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the bus section should hold one python example"
    return blocks[0]


def test_readme_bus_example_runs(capsys):
    exec(compile(bus_example(), "<README: bus example>", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "['alice'] (8, 2) 0.1 0"  # bob sees alice, the field's shape, the fold, no junk
    assert re.fullmatch(r"\(1, \d+, \d+\)", lines[1])
