"""MoEE as an MTEB v2 model: `mteb.evaluate(MoEEModel(encoder, variant="sum"), tasks)`.

data: the e5 instructions, the paper's tasks and checkpoints; model: the `MoEEModel` wrapper and
mteb's loader; naming: model names and ModelMeta; runs: `evaluate` and where its files go;
registry: `register_paper_models()`, the explicit call that makes the paper's checkpoints known to
mteb by name (importing this package leaves mteb's registry alone).
"""

try:
    import mteb  # noqa: F401
except ImportError as exc:  # mteb is an optional extra
    raise ImportError("moee_fast.mteb needs MTEB v2: pip install moee-fast[mteb]") from exc

from ..checks import VARIANTS
from .data import E5_INSTRUCTIONS, PAPER_CHECKPOINTS, PAPER_TASKS
from .model import MoEEModel, load_moee_model, model_meta
from .naming import moee_model_name, parameter_counts
from .registry import register_paper_models
from . import table
from .runs import evaluate, get_tasks, results_folder

__all__ = [
    "E5_INSTRUCTIONS", "MoEEModel", "PAPER_CHECKPOINTS", "PAPER_TASKS", "VARIANTS", "evaluate", "get_tasks", "load_moee_model",
    "model_meta", "moee_model_name", "parameter_counts", "register_paper_models", "results_folder",
]
