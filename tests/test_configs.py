"""QuantConfig names, validation, exact accounting, config spaces."""

import json
import math

import pytest

from bitalloc.configs import (LOWRANK_NF8, QuantConfig, check_fits, config_space, nearest_config_names, parse_ranks,
                             unusual_reasons)


def test_name_examples_round_trip():
    for name in [
        "nf3-g64-s8x256-r64",
        "nf4-g64-s16-r0",
        "nf2-g16-s2x16-fp32-r0",
        "nf8-g32-s4x64-r16-lr8",
        "nf4-g128-s16-r8-lr8",
    ]:
        cfg = QuantConfig.from_name(name)
        assert cfg.name == name
        assert QuantConfig.from_name(cfg.name) == cfg


def test_fields_from_name():
    cfg = QuantConfig.from_name("nf3-g64-s8x256-fp32-r64-lr8")
    assert (cfg.bits, cfg.block, cfg.scale_bits, cfg.scale_block) == (3, 64, 8, 256)
    assert (cfg.scale_dtype, cfg.rank, cfg.lowrank_bits) == ("fp32", 64, 8)


def test_every_lqlora_name_round_trips():
    space = config_space("lqlora", ranks=(0, 64))
    assert len(space) == 2 * 288
    assert len({c.name for c in space}) == len(space)
    for cfg in space:
        assert QuantConfig.from_name(cfg.name) == cfg


@pytest.mark.parametrize(
    "bad",
    ["", "nf4", "nf5-g64-s8x256-r0", "nf4-g64-s8-r0", "nf4-g64-s16x64-r0", "nf4-g64-s16-fp32-r0",
     "nf4-g0-s8x256-r0", "nf4-g64-s9x256-r0", "nf4-g64-s8x0-r0", "nf4-g64-s8x256-r0-lr8",
     "NF4-g64-s8x256-r0", "nf4-g64-s8x256-r-1", "nf4-g64-s1x256-r0"],
)
def test_invalid_names_raise(bad):
    with pytest.raises(ValueError):
        QuantConfig.from_name(bad)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"bits": 5}, "bits"), ({"block": 0}, "block"), ({"scale_bits": 1}, "scale_bits"),
     ({"scale_bits": 9}, "scale_bits"), ({"scale_dtype": "bf16"}, "scale_dtype"),
     ({"scale_block": 0}, "scale_block"), ({"rank": -1}, "rank"), ({"lowrank_bits": 4, "rank": 8}, "lowrank_bits"),
     ({"bits": 4.0}, "bits"), ({"rank": True}, "rank")],
)
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


def test_canonical_forms():
    assert QuantConfig(scale_bits=16, scale_block=64, scale_dtype="fp32") == QuantConfig(scale_bits=16)
    assert QuantConfig(rank=0, lowrank_bits=8) == QuantConfig(rank=0)


def _manual_bits(bits, block, scale_bits, scale_block, dtype_bits, rows, cols):
    n_blocks = rows * math.ceil(cols / block)
    total = n_blocks * block * bits
    if scale_bits == 16:
        return total + 16 * n_blocks
    return total + n_blocks * scale_bits + math.ceil(n_blocks / scale_block) * dtype_bits + 32


@pytest.mark.parametrize("rows, cols", [(1, 1), (4096, 4096), (576, 1536), (3, 100), (1024, 8192)])
def test_storage_bits_by_hand(rows, cols):
    for cfg in config_space("lqlora", ranks=(0,)):
        dtype_bits = 32 if cfg.scale_dtype == "fp32" else 16
        assert cfg.storage_bits(rows, cols) == _manual_bits(
            cfg.bits, cfg.block, cfg.scale_bits, cfg.scale_block, dtype_bits, rows, cols
        )
    fp16 = QuantConfig(bits=4, block=64, scale_bits=16)
    assert fp16.storage_bits(rows, cols) == _manual_bits(4, 64, 16, 1, 16, rows, cols)


