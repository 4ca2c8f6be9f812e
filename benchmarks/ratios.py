"""Round-by-round ratios of two interleaved timings: a noise figure beside the ratio of medians.

Every script times its methods interleaved, one call of each per round, so the two calls of a round
ran minutes closer together than the two medians' calls may have. The ratio of a round's two times is
free of slow drifts of the machine (a busy neighbour on a VM), and the spread of those ratios over
the rounds says how far one run's ratio can be trusted.
"""

from __future__ import annotations

import statistics
from typing import Sequence


def paired_ratio(ours: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Median and quartiles (25% and 75%) of ``ours[i] / reference[i]`` over the rounds ``i``.

    With fewer than two rounds both quartiles are the one ratio.
    """
    if not ours or len(ours) != len(reference):
        raise ValueError(f"need one reference time per time, got {len(ours)} and {len(reference)}")
    ratios = sorted(a / b for a, b in zip(ours, reference))
    if len(ratios) == 1:
        q1 = q3 = ratios[0]
    else:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}
