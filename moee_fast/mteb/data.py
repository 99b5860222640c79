"""The data the MTEB integration names and registers: the e5 instructions the paper's evaluation
used, its task list, and the paper's checkpoints as their published configs size them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The paper's figures (checkpoint -> prompt -> MTEB task -> column), copied from its tables.
from .paper_figures import PAPER_FIGURES, PAPER_TYPE_AVERAGES  # noqa: F401

# The e5 instruction set, as the paper's evaluation used it, for the tasks it reports.
E5_INSTRUCTIONS: dict[str, str] = {
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, joy, love, sadness, and surprise",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    **{
        name: "Retrieve semantically similar text."
        for name in ("STS12", "STS13", "STS14", "STS15", "STS16", "BIOSSES", "SICK-R", "STSBenchmark")
    },
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
}

# The paper's MTEB task list (`moee mteb --paper`).
PAPER_TASKS: tuple[str, ...] = tuple(E5_INSTRUCTIONS)

# Later MTEB versions of a task keep its instruction.
_TASK_ALIASES = {"SummEvalSummarization": "SummEval"}


# The settings that name a model (the paper's MoEE(sum) with alpha 1, PromptEOL, e5 instructions).
DEFAULT_VARIANT, DEFAULT_ALPHA, DEFAULT_PROMPT = "sum", 1.0, "prompteol"

NO_REVISION = "no_revision_available"

CITATION = """@inproceedings{li2025moee,
  title={Your Mixture-of-Experts {LLM} Is Secretly an Embedding Model for Free},
  author={Li, Ziyue and Zhou, Tianyi},
  booktitle={The Thirteenth International Conference on Learning Representations},
  year={2025}
}"""

# One instruction for every input of a task, or one per MTEB prompt type ("query", "document").
Instruction = str | Mapping[str, str]



# ---------------------------------------------------------------------------------- registry
# The checkpoints the MoEE paper and its released code evaluate, known to mteb by the names of their
# default settings in each variant (`mteb.get_model("allenai/OLMoE-1B-7B-0924-MoEE-sum-alpha1")`).
# Revisions: the Hub commits of their published snapshots. Counts (all, active, embedding
# parameters of the base model) as `parameter_counts` gives them for the published configs; shape:
# (hidden size, MoE layers, experts); memory: their bf16 weights, LM head included.
PAPER_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "allenai/OLMoE-1B-7B-0924": dict(
        revision="6d84c48581ece794365f2b8e9cfb043c68ade9c5", counts=(6816139264, 1075972096, 103022592),
        shape=(2048, 16, 64), max_tokens=4096,
        card={"license": "apache-2.0", "languages": ["eng-Latn"], "release_date": "2024-09-03"},
    ),
    "Qwen/Qwen1.5-MoE-A2.7B": dict(
        revision="1a758c50ecb6350748b9ce0a99d2352fd9fc11c9", counts=(14004619264, 2066843648, 311164928),
        shape=(2048, 24, 60), max_tokens=8192,
        card={"license": "https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/LICENSE", "languages": ["eng-Latn"], "release_date": "2024-03-28"},
    ),
    "deepseek-ai/deepseek-moe-16b-base": dict(
        revision="521d2bc4fb69a3f3ae565310fcc3b65f97af2580", counts=(16166012928, 2409220096, 209715200),
        shape=(2048, 27, 64), max_tokens=4096,
        card={"license": "https://github.com/deepseek-ai/DeepSeek-MoE/blob/main/LICENSE-MODEL", "languages": ["eng-Latn", "zho-Hans"], "release_date": "2024-01-11"},
    ),
    "mistralai/Mixtral-8x7B-v0.1": dict(
        revision="fc7ac94680e38d7348cfa806e51218e6273104b0", counts=(46571720704, 12617781248, 131072000),
        shape=(4096, 32, 8), max_tokens=32768,
        card={"license": "apache-2.0", "languages": ["deu-Latn", "eng-Latn", "fra-Latn", "ita-Latn", "spa-Latn"], "release_date": "2023-12-11"},
    ),
}
