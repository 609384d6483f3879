"""The `bitalloc` command: a thin shell over the public API, one small function per subcommand.

Each ``cmd_*`` function parses nothing itself: it receives argparse's namespace, calls the
library, and prints. Library errors (:class:`bitalloc.errors.BitallocError`, ``ValueError``,
``OSError``) become one clear line on stderr and exit status 2; anything else one line naming
its type and exit status 1. ``-v`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from bitalloc import __version__
from bitalloc.atomic import atomic_write_bytes, check_output
from bitalloc.cli.adapter_commands import add_adapter_commands
from bitalloc.cli.eval_command import add_eval_command
from bitalloc.cli.common import (BUILTIN_HELP, MODEL_FORMS, add_allow_unusual, add_model_arg, add_target_filters,
                                 float_list, jobs_count, positive_int, print_json, table)
from bitalloc.errors import BitallocError
from bitalloc.identity import BUILTIN_ALIAS
from bitalloc.preflight import check_input_file, check_model_spec, check_text_source

if TYPE_CHECKING:  # the CLI imports the stages lazily, to answer --help fast
    from bitalloc.allocation import SolveOptions

log = logging.getLogger("bitalloc")



# ----- subcommands -----------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """`bitalloc info [MODEL]`: targets, shapes, parameter counts."""
    check_model_spec(args.model)
    from bitalloc.apply import model_info

    summary = model_info(args.model, include=args.include, exclude=args.exclude)
    if args.json:
        print_json(summary)
        return 0
    rows = [(t["name"], f"{t['rows']}x{t['cols']}", t["params"], t.get("config", t["type"]))
            for t in summary["targets"]]
    print(table(rows, ["target", "shape", "params", "type or config"]))
    packed = f" ({summary['packed_targets']} packed)" if summary["packed_targets"] else ""
    filtered = (f"{summary['filtered_targets']} targets left out by --include/--exclude "
                f"({summary['filtered_params']:,} parameters); " if summary["filtered_targets"] else "")
    print(
        f"\n{len(summary['targets'])} targets{packed}, {summary['target_params']:,} target parameters; {filtered}"
        f"{summary['other_params']:,} other parameters (embeddings, norms, ...); "
        f"{summary['total_params']:,} in all"
    )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """`bitalloc profile`: the error of every config for every target matrix (resumable)."""
    check_model_spec(args.model, flag="--model")  # before the stages' heavy imports
    if not (args.no_fisher and args.no_act and args.no_kl):
        check_text_source(args.calib, flag="--calib")
    from bitalloc.configs import parse_ranks
    from bitalloc.profiles import ProfileRequest, profile

    request = ProfileRequest(
        model=args.model, out=args.out, calib=args.calib, samples=args.samples, seqlen=args.seqlen,
        calib_part=args.calib_part, fisher=not args.no_fisher, fisher_mode=args.fisher_mode, act=not args.no_act, kl=not args.no_kl,
        kl_windows=args.kl_windows, kl_levels=args.kl_levels, space=args.space,
        ranks=parse_ranks(args.ranks), include=args.include, exclude=args.exclude,
        device=args.device, shard=args.shard, resume=args.resume, seed=args.seed,
        progress=not args.quiet, jobs=args.jobs, allow_unusual_config=args.allow_unusual_config,
    )
    if args.executor == "ray":
        from bitalloc.profiles.ray_executor import profile_with_ray

        out = profile_with_ray(request, address=args.ray_address, shards=args.shards)
    elif args.ray_address is not None or args.shards is not None:
        raise ValueError("--ray-address and --shards need --executor ray (one shard of a local run: --shard i/n)")
    else:
        out = profile(request)
    print(f"profile written to {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """`bitalloc merge DIR... --out DIR`: join shard profiles."""
    from bitalloc.profiles import merge_profiles

    out = merge_profiles(args.dirs, args.out, force=args.force)
    print(f"merged {len(args.dirs)} shards into {out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """`bitalloc apply ALLOC.json --out DIR` (or `--uniform CONFIG`): write the quantized model directory."""
    from bitalloc.configs import QuantConfig

    if args.allocation is None and args.uniform is None:
        raise ValueError("give an allocation JSON (from `bitalloc solve --out`) or --uniform CONFIG")
    if args.uniform is not None:  # checks before the stages' heavy imports
        QuantConfig.from_name(args.uniform, allow_unusual=args.allow_unusual_config)
    check_input_file(args.allocation, what="allocation")
    check_model_spec(args.model, flag="--model")
    check_output(args.out, force=args.force, kind="dir", what="--out")
    from bitalloc.apply import apply_allocation
    from bitalloc.apply.summary import applied_report
    out = apply_allocation(
        args.allocation, out=args.out, model=args.model, uniform=args.uniform, include=args.include,
        exclude=args.exclude, dequantized=args.dequantized, device=args.device,
        fisher=False if args.no_fisher else None, force=args.force, ignore_model_hash=args.ignore_model_hash,
        keep_dense=args.keep_dense, seed=args.seed, progress=not args.quiet,
        allow_unusual_config=args.allow_unusual_config,
    )
    summary = applied_report(out)
    if args.json:
        print_json(summary)
        return 0
    print(applied_text(summary))
    return 0


def size_text(n: int) -> str:
    """Bytes for people: 512 B, 3.4 kB, 126.9 MB, 2.10 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n} B"


