"""The `moee` command line."""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import time

from .checks import RW_SOURCES, VARIANTS
from .prompts import PRESETS
from .loading.quantization import QUANTIZE_CHOICES

PRESET_NAMES = ", ".join(PRESETS)


class UsageError(ValueError):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _sample_rows():
    from .corpus.readers import Row
    from .demo import SAMPLE_TEXTS

    return [Row(f"samples[{i}]", text, f"samples[{i}]") for i, text in enumerate(SAMPLE_TEXTS)]


def _check_encode_args(args) -> None:
    """Every check that needs no model, so a bad command fails in well under a second."""
    from .prompts import resolve_prompt
    from .loading.placement import resolve_dtype

    try:
        resolve_prompt(args.prompt)
        if args.dtype is not None:
            resolve_dtype(args.dtype, None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"moee encode: {exc}") from None
    single_file = args.output.lower().endswith(".safetensors")
    if args.engine == "vllm" and not (single_file and args.format == "safetensors" and not args.devices and not args.quantize):
        raise UsageError("moee encode: --engine vllm writes one .safetensors file and places and loads the model itself; "
                         "leave out --devices and --quantize")
    if args.engine == "vllm" and "mean" in (args.rw_pooling, args.hs_pooling):
        raise UsageError("moee encode: --engine vllm takes the last token only; leave out --rw-pooling and --hs-pooling")
    if single_file and (args.format != "safetensors" or args.devices or args.engine == "ray"):
        raise UsageError("moee encode: --format parquet, --devices and --engine ray write a directory; "
                         "give --output a directory, not a .safetensors file")
    if args.engine == "ray" and args.devices:
        raise UsageError("moee encode: --engine ray places work through Ray; leave out --devices")
    output_stat = os.stat(args.output) if os.path.exists(args.output) else None
    if output_stat and not (stat.S_ISREG(output_stat.st_mode) or stat.S_ISDIR(output_stat.st_mode)):
        raise ValueError(f"{args.output}: output is not a regular file or directory (a device, pipe or socket); "
                         "embeddings go to a .safetensors file or a corpus directory, never to a device, /dev/null included")
    if args.output.lower().endswith(".parquet") or not args.output.strip():
        raise UsageError(f"moee encode: --output {args.output!r}: give a .safetensors file or a directory "
                         "(with --format parquet, a directory of part-*.parquet files that reads as one dataset)")


def cmd_encode(args) -> int:
    from .demo import DEMO_LABEL, demo_checkpoint

    _check_encode_args(args)
    model = args.model or demo_checkpoint()
    print(f"model: {args.model or DEMO_LABEL}", file=sys.stderr)
    if args.engine == "ray":
        return _encode_on_ray(model, args)
    if not args.output.lower().endswith(".safetensors"):
        return _encode_to_directory(model, args)
    return _encode_to_file(model, args.model or DEMO_LABEL, args)


def _encode_to_file(model: str, label: str, args) -> int:
    from . import MoEEncoder
    from .corpus.job import name_rows
    from .corpus.readers import expand_inputs, read_rows
    from .files import check_output_file

    paths = expand_inputs(args.input) if args.input else []
    check_output_file(args.output, args.overwrite, paths)
    rows = list(read_rows(paths, args.text_field, args.id_field)) if paths else _sample_rows()
    if args.skip_empty:
        rows = [row for row in rows if row.text]
    if not rows:
        raise ValueError("no texts to encode")
    if args.engine == "vllm":
        from .vllm import VLLMEncoder

        encoder = VLLMEncoder.from_pretrained(model, **({"dtype": args.dtype} if args.dtype else {}))
    else:
        encoder = MoEEncoder.from_pretrained(model, device=args.device, dtype=args.dtype, **_quantization(args))
    start = time.perf_counter()
    try:
        out = encoder.encode(
            [row.text for row in rows], batch_size=args.batch_size, prompt=args.prompt, max_length=args.max_length,
            show_progress_bar=True if len(rows) >= 256 else None, rw_source=args.rw_source, **_pooling(args),
        )
    except ValueError as exc:
        raise ValueError(name_rows(str(exc), [row.where for row in rows])) from None
    seconds = time.perf_counter() - start
    out.metadata["model"] = label
    out.save(args.output, overwrite=args.overwrite)
    tokens = int(out.metadata["tokens"])
    print(
        f"encoded {len(rows)} text{'' if len(rows) == 1 else 's'} ({tokens} tokens) in {seconds:.2f} s: "
        f"{len(rows) / seconds:.1f} texts/s, {tokens / seconds:.0f} tokens/s\n"
        f"hs {tuple(out.hs.shape)}  rw {tuple(out.rw.shape)} "
        f"({encoder.adapter.family}: {encoder.num_moe_layers} MoE layers x {encoder.num_experts} experts)\n"
        f"wrote {args.output}"
    )
    return 0


