"""Significance of paired comparisons, in the standard library only (the CLI prints the sign
test after a run without loading numpy: docs/benchmarks.md, CLI start-up)."""

from __future__ import annotations

import math


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) on paired hit/miss outcomes.

    Two methods ranked the same queries; `wins` is how many queries only the first found in
    its top K, `losses` how many only the second found (queries both or neither found carry
    no information). The p-value of "neither is better": twice the Binomial(n, 1/2) tail at
    m = min(wins, losses), n = wins + losses, capped at 1. The tail is summed from P(X = m)
    down, each term P(X = j - 1) = P(X = j) * j / (n - j + 1), until the terms no longer
    change the sum: O(sqrt(n)) terms at worst, so a million discordant queries take
    milliseconds.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses are counts; got {wins}, {losses}")
    n, m = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    log_top = math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1) - n * math.log(2)
    total, term, j = 0.0, 1.0, m  # terms relative to P(X = m)
    while j >= 0 and term > 1e-17 * total:
        total += term
        term *= j / (n - j + 1)
        j -= 1
    return min(1.0, 2.0 * math.exp(log_top + math.log(total)))