def applied_text(summary: dict) -> str:
    """What `bitalloc apply` prints: what is quantized, what is not, and the real bytes."""
    lines = [f"wrote {summary['out']} in {summary['seconds']:.1f} s",
             f"quantized: {summary['targets']} of {summary['model_targets']} targets "
             f"({summary['quantized_params']:,} parameters)"]
    if summary["dense_targets"]:
        lines.append(f"kept dense (--keep-dense): {summary['dense_targets']} targets ({summary['dense_params']:,} "
                     "parameters, counted at their stored bits)")
    lines.append(f"  {summary['bits_per_param']:.4f} bits/param over these targets "
                 f"({summary['bits_per_param_on_disk']:.4f} on disk); adapter: {'yes' if summary['adapter'] else 'no'}")
    if summary["untouched_targets"]:
        lines.append(f"not quantized: {len(summary['untouched_targets'])} targets outside the allocation stay as stored "
                     f"({'/'.join(summary['untouched_dtypes']) or '-'}, {summary['untouched_params']:,} parameters, "
                     f"{size_text(summary['untouched_bytes'])}), e.g. {summary['untouched_targets'][0]}")
    lines.append(f"other tensors (embeddings, norms, ...): {summary['other_params']:,} parameters, "
                 f"{size_text(summary['other_bytes'])}")
    parts = ", ".join(f"{name} {size_text(size)}" for name, size in summary["bytes"].items() if size)
    lines.append(f"on disk: {size_text(summary['total_bytes'])} ({parts}); the whole model: "
                 f"{summary['model_bits_per_param_on_disk']:.2f} bits per parameter over "
                 f"{summary['total_params']:,} parameters")
    return "\n".join(lines)


def _solve_options(args: argparse.Namespace) -> SolveOptions:
    """The one SolveOptions of a `solve` or `sweep` command line."""
    from bitalloc.allocation import SolveOptions

    ties = list(args.tie or []) + (["fuse"] if args.fuse else [])
    return SolveOptions(objective=args.objective, ties=tuple(ties), min_bits=tuple(args.min_bits or ()),
                        max_bits=tuple(args.max_bits or ()), exclude_lowrank_from_budget=args.exclude_lowrank_from_budget,
                        backend=args.backend, time_limit=args.time_limit, mip_gap=args.mip_gap)


