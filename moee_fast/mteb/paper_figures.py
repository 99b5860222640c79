"""The MTEB figures the paper reports, copied from Li & Zhou, "Your Mixture-of-Experts LLM Is
Secretly an Embedding Model for Free" (ICLR 2025, arXiv 2410.10814, HTML version):
per task from Appendix A, Tables 8-12 (STS, classification, pair classification, clustering,
re-ranking), and per task type from Table 3 (no prompt) and Table 4 (PromptEOL). Main score x 100.
The paper gives no per-task row for Summarization (SummEval): it appears in the type averages only.
Each type average of Tables 3-4 is the mean of its Appendix A rows (tests/test_paper_table.py checks
it), except one printed as the paper has it: DeepSeekMoE, no prompt, Reranking, HS is 38.13 in
Table 3 while Table 12's rows average 38.26.
Nothing here is measured by this package; the values are the paper's, as printed.
"""

from __future__ import annotations

COLUMNS = ("HS", "RW", "MoEE(concat)", "MoEE(sum)")
PROMPTS = ("none", "prompteol")  # the paper's "none" and "PromptEOL" rows

# Tasks in the column order of Appendix A's tables.
_TASKS = {
    "STS": ("STS12", "STS13", "STS14", "STS15", "STS16", "BIOSSES", "SICK-R", "STSBenchmark"),  # Table 8
    "Classification": ("TweetSentimentExtractionClassification", "EmotionClassification",
                       "ToxicConversationsClassification"),  # Table 9
    "PairClassification": ("TwitterURLCorpus", "TwitterSemEval2015"),  # Table 10
    "Clustering": ("TwentyNewsgroupsClustering", "MedrxivClusteringS2S"),  # Table 11
    "Reranking": ("AskUbuntuDupQuestions", "SciDocsRR", "StackOverflowDupQuestions"),  # Table 12
}

