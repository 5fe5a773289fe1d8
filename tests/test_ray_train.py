"""Ray Train: a 2-worker DDP run that exports a usable model, and recovery from a killed worker.

Real Ray (local, 2 CPUs), real ``datasets`` on ../shared/data. Both tests use the same settings,
so the run that loses a worker must reproduce the uninterrupted run's reported losses exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray_fixtures import ray_local  # noqa: F401  (session-scoped fixture)

from core_model.checkpoint import load_checkpoint
from core_model.config import ResoLLMConfig
from core_model.data import prepare_data
from core_model.model import ResoLLMModel
from core_model.train_metrics import read_metrics
from core_model.trainer import TrainConfig
from orchestrator.ray_train import FAILURE_MARKER, RayTrainSettings, run_ray_training

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2_1K = DATA / "guanaco-llama2-1k"
GUANACO_TEST = DATA / "openassistant-guanaco" / "openassistant_best_replies_eval.jsonl"

pytestmark = [
    pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent"),
    pytest.mark.timeout(240),
]

TOTAL_STEPS, LOG_EVERY, CKPT_EVERY, FAIL_AFTER = 8, 2, 3, 5


@pytest.fixture(scope="module")
def bundle():
    return prepare_data(str(LLAMA2_1K), str(GUANACO_TEST), block_size=32)


def _run(bundle, out: Path, fail_at: int | None = None):
    model_config = ResoLLMConfig(vocab_size=bundle.tokenizer.vocab_size, dim=64, num_layers=2, num_heads=2,
                                 num_phases=4, max_seq_len=32, dropout=0.1)
    train_config = TrainConfig(max_steps=TOTAL_STEPS, batch_size=4, warmup_steps=2, eval_interval=4,
                               eval_batches=2, log_interval=LOG_EVERY, checkpoint_interval=CKPT_EVERY, seed=5)
    settings = RayTrainSettings(workers=2, max_failures=1, report_interval=LOG_EVERY, fail_at_step=fail_at)
    return run_ray_training(model_config, train_config, bundle, settings, out)


@pytest.fixture(scope="module")
def clean_run(ray_local, bundle, tmp_path_factory):  # noqa: F811 (fixture imported above)
    out = tmp_path_factory.mktemp("ray") / "clean"
    return _run(bundle, out), out


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_two_workers_export_a_checkpoint_that_loads_and_generates(clean_run):
    result, out = clean_run
    assert result.step == TOTAL_STEPS and result.resumes == 0
    start = read_metrics(out / "metrics.jsonl")[0]
    assert start["event"] == "start" and start["world_size"] == 2
    # reported every LOG_EVERY steps and at checkpoints, not every step
    assert [r["step"] for r in _train_rows(out)] == [2, 3, 4, 6, 8]
    assert result.checkpoint_dir.name == f"step_{TOTAL_STEPS:08d}"
    model = ResoLLMModel.from_checkpoint(result.final_dir)
    same, tokenizer = load_checkpoint(result.final_dir)
    ckpt_model, _ = load_checkpoint(result.checkpoint_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt_model.state_dict().values()))
    prompt = tokenizer.encode(tokenizer.chat_prompt("Hello"))
    new = model.generate([prompt], max_new_tokens=8, temperature=0.0)[0]
    assert len(new) == 8 and all(0 <= t < tokenizer.vocab_size for t in new)
    assert (out / "loss_curve.png").is_file()
    assert result.metrics["step"] == TOTAL_STEPS and "eval_ppl" in result.metrics


def test_killed_worker_resumes_from_last_checkpoint(clean_run, bundle, tmp_path):
    clean, clean_out = clean_run
    out = tmp_path / "killed"
    result = _run(bundle, out, fail_at=FAIL_AFTER)
    assert (out / FAILURE_MARKER).is_file(), "the failure hook did not fire"
    rows = read_metrics(out / "metrics.jsonl")
    resumes = [r for r in rows if r.get("event") == "resume"]
    last_ckpt_before_failure = FAIL_AFTER // CKPT_EVERY * CKPT_EVERY
    assert [r["step"] for r in resumes] == [last_ckpt_before_failure]
    assert result.resumes == 1 and result.step == TOTAL_STEPS
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == TOTAL_STEPS  # the counter continued, never restarted at 0
    after = [r for r in rows[rows.index(resumes[0]):] if "loss" in r]
    assert after[0]["step"] == last_ckpt_before_failure + 1
    # the recovered run reports the same losses as the run that never failed
    assert [r["loss"] for r in _train_rows(out)] == pytest.approx([r["loss"] for r in _train_rows(clean_out)],
                                                                   abs=1e-5)
    ResoLLMModel.from_checkpoint(result.final_dir)
