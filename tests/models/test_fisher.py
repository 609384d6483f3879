"""Tests for bitalloc.models.fisher: the empirical diagonal Fisher (tiny seeded models, CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import bitalloc.models.fisher as fisher_mod
from bitalloc.models.fisher import default_fisher_settings, estimate_fisher
from bitalloc.models.targets import find_targets, target_weight
from tests.conftest import build_tiny_gpt2, build_tiny_llama

VOCAB = 128


@pytest.fixture
def llama():
    return build_tiny_llama(VOCAB, seed=0)


@pytest.fixture
def gpt2():
    return build_tiny_gpt2(VOCAB, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))


def manual_fisher(model, tokens, targets, batch: int = 1) -> dict[str, torch.Tensor]:
    """Σ over batches of (∂ Σ_batch L_i / ∂W)², L_i = HF mean token loss; float64, (out, in)."""
    out = {name: torch.zeros(target_weight(m).shape, dtype=torch.float64) for name, m in targets}
    for start in range(0, tokens.shape[0], batch):
        ids = tokens[start : start + batch]
        loss = model(input_ids=ids, labels=ids).loss * ids.shape[0]
        grads = torch.autograd.grad(loss, [m.weight for _, m in targets])
        for (name, module), grad in zip(targets, grads):
            grad = grad.t() if isinstance(module, Conv1D) else grad
            out[name] += grad.double() ** 2
    return out


def assert_fisher_close(est, ref, rel: float = 1e-5) -> None:
    assert set(est) == set(ref)
    for name in ref:
        assert est[name].dtype == torch.float32
        assert est[name].shape == ref[name].shape, name
        diff = (est[name].double() - ref[name]).norm() / ref[name].norm()
        assert diff <= rel, f"{name}: relative L2 difference {diff:.2e}"


# --------------------------------------------------------------------------- estimation


def test_exact_matches_manual_per_sequence_autograd(llama, tokens):
    targets = find_targets(llama)
    ref = manual_fisher(llama, tokens, targets)
    est = estimate_fisher(llama, tokens, targets, mode="exact", progress=False)
    assert_fisher_close(est, ref, rel=1e-5)
    assert all(bool((v > 0).any()) for v in est.values())


def test_default_targets_and_device_argument(llama, tokens):
    est = estimate_fisher(llama, tokens[:2], progress=False, device="cpu")
    assert list(est) == [name for name, _ in find_targets(llama)]


def test_only_target_weights_get_gradients_and_state_is_restored(llama, tokens):
    targets = find_targets(llama)
    target_ids = {id(m.weight) for _, m in targets}
    # unusual starting state: a frozen target, a frozen norm, an existing .grad, train mode
    llama.model.norm.weight.requires_grad_(False)
    frozen_target = targets[1][1].weight
    frozen_target.requires_grad_(False)
    kept_grad = torch.full_like(targets[0][1].weight, 7.0)
    targets[0][1].weight.grad = kept_grad
    llama.train()
    before = {name: p.requires_grad for name, p in llama.named_parameters()}

    seen = []

    def spy(module, args):
        seen.append(
            (
                module.training,
                {name: p.requires_grad for name, p in llama.named_parameters() if id(p) not in target_ids},
                all(m.weight.requires_grad for _, m in targets),
            )
        )

    handle = llama.model.embed_tokens.register_forward_pre_hook(spy)
    try:
        est = estimate_fisher(llama, tokens[:2], targets, mode="exact", progress=False)
    finally:
        handle.remove()

    assert seen, "the model was not run"
    for training, others, targets_trainable in seen:
        assert not training  # eval mode: no dropout
        assert not any(others.values()), [n for n, flag in others.items() if flag]
        assert targets_trainable
    assert {name: p.requires_grad for name, p in llama.named_parameters()} == before
    assert llama.training
    assert targets[0][1].weight.grad is kept_grad
    assert all(p.grad is None for name, p in llama.named_parameters() if p is not targets[0][1].weight)
    assert bool((est[targets[1][0]] > 0).any())  # the frozen target is still estimated


def test_persample_mode_touches_no_parameter_gradients(llama, tokens):
    targets = find_targets(llama)
    before = {name: p.requires_grad for name, p in llama.named_parameters()}
    estimate_fisher(llama, tokens, targets, mode="persample", batch_size=2, progress=False)
    assert {name: p.requires_grad for name, p in llama.named_parameters()} == before
    assert all(p.grad is None for p in llama.parameters())
    assert not any(m._forward_hooks for _, m in targets)  # hooks removed


@pytest.mark.parametrize("mode", ["batched", "persample"])
def test_batch_size_one_equals_exact(llama, tokens, mode):
    exact = estimate_fisher(llama, tokens, mode="exact", progress=False)
    other = estimate_fisher(llama, tokens, mode=mode, batch_size=1, progress=False)
    assert_fisher_close(other, {k: v.double() for k, v in exact.items()}, rel=1e-6)


def test_persample_is_exact_with_uneven_batches(llama, tokens):
    targets = find_targets(llama)
    ref = manual_fisher(llama, tokens, targets)
    est = estimate_fisher(llama, tokens, targets, mode="persample", batch_size=3, progress=False)
    assert_fisher_close(est, ref, rel=1e-5)


def test_batched_is_squared_gradient_of_summed_batch_loss(llama, tokens):
    targets = find_targets(llama)
    ref = manual_fisher(llama, tokens, targets, batch=2)
    est = estimate_fisher(llama, tokens, targets, mode="batched", batch_size=2, progress=False)
    assert_fisher_close(est, ref, rel=1e-5)
    exact = estimate_fisher(llama, tokens, targets, mode="exact", progress=False)
    name = targets[0][0]
    assert not torch.allclose(est[name], exact[name], rtol=1e-2)  # (Σg)² is not Σg²


@pytest.mark.parametrize("mode", ["exact", "persample"])
def test_conv1d_orientation_gpt2(gpt2, tokens, mode):
    targets = find_targets(gpt2)
    assert any(isinstance(m, Conv1D) for _, m in targets)
    est = estimate_fisher(gpt2, tokens[:3], targets, mode=mode, batch_size=2, progress=False)
    for name, module in targets:
        assert tuple(est[name].shape) == tuple(target_weight(module).shape)  # (out, in)
    c_attn = next(name for name in est if name.endswith("attn.c_attn"))
    assert tuple(est[c_attn].shape) == (96, 32)
    assert_fisher_close(est, manual_fisher(gpt2, tokens[:3], targets), rel=1e-5)


def test_tied_targets_share_one_estimate(tokens):
    model = build_tiny_llama(VOCAB, seed=1, tie=True)
    targets = find_targets(model, include=r"lm_head|layers\.0\.self_attn\.q_proj")
    assert [n for n, _ in targets][-1] == "lm_head"
    est = estimate_fisher(model, tokens[:2], targets, mode="exact", progress=False)
    ref = manual_fisher(model, tokens[:2], targets)
    assert_fisher_close(est, ref, rel=1e-5)


class ReuseLM(torch.nn.Module):
    """A toy LM applying ``lin`` twice and ``tied`` (sharing ``lin``'s weight) once per forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.tied = torch.nn.Linear(8, 8, bias=False)
        self.tied.weight = self.lin.weight
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, labels):
        h = self.emb(input_ids)
        h = torch.tanh(self.lin(torch.tanh(self.lin(h))))
        logits = self.head(torch.tanh(self.tied(h)))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return type("Output", (), {"loss": loss})()


