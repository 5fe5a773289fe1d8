"""The pure-torch trainer: schedule, exact resume, checkpoint format, metrics and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core_model.checkpoint import CheckpointError, load_checkpoint
from core_model.config import ResoLLMConfig
from core_model.data import PackedData, batch_indices, eval_batches, prepare_data
from core_model.model import ResoLLMModel
from core_model.train_state import STATE_FILE, latest_checkpoint, load_training_state
from core_model.trainer import TrainConfig, Trainer, TrainError, evaluate, lr_factor

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2_1K = DATA / "guanaco-llama2-1k"
GUANACO_TEST = DATA / "openassistant-guanaco" / "openassistant_best_replies_eval.jsonl"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


@pytest.fixture(scope="module")
def bundle():
    return prepare_data(str(LLAMA2_1K), str(GUANACO_TEST), block_size=32)


def tiny_model(vocab_size: int, dropout: float = 0.1) -> ResoLLMModel:
    torch.manual_seed(0)
    return ResoLLMModel(ResoLLMConfig(vocab_size=vocab_size, dim=64, num_layers=2, num_heads=2, num_phases=4,
                                      max_seq_len=32, dropout=dropout))


def make_trainer(bundle, out: Path, **overrides) -> Trainer:
    settings = dict(max_steps=8, batch_size=4, warmup_steps=2, eval_interval=4, eval_batches=2, log_interval=1,
                    checkpoint_interval=3, out_dir=str(out), progress=False, seed=3)
    dropout = overrides.pop("dropout", 0.1)
    settings.update(overrides)
    return Trainer(tiny_model(bundle.tokenizer.vocab_size, dropout), bundle.tokenizer, bundle.train, bundle.eval,
                   TrainConfig(**settings))


def test_warmup_then_cosine_from_real_step_count():
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warmup
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    cfg = TrainConfig(max_steps=None, epochs=2, batch_size=4)
    assert cfg.total_steps(num_blocks=100) == 50
    assert cfg.total_steps(num_blocks=100, world_size=2) == 24


def test_no_weight_decay_on_norms_biases_phases(bundle, tmp_path):
    trainer = make_trainer(bundle, tmp_path)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any("phase" in names[id(p)] or "coupling" in names[id(p)] for p in no_decay["params"])


def test_resume_continues_with_identical_losses(bundle, tmp_path):
    full = make_trainer(bundle, tmp_path / "full").fit()
    first = make_trainer(bundle, tmp_path / "split").fit(stop_at=5)  # checkpoint written at step 3 and 5
    ckpt = latest_checkpoint(tmp_path / "split" / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000005"
    resumed = make_trainer(bundle, tmp_path / "split")
    assert resumed.resume(ckpt) == 5
    rest = resumed.fit()
    assert [s for s, _ in first.losses + rest.losses] == list(range(1, 9))
    assert [loss for _, loss in first.losses + rest.losses] == [loss for _, loss in full.losses]  # bit-exact
    assert rest.eval_loss == pytest.approx(full.eval_loss, rel=0, abs=1e-9)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 9))


def test_checkpoint_contents_load_weights_only(bundle, tmp_path):
    trainer = make_trainer(bundle, tmp_path, max_steps=3)
    trainer.fit()
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    state = torch.load(ckpt / STATE_FILE, weights_only=True)  # no arbitrary unpickling needed
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    assert set(state["data"]) >= {"seed", "epoch", "step_in_epoch", "world_size"}
    assert isinstance(state["rng"][0]["torch"], torch.Tensor)
    assert load_training_state(ckpt)["optimizer"]["state"]
    model, tok = load_checkpoint(ckpt)
    assert tok.vocab_size == model.config.vocab_size
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    exported = trainer.export()
    again = ResoLLMModel.from_checkpoint(exported)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), trainer.model.state_dict().values()))


def test_resume_refuses_different_data_settings(bundle, tmp_path):
    make_trainer(bundle, tmp_path, max_steps=3).fit()
    other = make_trainer(bundle, tmp_path / "other", batch_size=2)
    with pytest.raises(TrainError, match="batch_size"):
        other.resume(latest_checkpoint(tmp_path / "checkpoints"))


def test_eval_perplexity_is_exp_of_loss(bundle, tmp_path):
    summary = make_trainer(bundle, tmp_path, max_steps=4, dropout=0.0).fit()
    assert summary.eval_ppl == pytest.approx(math.exp(summary.eval_loss))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "start" and rows[-1]["step"] == 4 and "eval_loss" in rows[-1]


def test_invalid_config_is_refused():
    with pytest.raises(TrainError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(TrainError, match="max_steps or epochs"):
        TrainConfig(max_steps=None, epochs=None).validate()


# --- the CLI ------------------------------------------------------------------------------
def _cli(args: list[str]):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    return CliRunner().invoke(app, args)


TINY = ["--dim", "64", "--layers", "2", "--heads", "2", "--block-size", "32", "--batch-size", "4", "--warmup", "2",
        "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1", "--checkpoint-interval", "3"]


def test_cli_train_resume_and_eval(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", str(LLAMA2_1K), "--eval-dataset", str(GUANACO_TEST), "--out", str(out), *TINY]
    first = _cli([*args, "--steps", "3", "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["eval_ppl"] > 1
    refused = _cli([*args, "--steps", "3"])
    assert refused.exit_code == 2 and "--resume" in refused.output
    assert (out / "run.json").is_file() and (out / "loss_curve.png").is_file()
    resumed = _cli([*args, "--steps", "5", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [3]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]

    evaluated = _cli(["eval", "--checkpoint", str(out / "final"), "--dataset", str(GUANACO_TEST),
                      "--block-size", "32", "--max-batches", "3", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-3)
    assert report["tokens"] == 3 * 8 * 32 and report["tokens_per_s"] > 0  # 3 batches of 8 blocks of 32


def test_cli_offline_hub_id_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import time

    started = time.perf_counter()
    result = _cli(["train", "--out", str(tmp_path / "x")])
    assert time.perf_counter() - started < 5.0
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--dataset PATH" in lines[0]
    assert "Traceback" not in result.output


def test_cli_eval_bad_checkpoint_exits_2(tmp_path):
    result = _cli(["eval", "--checkpoint", str(tmp_path), "--dataset", str(GUANACO_TEST)])
    assert result.exit_code == 2 and result.output.startswith("error: ")


# --- batches without a trained token (assistant-only masks) ----------------------------------
@pytest.fixture(scope="module")
def assistant_bundle():
    return prepare_data(str(LLAMA2_1K), str(GUANACO_TEST), block_size=32, assistant_only=True)


def test_step_without_trained_tokens_has_no_loss_and_a_zero_gradient(assistant_bundle, tmp_path):
    # with seed 3 and 2 blocks per step, step 22's blocks are all user text; eval batch 0 too
    empty_step = 22
    x, y = assistant_bundle.train.batch(batch_indices(len(assistant_bundle.train), 2, empty_step - 1, 3))
    assert not (y != -100).any()
    trainer = make_trainer(assistant_bundle, tmp_path, max_steps=empty_step + 1, batch_size=2, eval_batches=4,
                           checkpoint_interval=100)
    summary = trainer.fit()
    losses = dict(summary.losses)
    assert losses[empty_step] is None
    assert all(math.isfinite(v) for s, v in losses.items() if s != empty_step)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert summary.final_loss == losses[empty_step + 1]
    assert summary.eval_loss is not None and math.isfinite(summary.eval_loss)
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert rows[empty_step]["loss"] is None and rows[empty_step]["grad_norm"] == 0.0
    assert math.isfinite(rows[empty_step + 1]["loss"])


def test_evaluate_skips_batches_without_trained_tokens(assistant_bundle):
    model = tiny_model(assistant_bundle.tokenizer.vocab_size)
    x, y = assistant_bundle.eval.batch(next(iter(eval_batches(len(assistant_bundle.eval), 2, None))))
    assert not (y != -100).any()  # the first batch of 2 holds no assistant text
    result = evaluate(model, assistant_bundle.eval, batch_size=2, max_batches=4)
    assert math.isfinite(result["eval_loss"]) and result["eval_tokens"] > 0
    assert result["eval_ppl"] == pytest.approx(math.exp(result["eval_loss"]))
    data = assistant_bundle.eval
    nothing = PackedData(data.tokens[:33 * 4], np.zeros(33 * 4, dtype=bool), 32)
    assert evaluate(model, nothing, batch_size=2) == {"eval_loss": None, "eval_ppl": None, "eval_tokens": 0,
                                                      "eval_tokens_per_s": 0.0}


def test_cli_eval_assistant_only_prints_valid_json(tmp_path):
    from core_model.tokenizer import create_default_tokenizer

    tokenizer = create_default_tokenizer()
    torch.manual_seed(0)
    ResoLLMModel(ResoLLMConfig(vocab_size=tokenizer.vocab_size, dim=32, num_layers=1, num_heads=1, num_phases=4,
                               max_seq_len=64)).save(tmp_path / "ckpt", tokenizer)
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--assistant-only", "--block-size", "64",
            "--batch-size", "1", "--json"]
    result = _cli([*args, "--dataset", str(GUANACO_TEST), "--max-batches", "12"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])  # NaN would not parse
    assert math.isfinite(report["loss"]) and report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-3)
    users = tmp_path / "users.jsonl"  # user turns only: nothing to learn under --assistant-only
    users.write_text("".join(json.dumps({"text": f"### Human: question number {i}, about prime numbers?"}) + "\n"
                             for i in range(20)))
    none = _cli([*args, "--dataset", str(users)])
    assert none.exit_code == 0, none.output
    report = json.loads(none.stdout.strip().splitlines()[-1])
    assert report["loss"] is None and report["perplexity"] is None and report["tokens"] == 0
    assert "no trained token" in none.stderr


def test_grad_clip_zero_means_no_clipping(bundle, tmp_path):
    unclipped = make_trainer(bundle, tmp_path / "zero", max_steps=3, grad_clip=0.0, dropout=0.0).fit()
    huge = make_trainer(bundle, tmp_path / "huge", max_steps=3, grad_clip=1e9, dropout=0.0).fit()
    clipped = make_trainer(bundle, tmp_path / "one", max_steps=3, grad_clip=1e-3, dropout=0.0).fit()
    assert unclipped.losses == huge.losses != clipped.losses  # 0 trains like no clipping (not a zero gradient)
    rows = [json.loads(line) for line in (tmp_path / "zero" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows if "loss" in r)


def test_cli_unusable_device_exits_2_in_one_line(tmp_path):
    train = ["train", "--dataset", str(LLAMA2_1K), "--out", str(tmp_path / "run"), *TINY, "--steps", "1"]
    evaluate_ = ["eval", "--checkpoint", str(tmp_path), "--dataset", str(GUANACO_TEST)]
    for device in ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"]):
        for args in (train, evaluate_):
            result = _cli([*args, "--device", device])
            assert result.exit_code == 2, result.output
            assert result.output.startswith("error: ") and result.output.count("\n") == 1
            assert repr(device) in result.output
    assert not (tmp_path / "run").exists()


class NotAllowed:
    """A class outside torch's weights-only allowlist (loading it must be refused, not run)."""


