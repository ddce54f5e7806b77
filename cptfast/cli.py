"""The `cptfast` command: `train` (with no arguments: the demo), `prepare`, `verify`,
`expand-vocab`, `merge`, `bench`, `doctor` and `data-demo`."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from cptfast.data.prep import DEFAULT_SHARD_TOKENS
from cptfast.errors import CptfastError, TrainingStopped

# Errors that mean "the input, the set-up or the machine is wrong": one line, no traceback
# (unless --debug). Anything else is a bug and keeps its traceback.
USER_ERRORS = (CptfastError, FileNotFoundError, FileExistsError)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cptfast.data import prepare

    summary = prepare(args.input, args.output, args.tokenizer, text_field=args.text_field,
                      split_lines=args.split_lines, prefix_field=args.prefix_field,
                      prefix_template=args.prefix_template, shard_tokens=args.shard_tokens,
                      workers=args.workers, overwrite=args.overwrite,
                      progress=False if args.no_progress else None)
    print(summary.format())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from cptfast.data import verify
    from cptfast.data.shards import open_source

    if (Path(args.source) / "manifest.json").is_file():
        opened = verify(args.source)
        m = opened.manifest
        for info in m.files:
            print(f"  {info.name}: {info.documents:,} documents, {info.tokens:,} tokens, "
                  f"max id {info.max_token_id}  ok")
        print(f"{opened.path}: {m.documents:,} documents, {m.tokens:,} {m.dtype} tokens, vocab "
              f"{m.tokenizer.vocab_size:,}; structure, token ids and sha256 of every file "
              "verified")
        return 0
    # Foreign shards carry no checksums: the readers validate their structure; with
    # --vocab-size every token id is checked too.
    source = open_source(args.source, name=args.source, vocab_size=args.vocab_size,
                         format=args.format, dtype=args.dtype, eos_id=args.eos_id,
                         delimiter=args.delimiter, delimiter_role=args.delimiter_role)
    for reader in source.readers:
        split = (f", split at {reader.delimiter} ({reader.delimiter_role} of a document)"
                 if reader.delimiter is not None else "")
        print(f"  {reader.path}: {reader.format}, {reader.num_documents:,} documents, "
              f"{reader.document_tokens:,} {reader.dtype} tokens, max id "
              f"{reader.max_token_id()}{split}, {reader.cut_documents} cut at the file's edges")
    whole = source.documents()  # documents cut between files of one stream are joined
    checked = f"token ids < {args.vocab_size}" if args.vocab_size else "no vocabulary given"
    print(f"{args.source}: {len(source.readers)} files, {whole.num_documents:,} documents "
          f"({whole.cut_documents} cut at the source's edges), {whole.num_tokens:,} tokens; "
          f"structure verified ({checked}; foreign shards have no checksums)")
    return 0


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from cptfast.training.demo import run_data_demo

    run_data_demo(args.output, workers=args.workers)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cptfast.training import config as train_config

    if args.print_config:
        print(train_config.describe())
        return 0
    if args.config is None and not args.overrides:
        from cptfast.training.demo import run_demo
        run_demo(args.demo_output, quick=args.quick_demo)
        return 0
    from cptfast.training import recipes, train

    config = train_config.load(args.config, args.overrides)
    if os.environ.get("RANK", "0") == "0":  # the replay plan, once under torchrun
        print(recipes.format_plan(recipes.plan_from_manifests(
            config, int(os.environ.get("WORLD_SIZE", "1")))))
    if args.plan:
        return 0
    result = train(config)
    print(f"cptfast train: {result.steps} steps, {result.tokens:,} tokens, "
          f"{result.skipped_steps} skipped; final checkpoint {result.final_checkpoint}")
    for entry in result.evals[-1:]:
        print("held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items()
                                            if k != "step"))
    return 0


def _train_parser(sub) -> None:
    from cptfast.training.config import describe

    p = sub.add_parser(
        "train", help="continued pretraining from a TOML config (no arguments: the demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue pretraining a Hugging Face causal LM on token shards. "
                    "`cptfast train` alone runs the built-in offline demo.",
        epilog="Every key, with its default (override any with --section.key=value):\n\n"
               + describe())
    p.add_argument("config", nargs="?", help="TOML config file")
    p.add_argument("--print-config", action="store_true",
                   help="print every key with its default and exit")
    p.add_argument("--plan", action="store_true",
                   help="print the replay plan (tokens and epochs per source) and exit")
    p.add_argument("--demo-output", default="cptfast-demo",
                   help="demo working directory (%(default)s)")
    p.add_argument("--quick-demo", action="store_true", help="a seconds-long demo (tests)")
    p.set_defaults(run=_cmd_train, overrides=[])


def _cmd_expand_vocab(args: argparse.Namespace) -> int:
    from cptfast.training.vocab import expand_vocabulary

    report = expand_vocabulary(args.model, args.output, tokenizer_dir=args.tokenizer,
                               new_tokens=args.tokens, init=args.init, noise_std=args.noise_std,
                               seed=args.seed)
    print(f"{report['output']}: vocabulary {report['old_vocab']:,} -> {report['new_vocab']:,} "
          f"({report['added']:,} new rows, initialised by {report['init']})")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from cptfast.training.merge import merge

    eval_sets = dict(item.split("=", 1) for item in args.eval or [])
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else None
    rows = merge(args.base, args.tuned, args.alpha, args.output, eval_sets=eval_sets,
                 alphas=alphas, seq_len=args.seq_len, batches=args.batches)
    if rows:
        names = list(eval_sets)
        print("alpha  " + "  ".join(f"{name:>10}" for name in names))
        for row in rows:
            print(f"{row['alpha']:5.2f}  " + "  ".join(f"{row[n]:10.4f}" for n in names))
    if args.output:
        print(f"{args.output}: (1 - {args.alpha}) x base + {args.alpha} x tuned")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from cptfast.benchmark import run

    report = run(args.suite, args.preset, args.out, repeats=args.repeats,
                 static_bounds=not args.no_static_bounds)
    tests = report.get("tests")
    if tests is not None:
        counts = ", ".join(f"{n} {kind}" for kind, n in tests["counts"].items())
        print(f"CUDA tests: {counts or 'no summary'} ({Path(args.out) / 'tests.log'})")
    static = report.get("static_bounds", {})
    if static.get("records") or static.get("failures"):
        print(f"static bounds: {len(static['records'])} records, "
              f"{len(static['failures'])} not compiled")
    print(f"{len(report['ratios'])} ratios, {len(report['skipped'])} not measured here; "
          f"report: {args.out}/report.md")
    for problem in report.get("problems", []):
        print(f"cptfast bench: {problem}", file=sys.stderr)
    return 1 if report.get("problems") else 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    if args.perf:
        from cptfast.doctor import perf_report
        return perf_report(args.json, args.kernel)
    from cptfast.doctor import run
    return run(compile_kernels=not args.no_compile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cptfast", description="Kernel-accelerated continued pretraining of causal LMs.")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of every error, not only of internal ones")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)

    p = sub.add_parser("prepare", help="tokenize text files into a shard directory",
                       description="Tokenize .txt, .jsonl[.gz] and .parquet files into a cptfast "
                                   "shard directory (Megatron .bin/.idx pairs + manifest.json).")
    p.add_argument("--tokenizer", required=True, help="local directory AutoTokenizer can load")
    p.add_argument("--input", required=True, nargs="+", help="input files or directories")
    p.add_argument("--output", required=True, help="shard directory to create")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column (text)")
    p.add_argument("--prefix-field", "--metadata-field", dest="prefix_field", default=None,
                   help="a field put before the text and kept out of the loss (e.g. url: "
                        "metadata conditioning); writes OUTPUT/loss_mask")
    p.add_argument("--prefix-template", default="{}\n\n",
                   help="how the prefix is written (%(default)r)")
    p.add_argument("--split-lines", action="store_true",
                   help="one document per line of .txt files (default: one per file)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="start a new shard file after this many tokens (%(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_prepare)

    p = sub.add_parser("verify", help="check a data source (structure, token ids, sha256)",
                       description="Check a shard directory (structure, token ids and the "
                                   "sha256 of every file), or foreign shards (a directory, "
                                   "prefix, file or glob of Megatron, llm.c, headerless or "
                                   "datatrove files: structure, and token ids with "
                                   "--vocab-size).")
    p.add_argument("source", help="directory, prefix, file or quoted glob")
    p.add_argument("--format", default="auto",
                   help="auto, megatron, llmc, headerless or datatrove (%(default)s)")
    p.add_argument("--dtype", help="headerless/datatrove token type (uint16, uint32, int32)")
    p.add_argument("--eos-id", type=int, help="headerless: the token ending each document")
    p.add_argument("--delimiter", type=int, help="llmc: the token splitting documents")
    p.add_argument("--delimiter-role", choices=["end", "start"],
                   help="the delimiter ends (a label) or starts (a BOS) a document")
    p.add_argument("--vocab-size", type=int, help="check every token id is below this")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("expand-vocab", help="grow a model's embeddings to a larger tokenizer",
                       description="Add embedding and output-head rows for the tokens a new "
                                   "tokenizer (extending the model's) or a token list adds.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    new = p.add_mutually_exclusive_group(required=True)
    new.add_argument("--tokenizer", help="the larger tokenizer (old tokens keep their ids)")
    new.add_argument("--tokens", nargs="+", help="tokens to add to the model's tokenizer")
    p.add_argument("--output", required=True, help="directory for the expanded model")
    p.add_argument("--init", choices=["decompose", "mean"], default="decompose",
                   help="new rows: mean of the old pieces' rows (default) or of all old rows "
                        "plus noise")
    p.add_argument("--noise-std", type=float, default=0.01,
                   help="mean init: noise, as a fraction of the rows' std (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_expand_vocab)

    p = sub.add_parser("merge", help="interpolate a base and a tuned checkpoint",
                       description="theta = (1 - alpha) base + alpha tuned; with --eval, the "
                                   "held-out loss of each set for every alpha of --alphas.")
    p.add_argument("--base", required=True, help="the base model directory")
    p.add_argument("--tuned", required=True, help="the continued-pretrained model directory")
    p.add_argument("--alpha", type=float, default=0.5, help="for --output (%(default)s)")
    p.add_argument("--output", help="write the merge at --alpha here")
    p.add_argument("--eval", action="append", metavar="NAME=SHARDS",
                   help="a held-out set (repeatable)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1",
                   help="alphas to evaluate (%(default)s)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batches", type=int, default=8, help="batches of 4 rows per set")
    p.set_defaults(run=_cmd_merge)

    p = sub.add_parser("bench", help="run the benchmark suites and write a report",
                       description="Run the benchmark suites of bench/ against same-run "
                                   "baselines and write report.md, report.json and plots, "
                                   "with the static bound of each kernel the suites run.")
    p.add_argument("--suite", action="append",
                   help="prepare, loader, cross_entropy, attention, hf, train, distributed "
                        "(repeatable; default: all)")
    p.add_argument("--preset", default="small", help="smoke, small, medium (the acceptance "
                   "sizes), large, or gpu-check (one H100/H200, <= 10 minutes: the fast tests "
                   "in the CUDA test mode, then the GPU rows of every suite) (%(default)s)")
    p.add_argument("--out", default="bench-report", help="output directory (%(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per CPU timing, the median reported (default: 1 for smoke and "
                        "gpu-check, 3 for small and medium, 5 for large)")
    p.add_argument("--no-static-bounds", action="store_true",
                   help="leave out the static bounds of the kernels (compiling them for "
                        "sm_80 and sm_90 takes seconds to a minute)")
    p.set_defaults(run=_cmd_bench)

    p = sub.add_parser("doctor", help="environment and ahead-of-time kernel compilation report")
    p.add_argument("--no-compile", action="store_true",
                   help="only the environment (skip compiling the kernels)")
    p.add_argument("--perf", action="store_true",
                   help="the static performance bound of every shipped kernel, from its SASS")
    p.add_argument("--json", metavar="FILE", help="with --perf: write the records to FILE")
    p.add_argument("--kernel", metavar="PREFIX",
                   help="with --perf: only the configurations whose name starts with PREFIX")
    p.set_defaults(run=_cmd_doctor)

    p = sub.add_parser("data-demo", help="the demo's data half alone: corpora, tokenizer, shards")
    p.add_argument("--output", default="cptfast-data-demo",
                   help="working directory (%(default)s)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes")
    p.set_defaults(run=_cmd_data_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only `train` takes free-form --section.key=value overrides
        overrides = _join_values(unknown)
        if args.command != "train" or not all(o.startswith("--") and "." in o.split("=")[0]
                                               for o in overrides):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = overrides
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            traceback.print_exc()
        if isinstance(error, TrainingStopped):  # not an error: the run stopped as asked
            if os.environ.get("RANK", "0") == "0":  # once under torchrun
                print(f"cptfast {args.command}: {error}", file=sys.stderr)
            return error.exit_code
        print(f"cptfast {args.command}: error: {error}", file=sys.stderr)
        return 1


def _join_values(arguments: list[str]) -> list[str]:
    """``--a.b=1`` stays; ``--a.b 1`` becomes ``--a.b=1``."""
    joined = []
    for argument in arguments:
        if joined and "=" not in joined[-1] and not argument.startswith("--"):
            joined[-1] += "=" + argument
        else:
            joined.append(argument)
    return joined

