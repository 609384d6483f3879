"""bitalloc.identity: the built-in alias, model fingerprints and the cache root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from bitalloc.identity import BUILTIN_ALIAS, cache_root, model_fingerprint, model_id
from bitalloc.models import find_targets, target_weight
from tests.conftest import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128


def test_model_fingerprint_is_stable_and_sensitive():
    a, b = build_tiny_llama(VOCAB, seed=0), build_tiny_llama(VOCAB, seed=0)
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint(a)
    assert len(model_fingerprint(a)) == 16
    with torch.no_grad():
        target_weight(find_targets(b)[0][1]).view(-1)[0] += 1.0  # the first value is always sampled
    assert model_fingerprint(b) != model_fingerprint(a)
    assert model_fingerprint(build_tiny_llama(VOCAB, seed=1)) != model_fingerprint(a)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("BITALLOC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "bitalloc"


def test_model_id_names_the_builtin_model_for_none():
    assert model_id(None) == model_id("") == BUILTIN_ALIAS
    assert model_id("owner/name") == "owner/name"
    assert model_id(Path("some/dir")) == "some/dir"


def test_import_does_not_pull_torch():
    code = "import sys; import bitalloc.identity; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
