"""Text sources, token windows and calibration tokens."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from bitalloc.models import TextSourceError, calibration_tokens, hub, load_text, token_windows
from bitalloc.models import text as text_module


def test_text_file_is_read_without_byte_order_mark(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffHello  world\n".encode("utf-8"))
    assert load_text(str(path)) == "Hello  world\n"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_empty_text(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n ")
    with pytest.raises(TextSourceError, match="empty"):
        load_text(str(path))
    with pytest.raises(TextSourceError, match="empty"):
        token_windows(object(), "", 8)


def test_unknown_source_lists_forms():
    with pytest.raises(TextSourceError) as info:
        load_text("bogus-source")
    message = str(info.value)
    assert "wikitext2" in message and "c4" in message and "self:N" in message


def test_self_is_not_a_text():
    with pytest.raises(TextSourceError, match="calibration"):
        load_text("self:4")


def test_wikitext2_prefers_a_local_file(tmp_path, monkeypatch):
    (tmp_path / text_module.WIKITEXT2_FILE).write_text(" = Title = \n some words \n")
    monkeypatch.setenv("BITALLOC_DATA", str(tmp_path))
    assert load_text("wikitext2") == " = Title = \n some words \n"
    assert text_module.find_data_file(text_module.WIKITEXT2_FILE) == tmp_path / text_module.WIKITEXT2_FILE


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_datasets_fail_clearly_without_the_hub(source, monkeypatch):
    monkeypatch.setattr(text_module, "find_data_file", lambda name: None)
    monkeypatch.setattr(text_module, "is_offline", lambda: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.forget_probe_results()
    started = time.perf_counter()
    try:
        with pytest.raises(TextSourceError, match="cannot be reached"):
            load_text(source)
    finally:
        hub.forget_probe_results()
    assert time.perf_counter() - started < 10


def test_token_windows_follow_the_gptq_convention(tiny_tokenizer, tiny_text_file):
    text = load_text(str(tiny_text_file))
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids[0]
    seqlen = 64
    windows = token_windows(tiny_tokenizer, text, seqlen)
    assert windows.dtype == torch.long
    assert windows.shape == (ids.numel() // seqlen, seqlen)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    first_three = token_windows(tiny_tokenizer, text, seqlen, n_windows=3)
    assert torch.equal(first_three, windows[:3])


def test_too_few_windows_warns_and_returns_all(tiny_tokenizer, tiny_text_file, caplog):
    text = load_text(str(tiny_text_file))
    all_windows = token_windows(tiny_tokenizer, text, 256)
    with caplog.at_level(logging.WARNING):
        more = token_windows(tiny_tokenizer, text, 256, n_windows=all_windows.shape[0] + 5)
    assert torch.equal(more, all_windows)
    assert "windows" in caplog.text


def test_seqlen_longer_than_the_text(tiny_tokenizer):
    text = "A short text."
    count = len(tiny_tokenizer(text).input_ids)
    with pytest.raises(TextSourceError) as info:
        token_windows(tiny_tokenizer, text, 2048)
    assert f"only {count} tokens" in str(info.value) and "--seqlen" in str(info.value)


def test_token_windows_argument_checks(tiny_tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        token_windows(None, "text", 8)
    with pytest.raises(ValueError, match="seqlen"):
        token_windows(tiny_tokenizer, "text", 1)
    with pytest.raises(ValueError, match="n_windows"):
        token_windows(tiny_tokenizer, "text", 2, n_windows=0)


def test_calibration_from_a_file_spreads_windows_over_its_second_half(tiny_llama, tiny_text_file):
    model, tokenizer = tiny_llama
    everything = token_windows(tokenizer, load_text(str(tiny_text_file)), 32)
    whole = calibration_tokens(str(tiny_text_file), model, tokenizer, seqlen=32, n=4, part="whole")
    assert torch.equal(whole, torch.stack([everything[i * everything.shape[0] // 4] for i in range(4)]))
    picked = calibration_tokens(str(tiny_text_file), model, tokenizer, seqlen=32, n=4)
    half = everything[everything.shape[0] // 2:]
    assert half.shape[0] > 4 and torch.equal(picked, torch.stack([half[i * half.shape[0] // 4] for i in range(4)]))
    # the first half, where `bitalloc eval --windows N` reads, holds none of them
    text = everything.reshape(-1)
    first_half = text[: everything.shape[0] // 2 * 32].unfold(0, 32, 1)
    assert not any(bool((first_half == row).all(dim=1).any()) for row in picked)
    with pytest.raises(ValueError, match="calibration part"):
        calibration_tokens(str(tiny_text_file), model, tokenizer, seqlen=32, n=4, part="first")


def test_calibration_takes_the_whole_text_when_its_second_half_is_too_short(tiny_llama, tiny_text_file, caplog):
    model, tokenizer = tiny_llama
    everything = token_windows(tokenizer, load_text(str(tiny_text_file)), 32)
    n = everything.shape[0] // 2 + 2  # more than the second half holds, fewer than the whole text
    picked = calibration_tokens(str(tiny_text_file), model, tokenizer, seqlen=32, n=n)
    assert picked.shape == (n, 32) and "second half" in caplog.text


def test_self_sampling_is_seeded(tiny_llama):
    model, tokenizer = tiny_llama
    state = torch.random.get_rng_state()
    a = calibration_tokens("self:3", model, tokenizer, seqlen=12, n=99, seed=7, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    b = calibration_tokens("self:3", model, tokenizer, seqlen=12, n=99, seed=7, batch_size=2, progress=False)
    c = calibration_tokens("self:3", model, tokenizer, seqlen=12, n=99, seed=8, batch_size=2, progress=False)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.all(a[:, 0] == tokenizer.bos_token_id)
    assert int(a.max()) < model.config.vocab_size
    plain = calibration_tokens("self", model, tokenizer, seqlen=8, n=2, progress=False)
    assert plain.shape == (2, 8)


def test_self_sampling_needs_a_causal_model(tiny_bert, tiny_tokenizer):
    with pytest.raises(ValueError, match="causal"):
        calibration_tokens("self:2", tiny_bert, tiny_tokenizer, seqlen=8, n=2, progress=False)


def test_calibration_unknown_source(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(TextSourceError, match="unknown text source"):
        calibration_tokens("nothing-like-this", model, tokenizer, seqlen=8, n=2)