def _encode_to_directory(model: str, args) -> int:
    from .corpus import plan_corpus_job, run_corpus_job

    if not args.input:
        raise UsageError("moee encode: a directory output needs --input (files, globs or -)")
    _refuse_quantize_for_jobs(args)
    job, devices = plan_corpus_job(
        model, args.input, args.output, devices=args.devices or args.device, dtype=args.dtype, prompt=args.prompt,
        shard_size=args.shard_size, text_field=args.text_field, id_field=args.id_field, overwrite=args.overwrite,
        format=args.format, batch_size=args.batch_size, max_length=args.max_length, rw_source=args.rw_source,
        skip_empty=args.skip_empty, quoting=args.quoting, duplicate_ids=args.duplicate_ids, full_hashes=args.hash_weights == "full",
        **_pooling(args),
    )
    stats = run_corpus_job(job, model, devices, progress=True)
    return _report_job(stats, job.output_dir, sum(entry["rows"] for entry in job.manifest["shards"]))


def _pooling(args) -> dict:
    """encode's pooling arguments where they differ from the default (the vLLM engine takes none)."""
    return {name: getattr(args, name) for name in ("rw_pooling", "hs_pooling") if getattr(args, name) != "last"}


def _quantization(args) -> dict:
    """from_pretrained's quantization arguments from --quantize and --full-precision-routers."""
    if not args.full_precision_routers:
        return {"quantize": args.quantize}
    if not args.quantize:
        raise UsageError("--full-precision-routers applies to a quantized model: add --quantize nf4 or int8")
    return {"quantize": args.quantize, "quantize_routers": False}


def _refuse_quantize_for_jobs(args) -> None:
    # A job's manifest records everything its shards depend on; quantized weights are not yet among them.
    if args.quantize or args.full_precision_routers:
        raise UsageError("moee encode: --quantize applies to a .safetensors output (and moee mteb), not to corpus jobs yet")


def _encode_on_ray(model: str, args) -> int:
    _refuse_quantize_for_jobs(args)
    try:
        from .ray import encode_corpus_ray
    except ImportError as exc:
        raise ValueError(f"--engine ray needs Ray Data: pip install moee-fast[ray] ({exc})") from None
    stats = encode_corpus_ray(
        model, args.input, args.output, prompt=args.prompt, shard_size=args.shard_size, text_field=args.text_field,
        id_field=args.id_field, overwrite=args.overwrite, batch_size=args.batch_size, max_length=args.max_length,
        rw_source=args.rw_source, dtype=args.dtype, ray_address=args.ray_address, num_cpus=args.ray_cpus_per_actor,
        quoting=args.quoting, duplicate_ids=args.duplicate_ids, full_hashes=args.hash_weights == "full",
        **_pooling(args),
    )
    return _report_job(stats, args.output, stats["rows"])


def cmd_verify(args) -> int:
    """Check a corpus directory's manifest and every shard against it; 1 if anything is wrong."""
    from .corpus import verify_corpus
    from .corpus.job import load_manifest

    problems = verify_corpus(args.directory)
    for problem in problems:
        print(f"moee verify: {problem}", file=sys.stderr)
    if problems:
        return 1
    manifest = load_manifest(args.directory)
    rows = sum(entry["rows"] for entry in manifest["shards"])
    print(f"{args.directory}: {len(manifest['shards'])} shards, {rows} rows, every shard matches its manifest entry")
    return 0


