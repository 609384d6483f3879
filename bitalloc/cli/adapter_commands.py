"""`bitalloc adapter profile|solve|apply`: LoRAQuant adapters under one bit budget."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bitalloc.atomic import check_output
from bitalloc.cli.common import MODEL_FORMS, positive_int, print_json, table


def cmd_adapter_profile(args: argparse.Namespace) -> int:
    """`bitalloc adapter profile ADAPTER_DIR... --out DIR`: error and storage of every config of every module."""
    from bitalloc.adapters import load_adapter_profile, profile_adapters

    try:
        groups = None if args.groups is None else [int(g) for g in args.groups.split(",") if g.strip()]
    except ValueError:
        raise ValueError(f"invalid --groups {args.groups!r}: expected comma-separated ints like 64,128") from None
    out = profile_adapters(args.adapters, args.out, space=args.space, groups=groups, base_model=args.base_model,
                           model=args.model, calib=args.calib, samples=args.samples, seqlen=args.seqlen,
                           seed=args.seed, force=args.force)
    meta = load_adapter_profile(out).meta
    print(f"adapter profile written to {out}: {meta['n_modules']} modules of {len(meta['adapters'])} adapters, "
          f"{meta['table']['rows']} rows, {meta['seconds']:.1f} s")
    return 0


def cmd_adapter_solve(args: argparse.Namespace) -> int:
    """`bitalloc adapter solve PROFILE --budget B` (or `--variant b@rho`): one config per module."""
    if args.out:
        check_output(args.out, force=args.force, kind="file", what="--out")
    from bitalloc.adapters import solve_adapters

    alloc = solve_adapters(args.profile, args.budget, objective=args.objective, per_adapter=args.per_adapter,
                           variant=args.variant, h_rule=args.h_rule, backend=args.backend,
                           time_limit=args.time_limit, mip_gap=args.mip_gap)
    if args.out:
        alloc.save(args.out)
    d = alloc.to_dict()
    if args.json:
        print_json(d)
        return 0
    rows = [(name, a["modules"], f"{a['bits_per_param']:.4f}", f"{a['bits_per_param_codes']:.4f}",
             f"{a['objective']:.6g}", a.get("status", d["status"])) for name, a in d["adapters"].items()]
    rows.append(("(all)", d["n_matrices"], f"{d['bits_per_param']:.4f}", f"{d['bits_per_param_codes']:.4f}",
                 f"{d['objective']:.6g}", d["status"]))
    print(table(rows, ["adapter", "modules", "bits/param", "codes only", "error", "status"]))
    gap = "-" if d["gap"] is None else f"{100 * d['gap']:.4f}%"
    print(f"\n{d['mode']}: budget {d['budget']}, gap {gap}, {d['seconds']:.2f} s, backend {d['backend']}")
    if args.out:
        print(f"allocation written to {args.out}")
    return 0


def cmd_adapter_apply(args: argparse.Namespace) -> int:
    """`bitalloc adapter apply ALLOC --out DIR [--dequantized]`: packed adapters (and plain PEFT copies)."""
    from bitalloc.adapters import apply_adapters

    out = apply_adapters(args.allocation, args.out, dequantized=args.dequantized, adapters=args.adapters,
                         force=args.force)
    index = json.loads((out / "adapters.json").read_text())
    if args.json:
        print_json(index)
        return 0
    rows = [(a["name"], a["bytes"], f"{a['bits_per_param']:.4f}", f"{a['bits_per_param_codes']:.4f}")
            for a in index["adapters"]]
    print(table(rows, ["adapter", "bytes", "bits/param", "codes only"]))
    print(f"\nwrote {out}{' (with plain PEFT copies in NAME/peft)' if args.dequantized else ''}")
    return 0


def add_adapter_commands(sub: Any) -> None:
    """The `bitalloc adapter profile|solve|apply` group."""
    group = sub.add_parser("adapter", help="LoRAQuant: profile, solve and apply LoRA adapters under one bit budget")
    inner = group.add_subparsers(dest="adapter_command", metavar="ADAPTER_COMMAND")
    inner.required = True

    p = inner.add_parser("profile", help="error and storage bits of every config for every module of PEFT LoRA adapters")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT LoRA adapter directories (named by directory name)")
    p.add_argument("--out", required=True, help="adapter profile directory")
    p.add_argument("--space", default="default",
                   help="config space: default (b in 2,3,4,8, every h, groups 32,64,128) or a JSON/YAML file")
    p.add_argument("--groups", default=None, help="comma-separated group sizes, overriding the space's (e.g. 64,128)")
    p.add_argument("--base-model", default=None, metavar="NAME",
                   help="refuse adapters whose base_model_name_or_path is not NAME")
    p.add_argument("--model", default=None,
                   help="the base model (" + MODEL_FORMS + "): refuse adapters that do not fit its layers "
                        "(default: none, no check)")
    p.add_argument("--calib", default=None,
                   help="with --model: calibration text (wikitext2, c4, shakespeare, a file, self:N) for the activation-weighted "
                        "error_act = tr(dE H dE^T), H the layers' input second moments")
    p.add_argument("--samples", type=positive_int, default=16, help="calibration sequences (default: 16)")
    p.add_argument("--seqlen", type=positive_int, default=256, help="tokens per calibration sequence (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed for self: calibration text (default: 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_adapter_profile)

    p = inner.add_parser("solve", help="one config per module under one bits/param budget for all adapters")
    p.add_argument("profile", help="adapter profile directory (from `bitalloc adapter profile`)")
    p.add_argument("--budget", type=float, default=None, help="bits per LoRA parameter, everything stored counted (e.g. 1.8)")
    p.add_argument("--objective", default="plain",
                   help="plain (default) or act (activation-weighted; needs a profile made with --model and --calib)")
    p.add_argument("--per-adapter", action="store_true", help="the budget holds for each adapter on its own")
    p.add_argument("--variant", default=None, metavar="B@RHO",
                   help="LoRAQuant's fixed rule instead of the solver, e.g. 2@0.8 (group 128; 3@0.9-g64 for another group)")
    p.add_argument("--h-rule", choices=["paper", "code"], default="paper",
                   help="with --variant: paper (smallest h reaching rho, default) or code (the released code's, one less)")
    p.add_argument("--backend", default="auto",
                   help="auto (default: the Lagrangian allocation when its certified gap is at most 1e-4, else highs) "
                        "| lagrange | highs | pulp-highs | pulp-cbc (exact MIPs)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="exact backends: stop after S seconds with the best allocation found")
    p.add_argument("--mip-gap", type=float, default=0.0, help="accept a relative optimality gap; 0 is exact (default: 0)")
    p.add_argument("--out", default=None, help="write the allocation JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the allocation as one JSON object")
    p.set_defaults(func=cmd_adapter_solve)

    p = inner.add_parser("apply", help="write packed quantized adapters (and plain PEFT copies with --dequantized)")
    p.add_argument("allocation", help="adapter allocation JSON (from `bitalloc adapter solve --out`)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --force)")
    p.add_argument("--dequantized", action="store_true", help="also write NAME/peft: a plain PEFT LoRA adapter directory")
    p.add_argument("--adapters", nargs="+", default=None, metavar="ADAPTER_DIR",
                   help="adapter directories, when they moved since profiling (default: the recorded paths)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print adapters.json as one JSON object")
    p.set_defaults(func=cmd_adapter_apply)