def test_lowrank_bits_counted():
    base = QuantConfig.from_name("nf3-g64-s8x256-r0")
    bf16 = base.replace(rank=64)
    nf8 = base.replace(rank=64, lowrank_bits=8)
    rows, cols = 4096, 4096
    assert bf16.storage_bits(rows, cols) - base.storage_bits(rows, cols) == 16 * 64 * (rows + cols)
    # NF8 factors: L1 stored as (64 x rows), L2 as (64 x cols), each NF8 with fp16 block scales.
    expect = LOWRANK_NF8.storage_bits(64, rows) + LOWRANK_NF8.storage_bits(64, cols)
    assert nf8.storage_bits(rows, cols) - base.storage_bits(rows, cols) == expect
    assert nf8.lowrank_storage_bits(rows, cols) < bf16.lowrank_storage_bits(rows, cols)
    # LQ-LoRA's "2.75 bits" config with NF8 factors on a 4096 x 4096 matrix counts ~0.26 bits more.
    assert 3.3 < nf8.bits_per_param(rows, cols) < 3.45


def test_bits_per_param_close_to_nominal_for_large_matrices():
    cfg = QuantConfig.from_name("nf4-g64-s8x256-r0")
    bpp = cfg.bits_per_param(4096, 4096)
    assert bpp == pytest.approx(4 + 8 / 64 + 16 / (64 * 256), abs=1e-5)


def test_padding_counted():
    cfg = QuantConfig.from_name("nf4-g64-s16-r0")
    assert cfg.storage_bits(1, 65) == cfg.storage_bits(1, 128)
    assert cfg.storage_bits(1, 65) > cfg.storage_bits(1, 64)


def test_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        QuantConfig().storage_bits(0, 4)


def test_spaces():
    assert len(config_space("lqlora")) == 288
    assert all(c.rank == 64 for c in config_space("lqlora"))
    default = config_space("default", ranks=(0, 16))
    assert 0 < len(default) < 288 * 2
    assert {c.rank for c in default} == {0, 16}
    with pytest.raises(ValueError, match="unknown config space"):
        config_space("nope")
    with pytest.raises(ValueError, match="ranks"):
        config_space("default", ranks=())


def test_space_files(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["nf4-g64-s8x256-r0", "nf2-g16-s16-r8"]))
    assert [c.name for c in config_space(names)] == ["nf4-g64-s8x256-r0", "nf2-g16-s16-r8"]
    assert [c.name for c in config_space(names, ranks=(4,))] == ["nf4-g64-s8x256-r0", "nf2-g16-s16-r8"]

    rankless = tmp_path / "rankless.json"  # names without -r{rank} take --ranks
    rankless.write_text(json.dumps(["nf4-g64-s8x256", "nf3-g32-s4x64-fp32-lr8", "nf2-g16-s16-r8"]))
    assert [c.name for c in config_space(rankless, ranks=(0, 16))] == [
        "nf4-g64-s8x256-r0", "nf4-g64-s8x256-r16", "nf3-g32-s4x64-fp32-r0", "nf3-g32-s4x64-fp32-r16-lr8",
        "nf2-g16-s16-r8"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["nf4-gXX"]))
    with pytest.raises(ValueError, match="invalid config name"):
        config_space(bad)

    grid = tmp_path / "grid.yaml"
    grid.write_text("bits: [2, 4]\nblock: [64]\nscale_bits: [8]\nscale_block: [256]\n")
    assert [c.name for c in config_space(grid, ranks=(0, 8))] == [
        "nf2-g64-s8x256-r0", "nf2-g64-s8x256-r8", "nf4-g64-s8x256-r0", "nf4-g64-s8x256-r8"]

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no configs"):
        config_space(empty)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        config_space(broken)

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"bits": [4], "colour": ["red"]}))
    with pytest.raises(ValueError, match="colour"):
        config_space(unknown)

    bad_name = tmp_path / "bad_name.json"
    bad_name.write_text(json.dumps(["nf4-g64"]))
    with pytest.raises(ValueError, match="invalid config name"):
        config_space(bad_name)


def test_parse_ranks():
    assert parse_ranks("64") == (64,)
    assert parse_ranks("0,16,64") == (0, 16, 64)
    for bad in ["", "a", "-1", "4,,x"]:
        with pytest.raises(ValueError, match="--ranks"):
            parse_ranks(bad)


