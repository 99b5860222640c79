"""The `moee serve` subcommand: flags, loading the model, and running uvicorn with a graceful
SIGTERM (stop accepting, finish the requests in flight, exit 0)."""

from __future__ import annotations

import argparse
import os
import signal

from ..checks import VARIANTS
from ..prompts import PRESETS


def add_serve_command(commands) -> None:
    """Add `serve` to the `moee` command's subparsers."""
    serve = commands.add_parser("serve", help="OpenAI-compatible embeddings server (needs pip install moee-fast[serve])")
    serve.add_argument("--model", help="checkpoint directory or Hub id (default: the built-in untrained demo)")
    serve.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--api-key", default=os.environ.get("MOEE_API_KEY"),
                       help="require Authorization: Bearer KEY (default: $MOEE_API_KEY; none: open)")
    serve.add_argument("--variant", choices=VARIANTS, default="sum", help="default vector of /v1/embeddings (default: %(default)s)")
    serve.add_argument("--alpha", type=float, default=1.0, help="default weight of cos_RW in MoEE(sum) (default: %(default)s)")
    serve.add_argument("--prompt", help=f"default prompt: a preset ({', '.join(PRESETS)}) or a template with {{text}} (default: verbatim)")
    serve.add_argument("--max-batch-tokens", type=_positive, default=16384, help="tokens merged into one encode call (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default: %(default)s)")
    serve.add_argument("--max-queue", type=_positive, default=512, help="requests accepted and unanswered before 429 (default: %(default)s)")
    serve.add_argument("--max-inputs", type=_positive, default=2048, help="texts per request before 413 (default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=_positive, default=4 * 1024 * 1024, help="request body size before 413 (default: %(default)s)")
    serve.add_argument("--served-model-name", help="the `model` in responses (default: --model, or the demo's name)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    serve.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return number


def cmd_serve(args) -> int:
    from . import require_extra

    try:
        require_extra()
    except ImportError as exc:
        raise SystemExit(f"moee: {exc}")
    import uvicorn

    from .. import MoEEncoder
    from ..demo import DEMO_NAME, demo_checkpoint
    from .app import ServeConfig, create_app

    try:
        config = ServeConfig(
            served_model_name=args.served_model_name or args.model or DEMO_NAME,
            variant=args.variant, alpha=args.alpha, prompt=args.prompt,
            max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
            max_inputs=args.max_inputs, max_body_bytes=args.max_body_bytes, api_key=args.api_key or None,
        )
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"moee serve: {exc}")
    encoder = MoEEncoder.from_pretrained(args.model or demo_checkpoint(), device=args.device, dtype=args.dtype)
    app = create_app(encoder, config)
    # Idle keep-alive connections stay open 30 s (uvicorn: 5): a client that pauses between requests
    # under load would otherwise race the server's close and see its next request fail.
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30)
    server = _graceful_server(uvicorn_config, app)
    # uvicorn re-raises a captured SIGTERM once it has shut down gracefully, under the handler that
    # was installed before it ran; a no-op one lets the finished shutdown exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0


def _graceful_server(uvicorn_config, app):
    """uvicorn's server, with /health turning 503 and new requests refused from the moment a
    SIGTERM or SIGINT arrives, while the requests in flight finish."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.service.draining = True
            super().handle_exit(sig, frame)

    return GracefulServer(uvicorn_config)
