"""One encoder serving many threads: every call's state is its own."""

import threading

import torch

from moee_fast import MoEEncoder
from conftest import random_texts


def test_eight_threads_encoding_different_lists_get_exactly_the_single_thread_results(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    # Different lists, batch sizes and RW sources per thread: nothing of one call may leak into another.
    calls = [
        (random_texts(5 + i, seed=100 + i, max_words=40), (None, 2, 3)[i % 3], ("scores", "logits")[i % 2])
        for i in range(8)
    ]
    expected = [enc.encode(texts, batch_size=size, rw_source=source) for texts, size, source in calls]
    results, errors = [[] for _ in calls], []
    start = threading.Barrier(len(calls))

    def work(i):
        texts, size, source = calls[i]
        try:
            start.wait()
            for _ in range(2):
                results[i].append(enc.encode(texts, batch_size=size, rw_source=source))
        except BaseException as exc:  # reported below, with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, (want, got) in enumerate(zip(expected, results)):
        assert len(got) == 2
        for out in got:
            assert torch.equal(out.hs, want.hs) and torch.equal(out.rw, want.rw), f"thread {i}"
            assert out.metadata == want.metadata
