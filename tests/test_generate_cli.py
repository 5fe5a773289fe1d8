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


def _cli(*args: str):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    return CliRunner().invoke(app, list(args))


def _tiny_checkpoint(path, **kw):
    from core_model.tokenizer import create_default_tokenizer

    tokenizer = create_default_tokenizer()
    torch.manual_seed(0)
    model = ResoLLMModel(ResoLLMConfig(vocab_size=tokenizer.vocab_size, dim=32, num_layers=1, num_heads=2,
                                       num_phases=4, max_seq_len=32, **kw))
    model.save(path, tokenizer)
    return model.eval(), tokenizer


def _mean_logprob(model, ids: list[int], new: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids + new])[:, :model.config.max_seq_len]).logits[0]
    lp = logits[len(ids) - 1:len(ids) - 1 + len(new)].log_softmax(-1)
    return round(float(lp.gather(1, torch.tensor(new)[:, None]).mean()), 4)


def test_generate_up_to_the_limit_its_error_names(tmp_path):
    model, tokenizer = _tiny_checkpoint(tmp_path)
    ids = tokenizer.encode("Hi")
    limit = model.config.max_seq_len - len(ids) + 1  # what the too-long error suggests
    for n in (5, limit):
        run = _cli("generate", "Hi", "-c", str(tmp_path), "-n", str(n), "--temperature", "0", "--json")
        assert run.exit_code == 0, run.output
        out = json.loads(run.stdout)
        new = model.generate([ids], max_new_tokens=n, temperature=0.0, eos_id=tokenizer.eos_id)[0]
        assert out["tokens_generated"] == len(new) == n
        assert out["mean_logprob"] == _mean_logprob(model, ids, new)  # the same scores as before, at the limit too
    too_many = _cli("generate", "Hi", "-c", str(tmp_path), "-n", str(limit + 1))
    assert too_many.exit_code == 2 and f"at most {limit} new tokens" in too_many.stderr
    assert too_many.stderr.count("\n") == 1 and "Traceback" not in too_many.output
    long_prompt = _cli("generate", "x" * 40, "-c", str(tmp_path), "-n", "1")
    assert long_prompt.exit_code == 2 and "max_seq_len 32" in long_prompt.stderr


def test_generate_chat_stops_at_the_end_of_the_reply(tmp_path):
    model, tokenizer = _tiny_checkpoint(tmp_path, bias=True, tie_embeddings=False)
    with torch.no_grad():  # a model that always answers <|end|>: constant hidden state, one non-zero head row
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[tokenizer.end_id] = 1.0
    model.save(tmp_path, tokenizer)
    chat = json.loads(_cli("generate", "Hi", "-c", str(tmp_path), "--chat", "-n", "8", "--json").stdout)
    assert chat["tokens_generated"] == 1 and chat["text"] == ""  # stopped, and <|end|> is not in the text
    plain = json.loads(_cli("generate", "Hi", "-c", str(tmp_path), "-n", "8", "--json").stdout)
    assert plain["tokens_generated"] == 8  # outside chat mode <|end|> is an ordinary token


def test_generate_bad_device_and_penalty_exit_2(tmp_path):
    _tiny_checkpoint(tmp_path)
    devices = ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        run = _cli("generate", "Hi", "-c", str(tmp_path), "-n", "2", "--device", device)
        assert run.exit_code == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.output
        assert repr(device) in run.stderr
    run = _cli("generate", "Hi", "-c", str(tmp_path), "-n", "2", "--repetition-penalty", "0")
    assert run.exit_code == 2 and "is not > 0" in run.output and "Traceback" not in run.output
