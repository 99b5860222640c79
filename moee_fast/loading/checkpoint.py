"""Reading a checkpoint's config, tokenizer and weight files so that no code shipped with it runs
and every unreadable piece is named.

transformers runs a checkpoint's own `configuration_*.py` / `modeling_*.py` when its config.json
maps a model type transformers does not know (`auto_map`), after asking on the terminal. Every
loader call here passes `trust_remote_code=False`, and a model type neither transformers nor
moee-fast implements is refused before transformers sees it.

Nor does code come from the Hub's kernel repositories: transformers (5.x) swaps layers for Hub
kernels by default (`use_kernels`) and bitsandbytes' CPU backend fetches one when it is first
imported. Every model load passes `use_kernels=False`, and bitsandbytes is imported only through
`import_bitsandbytes()`, which keeps its kernel fetch from running.
"""

from __future__ import annotations

import contextlib
import json
import os

NO_REMOTE_CODE = {"trust_remote_code": False}
NO_HUB_KERNELS = {"use_kernels": False}

# What tokenizer classes read; a checkpoint directory without any of them has no vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")

# The published weight layouts, shared by every family: one file, or shards listed in an index.
SAFETENSORS_SINGLE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SINGLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# A sentence any real vocabulary turns into tokens (an unknown-token id at worst).
_PROBE = "The quick brown fox jumps over the lazy dog."


def load_config(name: str, **hf_kwargs):
    """The checkpoint's config, as transformers' (or moee-fast's own) config class for its
    model_type; an unknown model_type is refused, naming it and the supported families. The
    families transformers lacks are known once moee_fast.loading.models is imported (load does)."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..adapters import supported_families

    config_dict, _ = PretrainedConfig.get_config_dict(name, **hf_kwargs)  # reads JSON only
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        code = " (its config.json points to code shipped with the checkpoint, which moee-fast never runs)" if "auto_map" in config_dict else ""
        raise ValueError(
            f"{name}: model type {model_type!r} is not supported{code}. "
            f"Supported families: {', '.join(supported_families())}"
        )
    return AutoConfig.from_pretrained(name, **NO_REMOTE_CODE, **hf_kwargs)


def load_tokenizer(name: str, **hf_kwargs):
    """The checkpoint's tokenizer. transformers builds an empty one (no vocabulary) when the
    tokenizer files are missing; that is refused here, naming the files looked for."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, **NO_REMOTE_CODE, **hf_kwargs)
    if not tokenizer(_PROBE, add_special_tokens=False)["input_ids"]:
        directory = checkpoint_directory(name, hf_kwargs.get("subfolder"))
        where = f"{directory} has none of" if os.path.isdir(directory) else "the checkpoint lacks"
        raise ValueError(
            f"{name}: the tokenizer is empty (no vocabulary): {where} the tokenizer files "
            f"({', '.join(TOKENIZER_FILES)}); copy them from the model's original repository"
        )
    return tokenizer


def checkpoint_directory(name: str, subfolder: str | None) -> str:
    return os.path.join(name, subfolder) if subfolder else name


def check_weight_files(directory: str, allow_pickle: bool = False) -> None:
    """In a local checkpoint directory: refuse pickle-only weights unless `allow_pickle`, and open
    the header of every safetensors file its index lists, so a truncated or garbage file is named
    before loading."""
    if not os.path.isdir(directory):
        return  # a Hub id: transformers downloads and checks the files
    kind, files = weight_files(directory, allow_pickle)
    if kind == "safetensors":
        for path in files:
            check_safetensors_file(path)


