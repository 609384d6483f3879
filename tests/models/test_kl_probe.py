"""The KL probe: replaying kept block inputs gives the KL of a whole forward pass, at any operating point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitalloc.models import find_targets, set_target_weight, target_weight
from bitalloc.models.kl_probe import KLProbe, ProbeSettings, basis_error, find_blocks, fit_kl_factors


def _direct_kl(model, ids, weights, targets) -> float:
    """KL(original || model with ``weights``) from two full forward passes."""
    modules = dict(targets)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        saved = {n: target_weight(modules[n]).detach().clone() for n in weights}
        for n, w in weights.items():
            set_target_weight(modules[n], w)
        new = model(input_ids=ids, use_cache=False).logits
        for n, w in saved.items():
            set_target_weight(modules[n], w)
    return float(F.kl_div(F.log_softmax(new.float(), -1), F.log_softmax(ref.float(), -1), log_target=True,
                          reduction="sum")) / ids.numel()


def _noisy(targets, name, size, seed=0):
    W = target_weight(dict(targets)[name]).detach()
    return W + size * torch.randn(W.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def setup(tiny_llama):
    model, tokenizer = tiny_llama
    ids = torch.randint(1, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    targets = find_targets(model)
    return model, ids, targets, KLProbe(model, ids, targets)


def test_blocks_are_found_by_structure(tiny_llama):
    model, _ = tiny_llama
    names = [n for n, _ in find_targets(model)]
    blocks, index = find_blocks(model, names)
    assert blocks is model.model.layers
    assert index["model.layers.0.mlp.up_proj"] == 0 and index["model.layers.1.self_attn.q_proj"] == 1


@pytest.mark.parametrize("names", [["model.layers.0.self_attn.v_proj"], ["model.layers.1.mlp.down_proj"],
                                   ["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.gate_proj"]])
def test_probe_equals_a_whole_forward_pass(setup, names):
    model, ids, targets, probe = setup
    before = {n: target_weight(m).detach().clone() for n, m in targets}
    weights = {n: _noisy(targets, n, 0.05, seed=i) for i, n in enumerate(names)}
    measured = probe.kl(weights)
    assert measured > 0
    assert measured == pytest.approx(_direct_kl(model, ids, weights, targets), rel=1e-4)
    for n, m in targets:  # the model is left as it was
        torch.testing.assert_close(target_weight(m), before[n], rtol=0, atol=0)
    assert probe.kl({}) == pytest.approx(0.0, abs=1e-9)


def test_probe_around_an_operating_point(setup):
    model, ids, targets, probe = setup
    base = {n: _noisy(targets, n, 0.03, seed=i) for i, (n, _) in enumerate(targets)}
    change = {"model.layers.1.mlp.up_proj": _noisy(targets, "model.layers.1.mlp.up_proj", 0.1, seed=99)}
    with probe.at(base):
        at_base = probe.kl({})
        moved = probe.kl(change)
    assert at_base == pytest.approx(_direct_kl(model, ids, base, targets), rel=1e-4)
    assert moved == pytest.approx(_direct_kl(model, ids, {**base, **change}, targets), rel=1e-4)
    assert probe.kl({}) == pytest.approx(0.0, abs=1e-9)  # back at the original model


def test_factors_predict_the_kl_of_small_noise(setup):
    model, ids, targets, probe = setup
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    factors = fit_kl_factors(probe, names, ProbeSettings(levels=(0.002, 0.008)), lambda n, d: basis_error(d),
                             progress=False)
    for name in names:
        entry = factors[name]
        assert entry["factor"] > 0 and len(entry["kl"]) == 2
        # relative errors as asked, and a KL near-quadratic in the noise size (linear in the error)
        W = target_weight(dict(targets)[name]).detach()
        assert entry["errors"][0] == pytest.approx(0.002 * basis_error(W), rel=1e-6)
        assert 2.0 < entry["kl"][1] / entry["kl"][0] < 8.0  # 4x the error, another noise draw


def test_settings_are_checked():
    with pytest.raises(ValueError, match="windows"):
        ProbeSettings(windows=0)
    with pytest.raises(ValueError, match="levels"):
        ProbeSettings(levels=(0.01, -1.0))
    assert ProbeSettings.from_dict(ProbeSettings(levels=[0.5]).to_dict()) == ProbeSettings(levels=(0.5,))
