"""The `gpu` marker (registered in pyproject.toml): such tests need CUDA and are skipped, with that
reason, where torch sees no GPU."""

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]  # not keywords: a folder named gpu matches those
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA GPU, and torch sees none")
    for item in gpu_items:
        item.add_marker(skip)
