"""How a batch of texts of different lengths is cut into model runs.

An encoder computes every position of its padded input, so a batch padded to its longest text pays for the
padding of every shorter one: one sentence per request, 9 to 17 tokens, pads about a third of a batch of 32.
Each run also has a fixed cost (the runtime's call, its small matrix products), so one run per distinct length is
not the answer either. ``length_chunks`` sorts the texts longest first and cuts them where the sum of
``run_tokens + rows x width`` over the runs is least: each run costs a fixed number of tokens' worth of work plus
its padded tokens.
"""

from __future__ import annotations

import numpy as np


def length_chunks(lengths: np.ndarray, run_tokens: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Index arrays into ``lengths`` (the tokens of each text), one a model run, longest texts first.

    Runs are cut only between texts of different lengths, where ``run_tokens`` (the fixed cost of one run, in
    tokens) plus the padded tokens of all runs is least; a run never holds more than ``max_batch_tokens`` padded
    tokens unless one text alone is longer."""
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]
    # The start of each group of equal lengths: a run is one or more consecutive groups, its width the first's.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]).tolist()
    bounds = [*starts, n]
    widths = [max(1, int(ordered[s])) for s in starts]
    groups = len(starts)
    best = [0] * (groups + 1)  # best[g]: the least cost of the texts from group g on
    cut = [groups] * (groups + 1)
    for g in range(groups - 1, -1, -1):
        width, first = widths[g], bounds[g]
        cost = -1
        for h in range(g + 1, groups + 1):
            rows = bounds[h] - first
            if rows * width > max_batch_tokens and h > g + 1:
                break
            c = run_tokens + rows * width + best[h]
            if cost < 0 or c < cost:
                cost, cut[g] = c, h
        best[g] = cost
    runs: list[np.ndarray] = []
    g = 0
    while g < groups:
        h = cut[g]
        run = order[bounds[g] : bounds[h]]
        # One group longer than the limit (many texts of one length): split it in equal runs within it.
        pieces = min(len(run), -(-len(run) * widths[g] // max_batch_tokens))
        runs.extend(np.array_split(run, pieces) if pieces > 1 else [run])
        g = h
    return runs
