"""The `moee serve` subcommand: flags, loading the model, and running uvicorn with timeouts for
idle and slow clients and a graceful SIGTERM (stop accepting, answer every request received,
exit 0)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys

from ..checks import VARIANTS
from ..prompts import PRESETS

log = logging.getLogger("moee_fast.serve")
API_KEY_ENV = "MOEE_API_KEY"


def add_serve_command(commands) -> None:
    """Add `serve` to the `moee` command's subparsers."""
    serve = commands.add_parser("serve", help="OpenAI-compatible embeddings server (needs pip install moee-fast[serve])")
    serve.add_argument("--model", help="checkpoint directory or Hub id (default: the built-in untrained demo)")
    serve.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--api-key", help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV}, the way to keep it out of `ps`; unset: open)")
    serve.add_argument("--variant", choices=VARIANTS, default="sum", help="default vector of /v1/embeddings and /embed (default: %(default)s)")
    serve.add_argument("--alpha", type=float, default=1.0, help="default weight of cos_RW in MoEE(sum) (default: %(default)s)")
    serve.add_argument("--prompt", help=f"default prompt: a preset ({', '.join(PRESETS)}) or a template with {{text}} (default: verbatim)")
    serve.add_argument("--max-batch-tokens", type=_positive, help="tokens per batch; larger requests are split (default: one forward's token budget, 2048 on CPU)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default: %(default)s)")
    serve.add_argument("--max-queue", type=_positive, default=512, help="requests accepted and unanswered before 429 (default: %(default)s)")
    serve.add_argument("--max-inputs", type=_positive, default=2048, help="inputs per request before 413 (default: %(default)s)")
    serve.add_argument("--max-request-tokens", type=_positive, default=262144, help="tokens per request before 413 (default: %(default)s)")
    serve.add_argument("--max-compare-inputs", type=_positive, default=16, help="texts per /compare request before 413 (default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=_positive, default=4 * 1024 * 1024, help="request body size before 413 (default: %(default)s)")
    serve.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection may take to send a request's headers (default: %(default)s)")
    serve.add_argument("--served-model-name", help="the `model` in responses (default: the checkpoint directory's name or the Hub id)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    serve.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    serve.add_argument("--engine", choices=("local", "vllm"), default="local",
                       help="what runs the model: moee-fast's encoder, or vLLM with the MoEE plugin (pip install moee-fast[vllm]; "
                            "it places the model itself: no --device) (default: %(default)s)")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return number


def served_name(model: str | None, default: str) -> str:
    """A local checkpoint is named by its directory (a path tells clients about this machine);
    a Hub id as given."""
    if model is None:
        return default
    path = os.path.expanduser(model)
    return os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else model


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    from . import require_extra

    try:
        require_extra()
    except ImportError as exc:
        raise SystemExit(f"moee: {exc}")
    import uvicorn

    from ..demo import DEMO_NAME, demo_checkpoint
    from .app import ServeConfig, create_app
    from .timeouts import header_timeout_protocol

    logging.basicConfig(level=args.log_level.upper() if args.log_level.upper() in logging._nameToLevel else "INFO", format="%(levelname)s: %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        config = ServeConfig(
            served_model_name=args.served_model_name or served_name(args.model, DEMO_NAME),
            variant=args.variant, alpha=args.alpha, prompt=args.prompt,
            max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
            max_inputs=args.max_inputs, max_request_tokens=args.max_request_tokens,
            max_compare_inputs=args.max_compare_inputs, max_body_bytes=args.max_body_bytes, api_key=api_key,
        )
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"moee serve: {exc}")
    if api_key is None and not is_loopback(args.host):
        log.warning("!" * 78)
        log.warning("SERVING OPEN ON %s: anyone who can reach this port may use the model. Set %s.", args.host, API_KEY_ENV)
        log.warning("!" * 78)
    encoder = _load_encoder(args, args.model or demo_checkpoint())
    app = create_app(encoder, config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.warning("moee serve: model %s, variant %s, prompt %s, auth %s, on http://%s:%d/", config.served_model_name, config.variant,
                config.prompt or "verbatim", "on" if api_key else "off", host, args.port)
    # Idle keep-alive connections stay open 30 s (uvicorn: 5): a client that pauses between requests
    # under load would otherwise race the server's close and see its next request fail.
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30,
                                    http=header_timeout_protocol(args.header_timeout), timeout_graceful_shutdown=60)
    server = _graceful_server(uvicorn_config, app)
    # uvicorn re-raises a captured SIGTERM once it has shut down gracefully, under the handler that
    # was installed before it ran; a no-op one lets the finished shutdown exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    # Every request is answered and the batcher has stopped. The thread pool's idle worker threads
    # are not daemons and linger up to 10 s before the interpreter may exit: leave without them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if server.started else 1)


def _load_encoder(args, model: str):
    """The engine behind the routes (either gives the same HS and RW)."""
    if args.engine == "vllm":
        if args.device:
            raise SystemExit("moee serve: --engine vllm places the model itself; leave out --device")
        from ..vllm import VLLMEncoder

        return VLLMEncoder.from_pretrained(model, **({"dtype": args.dtype} if args.dtype else {}))
    from .. import MoEEncoder

    return MoEEncoder.from_pretrained(model, device=args.device, dtype=args.dtype)


def _graceful_server(uvicorn_config, app):
    """uvicorn's server, with /health turning 503 from the moment a SIGTERM or SIGINT arrives,
    while every request already received is answered."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.service.draining = True
            super().handle_exit(sig, frame)

    return GracefulServer(uvicorn_config)