def test_refused_training_state_is_a_checkpoint_error(tmp_path):
    torch.save({"version": 1, "x": NotAllowed()}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="refused training state.*NotAllowed"):
        load_training_state(tmp_path)


def test_cli_bad_resume_exits_2_and_keeps_run_json(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", str(LLAMA2_1K), "--eval-dataset", str(GUANACO_TEST), "--out", str(out), *TINY]
    assert _cli([*args, "--steps", "3"]).exit_code == 0
    run_json, metrics = (out / "run.json").read_bytes(), (out / "metrics.jsonl").read_bytes()
    state = latest_checkpoint(out / "checkpoints") / STATE_FILE
    good = state.read_bytes()

    def refused(*extra: str, match: str) -> None:
        result = _cli([*args, "--steps", "5", "--resume", *extra])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1 and match in result.output
        assert (out / "run.json").read_bytes() == run_json and (out / "metrics.jsonl").read_bytes() == metrics

    refused("--batch-size", "2", match="batch_size")
    refused("--warmup", "5", match="warmup_steps")
    refused("--assistant-only", match="assistant_only")
    state.write_bytes(good[:len(good) // 2])
    refused(match="unreadable training state")
    torch.save({"version": 1, "x": NotAllowed()}, state)
    refused(match="refused training state")
    state.write_bytes(good)
    assert _cli([*args, "--steps", "5", "--resume"]).exit_code == 0
    assert (out / "run.json").read_bytes() != run_json


def test_resume_refuses_settings_that_change_the_loss_curve(bundle, tmp_path):
    make_trainer(bundle, tmp_path, max_steps=3).fit()
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    for change, name in ((dict(assistant_only=True), "assistant_only"), (dict(dropout=0.0), "dropout"),
                         (dict(lr=1e-3), "lr"), (dict(warmup_steps=5), "warmup_steps"),
                         (dict(grad_clip=0.5), "grad_clip"), (dict(max_steps=2), "not shortened")):
        with pytest.raises(TrainError, match=name):
            make_trainer(bundle, tmp_path / "other", **change).resume(ckpt)
    assert make_trainer(bundle, tmp_path / "longer", max_steps=12).resume(ckpt) == 3  # extending is allowed
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    del state["extra"]["settings"]  # a checkpoint written before the settings were stored
    torch.save(state, ckpt / STATE_FILE)
    assert make_trainer(bundle, tmp_path / "old", lr=1e-3).resume(ckpt) == 3


def test_restart_before_the_first_checkpoint_starts_a_new_metrics_file(bundle, tmp_path):
    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        if step == 3:
            raise Killed

    killed = make_trainer(bundle, tmp_path, checkpoint_interval=100)
    killed.on_step_end = kill
    with pytest.raises(Killed):  # killed during step 3, before any checkpoint
        killed.fit()
    assert latest_checkpoint(tmp_path / "checkpoints") is None
    make_trainer(bundle, tmp_path, max_steps=4).fit()  # started again from step 0 into the same folder
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r.get("event") for r in rows].count("start") == 1
    previous = [json.loads(line) for line in (tmp_path / "metrics.jsonl.1").read_text().splitlines()]
    assert previous[0]["event"] == "start" and [r["step"] for r in previous if "loss" in r] == [1, 2]
