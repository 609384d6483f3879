"""Perplexity and KL divergence against manual computations; evaluate's result."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bitalloc.models import evaluate, kl_divergence, load_model, load_text, perplexity, token_windows


@pytest.fixture
def windows(tiny_tokenizer, tiny_text_file):
    return token_windows(tiny_tokenizer, load_text(str(tiny_text_file)), 48, n_windows=4)


def test_perplexity_matches_the_labels_loss(tiny_llama, windows):
    model, _ = tiny_llama
    result = perplexity(model, windows, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected_nll = sum(losses) / len(losses)
    assert result["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_nll), rel=1e-5)
    assert result["tokens"] == 4 * 47 and result["windows"] == 4 and result["seqlen"] == 48


def test_perplexity_does_not_depend_on_batch_size(tiny_gpt2, windows):
    model, _ = tiny_gpt2
    one = perplexity(model, windows, batch_size=1, progress=False)
    three = perplexity(model, windows, batch_size=3, progress=False)
    assert one["nll"] == pytest.approx(three["nll"], rel=1e-5)
    assert one["tokens"] == three["tokens"]


def test_kl_to_itself_is_zero_and_positive_when_perturbed(tiny_llama, windows):
    model, _ = tiny_llama
    assert abs(kl_divergence(model, model, windows, progress=False)) < 1e-6
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = kl_divergence(other, model, windows, progress=False)
    assert kl > 1e-4


def test_kl_matches_a_direct_computation(tiny_llama, windows):
    model, _ = tiny_llama
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    with torch.no_grad():
        log_p = torch.log_softmax(other(windows).logits, -1)
        log_q = torch.log_softmax(model(windows).logits, -1)
        expected = (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()
    assert kl_divergence(other, model, windows, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-4)


def test_evaluate_result(tiny_llama_dir, tiny_text_file):
    model, tokenizer = load_model(str(tiny_llama_dir))
    result = evaluate(model, tokenizer, str(tiny_text_file), seqlen=32, windows=3, progress=False)
    assert {"perplexity", "nll", "tokens", "windows", "seqlen", "kl", "seconds", "data"} <= set(result)
    assert result["kl"] is None and result["windows"] == 3 and result["tokens"] == 3 * 31
    assert result["data"] == str(tiny_text_file) and result["seconds"] > 0
    with_reference = evaluate(model, tokenizer, str(tiny_text_file), 32, 3, kl_to=str(tiny_llama_dir), progress=False)
    assert abs(with_reference["kl"]) < 1e-6
    assert with_reference["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)


def test_encoder_has_no_perplexity(tiny_bert, windows):
    with pytest.raises(ValueError, match="causal"):
        perplexity(tiny_bert, windows, progress=False)


def test_bad_windows_are_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="2-D"):
        perplexity(model, torch.arange(10), progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long), progress=False)


@pytest.mark.slow
def test_builtin_model_perplexity_on_one_wikitext_window():
    model, tokenizer = load_model()
    result = evaluate(model, tokenizer, "wikitext2", seqlen=2048, windows=1, progress=False)
    ppl, seconds = result["perplexity"], result["seconds"]
    print(f"built-in model, wikitext2, 1 window of 2048: perplexity {ppl:.2f} in {seconds:.1f}s")
    assert 1.0 < result["perplexity"] < 200.0
    assert result["tokens"] == 2047


def test_training_mode_is_ignored_and_restored(tiny_gpt2, windows):
    model, _ = tiny_gpt2
    expected = perplexity(model, windows, progress=False)["nll"]
    model.train()
    assert perplexity(model, windows, progress=False)["nll"] == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_seqlen_beyond_the_model_positions(tiny_gpt2):
    model, _ = tiny_gpt2
    too_long = torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="smaller --seqlen"):
        perplexity(model, too_long, progress=False)


def test_self_text_is_sampled_once_from_the_text_model_and_cached(tiny_llama, tmp_path, monkeypatch):
    from bitalloc.models import self_text

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny_llama
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    calls = []
    real = self_text.sample_sequences

    def counting(m, *a, **kw):
        calls.append(m)
        return real(m, *a, **kw)

    monkeypatch.setattr(self_text, "sample_sequences", counting)
    first = evaluate(other, tokenizer, "self:3", seqlen=16, windows=None, text_model=model, progress=False)
    again = evaluate(other, tokenizer, "self:3", seqlen=16, windows=None, kl_to=model, progress=False)
    assert calls == [model]  # sampled once, from the text model (then the KL reference), then cached
    assert first["windows"] == 3 and first["data"] == "self:3"
    assert again["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
    assert again["kl"] > 0
    from bitalloc.models.self_text import self_windows

    ids = self_windows(model, tokenizer, 3, 16, progress=False)
    assert ids.shape == (3, 16) and len(calls) == 1
    own = evaluate(model, tokenizer, "self:3", seqlen=16, windows=None, progress=False)
    assert own["tokens"] == 3 * 15 and len(calls) == 1  # the model's own samples: the same cache entry


def test_self_text_cache_damage_is_resampled(tiny_llama, tmp_path, monkeypatch):
    from bitalloc.models.self_text import _cache_file, self_windows
    from bitalloc.identity import model_fingerprint

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny_llama
    ids = self_windows(model, tokenizer, 2, 12, progress=False)
    path = _cache_file(model_fingerprint(model), 2, 12, 0)
    path.write_bytes(b"not a tensor")
    assert torch.equal(self_windows(model, tokenizer, 2, 12, progress=False), ids)


def test_self_text_needs_a_count(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="how many windows"):
        evaluate(model, tokenizer, "self", seqlen=16, windows=None, progress=False)
    with pytest.raises(ValueError, match="at least one sampled window"):
        evaluate(model, tokenizer, "self:0", seqlen=16, windows=4, progress=False)


def test_perplexity_and_kl_in_one_pass_equal_the_two_passes(tiny_llama, windows):
    from bitalloc.models.evaluate import perplexity_and_kl

    model, _ = tiny_llama
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
        log_p = torch.log_softmax(other(windows).logits, -1)
        log_q = torch.log_softmax(model(windows).logits, -1)
        expected_kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()
    both = perplexity_and_kl(other, model, windows, batch_size=2, progress=False)
    alone = perplexity(other, windows, progress=False)
    assert both["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
    assert both["tokens"] == alone["tokens"] and both["windows"] == alone["windows"]
    assert both["kl"] == pytest.approx(expected_kl, rel=1e-4)


def _perturbed(model, scale: float, seed: int):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def test_score_models_runs_the_reference_once_per_batch_and_equals_one_model_at_a_time(tiny_llama, windows):
    from bitalloc.models import perplexity_and_kl, score_models

    model, _ = tiny_llama
    a, b = _perturbed(model, 0.02, 1), _perturbed(model, 0.05, 2)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        together = score_models([a, model, b], windows, reference=model, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # 4 windows in batches of 2: the reference ran once per batch, listed or not
    for other, result in zip((a, b), (together[0], together[2])):
        alone = perplexity_and_kl(other, model, windows, progress=False)
        assert result["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
        assert result["kl"] == pytest.approx(alone["kl"], rel=1e-5) and result["kl"] > 0
        assert result["model_seconds"] > 0
    assert together[1]["kl"] == 0.0  # the reference itself, scored from its own logits
    assert together[1]["perplexity"] == pytest.approx(perplexity(model, windows, progress=False)["perplexity"],
                                                      rel=1e-6)
    assert together[0]["kl"] < together[2]["kl"]  # the larger perturbation moves further


def test_evaluate_many_without_a_reference_has_no_kl(tiny_llama_dir, tiny_text_file):
    from bitalloc.models import evaluate_many

    model, tokenizer = load_model(str(tiny_llama_dir))
    other = _perturbed(model, 0.05, 3)
    results = evaluate_many([model, other], tokenizer, str(tiny_text_file), seqlen=32, windows=2, progress=False)
    assert [r["kl"] for r in results] == [None, None]
    assert results[0]["tokens"] == results[1]["tokens"] == 2 * 31
    assert results[0]["perplexity"] != results[1]["perplexity"]
    with pytest.raises(ValueError, match="at least one model"):
        evaluate_many([], tokenizer, str(tiny_text_file), seqlen=32, windows=2, progress=False)