def cmd_solve(args: argparse.Namespace) -> int:
    """`bitalloc solve PROFILE --budget B`: the exact allocation at one budget."""
    from bitalloc.allocation import RefineOptions, refine, solve
    if args.out:
        check_output(args.out, force=args.force, kind="file", what="--out")
    if args.refine:
        alloc = refine(args.profile, args.budget, _solve_options(args),
                       RefineOptions(iterations=args.refine, windows=args.refine_windows, device=args.device,
                                     progress=not args.quiet))
    else:
        alloc = solve(args.profile, args.budget, _solve_options(args))
    if args.out:
        alloc.save(args.out)
    if args.json:
        print_json(alloc.to_dict())
        return 0
    gap = "-" if alloc.gap is None else f"{100 * alloc.gap:.4f}%"
    print(table([(alloc.budget, f"{alloc.bits_per_param:.4f}", f"{alloc.objective:.6g}", alloc.status, gap,
                   f"{alloc.seconds:.2f}", alloc.backend, alloc.n_candidates_after_pruning)],
                 ["budget", "bits/param", "predicted error", "status", "gap", "seconds", "backend", "candidates kept"]))
    shares = alloc.params_by_bits or {}
    print("\nNF bits  matrices  share of params")
    for bits, count in alloc.bits_histogram.items():
        print(f"{bits:>7}  {count:>8}  {100 * shares.get(bits, 0.0):>14.1f}%")
    if alloc.note:
        print(f"\nnote: {alloc.note}")
    done = alloc.extra.get("refinement")
    if done:
        print(f"\nrefined: measured KL {done['kl_start']:.5g} -> {done['kl_best']:.5g} (round {done['chosen_round']} of "
              f"{done['iterations']}, {done['kl_runs']} KL runs on {done['positions']} positions, {done['seconds']:.1f} s)")
    if alloc.status != "optimal":
        print(f"\nnot proven optimal (status {alloc.status}, gap {gap})")
    if args.out:
        print(f"\nallocation written to {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`bitalloc sweep PROFILE --budgets A:B:STEP`: exact solves over budgets plus the Lagrangian hull."""
    from bitalloc.allocation import sweep

    if args.out:
        check_output(args.out, force=args.force, kind="file", what="--out")
    if args.allocs:
        check_output(args.allocs, force=args.force, kind="dir", what="--allocs")
    pareto, allocations, _ = sweep(args.profile, args.budgets, _solve_options(args), progress=not args.quiet)
    if args.out:
        atomic_write_bytes(Path(args.out), pareto.to_csv(index=False).encode())
    if args.allocs:
        folder = Path(args.allocs)
        for alloc in allocations:
            if alloc.feasible:
                alloc.save(folder / f"alloc-{alloc.budget:.4f}.json")
    ilp = pareto[pareto["kind"] == "ilp"]
    if args.json:
        print_json({"rows": json.loads(pareto.to_json(orient="records"))})
        return 0
    rows = [(f"{r.budget:.4f}", f"{r.bits_per_param:.4f}", f"{r.objective:.6g}", r.status,
             "-" if r.gap != r.gap else f"{100 * r.gap:.4f}%", f"{r.seconds:.2f}") for r in ilp.itertuples()]
    print(table(rows, ["budget", "bits/param", "predicted error", "status", "gap", "seconds"]))
    print(f"\n{len(ilp)} budgets, {int((pareto['kind'] == 'hull').sum())} Lagrangian hull points, "
          f"{ilp['seconds'].sum():.2f} s solving")
    if args.out:
        print(f"written to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`bitalloc report PROFILE [--sweep CSV] [--evals JSONL] [--alloc JSON ...] --out DIR`: figures + report.md."""
    from bitalloc.reports import report

    path = report(args.profile, sweep=args.sweep, evals=args.evals, allocs=args.alloc or [], out=args.out,
                  objectives=args.objectives, budgets=args.budgets, force=args.force)
    figures = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"report written to {path} ({len(figures)} figures: {', '.join(figures)})")
    return 0


# ----- parser ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `bitalloc` command."""
    parser = argparse.ArgumentParser(
        prog="bitalloc",
        description="Mixed-precision bit allocation for LLM quantization: profile, solve, apply, eval, report.",
    )
    parser.add_argument("--version", action="version", version=f"bitalloc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="list a model's target matrices, shapes and parameter counts")
    add_model_arg(p)
    add_target_filters(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    add_eval_command(sub)

    p = sub.add_parser("profile", help="measure the error of every config for every target matrix")
    p.add_argument("--model", default=None, help=BUILTIN_HELP)
    p.add_argument("--calib", default=None, help="calibration text for the Fisher: wikitext2, c4, shakespeare, a file, or self:N (default: self:SAMPLES, text "
                        "sampled from the model itself)")
    p.add_argument("--samples", type=positive_int, default=None, help="calibration sequences (default: chosen per device)")
    p.add_argument("--seqlen", type=positive_int, default=None, help="tokens per calibration sequence (default: chosen per device)")
    p.add_argument("--calib-part", choices=("second-half", "whole"), default="second-half",
                   help="where a calibration text's windows come from: its second half (default), so that `bitalloc eval "
                        "--windows N`, which reads the first N windows, scores text calibration never saw; or the whole "
                        "text")
    p.add_argument("--no-fisher", action="store_true", help="no Fisher-weighted errors (no Fisher estimate)")
    p.add_argument("--no-act", action="store_true",
                   help="no activation-aware errors (error_act, from the calibration inputs' second moments)")
    p.add_argument("--no-kl", action="store_true",
                   help="no KL-calibrated errors (error_kl: per-matrix factors measured by injecting noise into "
                        "one matrix at a time)")
    p.add_argument("--kl-windows", type=positive_int, default=1, metavar="N",
                   help="calibration sequences each KL probe runs on; cost grows linearly (default: 1)")
    p.add_argument("--kl-levels", type=float_list, default=(0.04,), metavar="A,B",
                   help="relative errors of the injected noise, one probe per matrix and level (default: 0.04)")
    p.add_argument("--fisher-mode", choices=["exact", "batched"], default=None,
                   help="exact: one sequence per backward pass (LQ-LoRA); batched: cheaper (default: chosen per device)")
    p.add_argument("--space", default="default", help="config space: default, lqlora, or a JSON/YAML file")
    p.add_argument("--ranks", default="auto",
                   help="low-rank ranks: one value fixes it, several let the solver choose (e.g. 0,16,64); "
                        "auto (default): 0 and the largest power of two whose bf16 factors cost at most 0.5 "
                        "bits/param on the median target (0,8 on the built-in model, 0,64 on a 7B)")
    add_target_filters(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--out", default="profile", help="profile directory (default: ./profile)")
    p.add_argument("--shard", default=None, help="i/n: profile every n-th matrix starting at the i-th (1 <= i <= n)")
    p.add_argument("--jobs", type=jobs_count, default=None,
                   help="CPU worker processes, one matrix each at a time, one thread each (default: one per core when the "
                        "profile is big enough to pay for starting them, as many as the available memory "
                        "holds; 1 on CUDA)")
    p.add_argument("--resume", action="store_true", help="require an existing profile in --out and continue it (resuming is automatic when it matches); "
                        "a corrupt meta.json is rebuilt from this command line, keeping the parts that fit it")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_allow_unusual(p)
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: shards as Ray tasks on a Ray cluster, one GPU each "
                        "where the cluster has GPUs, merged into --out (needs pip install 'bitalloc[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster for --executor ray, as ray.init(address=ADDR) takes it (default: $RAY_ADDRESS, "
                        "else a cluster started with `ray start` on this machine, else a new local Ray instance; "
                        "'auto' refuses to start one)")
    p.add_argument("--shards", type=positive_int, default=None, metavar="N",
                   help="with --executor ray: split into N shards, kept in OUT.shards/ for resuming (default: the "
                        "cluster's GPUs, else its CPUs, at most one per target matrix)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("apply", help="quantize a model as an allocation says: packed Q + a PEFT adapter with L1, L2")
    p.add_argument("allocation", nargs="?", default=None, help="allocation JSON (from `bitalloc solve --out`)")
    p.add_argument("--uniform", default=None, metavar="CONFIG",
                   help="instead of an allocation: one config for every target, e.g. nf4-g64-s8x256-r0 (a baseline)")
    p.add_argument("--model", default=None, help=f"model to quantize: {MODEL_FORMS} (default: the allocation's model; "
                   f"with --uniform, {BUILTIN_ALIAS})")
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --force)")
    p.add_argument("--dequantized", action="store_true",
                   help="also write DIR/dequantized: a plain Hugging Face checkpoint with Q in bf16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--no-fisher", action="store_true",
                   help="plain decomposition even when the allocation came from a Fisher profile")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--ignore-model-hash", action="store_true",
                   help="apply an allocation to a model whose weights differ from the profiled one (same names, shapes)")
    p.add_argument("--keep-dense", default=None, metavar="REGEX",
                   help="keep the targets matching REGEX dense (as stored in the model), counted at their stored bits; "
                        "every other target needs a config")
    p.add_argument("--include", default=None, metavar="REGEX", help="with --uniform: only layers whose name matches REGEX")
    p.add_argument("--exclude", default=None, metavar="REGEX", help="with --uniform: drop layers whose name matches REGEX")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print what was written (bitalloc.json's summary, parameter counts and bytes) as one JSON object")
    add_allow_unusual(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("merge", help="join shard profiles (from --shard i/n) into one profile")
    p.add_argument("dirs", nargs="+", help="shard profile directories")
    p.add_argument("--out", required=True, help="merged profile directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_merge)

    for name, helptext in (("solve", "the exact allocation at one bits/param budget"),
                           ("sweep", "exact allocations over many budgets, plus the Lagrangian hull (Pareto front)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("profile", help="profile directory (from `bitalloc profile`)")
        if name == "solve":
            p.add_argument("--budget", type=float, required=True, help="bits per parameter, everything stored counted (e.g. 2.85)")
            p.add_argument("--out", default=None, help="write the allocation JSON here")
            p.add_argument("--json", action="store_true", help="print the allocation as one JSON object")
            p.add_argument("--refine", type=positive_int, default=None, metavar="N",
                           help="then N rounds of: measure the KL of one-step moves of each matrix (or tied group) "
                                "around the allocation, correct its objective factor, solve again; the allocation "
                                "with the lowest measured KL is kept (loads the profile's model)")
            p.add_argument("--refine-windows", type=positive_int, default=None, metavar="N",
                           help="calibration sequences the refinement measures KL on (default: the profile's "
                                "--kl-windows, else 1)")
            p.add_argument("--device", default="auto", help="where --refine runs the model: auto | cpu | cuda[:i]")
        else:
            p.add_argument("--budgets", required=True, help="A:B:STEP (inclusive) or a comma list, e.g. 2.25:4.5:0.05")
            p.add_argument("--out", default=None, help="write the Pareto table (CSV) here")
            p.add_argument("--allocs", default=None, metavar="DIR", help="also write one allocation JSON per budget into DIR")
            p.add_argument("--json", action="store_true", help="print the table as one JSON object")
        p.add_argument("--objective", default=None,
                       help="what is minimized: plain (error) | fisher (error_fisher) | act (error_act) | kl (error_kl) "
                            "(default: fisher when profiled, else plain)")
        p.add_argument("--backend", default="highs", help="highs (default) | pulp-highs | pulp-cbc | lagrange")
        p.add_argument("--tie", action="append", metavar="REGEX",
                       help="matrices matching REGEX share one config within each layer, e.g. 'self_attn\\.[qkv]_proj' (repeatable)")
        p.add_argument("--fuse", action="store_true", help="tie the usual fused groups (q/k/v, gate/up)")
        p.add_argument("--min-bits", action="append", metavar="REGEX=BITS", help="floor on bits/param for matching matrices (repeatable)")
        p.add_argument("--max-bits", action="append", metavar="REGEX=BITS", help="ceiling on bits/param for matching matrices (repeatable)")
        p.add_argument("--exclude-lowrank-from-budget", action="store_true",
                       help="LQ-LoRA's convention: low-rank factors outside the budget (for comparison)")
        p.add_argument("--time-limit", type=float, default=None, metavar="S", help="stop after S seconds with the best allocation found")
        p.add_argument("--mip-gap", type=float, default=0.0, help="accept a relative optimality gap (default: 0, exact)")
        p.add_argument("--force", action="store_true", help="replace existing outputs (--out" +
                       (")" if name == "solve" else ", --allocs)"))
        p.set_defaults(func=cmd_solve if name == "solve" else cmd_sweep)

    p = sub.add_parser("report", help="figures (Pareto front, allocation maps, sensitivity) and a markdown report")
    p.add_argument("profile", help="profile directory (from `bitalloc profile`)")
    p.add_argument("--sweep", default=None, metavar="CSV", help="Pareto table of this profile (`bitalloc sweep --out`); "
                   "objectives it lacks are solved by the report")
    p.add_argument("--evals", default=None, metavar="JSONL", help="evaluated models, one JSON object per line "
                   "(label, bits_per_param, perplexity, kl, baseline, ...)")
    p.add_argument("--alloc", action="extend", nargs="+", metavar="JSON", help="allocation JSON(s) of this profile, one map each")
    p.add_argument("--objectives", default=None, help="comma-separated: plain, fisher, act, kl (default: those the profile has)")
    p.add_argument("--budgets", default=None, help="A:B:STEP or a list: budgets solved when no sweep has the objective "
                   "(default: 9 across the profile's range)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and its PNG/SVG figures")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_report)

    add_adapter_commands(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("urllib3", "filelock", "httpx", "huggingface_hub", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if verbose < 2:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except Exception:  # transformers missing or changed: keep its defaults
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bitalloc` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print(f"bitalloc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for every failure; the traceback with -v
        return _report_error(args, exc)


#: Errors that are the input's or the environment's, not bitalloc's: exit status 2.
EXPECTED_ERRORS = (BitallocError, ValueError, OSError)


def _report_error(args: argparse.Namespace, exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr (its traceback first with -v); the exit status."""
    if args.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, EXPECTED_ERRORS):
        print(f"bitalloc {args.command}: error: {message}", file=sys.stderr)
        return 2
    hint = "" if args.verbose else "; rerun with -v for the traceback"
    print(f"bitalloc {args.command}: internal error ({type(exc).__name__}): {message}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
