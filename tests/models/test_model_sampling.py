"""Text sampled from the model: batched documents with a KV cache, seeded, cached under a key that
names the sampler, and evaluation windows disjoint from calibration ones."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from bitalloc.identity import model_fingerprint
from bitalloc.models.calibration import Calibration
from bitalloc.models.sampling import SAMPLER_VERSION, sample_sequences
from bitalloc.models.self_text import _cache_file, self_windows
from bitalloc.models.text import calibration_tokens


def test_long_windows_are_documents_laid_end_to_end(tiny_llama):
    model, tokenizer = tiny_llama
    ids = sample_sequences(model, tokenizer, 3, 20, seed=1, batch_size=4, document_tokens=8, progress=False)
    assert ids.shape == (3, 20) and ids.dtype == torch.long
    flat = ids.reshape(-1)
    bos = tokenizer.bos_token_id
    assert torch.all(flat[::8] == bos)  # a document starts every 8 tokens
    again = sample_sequences(model, tokenizer, 3, 20, seed=1, batch_size=4, document_tokens=8, progress=False)
    assert torch.equal(ids, again)
    other = sample_sequences(model, tokenizer, 3, 20, seed=2, batch_size=4, document_tokens=8, progress=False)
    assert not torch.equal(ids, other)


def test_use_cache_matches_a_full_forward(tiny_llama):
    """The KV-cached tokens are what the model would sample: greedy (top_k=1) equals argmax of a full pass."""
    model, tokenizer = tiny_llama
    ids = sample_sequences(model, tokenizer, 2, 12, top_k=1, progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    # from the second step on (the tiny model's logits after BOS are all tied)
    assert torch.equal(logits[:, 1:-1].argmax(-1), ids[:, 2:])


def test_evaluation_windows_are_disjoint_from_calibration_ones(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny_llama
    calib = calibration_tokens("self:4", model, tokenizer, seqlen=16, n=4, seed=0, progress=False)
    evals = self_windows(model, tokenizer, 4, 16, seed=0, progress=False)
    assert calib.shape == evals.shape
    assert not any(torch.equal(c, e) for c in calib for e in evals)
    assert not torch.equal(calib[:, :4], evals[:, :4])


def test_a_cache_entry_of_another_sampler_is_not_read(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny_llama
    model_hash = model_fingerprint(model)
    old_payload = json.dumps({"format": 1, "model_hash": model_hash, "n": 2, "seqlen": 12, "seed": 0}, sort_keys=True)
    old = _cache_file(model_hash, 2, 12, 0).parent / f"self-{hashlib.sha256(old_payload.encode()).hexdigest()[:16]}.pt"
    assert old != _cache_file(model_hash, 2, 12, 0)
    old.parent.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save(torch.zeros(2, 12, dtype=torch.long), buf)
    old.write_bytes(buf.getvalue())
    ids = self_windows(model, tokenizer, 2, 12, progress=False)
    assert int(ids.abs().sum()) > 0 and _cache_file(model_hash, 2, 12, 0).is_file()


def test_fisher_key_of_sampled_text_names_the_sampler():
    self_fields = Calibration(source="self:16", samples=16, seqlen=256, mode="exact").key_fields(model_id="m", model_hash="h", seed=0)
    file_fields = Calibration(source="wikitext2", samples=16, seqlen=256, mode="exact").key_fields(model_id="m", model_hash="h",
                                                                                     seed=0)
    assert self_fields["data"] == f"self:16@sampler{SAMPLER_VERSION}"
    assert file_fields["data"] == "wikitext2#second-half"


def test_sampling_progress_counts_tokens(tiny_llama, monkeypatch):
    from bitalloc.models import sampling

    totals = []
    real = sampling.tqdm

    def spy(*args, **kwargs):
        totals.append((kwargs.get("total"), kwargs.get("unit")))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "tqdm", spy)
    model, tokenizer = tiny_llama
    sample_sequences(model, tokenizer, 2, 10, batch_size=2, document_tokens=3, progress=False)
    assert totals == [(7 * 3, "token")]  # 20 tokens need 7 documents of 3


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(document_tokens=1)])
def test_bad_sizes(tiny_llama, bad):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError):
        sample_sequences(model, tokenizer, 1, 8, progress=False, **bad)
