"""``reso generate`` through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from core_model.config import ResoLLMConfig
from core_model.model import ResoLLMModel


def reso(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=120)


def test_generate_from_checkpoint_prints_json_metrics(tmp_path):
    torch.manual_seed(0)
    ResoLLMModel(ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4)).save(tmp_path)
    run = reso("generate", "Once upon a time", "--checkpoint", str(tmp_path), "-n", "12", "--json", "--seed", "1")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["tokens_generated"] == 12 and out["prompt"] == "Once upon a time"
    assert 0.0 <= out["coherence"] <= 1.0 and out["mean_logprob"] < 0
    again = json.loads(reso("generate", "Once upon a time", "--checkpoint", str(tmp_path), "-n", "12", "--json",
                            "--seed", "1").stdout)
    assert again["text"] == out["text"]  # same seed, same text


def test_generate_human_output_and_errors(tmp_path):
    run = reso("generate", "Hi", "--preset", "small", "-n", "5", "--temperature", "0")
    assert run.returncode == 0 and run.stdout.startswith("Hi") and "tokens_generated=5" in run.stderr
    bad = reso("generate", "Hi", "--checkpoint", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "not a checkpoint directory" in bad.stderr and "Traceback" not in bad.stderr
    assert reso("generate", "Hi", "--preset", "huge").returncode == 2