def _report_job(stats: dict, output: str, rows: int) -> int:
    seconds = max(stats["seconds"], 1e-9)
    tokens = f", {stats['tokens'] / seconds:.0f} tokens/s" if stats["tokens"] else ""  # Ray does not count them
    skipped = stats.get("skipped", 0)
    encoded = stats["rows"] - skipped
    print(
        f"encoded {encoded} rows{f' ({skipped} empty rows skipped)' if skipped else ''} in {seconds:.2f} s: "
        f"{encoded / seconds:.1f} texts/s{tokens}\n"
        f"wrote {rows} rows to {output} (load_corpus reads them back)"
    )
    return 0


def cmd_mteb(args) -> int:
    try:
        from .mteb import PAPER_TASKS, MoEEModel, evaluate, get_tasks, register_paper_models, results_folder
    except ImportError as exc:
        raise SystemExit(f"moee: {exc}")
    from . import MoEEncoder
    from .demo import demo_checkpoint

    if args.paper == bool(args.tasks):
        raise SystemExit("moee mteb: give either --tasks A,B,... or --paper")
    register_paper_models()  # results of the paper's checkpoints then load by name in mteb
    task_names = list(PAPER_TASKS) if args.paper else [name.strip() for name in args.tasks.split(",") if name.strip()]
    try:
        tasks = get_tasks(task_names)
    except KeyError as exc:
        detail = str(exc.args[0] if exc.args else exc).removeprefix("KeyError: ")
        raise SystemExit(f"moee mteb: unknown task: {detail} (mteb.get_tasks() lists the task names)")
    _refuse_uncached_tasks_offline(tasks)
    encoder = MoEEncoder.from_pretrained(args.model or demo_checkpoint(), device=args.device, dtype=args.dtype, **_quantization(args))
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
    encode_kwargs = {"precision": args.precision} if args.precision else None
    result = evaluate(model, tasks, output_dir=args.output_dir, overwrite=args.overwrite, encode_kwargs=encode_kwargs)
    metadata = {task.metadata.name: task.metadata for task in tasks}
    rows = [(r.task_name, metadata[r.task_name].type, metadata[r.task_name].main_score, r.get_score()) for r in result.task_results]
    width = max([len("average")] + [len(row[0]) for row in rows])
    print(f"{'task':<{width}}  {'type':<18}  {'main score':<16}  value")
    for name, task_type, score_name, score in rows:
        print(f"{name:<{width}}  {task_type:<18}  {score_name:<16}  {100 * score:.2f}")
    if rows:
        print(f"{'average':<{width}}  {'':<18}  {'':<16}  {100 * sum(row[3] for row in rows) / len(rows):.2f}")
    folder = results_folder(model, args.output_dir, precision=args.precision)
    experiment = ", load_experiments='match_name'" if "experiments" in folder.parts else ""
    print(f"MTEB result files: {folder}\nload them with "
          f"mteb.ResultCache({str(args.output_dir)!r}).load_results(models=[{model.mteb_model_meta.name!r}]{experiment})")
    return 0


