"""The statistics of a preference study: Wilson intervals, Krippendorff's alpha, percent agreement.

- **Wilson score interval** for a proportion (win, tie or loss rate): unlike the normal approximation it stays
  inside [0, 1] and keeps near its nominal coverage for the small counts of a user study (20 pairs × a few
  raters). It treats votes as independent; votes of one rater, or on one pair, are not quite, so read the
  interval as a lower bound on the uncertainty.
- **Krippendorff's alpha** (nominal) for agreement between raters: raters answer different subsets of pairs
  (the assignment balances, it does not give every rater every pair), and alpha, unlike Fleiss' kappa, allows
  any number of raters per unit and missing answers. 1 is perfect agreement, 0 is chance, below 0 is systematic
  disagreement. A unit is (pair, question); its values are the models chosen (or ``tie``).
- **Pairwise percent agreement**: of all pairs of raters who answered the same unit, the share that chose the
  same; easy to read next to alpha, which corrects it for chance.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (95 % by default); ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def krippendorff_alpha_nominal(units: Mapping[Hashable, Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data.

    Args:
        units: For every unit, the values the raters gave it (any number of raters; units with fewer than two
            values are not pairable and do not count).

    Returns:
        Alpha, or ``None`` when it is undefined: fewer than two pairable values, or every value the same
        (no variation to agree on).
    """
    coincidence: Counter[tuple[Hashable, Hashable]] = Counter()
    for values in units.values():
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nk - 1) if c == k else nc * nk
                if pairs:
                    coincidence[(c, k)] += pairs / (m - 1)
    n = sum(coincidence.values())
    if n < 2:
        return None
    marginals: Counter[Hashable] = Counter()
    for (c, _k), v in coincidence.items():
        marginals[c] += v
    # alpha = 1 - D_o / D_e with D_o = Σ_{c≠k} o_ck / n and D_e = Σ_{c≠k} n_c n_k / (n (n - 1)).
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = (n * n - sum(v * v for v in marginals.values())) / (n - 1)
    if expected <= 1e-12:
        return None
    return 1.0 - observed / expected


def pairwise_agreement(units: Mapping[Hashable, Sequence[Hashable]]) -> tuple[float | None, int]:
    """The share of rater pairs on the same unit that gave the same value, and how many rater pairs there were."""
    agree = total = 0
    for values in units.values():
        counts = Counter(values)
        m = len(values)
        total += m * (m - 1) // 2
        agree += sum(c * (c - 1) // 2 for c in counts.values())
    return (agree / total if total else None), total
