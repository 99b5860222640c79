"""The `moee` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


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
    encoder = MoEEncoder.from_pretrained(model, device=args.device, dtype=args.dtype)
    start = time.perf_counter()
    out = encoder.encode(
        texts,
        batch_size=args.batch_size,
        prompt=args.prompt,
        max_length=args.max_length,
        show_progress_bar=True if len(texts) >= 256 else None,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moee", description="MoEE embeddings from Mixture-of-Experts LLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser("encode", help="embed texts into a .safetensors file (hs, rw, metadata)")
    encode.add_argument("--model", help="checkpoint directory or Hub id (default: the built-in untrained demo)")
    encode.add_argument("--input", help='.txt (one text per line), .jsonl ("text" field), or - for stdin (default: built-in samples)')
    encode.add_argument("--output", default="embeddings.safetensors", help="where to write (default: %(default)s)")
    encode.add_argument("--prompt", help='template with {text}, e.g. \'This sentence : "{text}" means in one word:"\'')
    encode.add_argument("--max-length", type=int, help="token limit per text (the template is never cut)")
    encode.add_argument("--batch-size", type=int, help="most texts per forward (default: a token budget decides)")
    encode.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    encode.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    encode.set_defaults(func=cmd_encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
