"""``reso chat`` driven through a pipe: answers, obeys exit / goal / status / metrics, prints metrics."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from core_model.config import AgencyConfig, ResoLLMConfig
from core_model.inference import ResoLLMInference
from core_model.model import ResoLLMModel
from core_model.tokenizer import create_default_tokenizer
from orchestrator.cli import app
from model_helpers import one_torch_thread  # noqa: F401  (fixture)

METRICS = "[stability="


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = create_default_tokenizer()
    model = ResoLLMModel(ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256))
    return model.save(tmp_path_factory.mktemp("ckpt"), tok)


def test_chat_commands(checkpoint):
    script = "hello\nstatus\nmetrics\nwhat now?\nmetrics\ngoal talk about gardens\ntell me\nstatus\nexit\nnever read\n"
    result = CliRunner().invoke(app, ["chat", "--checkpoint", str(checkpoint), "-n", "12"], input=script)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("Reso-LLM interactive session.")
    assert out.count("reso> ") == 3  # three messages answered, "never read" after exit is not
    assert out.count(METRICS) == 2  # metrics on, off for "what now?", on again
    assert "metrics display off" in out and "metrics display on" in out
    assert "goal set for the next response: talk about gardens" in out
    statuses = [l for l in out.splitlines() if "status: stability=" in l]
    assert len(statuses) == 2 and "turn=1" in statuses[0] and "turn=3" in statuses[1]
    assert "memory=3 moments" in statuses[1]  # each user message is remembered
    assert out.rstrip().endswith("bye")


def test_chat_through_a_real_pipe(checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reso = Path(sys.executable).parent / "reso"  # the installed console script
    if not reso.exists():
        pytest.skip(f"console script not installed at {reso}")
    proc = subprocess.run([str(reso), "chat", "--checkpoint", str(checkpoint),
                           "-n", "8", "--no-metrics"],
                          input="hi\nmetrics\ngoal talk about gardens\nhi again\nstatus\nexit\nnever read\n",
                          capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("reso> ") == 2 and out.count(METRICS) == 1  # toggled on for the second answer
    assert "goal set for the next response: talk about gardens" in out
    status = [l for l in out.splitlines() if "status: stability=" in l]
    assert len(status) == 1 and "turn=2" in status[0] and "memory=2 moments" in status[0]
    assert "goals=[none]" in status[0]  # the goal lasted one response
    assert out.rstrip().endswith("bye")  # exit: "never read" is not answered


def _chat(engine: ResoLLMInference, script: str) -> str:
    out = io.StringIO()
    engine.interactive_session(show_metrics=False, input_stream=io.StringIO(script), output_stream=out,
                               max_length=6)
    return out.getvalue()


def test_every_pending_goal_lasts_one_response_and_a_refused_goal_is_not_fatal():
    torch.manual_seed(0)
    tok = create_default_tokenizer()
    cfg = ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256,
                        agency=AgencyConfig(max_goals=2))
    model = ResoLLMModel(cfg).eval()
    engine = ResoLLMInference(model, tok)
    out = _chat(engine, "goal talk about gardens\ngoal describe rivers\ngoal explain mountains\n"
                        "status\nhello\nstatus\nexit\n")
    assert out.count("goal set for the next response") == 2
    assert "goal not set: 2 goals are already active" in out  # reported; the chat carries on
    first, second = [l for l in out.splitlines() if "status: stability=" in l]
    assert "gardens" in first and "rivers" in first
    assert "goals=[none]" in second and out.count("reso> ") == 1
    assert {g.status for g in model.session.agency.goals} <= {"abandoned", "achieved"}

    off = ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256,
                        agency=AgencyConfig(enabled=False))
    out = _chat(ResoLLMInference(ResoLLMModel(off).eval(), tok), "goal talk about gardens\nhello\nexit\n")
    assert "goal not set:" in out and out.count("reso> ") == 1 and out.rstrip().endswith("bye")


def test_bad_checkpoint_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["chat", "--checkpoint", str(tmp_path)], input="exit\n")
    assert result.exit_code == 2


def test_commands_in_any_case_a_goal_set_before_exit_goes_and_a_failed_response_is_not_fatal(monkeypatch):
    torch.manual_seed(0)
    tok = create_default_tokenizer()
    model = ResoLLMModel(ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256)).eval()
    engine = ResoLLMInference(model, tok)
    out = _chat(engine, "Status\nGOAL talk about gardens\nEXIT\n")
    assert "status: stability=" in out and "goal set for the next response" in out and "reso> " not in out
    assert out.rstrip().endswith("bye")
    assert [g.status for g in model.session.agency.goals] == ["abandoned"]  # it had no response to last for

    real = engine.generate_ids
    calls = {"n": 0}

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate_ids", fails_once)
    out = _chat(engine, "hello\nhello again\nexit\n")
    assert "error: the response failed (RuntimeError: out of memory)" in out and out.count("reso> ") == 1
    assert [t["text"] for t in model.session.history if t["role"] == "user"] == ["hello again"]
