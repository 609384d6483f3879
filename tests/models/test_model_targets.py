"""find_targets, target_weight / set_target_weight, target_shapes, model_summary."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from bitalloc.models import find_targets, model_summary, set_target_weight, target_shapes, target_weight


def test_llama_targets_in_module_order_without_output_layer(tiny_llama):
    model, _ = tiny_llama
    targets = find_targets(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    output = model.get_output_embeddings()
    assert [n for n, _ in targets] == [n for n in linears if dict(model.named_modules())[n] is not output]
    assert len(targets) == 2 * 7
    assert all(m is not output for _, m in targets)


def test_output_layer_comes_in_with_an_explicit_include(tiny_llama):
    model, _ = tiny_llama
    output_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    targets = find_targets(model, include=output_name)
    assert [m for _, m in targets] == [model.get_output_embeddings()]
    everything = find_targets(model, include=".")
    assert len(everything) == 2 * 7 + 1


def test_include_and_exclude_regexes(tiny_llama):
    model, _ = tiny_llama
    mlp = find_targets(model, include=r"\.mlp\.")
    assert len(mlp) == 2 * 3 and all(".mlp." in n for n, _ in mlp)
    first_layer = find_targets(model, include=r"layers\.0\.", exclude=r"(q|k)_proj$")
    assert len(first_layer) == 5 and all(".layers.0." in n for n, _ in first_layer)
    with pytest.raises(ValueError, match="no target layers matched"):
        find_targets(model, include=r"layers\.0\.", exclude=r"proj")


def test_include_list_and_exclude(tiny_llama):
    model, _ = tiny_llama
    names = [n for n, _ in find_targets(model, include=[r"layers\.0\.self_attn", r"layers\.1\.mlp"], exclude="down")]
    assert len(names) == 4 + 2
    assert all("down" not in n for n in names)
    without_attention = find_targets(model, exclude=r"self_attn")
    assert len(without_attention) == 2 * 3


def test_no_match_error_lists_names_and_suggests_include(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError) as info:
        find_targets(model, include="no-such-layer")
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "--include" in message
    with pytest.raises(ValueError, match="invalid include regex"):
        find_targets(model, include="(")


def test_output_layer_found_by_identity_not_by_name():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.lm_head = torch.nn.Linear(4, 4)  # named like an output layer, but it is not one
            self.readout = torch.nn.Linear(4, 10)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.readout

    names = [n for n, _ in find_targets(Toy())]
    assert names == ["lm_head"]


def test_conv1d_weight_is_a_transposed_view(tiny_gpt2):
    model, _ = tiny_gpt2
    name, module = next((n, m) for n, m in find_targets(model) if isinstance(m, Conv1D))
    weight = target_weight(module)
    assert weight.shape == (module.nf, module.weight.shape[0])
    x = torch.randn(3, weight.shape[1])
    torch.testing.assert_close(module(x), x @ weight.T + module.bias)
    assert target_shapes([(name, module)]) == {name: tuple(weight.shape)}


def test_set_target_weight_writes_back(tiny_gpt2, tiny_llama):
    for model in (tiny_gpt2[0], tiny_llama[0]):
        _, module = find_targets(model)[0]
        new = torch.randn_like(target_weight(module))
        set_target_weight(module, new)
        torch.testing.assert_close(target_weight(module), new)
        with pytest.raises(ValueError, match="does not fit"):
            set_target_weight(module, new.T if new.shape[0] != new.shape[1] else new[:-1])


def test_target_shapes_are_out_by_in(tiny_llama):
    model, _ = tiny_llama
    shapes = target_shapes(find_targets(model))
    assert shapes["model.layers.0.mlp.up_proj"] == (64, 32)
    assert shapes["model.layers.0.mlp.down_proj"] == (32, 64)
    assert shapes["model.layers.0.self_attn.k_proj"] == (16, 32)


def test_gpt2_and_bert_targets(tiny_gpt2, tiny_bert):
    gpt2, _ = tiny_gpt2
    gpt2_targets = find_targets(gpt2)
    assert len(gpt2_targets) == 2 * 4 and all(isinstance(m, Conv1D) for _, m in gpt2_targets)
    bert_targets = find_targets(tiny_bert)
    assert all(m is not tiny_bert.get_output_embeddings() for _, m in bert_targets)
    # per layer: query, key, value, attention output, intermediate, output; plus the MLM head's transform
    assert len(bert_targets) == 2 * 6 + 1


def test_model_summary_adds_up(tiny_gpt2):
    model, _ = tiny_gpt2
    summary = model_summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert summary["total_params"] == total
    assert summary["n_targets"] == len(summary["targets"]) == 8
    assert summary["target_params"] == sum(t["params"] for t in summary["targets"])
    assert summary["target_params"] + summary["non_target_params"] == total
    assert summary["other_params"] == summary["non_target_params"]
    assert sum(t["params"] for t in summary["non_target_tensors"]) == summary["non_target_params"]
    first = summary["targets"][0]
    assert set(first) == {"name", "type", "rows", "cols", "params"} and first["type"] == "Conv1D"


def test_model_summary_counts_a_tied_output_layer_once(tiny_gpt2):
    model, _ = tiny_gpt2
    assert model.lm_head.weight is model.transformer.wte.weight
    summary = model_summary(model, include=".")
    assert summary["target_params"] + summary["non_target_params"] == summary["total_params"]
    assert all(t["name"] != "transformer.wte.weight" for t in summary["non_target_tensors"])
