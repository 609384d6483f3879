"""Layers and matrix kinds from target names, for several architectures' naming schemes."""

from __future__ import annotations

import pytest

from bitalloc.reports.names import OTHER, layer_grid, short_name, split_name


@pytest.mark.parametrize(
    "name, stem, index, kind",
    [
        ("model.layers.0.self_attn.q_proj", "model.layers", 0, "self_attn.q_proj"),
        ("model.layers.17.mlp.down_proj", "model.layers", 17, "mlp.down_proj"),
        ("transformer.h.3.attn.c_attn", "transformer.h", 3, "attn.c_attn"),
        ("transformer.h.11.mlp.c_proj", "transformer.h", 11, "mlp.c_proj"),
        ("bert.encoder.layer.1.attention.self.query", "bert.encoder.layer", 1, "attention.self.query"),
        ("bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer", 1, "attention.output.dense"),
        # nested numbers stay in the kind: T5 sub-layers, MoE experts
        ("encoder.block.2.layer.1.DenseReluDense.wi", "encoder.block", 2, "layer.1.DenseReluDense.wi"),
        ("model.layers.4.block_sparse_moe.experts.7.w1", "model.layers", 4, "block_sparse_moe.experts.7.w1"),
        ("lm_head", "", None, "lm_head"),
        ("pooler.dense", "", None, "pooler.dense"),
    ],
)
def test_split_name(name, stem, index, kind):
    part = split_name(name)
    assert (part.stem, part.index, part.kind) == (stem, index, kind)
    assert part.layer == (OTHER if index is None else f"{stem}.{index}")


def test_layer_grid_orders_layers_numerically_and_kinds_by_first_seen():
    names = [f"model.layers.{i}.{k}" for i in (0, 2, 10, 1) for k in ("self_attn.q_proj", "mlp.up_proj")]
    grid = layer_grid(names + ["lm_head"])
    assert grid.rows == ["0", "1", "2", "10", OTHER]
    assert grid.kinds == ["self_attn.q_proj", "mlp.up_proj", "lm_head"]
    assert grid.cell[("10", "mlp.up_proj")] == "model.layers.10.mlp.up_proj"
    assert grid.position("model.layers.2.self_attn.q_proj") == (2, 0)
    assert len(grid.cell) == len(names) + 1


def test_layer_grid_keeps_encoder_and_decoder_blocks_apart():
    names = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.0.SelfAttention.q",
             "decoder.block.0.layer.0.SelfAttention.q"]
    grid = layer_grid(names)
    assert grid.rows == ["decoder.block.0", "encoder.block.0", "encoder.block.1"]
    assert grid.kinds == ["layer.0.SelfAttention.q"]
    assert len(grid.cell) == 3


def test_short_name():
    assert short_name("transformer.h.3.attn.c_attn") == "L3 attn.c_attn"
    assert short_name("lm_head") == "lm_head"
