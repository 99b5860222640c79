"""Top-k of the combined cosine per query, streaming the corpus so [Nq, Nc] is never materialised."""

import torch

from .combined_cosine import combined_cosine, inverse_norms


def topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, alpha, corpus_tile, values, indices, precision):
    """values float32 [Nq, k] / indices int64 [Nq, k] are fully overwritten, sorted by descending value;
    NaN scores rank last (written as -inf by the kernel, NaN again at the end).

    One buffer [Nq, k + tile] holds the running top-k in its first k columns; the kernel writes each
    corpus tile's scores straight into the rest, and torch.topk merges the two. Memory: Nq * (k + tile).
    """
    n_queries, n_corpus = q_hs.shape[0], c_hs.shape[0]
    tile = max(k, min(corpus_tile, n_corpus))  # the first tile alone must fill the top-k
    candidates = torch.empty((n_queries, k + tile), dtype=torch.float32, device=q_hs.device)
    q_norms = (inverse_norms(q_hs), inverse_norms(q_rw))
    c_hs_norms, c_rw_norms = inverse_norms(c_hs), inverse_norms(c_rw)
    kept = 0  # columns of `candidates` holding the running top-k (0 until the first merge)
    for start in range(0, n_corpus, tile):
        end = min(start + tile, n_corpus)
        scores = candidates[:, kept:kept + end - start]
        norms = (q_norms[0], c_hs_norms[start:end], q_norms[1], c_rw_norms[start:end])
        combined_cosine(q_hs, q_rw, c_hs[start:end], c_rw[start:end], alpha, scores, precision,
                        inv_norms=norms, nan_as_neg_inf=True)
        top_values, positions = candidates[:, :kept + end - start].topk(k, dim=1)
        # Position p < kept is a survivor from earlier tiles; otherwise it is corpus row start + p - kept.
        from_tile = positions >= kept
        previous = indices.gather(1, positions.clamp(max=kept - 1)) if kept else positions
        indices.copy_(torch.where(from_tile, positions - kept + start, previous))
        values.copy_(top_values)
        candidates[:, :k] = top_values
        kept = k
    return values.masked_fill_(values == float("-inf"), float("nan")), indices
