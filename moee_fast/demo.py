"""The built-in demo checkpoint (built by moee_fast.loading.demo; `MoEEncoder.from_pretrained("demo")` loads it)."""

from .loading.demo import DEMO_LABEL, DEMO_NAME, SAMPLE_TEXTS, build_demo_checkpoint, build_tokenizer, cache_dir, demo_checkpoint, is_demo_checkpoint

__all__ = ["DEMO_LABEL", "DEMO_NAME", "SAMPLE_TEXTS", "build_demo_checkpoint", "build_tokenizer", "cache_dir", "demo_checkpoint", "is_demo_checkpoint"]
