"""Synthetic profiles (no model, no torch): tables with the profiler's columns and meta."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bitalloc.configs import QuantConfig
from bitalloc.profiles.store import COLUMNS, PROFILE_FORMAT, PROFILE_VERSION, write_meta, write_table

CONFIGS = ["nf2-g64-s8x256-r0", "nf3-g64-s8x256-r0", "nf4-g64-s8x256-r0", "nf8-g64-s8x256-r0",
           "nf3-g64-s8x256-r8", "nf2-g64-s8x256-r8"]


def synthetic_table(n_layers: int = 3, seed: int = 0, fisher: bool = True, configs=CONFIGS) -> pd.DataFrame:
    """A plausible profile table: error ~ numel * sensitivity * 2^(-2 bits), rank helps a bit."""
    rng = np.random.default_rng(seed)
    kinds = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (16, 64), "self_attn.v_proj": (16, 64),
             "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
             "mlp.down_proj": (64, 128)}
    records = []
    index = 0
    for layer in range(n_layers):
        for kind, (rows, cols) in kinds.items():
            name = f"model.layers.{layer}.{kind}"
            sens = float(rng.lognormal(0, 1))
            fsens = sens * float(rng.lognormal(0, 0.5))
            for cfg_name in configs:
                cfg = QuantConfig.from_name(cfg_name)
                base = rows * cols * 2.0 ** (-2 * cfg.bits) * (0.8 if cfg.rank else 1.0)
                noise = float(rng.uniform(0.95, 1.05))
                records.append({
                    "matrix": name, "index": index, "rows": rows, "cols": cols, "config": cfg_name,
                    "bits": cfg.bits, "block": cfg.block, "scale_bits": cfg.scale_bits,
                    "scale_block": cfg.scale_block, "scale_dtype": cfg.scale_dtype, "rank": cfg.rank,
                    "lowrank_bits": cfg.lowrank_bits, "storage_bits": cfg.storage_bits(rows, cols),
                    "bits_per_param": cfg.bits_per_param(rows, cols), "error": base * sens * noise,
                    "error_fisher": base * fsens * noise if fisher else float("nan"),
                    "weight_norm_sq": float(rows * cols), "iterations": 1, "seconds": 0.01,
                })
            index += 1
    return pd.DataFrame.from_records(records).reindex(columns=COLUMNS)  # error_act, error_kl: NaN


def write_synthetic_profile(directory: Path, table: pd.DataFrame | None = None, model: str = "synthetic") -> Path:
    """Write ``table`` as a finished profile directory."""
    table = synthetic_table() if table is None else table
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = table.drop_duplicates("matrix")[["matrix", "rows", "cols"]]
    meta = {
        "format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "model": model,
        "model_hash": f"hash-{model}",
        "targets": [{"name": r.matrix, "rows": int(r.rows), "cols": int(r.cols)} for r in targets.itertuples()],
        "configs": sorted(table["config"].unique().tolist()), "space": "synthetic", "ranks": [0, 8],
        "fisher": bool(table["error_fisher"].notna().any()), "calibration": None, "seed": 0, "shard": None,
        "work": list(range(len(targets))), "complete": False,
    }
    write_meta(directory, meta)
    write_table(directory, table, meta)
    return directory