def test_auto_ranks_follow_the_factor_cost_of_the_median_target():
    from bitalloc.configs import auto_ranks, parse_ranks, resolve_ranks

    smollm = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    assert auto_ranks(smollm) == (0, 8)
    llama7b = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    assert auto_ranks(llama7b) == (0, 64)
    assert auto_ranks([(8192, 8192)]) == (0, 64)  # capped at LQ-LoRA's 64
    assert auto_ranks([(32, 64)]) == (0,)  # factors would cost too much even at rank 4
    for rows, cols in smollm:  # rank 8 costs at most 0.5 bits/param on the median (576 x 576)
        assert 8 * 16 * (rows + cols) / (rows * cols) <= 1.0
    assert parse_ranks("auto") == "auto" and parse_ranks(" AUTO ") == "auto"
    assert resolve_ranks("auto", smollm) == (0, 8)
    assert resolve_ranks("0,16", smollm) == (0, 16) and resolve_ranks((4,), smollm) == (4,)
    with pytest.raises(ValueError, match="auto"):
        parse_ranks("sometimes")
    with pytest.raises(ValueError, match="at least one"):
        auto_ranks([])


# ----- unusual configs: likely typos are refused with the nearest known names ------------
@pytest.mark.parametrize(
    "typo, near",
    [("nf4-g64-s8x265-r0", "nf4-g64-s8x256-r0"), ("nf4-g46-s8x256-r0", "nf4-g64-s8x256-r0"),
     ("nf3-g6-s4x64-r8", "nf3-g16-s4x64-r8")],
)
def test_a_digit_typo_is_refused_with_the_nearest_known_names(typo, near):
    with pytest.raises(ValueError) as info:
        QuantConfig.from_name(typo)
    message = str(info.value)
    assert typo in message and near in message and "--allow-unusual-config" in message


def test_an_unusual_config_is_allowed_explicitly():
    cfg = QuantConfig.from_name("nf4-g48-s8x100-r0", allow_unusual=True)
    assert (cfg.block, cfg.scale_block) == (48, 100)
    assert unusual_reasons(cfg) and len(unusual_reasons(cfg)) == 2
    assert unusual_reasons(QuantConfig.from_name("nf4-g128-s16-r0")) == []


def test_every_builtin_space_config_is_usual():
    for space in ("lqlora", "default"):
        for cfg in config_space(space, ranks=(0, 8)):
            assert unusual_reasons(cfg) == [], cfg.name


def test_nearest_names_keep_the_rank_and_factor_format():
    near = nearest_config_names("nf4-g46-s8x256-r16-lr8", QuantConfig.from_name("nf4-g46-s8x256-r16-lr8",
                                                                                  allow_unusual=True))
    assert near and all(name.endswith("-r16-lr8") for name in near)


def test_space_file_refuses_unusual_entries(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["nf4-g64-s8x256-r0", "nf4-g46-s8x256"]))
    with pytest.raises(ValueError, match=r"names\.json.*nf4-g46-s8x256.*nf4-g64-s8x256"):
        config_space(names, ranks=(0,))
    assert len(config_space(names, ranks=(0,), allow_unusual=True)) == 2
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"bits": [4], "block": [64, 46], "scale_bits": [8], "scale_block": [256]}))
    with pytest.raises(ValueError, match="block 46"):
        config_space(grid, ranks=(0,))
    dicts = tmp_path / "dicts.json"
    dicts.write_text(json.dumps([{"bits": 4, "block": 64, "scale_bits": 8, "scale_block": 265}]))
    with pytest.raises(ValueError, match="scale group 265"):
        config_space(dicts, ranks=(0,))


def test_check_fits_refuses_a_block_longer_than_a_row_and_a_rank_above_the_matrix():
    check_fits(QuantConfig.from_name("nf4-g64-s8x256-r8"), 128, 64)
    with pytest.raises(ValueError, match="block 128.*64 columns"):
        check_fits(QuantConfig.from_name("nf4-g128-s16-r0"), 256, 64)
    with pytest.raises(ValueError, match="rank 128 .*smaller side 64"):
        check_fits(QuantConfig.from_name("nf4-g64-s16-r128"), 64, 256)