@pytest.mark.parametrize("mode", ["exact", "persample"])
def test_weights_used_several_times_per_pass(tokens, mode):
    model = ReuseLM()
    targets = [("lin", model.lin), ("tied", model.tied), ("head", model.head)]
    ref = manual_fisher(model, tokens, targets)
    est = estimate_fisher(model, tokens, targets, mode=mode, batch_size=2, progress=False)
    assert_fisher_close(est, ref, rel=1e-5)
    assert torch.equal(est["lin"], est["tied"]) and est["lin"] is not est["tied"]


class FlatLM(ReuseLM):
    """A toy LM whose ``lin`` sees the batch and positions flattened into one dimension."""

    def forward(self, input_ids, labels):
        h = self.emb(input_ids)
        h = torch.tanh(self.lin(h.reshape(-1, 8))).reshape(*input_ids.shape, 8)
        logits = self.head(h)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return type("Output", (), {"loss": loss})()


def test_persample_falls_back_to_exact_when_the_batch_is_flattened(tokens, caplog):
    model = FlatLM()
    targets = [("lin", model.lin), ("head", model.head)]
    with caplog.at_level(logging.WARNING, logger="bitalloc.models.fisher"):
        est = estimate_fisher(model, tokens, targets, mode="persample", batch_size=2, progress=False)
    assert any("falling back to exact" in r.getMessage() for r in caplog.records)
    assert_fisher_close(est, manual_fisher(model, tokens, targets), rel=1e-5)
    assert not any(m._forward_hooks for _, m in targets)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_non_finite_loss_raises(llama, tokens):
    with torch.no_grad():
        llama.model.embed_tokens.weight[tokens[1, 0]] = float("nan")
    with pytest.raises(ValueError, match="non-finite") as info:
        estimate_fisher(llama, tokens, mode="exact", progress=False)
    assert "sequences 1..1" in str(info.value)  # found on the pass where the loss turned NaN


