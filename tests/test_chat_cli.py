"""``reso chat`` driven through a pipe: answers, obeys exit / goal / status / metrics, prints metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from core_model.config import ResoLLMConfig
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
                           "-n", "8", "--no-metrics"], input="hi\nmetrics\nhi again\n", capture_output=True,
                          text=True, timeout=120, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("reso> ") == 2 and proc.stdout.count(METRICS) == 1  # toggled on; EOF ends


def test_bad_checkpoint_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["chat", "--checkpoint", str(tmp_path)], input="exit\n")
    assert result.exit_code == 2