# ----- the integer family ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int3-g64-s16-r0", "int4-g32-s8x256-r8", "int2-g16-s2x16-fp32-r0",
                                  "int8-g64-s4x64-r16-lr8", "int4-g128-s16-r8-lr8"])
def test_int_names_round_trip(name):
    cfg = QuantConfig.from_name(name)
    assert cfg.family == "int" and cfg.name == name
    assert QuantConfig.from_name(cfg.name) == cfg
    assert QuantConfig(**cfg.to_dict()) == cfg
    assert cfg != QuantConfig.from_name("nf" + name[3:])


def test_a_config_dict_without_family_reads_as_nf():
    d = QuantConfig.from_name("nf3-g64-s8x256-r0").to_dict()
    del d["family"]
    assert QuantConfig(**d).family == "nf"


def test_int_accounting_adds_one_zero_point_per_block():
    for name, rows, cols in [("int3-g64-s16-r0", 10, 130), ("int4-g32-s8x256-fp32-r8", 7, 64),
                             ("int2-g16-s3x16-r4-lr8", 33, 17)]:
        cfg = QuantConfig.from_name(name)
        nf = cfg.replace(family="nf")
        n_blocks = rows * -(-cols // cfg.block)
        assert cfg.storage_bits(rows, cols) - nf.storage_bits(rows, cols) == n_blocks * cfg.bits
        assert cfg.stored_arrays() == nf.stored_arrays() + 1
    assert QuantConfig.from_name("int3-g64-s16-r0").bits_per_param(128, 64 * 9) == 3.296875


@pytest.mark.parametrize("bad", ["int5-g64-s16-r0", "INT3-g64-s16-r0", "int3-g64-s8-r0", "uint3-g64-s16-r0",
                                 "int3-g64-s16x64-r0", "int-g64-s16-r0"])
def test_invalid_int_names_raise(bad):
    with pytest.raises(ValueError):
        QuantConfig.from_name(bad)


def test_invalid_family_names_the_field():
    with pytest.raises(ValueError, match="family"):
        QuantConfig(family="fp")


def test_int_typos_name_the_nearest_int_configs():
    with pytest.raises(ValueError, match=r"unusual config 'int3-g46-s16-r0'.*did you mean 'int3-g64-s16-r0'"):
        QuantConfig.from_name("int3-g46-s16-r0")
    with pytest.raises(ValueError, match=r"invalid config name 'itn4-g64-s16-r0'.*did you mean 'int4-g64-s16-r0'"):
        QuantConfig.from_name("itn4-g64-s16-r0")
    near = nearest_config_names("int4-g46-s8x256-r16-lr8",
                                QuantConfig.from_name("int4-g46-s8x256-r16-lr8", allow_unusual=True))
    assert near[0] == "int4-g64-s8x256-r16-lr8" and all(n.startswith("int") and n.endswith("-r16-lr8") for n in near)


def test_space_files_and_grids_name_any_family(tmp_path):
    names = tmp_path / "mixed.json"
    names.write_text(json.dumps(["nf4-g64-s8x256", "int3-g64-s16", "int4-g32-s4x64-r0"]))
    space = config_space(names, ranks=(0, 8))
    assert {c.family for c in space} == {"nf", "int"}
    assert "int3-g64-s16-r8" in {c.name for c in space}
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"family": ["nf", "int"], "bits": [3, 4], "block": [64], "scale_bits": [16]}))
    assert sorted(c.name for c in config_space(grid, ranks=(0,))) == [
        "int3-g64-s16-r0", "int4-g64-s16-r0", "nf3-g64-s16-r0", "nf4-g64-s16-r0"]
    with pytest.raises(ValueError, match="family"):
        grid.write_text(json.dumps({"family": ["fp"], "bits": [3]}))
        config_space(grid, ranks=(0,))


def test_lqlora_space_stays_nf_only():
    assert {c.family for c in config_space("lqlora", ranks=(0,))} == {"nf"}
