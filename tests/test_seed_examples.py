"""The seed document's own code: every block of "Quick Start" (basic usage, goal-guided
generation, interactive chat) and "Enhanced Features", with ``apps.reso_llm`` replaced by
``core_model`` and nothing else changed, run in order in one namespace. The multi-agent block
belongs to another issue and is left out."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from model_helpers import one_torch_thread  # noqa: F401  (fixture)

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "reso-llm-v2.md"
CLASSES = "(stable|periodic|chaotic|divergent)"


def seed_blocks() -> dict[str, str]:
    """``{subsection title: python code}`` for the two sections, in document order."""
    if not SEED.is_file():
        pytest.skip(f"seed document not found at {SEED}")
    text = SEED.read_text()
    blocks: dict[str, str] = {}
    for section in ("## Quick Start", "## Enhanced Features"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        head, *parts = body.split("\n### ")
        assert "```python" not in head, f"code under {section!r} outside a subsection would be skipped"
        for part in parts:
            title = part.splitlines()[0].strip()
            for code in re.findall(r"```python\n(.*?)```", part, flags=re.S):
                blocks[title] = blocks.get(title, "") + code.replace("apps.reso_llm", "core_model")
    return blocks


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_seed_document_examples_run_as_written(capsys, monkeypatch):
    blocks = seed_blocks()
    assert list(blocks) == ["Basic Usage", "Goal-Guided Generation", "Interactive Chat", "Multi-Agent Coordination",
                            "1. Agency Layer", "2. PRSC Semantic Bindings", "3. Predictive Stability",
                            "4. Memory Management", "5. Generation Result"]
    del blocks["Multi-Agent Coordination"]  # issue: multi-agent coordination
    torch.manual_seed(0)
    ns: dict = {}

    def run(title: str) -> str:
        exec(compile(blocks[title], f"<seed: {title}>", "exec"), ns)
        return capsys.readouterr().out

    out = run("Basic Usage")
    assert re.search(rf"^Stability: {CLASSES}$", out, re.M) and re.search(r"^Lyapunov: -?\d+\.\d{4}$", out, re.M)
    assert ns["result"].tokens_generated >= 1 and ns["result"].prompt == "Once upon a time"
    assert out.startswith(ns["result"].text + "\n")  # print(result.text) comes first
    assert ns["result"].text == ns["tokenizer"].decode(ns["result"].token_ids)

    out = run("Goal-Guided Generation")
    m = re.search(r"^Goals achieved: (\[.*\])$", out, re.M)
    assert m and m.group(1) == repr(ns["result"].goals_achieved)
    assert out.startswith(ns["result"].text + "\n")
    assert set(ns["result"].goals_achieved) <= {"Provide a clear, beginner-friendly explanation"}
    assert "Provide a clear, beginner-friendly explanation" in ns["result"].goal_progress

    monkeypatch.setattr("sys.stdin", io.StringIO("status\nmetrics\nHello there\nmetrics\ngoal be kind\nHi\nexit\n"))
    out = run("Interactive Chat")
    assert out.startswith("Reso-LLM interactive session.") and "status: stability=" in out
    assert "metrics display off" in out and "goal set for the next response: be kind" in out
    assert out.count("reso> ") == 2 and out.count("[stability=") == 1 and out.rstrip().endswith("bye")

    out = run("1. Agency Layer")
    assert ns["goal"].description == "Generate coherent technical documentation" and ns["goal"].status == "active"
    lines = out.splitlines()
    foci = [l for l in lines if re.match(r"^(token|goal|concept):.+ - intensity: \d\.\d\d$", l)]
    assert 1 <= len(foci) <= 5
    assert "Generate coherent technical documentation: 0%" in lines  # no generation since it was created

    run("2. PRSC Semantic Bindings")
    assert ns["binding"].name == "mathematics" and ns["binding"].token_ids == [42] and ns["binding"].prime == 191

    out = run("3. Predictive Stability")
    assert 0.0 <= ns["stability"] <= 1.0
    assert 0.3 <= ns["suggested_temp"] <= 1.5
    printed = out.splitlines()
    assert re.fullmatch(CLASSES, printed[0]) and float(printed[1]) == ns["result"].lyapunov
    assert printed[2] == str(ns["result"].warnings)

    run("4. Memory Management")
    moments = ns["model"].session.memory.moments
    assert moments[-1].text == "Important context to remember" and moments[-1].importance == 1.0
    assert ns["model"].when_did_i_learn("Important context to remember")[0].text == "Important context to remember"

    run("5. Generation Result")
    r = ns["result"]
    assert r.prompt == "Hello" and r.tokens_generated == len(r.entropy_trace) == len(r.temperature_trace)
    assert len(r.coherence_trace) == r.tokens_generated and isinstance(r.generation_time_ms, float)
