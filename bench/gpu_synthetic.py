"""GPU profile throughput on LLaMA-2-7B-shaped synthetic matrices.

A 7B layer has q, k, v, o (4096 x 4096), gate, up (11008 x 4096) and down (4096 x 11008);
weights are N(0, 0.02^2). This times ``decompose_many`` (what ``bitalloc profile`` runs per
matrix) on the matrices of ``--layers`` layers for a config space, on CUDA, and reports
matrices x configs per second and the extrapolated time of the full 32-layer profile.
Without CUDA it says so and leaves ``reports/gpu_synthetic/`` as it is.

    python bench/gpu_synthetic.py [--space default] [--ranks 64] [--layers 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitalloc.configs import config_space  # noqa: E402
from bitalloc.lowrank import decompose_many  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
FULL_LAYERS = 32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="default")
    p.add_argument("--ranks", default="64")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "reports" / "gpu_synthetic"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_synthetic: no CUDA device here; skipped (reports/gpu_synthetic/ keeps the last GPU run)")
        return 0
    dev = torch.device("cuda")
    configs = config_space(args.space, ranks=tuple(int(r) for r in args.ranks.split(",")))
    gen = torch.Generator(device=dev).manual_seed(0)
    # warm-up: kernels, cuSOLVER/cuBLAS handles
    decompose_many(torch.randn(512, 512, device=dev, generator=gen) * 0.02, configs[:4])
    torch.cuda.synchronize()
    rows = []
    started = time.perf_counter()
    for layer in range(args.layers):
        for kind, shape in SHAPES.items():
            W = torch.randn(shape, device=dev, generator=gen) * 0.02
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            decs = decompose_many(W, configs)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            rel = [d.error / float(W.double().pow(2).sum()) for d in decs]
            rows.append({"layer": layer, "matrix": kind, "shape": list(shape), "configs": len(configs),
                         "seconds": seconds, "configs_per_s": len(configs) / seconds,
                         "rel_error_min": min(rel), "rel_error_max": max(rel)})
            print(f"layer {layer} {kind:9s} {shape[0]}x{shape[1]}: {len(configs)} configs in {seconds:.2f} s "
                  f"({len(configs) / seconds:.1f} configs/s)", flush=True)
            del W, decs
    total = time.perf_counter() - started
    entries = len(rows) * len(configs)
    per_layer = total / args.layers
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python bench/gpu_synthetic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{torch.cuda.get_device_name()}, {platform.platform()}, torch {torch.__version__}",
        "space": args.space, "ranks": args.ranks, "configs_per_matrix": len(configs),
        "matrices": len(rows), "entries": entries, "wall_s": total,
        "matrix_configs_per_s": entries / total,
        "full_profile_estimate_s": per_layer * FULL_LAYERS,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# gpu_synthetic: profile throughput on LLaMA-2-7B-shaped synthetic matrices", "",
        f"- date: {result['date']}", f"- command: `{result['command']}`", f"- machine: {result['machine']}",
        f"- space `{args.space}`, ranks {args.ranks}: {len(configs)} configs per matrix; weights N(0, 0.02^2)",
        f"- measured: {len(rows)} matrices ({args.layers} layer(s) of q, k, v, o 4096x4096, gate, up 11008x4096, "
        f"down 4096x11008) x {len(configs)} configs = {entries} entries in {total:.1f} s: "
        f"**{result['matrix_configs_per_s']:.1f} matrix-configs per second**",
        f"- the full 32-layer profile (224 matrices) would take about **{result['full_profile_estimate_s'] / 60:.1f} "
        f"minutes** (measured time per layer x 32, extrapolated); peak GPU memory {result['peak_memory_gib']:.2f} GiB",
        "", "| layer | matrix | shape | configs | seconds | configs/s | rel. error (min / max) |",
        "| ---: | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['matrix']} | {r['shape'][0]}x{r['shape'][1]} | {r['configs']} | "
                     f"{r['seconds']:.2f} | {r['configs_per_s']:.1f} | {r['rel_error_min']:.4g} / "
                     f"{r['rel_error_max']:.4g} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/results.md: {result['matrix_configs_per_s']:.1f} matrix-configs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
