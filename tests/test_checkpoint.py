"""Checkpoints round-trip bit-exactly; anything that does not match is refused, nothing unpickled."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from core_model.checkpoint import CheckpointError, load_checkpoint
from core_model.config import ResoLLMConfig
from core_model.model import ResoLLMModel
from core_model.tokenizer import train_bpe_tokenizer


def tiny(**kw):
    return ResoLLMConfig(vocab_size=263, dim=64, num_layers=2, num_heads=4, num_phases=4, **kw)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ResoLLMModel(tiny())
    with torch.no_grad():  # make every parameter differ from a fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = model.save(tmp_path / "ckpt")
    return model, path


def test_save_load_round_trips_bit_exactly(saved):
    model, path = saved
    loaded, tok = load_checkpoint(path)
    assert loaded.config == model.config and tok.vocab_size == model.config.vocab_size
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.head.weight.data_ptr() == loaded.embed.semantic.weight.data_ptr()  # still tied
    x = torch.randint(0, 263, (1, 10))
    model.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert ResoLLMModel.from_checkpoint(path).config == model.config


def test_bpe_tokenizer_travels_with_the_checkpoint(tmp_path):
    tok = train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog " * 50], vocab_size=300)
    model = ResoLLMModel(tiny().replace(vocab_size=tok.vocab_size))
    model.save(tmp_path, tok)
    _, loaded_tok = load_checkpoint(tmp_path)
    assert loaded_tok.fingerprint() == tok.fingerprint()


def test_mismatched_shapes_are_refused_with_what_differs(saved, tmp_path):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["dim"] = 128
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"shape mismatch .*\(64\).* vs config \(128\)|shape mismatch"):
        load_checkpoint(path)


def test_switch_mismatch_names_missing_tensors(saved):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["vanilla"] = True
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_checkpoint(path)


def test_tokenizer_mismatch_missing_files_and_bad_config(saved, tmp_path):
    _, path = saved
    other = tmp_path / "other"
    shutil.copytree(path, other)
    train_bpe_tokenizer(["abc def " * 100], vocab_size=300).save(other / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ tokens but config.vocab_size is 263"):
        load_checkpoint(other)
    (other / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        load_checkpoint(other)
    shutil.copy(path / "tokenizer.json", other / "tokenizer.json")
    (other / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(other)
    (other / "config.json").write_text(json.dumps({"format_version": 1, "config": {"dim": -1}}))
    with pytest.raises(CheckpointError, match="dim"):
        load_checkpoint(other)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle payload executed')",))


def test_a_pickle_in_place_of_the_weights_is_refused_without_running_it(saved, tmp_path):
    _, path = saved
    (path / "model.safetensors").write_bytes(pickle.dumps({"w": _Boom()}))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(path)


def test_config_values_of_the_wrong_type_are_refused(saved):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["dim"] = 64.0
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config.dim: expected int, got float"):
        load_checkpoint(path)
    meta["config"]["dim"] = 64
    meta["config"]["agency"] = 5
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config.agency: expected a mapping"):
        load_checkpoint(path)


def test_save_writes_whole_files_and_leaves_no_temporaries(tmp_path, monkeypatch):
    import core_model.checkpoint as ckpt

    model = ResoLLMModel(ResoLLMConfig(vocab_size=263, dim=32, num_layers=1, num_heads=2, num_phases=2))
    model.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", fail)  # the weights cannot be written
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no temp files
    ResoLLMModel.from_checkpoint(tmp_path)
