"""llama.cpp's own convert_hf_to_gguf.py, run on a benchmark checkpoint:

    python benchmarks/peers/convert_gguf.py LLAMA_CPP_TREE CHECKPOINT --outfile x.gguf --outtype f32

Run by a Python with torch, transformers and numpy (ours); the converter's gguf package comes from
the tree. One change: the benchmark checkpoints carry a small BPE tokenizer of their own, whose
pre-tokenizer hash the converter does not know (it refuses such a vocabulary), so the pre-tokenizer
is named "gpt-2". The benchmark hands llama.cpp token ids, never text, so this changes nothing it
computes.
"""

import os
import runpy
import sys

tree, args = sys.argv[1], sys.argv[2:]
sys.path[:0] = [tree, os.path.join(tree, "gguf-py")]
from conversion.base import TextModel  # noqa: E402  (from the tree just put on the path)

TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
script = os.path.join(tree, "convert_hf_to_gguf.py")
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