@contextlib.contextmanager
def naming_unreadable_weights(name: str, hf_kwargs: dict):
    """A weight file transformers fetched from the Hub and could not read: named from the local
    cache where it lies (safetensors' own error does not say which file)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        check_weight_files(_cached_snapshot(name, hf_kwargs))  # raises, naming the file
        raise ValueError(f"{name}: a weight file is not a readable safetensors file ({exc})") from exc


def _cached_snapshot(name: str, hf_kwargs: dict) -> str:
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(name, revision=hf_kwargs.get("revision"), cache_dir=hf_kwargs.get("cache_dir"),
                                 local_files_only=True)
    except Exception:  # not in the cache after all: nothing more to name
        return name
    return checkpoint_directory(root, hf_kwargs.get("subfolder"))


def transformers_kwargs(hf_kwargs: dict) -> dict:
    """Keyword arguments for transformers' model loader: never checkpoint code nor Hub kernels,
    and pickle weights only when the caller passed allow_pickle=True."""
    kwargs = {key: value for key, value in hf_kwargs.items() if key != "allow_pickle"}
    kwargs.setdefault("use_safetensors", not hf_kwargs.get("allow_pickle", False))
    return {**kwargs, **NO_REMOTE_CODE, **NO_HUB_KERNELS}


def refuse_remote_code(hf_kwargs: dict) -> None:
    """A caller's request for code from outside the installed packages is an error, not a no-op."""
    if hf_kwargs.pop("trust_remote_code", False):
        raise ValueError("moee-fast never runs code shipped with a checkpoint; drop trust_remote_code")
    if hf_kwargs.pop("use_kernels", False):
        raise ValueError("moee-fast never loads kernels from the Hub (its own fast path replaces those layers); drop use_kernels")
    hf_kwargs.pop("kernel_config", None)


def import_bitsandbytes():
    """bitsandbytes, imported without letting it fetch a kernel from the Hub.

    Its CPU backend (0.50), on CPUs with AVX512-BF16, calls Hugging Face `kernels.get_kernel` at
    import to download a 4-bit GEMM, and logs a warning when that fails (always, offline). Here
    that call raises at once, and its warning is not printed; bitsandbytes then keeps its own
    kernels, which is what it does whenever the download fails."""
    import sys

    if sys.modules.get("bitsandbytes") is not None:  # None: marked unimportable, so the import below raises
        return sys.modules["bitsandbytes"]
    import logging

    try:
        import kernels as hub_kernels
    except ImportError:
        hub_kernels = None
    original = getattr(hub_kernels, "get_kernel", None)

    def refuse(repo_id, *args, **kwargs):
        raise RuntimeError(f"moee-fast does not load Hub kernels ({repo_id})")

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, logger.disabled = logger.disabled, True
    if original is not None:
        hub_kernels.get_kernel = refuse
    try:
        import bitsandbytes
    finally:
        logger.disabled = level
        if original is not None:
            hub_kernels.get_kernel = original
    return bitsandbytes


def check_safetensors_file(path: str) -> None:
    """Raise a ValueError naming `path` when it is not a complete safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu"):
            pass
    except SafetensorError as exc:
        raise ValueError(
            f"weight file {path} is not a readable safetensors file ({exc}): it is truncated or corrupted; "
            "download or copy it again"
        ) from exc


def weight_files(directory: str, allow_pickle: bool = False) -> tuple[str, dict[str, list[str] | None]]:
    """("safetensors" | "pickle", {file path: tensor names listed for it, or None for all}).
    Every shard an index lists must exist; pickle files only with `allow_pickle`."""
    for kind, single, index in (("safetensors", SAFETENSORS_SINGLE, SAFETENSORS_INDEX), ("pickle", PICKLE_SINGLE, PICKLE_INDEX)):
        index_path, single_path = os.path.join(directory, index), os.path.join(directory, single)
        if not (os.path.isfile(index_path) or os.path.isfile(single_path)):
            continue
        if kind == "pickle" and not allow_pickle:
            raise ValueError(
                f"{directory} has only pickle weights ({single} / {index}), which can run code when loaded. "
                "To load them anyway (with torch.load(weights_only=True)), pass allow_pickle=True, e.g. "
                "MoEEncoder.from_pretrained(path, allow_pickle=True); or convert the checkpoint to safetensors."
            )
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files: dict[str, list[str] | None] = {}
            for name, file in weight_map.items():
                files.setdefault(os.path.join(directory, file), []).append(name)
            for path in files:
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"checkpoint shard {os.path.basename(path)!r} listed in {index} is missing from {directory}"
                    )
            return kind, files
        return kind, {single_path: None}
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")


@contextlib.contextmanager
def quiet_transformers():
    """The base model loads from a causal-LM checkpoint: its unused lm_head weights are expected,
    so transformers' load report about them, and its per-shard progress bar, are noise."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
