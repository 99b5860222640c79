"""The `moee` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .checks import RW_SOURCES, VARIANTS
from .prompts import PRESETS
from .quantize import QUANTIZE_CHOICES

PRESET_NAMES = ", ".join(PRESETS)


def _read_texts(path: str | None) -> list[str]:
    """Texts from a .txt file (one per line), a .jsonl file (a "text" field), or stdin ("-")."""
    if path is None:
        from .demo import SAMPLE_TEXTS

        return list(SAMPLE_TEXTS)
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not os.path.isfile(path):
        raise SystemExit(f"moee: no input file {path!r}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            texts = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"moee: {path}:{n}: not valid JSON ({exc.msg})")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise SystemExit(f'moee: {path}:{n}: needs a string "text" field')
                texts.append(record["text"])
            return texts
        return [line.rstrip("\n") for line in f if line.strip()]


def cmd_encode(args) -> int:
    from . import MoEEncoder
    from .demo import DEMO_LABEL, demo_checkpoint

    model = args.model or demo_checkpoint()
    label = args.model or DEMO_LABEL
    texts = _read_texts(args.input)
    if not texts:
        raise SystemExit("moee: no texts to encode")
    print(f"model: {label}", file=sys.stderr)
    encoder = MoEEncoder.from_pretrained(model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    start = time.perf_counter()
    out = encoder.encode(
        texts,
        batch_size=args.batch_size,
        prompt=args.prompt,
        max_length=args.max_length,
        show_progress_bar=True if len(texts) >= 256 else None,
        rw_source=args.rw_source,
    )
    seconds = time.perf_counter() - start
    out.metadata["model"] = label
    out.save(args.output)
    tokens = int(out.metadata["tokens"])
    print(
        f"encoded {len(texts)} texts ({tokens} tokens) in {seconds:.2f} s: "
        f"{len(texts) / seconds:.1f} texts/s, {tokens / seconds:.0f} tokens/s\n"
        f"hs {tuple(out.hs.shape)}  rw {tuple(out.rw.shape)} "
        f"({encoder.adapter.family}: {encoder.num_moe_layers} MoE layers x {encoder.num_experts} experts)\n"
        f"wrote {args.output}"
    )
    return 0


def cmd_mteb(args) -> int:
    try:
        from .mteb import PAPER_TASKS, MoEEModel, evaluate, get_tasks, results_folder
    except ImportError as exc:
        raise SystemExit(f"moee: {exc}")
    from . import MoEEncoder
    from .demo import demo_checkpoint

    if args.paper == bool(args.tasks):
        raise SystemExit("moee mteb: give either --tasks A,B,... or --paper")
    task_names = list(PAPER_TASKS) if args.paper else [name.strip() for name in args.tasks.split(",") if name.strip()]
    try:
        tasks = get_tasks(task_names)
    except KeyError as exc:
        raise SystemExit(f"moee mteb: {exc.args[0] if exc.args else exc}")
    encoder = MoEEncoder.from_pretrained(args.model or demo_checkpoint(), device=args.device, dtype=args.dtype, quantize=args.quantize)
    try:
        model = MoEEModel(
            encoder,
            variant=args.variant,
            alpha=args.alpha,
            prompt=None if args.prompt == "verbatim" else args.prompt,
            instructions=not args.no_instructions,
            reference_exact=args.reference_exact,
            rw_source=args.rw_source,
            standardize=None if args.standardize == "none" else args.standardize,
            standardize_batch_size=args.standardize_batch_size,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except ValueError as exc:
        raise SystemExit(f"moee mteb: {exc}")
    print(f"{model!r}\ntasks: {', '.join(task_names)}", file=sys.stderr)
    result = evaluate(model, tasks, output_dir=args.output_dir, overwrite=args.overwrite)
    metadata = {task.metadata.name: task.metadata for task in tasks}
    rows = [(r.task_name, metadata[r.task_name].type, metadata[r.task_name].main_score, r.get_score()) for r in result.task_results]
    width = max([len("average")] + [len(row[0]) for row in rows])
    print(f"{'task':<{width}}  {'type':<18}  {'main score':<16}  value")
    for name, task_type, score_name, score in rows:
        print(f"{name:<{width}}  {task_type:<18}  {score_name:<16}  {100 * score:.2f}")
    if rows:
        print(f"{'average':<{width}}  {'':<18}  {'':<16}  {100 * sum(row[3] for row in rows) / len(rows):.2f}")
    print(f"MTEB result files: {results_folder(model, args.output_dir)}")
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or Hub id (default: the built-in untrained demo)")
    parser.add_argument("--max-length", type=int, help="token limit per text (the template is never cut)")
    parser.add_argument("--batch-size", type=int, help="most texts per forward (default: a token budget decides)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="load weights in 4-bit NF4 (the paper's setting) or "
                        "8-bit through bitsandbytes (needs pip install moee-fast[quant])")
    parser.add_argument(
        "--rw-source",
        choices=RW_SOURCES,
        default="scores",
        help="RW from the router's scores (the paper's definition, default) or its raw logits "
        "(as the authors' released code took for OLMoE, Qwen and Mixtral)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moee", description="MoEE embeddings from Mixture-of-Experts LLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser("encode", help="embed texts into a .safetensors file (hs, rw, metadata)")
    encode.add_argument("--input", help='.txt (one text per line), .jsonl ("text" field), or - for stdin (default: built-in samples)')
    encode.add_argument("--output", default="embeddings.safetensors", help="where to write (default: %(default)s)")
    encode.add_argument("--prompt", help=f"a preset ({PRESET_NAMES}) or a template with {{text}}, e.g. "
                        '\'This sentence : "{text}" means in one word:"\' (default: the text verbatim)')
    _add_model_arguments(encode)
    encode.set_defaults(func=cmd_encode)

    evaluation = commands.add_parser("mteb", help="evaluate a MoEE variant on MTEB tasks (needs pip install moee-fast[mteb])")
    evaluation.add_argument("--tasks", help="comma-separated MTEB task names, e.g. STSBenchmark,SciDocsRR")
    evaluation.add_argument("--paper", action="store_true", help="the paper's task list: its 19 English MTEB tasks (STS, classification, clustering, pair classification, reranking, summarization)")
    evaluation.add_argument("--variant", choices=VARIANTS, default="sum", help="MoEE variant (default: %(default)s)")
    evaluation.add_argument("--alpha", type=float, default=1.0, help="weight of cos_RW in the sum variant (default: %(default)s)")
    evaluation.add_argument("--prompt", default="prompteol",
                            help=f"a preset ({PRESET_NAMES}), a template with {{text}}, or verbatim (default: %(default)s)")
    evaluation.add_argument("--no-instructions", action="store_true", help="leave out the paper's per-task e5 instructions")
    evaluation.add_argument("--reference-exact", action="store_true",
                            help="build prompts byte for byte as the authors' code did (instruction inside the quotes, _ as space)")
    evaluation.add_argument("--standardize", choices=("none", "per_batch"), default="none",
                            help="per_batch: the authors' z-scores over each --standardize-batch-size texts (batch-dependent)")
    evaluation.add_argument("--standardize-batch-size", type=int, default=128, help="(default: %(default)s)")
    evaluation.add_argument("--output-dir", default="results", help="where MTEB writes its result files (default: %(default)s)")
    evaluation.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results there")
    _add_model_arguments(evaluation)
    evaluation.set_defaults(func=cmd_mteb)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