# checkpoint -> task type -> rows of the table, in the paper's order: HS, RW, MoEE (concat),
# MoEE (sum) with no prompt, then the same four with PromptEOL.
_BY_TASK = {
    "deepseek-ai/deepseek-moe-16b-base": {
        "STS": (
            (20.90, 43.39, 24.02, 37.75, 47.15, 29.87, 42.66, 30.61),
            (45.22, 41.38, 28.75, 38.63, 50.36, 34.14, 51.98, 38.44),
            (46.26, 55.88, 37.90, 42.37, 54.19, 41.20, 53.66, 43.06),
            (46.41, 60.58, 41.50, 42.85, 54.98, 42.33, 53.70, 44.36),
            (51.99, 69.56, 54.68, 58.04, 68.47, 45.29, 63.78, 65.48),
            (61.97, 65.86, 51.38, 65.86, 62.49, 53.97, 57.93, 56.68),
            (66.79, 77.60, 63.56, 64.60, 71.22, 61.96, 66.29, 68.72),
            (67.39, 81.43, 68.98, 67.76, 74.26, 62.09, 69.98, 73.41),
        ),
        "Classification": (
            (49.14, 27.55, 57.69), (52.37, 26.49, 53.32), (52.64, 28.02, 54.12), (50.32, 27.52, 68.39),
            (60.13, 49.11, 65.47), (57.68, 35.57, 55.32), (61.12, 45.59, 55.93), (59.32, 46.86, 68.76),
        ),
        "PairClassification": (
            (49.04, 39.63), (53.39, 47.79), (57.27, 46.48), (58.99, 45.25),
            (36.72, 60.79), (76.58, 60.01), (80.08, 64.79), (79.20, 62.70),
        ),
        "Clustering": (
            (25.62, 26.11), (15.33, 19.72), (22.94, 25.35), (31.44, 34.22),
            (27.02, 22.26), (21.89, 18.04), (29.13, 23.06), (35.77, 33.27),
        ),
        "Reranking": (
            (43.75, 45.23, 25.79), (41.97, 42.65, 23.21), (44.10, 53.43, 26.06), (45.26, 70.79, 27.58),
            (43.75, 45.23, 25.41), (46.57, 42.65, 23.21), (50.66, 72.63, 36.65), (52.93, 76.17, 38.88),
        ),
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "STS": (
            (8.39, 25.23, 15.76, 22.08, 38.11, 28.69, 51.73, 36.88),
            (27.96, 18.89, 13.88, 17.11, 36.29, 25.40, 29.42, 22.80),
            (33.36, 36.30, 24.68, 25.86, 47.16, 39.06, 53.92, 43.09),
            (35.72, 47.29, 31.51, 31.00, 50.61, 53.40, 62.35, 54.11),
            (55.05, 77.48, 63.63, 73.60, 73.49, 61.42, 67.01, 67.42),
            (54.39, 59.05, 45.49, 48.11, 56.96, 43.65, 55.46, 50.54),
            (64.44, 77.38, 64.05, 67.18, 71.48, 64.87, 69.01, 69.71),
            (65.54, 82.44, 71.39, 72.88, 75.43, 67.84, 71.15, 75.57),
        ),
        "Classification": (
            (48.83, 31.02, 59.38), (42.80, 20.63, 53.53), (49.60, 30.93, 53.90), (48.84, 32.76, 70.50),
            (61.14, 48.09, 68.80), (55.33, 33.82, 54.37), (60.78, 46.10, 55.82), (60.72, 47.97, 70.03),
        ),
        "PairClassification": (
            (45.71, 43.14), (48.78, 35.74), (53.74, 45.83), (57.78, 45.95),
            (82.50, 66.07), (73.72, 55.98), (82.34, 65.51), (80.21, 64.20),
        ),
        "Clustering": (
            (26.14, 22.48), (9.71, 11.38), (28.99, 24.51), (32.07, 30.62),
            (34.04, 24.95), (16.94, 16.54), (30.45, 23.91), (42.05, 34.60),
        ),
        "Reranking": (
            (43.71, 60.91, 30.12), (41.00, 36.85, 22.75), (44.95, 68.42, 34.31), (44.30, 70.85, 34.31),
            (54.69, 75.06, 39.79), (44.65, 55.03, 30.96), (52.15, 75.69, 40.51), (51.30, 74.53, 42.91),
        ),
    },
    "allenai/OLMoE-1B-7B-0924": {
        "STS": (
            (21.53, 41.47, 22.71, 39.88, 51.49, 44.11, 39.98, 22.36),
            (47.16, 43.92, 32.62, 43.87, 51.91, 44.30, 52.89, 40.77),
            (48.82, 52.69, 37.48, 46.80, 56.06, 54.58, 52.24, 42.02),
            (49.59, 54.19, 38.87, 47.27, 56.11, 54.58, 52.82, 42.16),
            (65.51, 81.86, 69.37, 77.64, 77.19, 73.54, 66.62, 71.51),
            (55.76, 60.01, 48.08, 49.88, 57.88, 56.28, 56.02, 50.72),
            (67.35, 80.13, 68.42, 68.76, 73.35, 73.02, 67.51, 70.47),
            (68.84, 84.34, 74.02, 73.81, 76.88, 73.02, 70.56, 75.58),
        ),
        "Classification": (
            (50.29, 30.29, 52.10), (50.15, 25.53, 54.93), (51.59, 28.76, 53.51), (51.00, 29.75, 64.86),
            (59.58, 47.50, 67.46), (52.79, 28.51, 53.75), (59.72, 42.78, 55.27), (59.92, 45.63, 66.84),
        ),
        "PairClassification": (
            (55.07, 40.04), (54.25, 51.99), (56.97, 46.31), (57.03, 44.82),
            (82.32, 61.87), (70.37, 52.79), (82.32, 61.38), (80.98, 61.53),
        ),
        "Clustering": (
            (21.05, 26.52), (17.14, 18.17), (20.72, 24.94), (27.58, 33.75),
            (38.96, 26.69), (22.13, 17.72), (41.23, 26.60), (38.58, 34.33),
        ),
        "Reranking": (
            (43.67, 69.08, 24.05), (42.83, 54.17, 25.72), (43.91, 70.33, 25.49), (44.57, 72.54, 26.20),
            (55.32, 78.24, 41.36), (45.11, 55.43, 31.20), (52.81, 77.14, 40.13), (56.68, 81.19, 43.41),
        ),
    },
}

