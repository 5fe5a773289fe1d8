"""Data pipeline on the real local data sets in ../shared/data (no network)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_model.data import (
    DEFAULT_DATASET,
    DatasetError,
    DatasetUnavailable,
    batch_indices,
    detect_format,
    load_text_dataset,
    normalize_example,
    pack_dataset,
    parse_guanaco,
    parse_llama2,
    prepare_data,
    tokenize_dataset,
    train_tokenizer_on,
)
from core_model.tokenizer import ChatTurn, create_default_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GUANACO_TEST = DATA / "openassistant-guanaco" / "openassistant_best_replies_eval.jsonl"
LLAMA2_1K = DATA / "guanaco-llama2-1k"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


@pytest.fixture(scope="module")
def tok():
    return create_default_tokenizer()


def test_guanaco_rows_normalise_to_chat_template(tok):
    ds = load_text_dataset(GUANACO_TEST)
    assert len(ds) == 518
    for text in ds[:50]["text"]:
        turns = parse_guanaco(text)
        assert detect_format(text) == "guanaco"
        assert len(turns) == text.count("### Human:") + text.count("### Assistant:")
        assert turns[0].role == "user"
        assert all(a.role != b.role for a, b in zip(turns, turns[1:]))  # strictly alternating
        out = normalize_example(text, tok)
        assert out.startswith("<|bos|><|user|>") and out.endswith("<|end|><|eos|>")
        assert "### Human" not in out and "### Assistant" not in out
        assert out == tok.format_chat(turns)


def test_llama2_rows_normalise_to_chat_template(tok):
    ds = load_text_dataset(LLAMA2_1K)
    assert len(ds) == 1000
    multi = [t for t in ds["text"] if t.count("[INST]") > 1]
    assert len(multi) == 353  # the dataset card's count of multi-turn rows
    for text in multi[:30] + ds[:30]["text"]:
        assert detect_format(text) == "llama2"
        turns = parse_llama2(text)
        assert [t.role for t in turns if t.role == "user"] == ["user"] * text.count("[INST]")
        assert sum(t.role == "assistant" for t in turns) == text.count("[/INST]")
        out = normalize_example(text, tok)
        for marker in ("[INST]", "[/INST]", "<s>", "</s>"):
            assert marker not in out
        assert out.startswith("<|bos|><|user|>") and out.endswith("<|end|><|eos|>")
    first = parse_llama2(multi[0])
    assert first[0].text.startswith("¿Qué juegos me recomendarías")
    assert first[2].text.startswith("EarthBound suena divertido")


def test_llama2_system_prompt_becomes_system_turn():
    turns = parse_llama2("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>")
    assert turns == [ChatTurn("system", "Be brief."), ChatTurn("user", "Hi there"), ChatTurn("assistant", "Hello!")]


def test_plain_text_paragraphs(tok):
    ds = load_text_dataset(SHAKESPEARE)
    assert ds[0]["text"].startswith("First Citizen:")
    assert detect_format(ds[0]["text"]) == "plain"
    assert normalize_example(ds[0]["text"], tok) == "<|bos|>" + ds[0]["text"].strip() + "<|eos|>"


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="#", blacklist_categories=("Cs",)),
                        min_size=1, max_size=30).filter(lambda s: s.strip()), min_size=1, max_size=6))
@settings(max_examples=50, deadline=None)
def test_guanaco_parse_roundtrip(texts):
    roles = ["user", "assistant"] * 3
    raw = "".join(f"### {'Human' if r == 'user' else 'Assistant'}: {t}" for r, t in zip(roles, texts))
    assert parse_guanaco(raw) == [ChatTurn(r, t.strip()) for r, t in zip(roles, texts)]


def test_tokenize_pack_eos_between_examples_and_assistant_mask(tok, tmp_path):
    ds = load_text_dataset(GUANACO_TEST, cache_dir=str(tmp_path)).select(range(40))
    tokd = tokenize_dataset(ds, tok, assistant_only=True)
    packed = pack_dataset(tokd, block_size=64)
    assert int((packed.tokens == tok.eos_id).sum()) == 40  # one EOS closes each example
    assert int((packed.tokens == tok.bos_id).sum()) == 40
    # trainable tokens are exactly the assistant replies (+ their <|end|> and the final <|eos|>)
    ids = tokd[0]["input_ids"]
    mask = np.asarray(tokd[0]["loss_mask"], dtype=bool)
    kept = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    replies = [t.text for t in parse_guanaco(ds[0]["text"]) if t.role == "assistant"]
    assert kept == "".join(r + "<|end|>" for r in replies) + "<|eos|>"
    x, y = packed.batch(range(20))
    assert x.shape == y.shape == (20, 64)
    assert (y == -100).any() and (y != -100).any()
    keep = y != -100
    assert bool((y[:, :-1][keep[:, :-1]] == x[:, 1:][keep[:, :-1]]).all())  # targets are the next inputs


def test_tokenize_map_is_cached(tok, tmp_path):
    ds = load_text_dataset(LLAMA2_1K, cache_dir=str(tmp_path))
    first = tokenize_dataset(ds, tok)
    assert first.cache_files, "map output should live in the datasets cache"
    started = time.perf_counter()
    second = tokenize_dataset(ds, tok)
    assert second.cache_files == first.cache_files
    assert time.perf_counter() - started < 1.0


def test_batch_order_is_a_pure_function_with_disjoint_shards():
    a = batch_indices(100, 8, step=3, seed=7, rank=0, world_size=2)
    assert np.array_equal(a, batch_indices(100, 8, step=3, seed=7, rank=0, world_size=2))
    b = batch_indices(100, 8, step=3, seed=7, rank=1, world_size=2)
    assert not set(a) & set(b)
    epoch0 = np.concatenate([batch_indices(100, 8, s, 7) for s in range(12)])
    assert len(set(epoch0)) == 96  # 12 steps of 8 cover distinct blocks in one epoch
    epoch1 = np.concatenate([batch_indices(100, 8, s, 7) for s in range(12, 24)])
    assert not np.array_equal(epoch0, epoch1)


def test_prepare_data_splits_and_bpe(tmp_path):
    bundle = prepare_data(str(LLAMA2_1K), str(GUANACO_TEST), block_size=128, cache_dir=str(tmp_path))
    assert bundle.description["train_rows"] == 1000 and bundle.description["eval_rows"] == 518
    held = prepare_data(str(LLAMA2_1K), block_size=128, eval_fraction=0.1, cache_dir=str(tmp_path))
    assert held.description["train_rows"] == 900 and held.description["eval_rows"] == 100
    small = load_text_dataset(LLAMA2_1K, cache_dir=str(tmp_path)).select(range(200))
    bpe = train_tokenizer_on(small, vocab_size=600)
    assert bpe.vocab_size == 600
    assert len(bpe.encode(small[0]["text"])) < len(small[0]["text"].encode())


def test_local_errors_are_typed(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_text_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="no .jsonl"):
        load_text_dataset(tmp_path)
    (tmp_path / "y.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DatasetError, match="'text' column"):
        load_text_dataset(tmp_path / "y.jsonl")


@pytest.mark.parametrize("offline_env", [True, False])
def test_offline_hub_id_fails_fast_with_the_local_option(monkeypatch, offline_env):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if offline_env:
            monkeypatch.setenv(var, "1")
        else:
            monkeypatch.delenv(var, raising=False)
    if not offline_env and _has_network():
        pytest.skip("this machine can reach huggingface.co; the no-network path cannot be exercised")
    started = time.perf_counter()
    with pytest.raises(DatasetUnavailable) as info:
        load_text_dataset(DEFAULT_DATASET)
    assert time.perf_counter() - started < 5.0
    assert "--dataset PATH" in str(info.value) and "shared/data" in str(info.value)


def _has_network() -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False