def test_nan_gradient_raises_naming_the_target(llama, tokens):
    targets = find_targets(llama)
    name, module = targets[3]
    handle = module.weight.register_hook(lambda grad: grad * float("nan"))
    try:
        with pytest.raises(ValueError, match="non-finite") as info:
            estimate_fisher(llama, tokens[:2], targets, mode="exact", progress=False)
    finally:
        handle.remove()
    assert name in str(info.value)
    assert {p.requires_grad for p in llama.parameters()} == {True}  # restored after the error


def test_nan_gradient_raises_in_persample_mode(llama, tokens):
    targets = find_targets(llama)
    name, module = targets[-1]  # last layer's last target: the NaN spreads only upstream
    original = module.forward

    def poisoned(x):
        y = original(x)
        if y.requires_grad:
            y.register_hook(lambda grad: grad * float("nan"))
        return y

    module.forward = poisoned
    with pytest.raises(ValueError, match="non-finite") as info:
        estimate_fisher(llama, tokens[:2], targets, mode="persample", batch_size=2, progress=False)
    assert any(n in str(info.value) for n, _ in targets)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.empty(0, 12, dtype=torch.long), "no calibration tokens"),
        (torch.empty(3, 0, dtype=torch.long), "no calibration tokens"),
        (torch.zeros(3, 1, dtype=torch.long), "at least 2 tokens"),
        (torch.zeros(12, dtype=torch.long), "2-D"),
        (torch.zeros(2, 12), "integer"),
    ],
)
def test_bad_tokens_raise_clear_errors(llama, bad, message):
    with pytest.raises(ValueError, match=message):
        estimate_fisher(llama, bad, progress=False)


def test_bad_mode_and_batch_size(llama, tokens):
    with pytest.raises(ValueError, match="unknown Fisher mode"):
        estimate_fisher(llama, tokens, mode="fast", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_fisher(llama, tokens, mode="batched", batch_size=0, progress=False)


def test_default_settings():
    cpu, cuda = default_fisher_settings("cpu"), default_fisher_settings("cuda")
    for settings in (cpu, cuda):
        assert set(settings) >= {"samples", "seqlen", "mode"}
        assert settings["mode"] in fisher_mod.FISHER_MODES
    assert (cuda["samples"], cuda["seqlen"]) == (128, 512)
    assert cpu["samples"] * cpu["seqlen"] < cuda["samples"] * cuda["seqlen"]
    assert default_fisher_settings(None) == cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(llama, tokens):
    cpu = estimate_fisher(llama, tokens, mode="exact", progress=False)
    for mode in ("exact", "persample"):
        gpu = estimate_fisher(llama, tokens, mode=mode, batch_size=2, device="cuda", progress=False)
        assert next(llama.parameters()).device.type == "cpu"  # moved back
        assert_fisher_close(gpu, {k: v.double() for k, v in cpu.items()}, rel=1e-4)