def cmd_paper_table(args) -> int:
    try:
        from .mteb import PAPER_TASKS, get_tasks, table
    except ImportError as exc:
        raise SystemExit(f"moee: {exc}")
    from . import MoEEncoder
    from .demo import demo_checkpoint

    if args.paper == bool(args.tasks):
        raise SystemExit("moee paper-table: give either --tasks A,B,... or --paper")
    names = list(PAPER_TASKS) if args.paper else [name.strip() for name in args.tasks.split(",") if name.strip()]
    try:
        poolings = [pooling.strip() for pooling in args.poolings.split(",") if pooling.strip()]
        alphas = table.ALPHA_GRID if args.alphas is None else [float(alpha) for alpha in args.alphas.split(",") if alpha.strip()]
        tasks = get_tasks(names)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"moee paper-table: {exc.args[0] if exc.args else exc}")
    encoder = MoEEncoder.from_pretrained(args.model or demo_checkpoint(), device=args.device, dtype=args.dtype, quantize=args.quantize)
    settings = {"prompt": None if args.prompt == "verbatim" else args.prompt, "instructions": not args.no_instructions,
                "batch_size": args.batch_size, "max_length": args.max_length}
    try:
        rows = table.paper_table(encoder, tasks, poolings, alphas, output_dir=args.output_dir, **settings)
    except ValueError as exc:
        raise SystemExit(f"moee paper-table: {exc}")
    for path in table.write_table(rows, args.output, encoder.name):
        print(path)
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or Hub id (default: the built-in untrained demo)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--max-length", type=_positive_int, help="token limit per text (the template is never cut)")
    parser.add_argument("--batch-size", type=_positive_int, help="most texts per forward (default: a token budget decides)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="load weights in 4-bit NF4 (the paper's setting) or "
                        "8-bit through bitsandbytes (needs pip install moee-fast[quant])")
    parser.add_argument("--full-precision-routers", action="store_true", help="with --quantize: keep the routers (and "
                        "Qwen2-MoE's shared-expert gate) in the load dtype; the paper's runs quantized them")
    parser.add_argument(
        "--rw-source",
        choices=RW_SOURCES,
        default="scores",
        help="RW from the router's scores (the paper's definition, default) or its raw logits "
        "(as the authors' released code took for OLMoE, Qwen and Mixtral)",
    )


def _add_encode_arguments(encode: argparse.ArgumentParser) -> None:
    from .corpus import DEFAULT_SHARD_SIZE
    from .corpus.readers import FORMATS_TEXT

    encode.add_argument("--input", nargs="+", metavar="PATH", help=f"files or globs: {FORMATS_TEXT} (default: built-in samples)")
    encode.add_argument("--output", default="embeddings.safetensors",
                        help="a .safetensors file, or a directory for a sharded, resumable corpus job (default: %(default)s)")
    encode.add_argument("--prompt", help=f"a preset ({PRESET_NAMES}) or a template with {{text}}, e.g. "
                        '\'This sentence : "{text}" means in one word:"\' (default: the text verbatim)')
    encode.add_argument("--text-field", default="text", help="the text's field or column in .jsonl/.csv/.tsv/.parquet (default: %(default)s)")
    encode.add_argument("--id-field", help="a field or column holding each row's id (default: file:line, or file:row for parquet)")
    encode.add_argument("--skip-empty", action="store_true", help="skip empty texts (a directory output lists their ids in its manifest)")
    encode.add_argument("--overwrite", action="store_true", help="replace an existing output file, or restart a corpus job from scratch")
    encode.add_argument("--format", choices=("safetensors", "parquet"), default="safetensors", help="shard format of a directory output")
    encode.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE, help="rows per shard (default: %(default)s)")
    encode.add_argument("--devices", help="one worker per device: cuda:0,cuda:1, all, or cpu,cpu (threads split between them)")
    encode.add_argument("--engine", choices=("local", "ray", "vllm"), default="local",
                        help="ray: read, encode and write on Ray Data; vllm: run the model in vLLM (needs vllm)")
    encode.add_argument("--rw-pooling", choices=("last", "mean"), default="last",
                        help="RW of the last token (the paper's, default) or the mean over all of the text's tokens")
    encode.add_argument("--hs-pooling", choices=("last", "mean"), default="last",
                        help="HS of the last token (the paper's, default) or the mean over all of the text's tokens")
    encode.add_argument("--ray-address", help="a running Ray cluster (default: start a local one)")
    encode.add_argument("--ray-cpus-per-actor", type=float,
                        help="CPUs each Ray encoder actor asks for (default: 1 where one more stays free for the checkpoint "
                        "filter of a resumed job, else what is left: 0.5 on a 2-CPU machine)")
    encode.add_argument("--quoting", choices=("csv", "none"), default="csv",
                        help="csv: .csv/.tsv fields follow the csv module (quotes group, \"\" escapes; a stray quote is an "
                        "error); none: raw fields split at the delimiter, quotes kept (default: %(default)s)")
    encode.add_argument("--duplicate-ids", choices=("warn", "error"), default="warn",
                        help="what a repeated --id-field value does (default: %(default)s)")
    encode.add_argument("--hash-weights", choices=("headers", "full"), default="headers",
                        help="how a corpus job fingerprints the model: file sizes and safetensors headers, or a "
                        "SHA-256 of every byte (default: %(default)s)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moee", description="MoEE embeddings from Mixture-of-Experts LLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser("encode", help="embed texts into a .safetensors file or a corpus directory (shards + manifest)")
    _add_encode_arguments(encode)
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
    evaluation.add_argument("--standardize-batch-size", type=_positive_int, default=128, help="(default: %(default)s)")
    evaluation.add_argument("--precision", choices=("int8", "uint8", "int4", "uint4", "binary", "float16", "bfloat16"),
                            help="quantize the vectors as mteb's CompressionWrapper does (results filed as an output_dtypes experiment)")
    evaluation.add_argument("--output-dir", default="results", help="where MTEB writes its result files (default: %(default)s)")
    evaluation.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results there")
    _add_model_arguments(evaluation)
    evaluation.set_defaults(func=cmd_mteb)

    verify = commands.add_parser("verify", help="check a corpus directory: manifest, every shard's size, SHA-256, rows and shape")
    verify.add_argument("directory")
    verify.add_argument("--debug", action="store_true", help="show the traceback of an error")
    verify.set_defaults(func=cmd_verify)
    paper = commands.add_parser("paper-table", help="every MoEE variant x pooling on MTEB tasks, as one table (needs moee-fast[mteb])")
    paper.add_argument("--tasks", help="comma-separated MTEB task names")
    paper.add_argument("--paper", action="store_true", help="the paper's task list")
    paper.add_argument("--poolings", default="last,mean",
                       help="comma-separated: last (the last token's HS and RW), mean (over every token, prompt and special tokens included) (default: %(default)s)")
    paper.add_argument("--alphas", help="comma-separated alpha grid for MoEE(sum), best per task reported (default: 0.1,0.2,0.5,1,2,5,10)")
    paper.add_argument("--prompt", default="prompteol", help="a preset, a template with {text}, or verbatim (default: %(default)s)")
    paper.add_argument("--no-instructions", action="store_true", help="leave out the paper's per-task e5 instructions")
    paper.add_argument("--output", default="paper_table", help="writes <output>.md and <output>.csv (default: %(default)s)")
    paper.add_argument("--output-dir", help="where MTEB writes its result files (default: a temporary folder)")
    _add_model_arguments(paper)
    paper.set_defaults(func=cmd_paper_table)

    from .serve.cli import add_serve_command

    add_serve_command(commands)
    return parser


def _refuse_uncached_tasks_offline(tasks) -> None:
    """Offline, a task whose dataset is not in the Hugging Face cache would fail only after the
    model loads and the Hub is retried: refuse at once, naming the datasets."""
    from huggingface_hub import snapshot_download

    from .loading import hub_offline_reason

    offline = hub_offline_reason()
    if not offline:
        return
    missing = []
    for task in tasks:
        dataset = task.metadata.dataset
        if "/" not in str(dataset.get("path", "")):  # not a Hub dataset (mteb's mock tasks build theirs in memory)
            continue
        try:
            snapshot_download(dataset["path"], repo_type="dataset", revision=dataset.get("revision"), local_files_only=True)
        except Exception:  # any miss: not in the cache at that revision
            missing.append(f"{task.metadata.name} ({dataset['path']})")
    if missing:
        raise SystemExit(f"moee mteb: offline ({offline}) and these tasks' datasets are not in the Hugging Face cache: "
                         f"{', '.join(missing)}; run the same command once on a connected machine (the cache is then "
                         "used offline, with HF_HUB_OFFLINE=1)")


def main(argv: list[str] | None = None) -> int:
    """Run a command; an expected error prints one line and returns 2 (usage) or 1, Ctrl-C
    returns 130; tracebacks only with --debug."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        print(_one_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"moee: {_one_line(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        expected = isinstance(exc, (ValueError, OSError, TypeError))
        detail = _one_line(exc) if expected else f"{type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)"
        print(f"moee: {detail}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, OSError) and len(exc.args) == 1 else str(exc)
    text = re.sub(r"(--[\w-]+) \(\w+=[^()]*\)", r"\1", text)  # the library names both flag and argument: keep the flag
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