# checkpoint -> prompt -> the rows HS, RW, MoEE (concat), MoEE (sum) of Table 3 (no prompt) and
# Table 4 (PromptEOL), in the tables' column order: CLF, Clust., PairCLF, Rerank, STS, Summ., Avg.
_TYPE_COLUMNS = ("Classification", "Clustering", "PairClassification", "Reranking", "STS", "Summarization", "average")
_BY_TYPE = {
    "deepseek-ai/deepseek-moe-16b-base": {
        "none": ((44.79, 25.87, 44.34, 38.13, 34.54, 24.51, 35.36), (44.06, 17.53, 50.59, 35.94, 41.11, 26.22, 35.91),
                 (44.93, 24.15, 51.88, 41.20, 46.82, 31.17, 40.03), (48.74, 32.83, 52.12, 47.88, 48.34, 29.89, 43.30)),
        "prompteol": ((58.24, 24.64, 48.76, 38.13, 59.66, 24.38, 42.30), (49.52, 19.97, 68.30, 37.48, 59.52, 29.26, 44.01),
                      (54.21, 26.10, 72.44, 53.31, 67.59, 28.89, 50.42), (58.31, 34.52, 70.95, 55.99, 70.66, 29.22, 53.28)),
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "none": ((46.41, 24.31, 44.43, 44.91, 28.36, 22.65, 35.18), (38.99, 10.55, 42.26, 33.53, 23.97, 27.44, 29.46),
                 (44.81, 26.75, 49.79, 49.23, 37.93, 27.61, 39.35), (50.70, 31.35, 51.87, 49.82, 45.75, 24.00, 42.25)),
        "prompteol": ((59.34, 29.50, 74.29, 56.51, 67.39, 23.01, 51.67), (47.84, 16.74, 64.85, 43.55, 51.71, 27.74, 42.07),
                      (54.23, 27.18, 73.93, 56.12, 68.52, 28.57, 51.43), (59.57, 38.33, 72.21, 56.25, 72.78, 31.09, 55.04)),
    },
    "allenai/OLMoE-1B-7B-0924": {
        "none": ((44.23, 23.79, 47.56, 45.60, 35.44, 20.94, 36.26), (43.54, 17.66, 53.12, 40.91, 44.68, 28.68, 38.10),
                 (44.62, 22.83, 51.64, 46.58, 48.84, 31.67, 41.03), (48.54, 30.67, 50.93, 47.77, 49.45, 28.77, 42.69)),
        "prompteol": ((58.18, 32.83, 72.10, 58.31, 72.91, 27.96, 53.72), (45.02, 19.93, 61.58, 43.91, 54.33, 29.49, 42.38),
                      (52.59, 33.92, 71.85, 56.69, 71.13, 30.21, 52.73), (57.46, 36.46, 71.26, 60.43, 74.63, 30.71, 55.16)),
    },
}


def _by_task() -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    figures: dict = {}
    for checkpoint, types in _BY_TASK.items():
        for task_type, rows in types.items():
            for index, row in enumerate(rows):
                prompt, column = PROMPTS[index // len(COLUMNS)], COLUMNS[index % len(COLUMNS)]
                for task, value in zip(_TASKS[task_type], row, strict=True):
                    figures.setdefault(checkpoint, {}).setdefault(prompt, {}).setdefault(task, {})[column] = value
    return figures


def _by_type() -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    return {
        checkpoint: {
            prompt: {task_type: {column: row[i] for column, row in zip(COLUMNS, rows, strict=True)}
                     for i, task_type in enumerate(_TYPE_COLUMNS)}
            for prompt, rows in prompts.items()
        }
        for checkpoint, prompts in _BY_TYPE.items()
    }


# checkpoint -> prompt ("none" or "prompteol") -> MTEB task name -> column -> the paper's figure.
PAPER_FIGURES: dict[str, dict[str, dict[str, dict[str, float]]]] = _by_task()
# checkpoint -> prompt -> task type (MTEB's names, and "average" over the six) -> column -> figure.
PAPER_TYPE_AVERAGES: dict[str, dict[str, dict[str, dict[str, float]]]] = _by_type()
