"""Which pair a rater sees next: never one they saw, the least-answered first, in a random left/right order.

Balancing on answers per pair spreads the raters' votes evenly over the pairs, so that every pair gets votes
early in a study and the per-pair agreement statistics have several raters to work with. The left/right order is
drawn per assignment (a fair coin) and stored, so position bias averages out and can be checked from the votes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from mole.evaluate.study.design import Study
from mole.evaluate.study.store import Assignment, VoteStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Next:
    """The rater's next pair (``None`` when they are done) and their progress."""

    assignment: Assignment | None
    answered: int
    total: int


def next_pair(study: Study, store: VoteStore, rater_id: str, rng: random.Random | None = None) -> Next:
    """The pair ``rater_id`` should answer now.

    A pair shown and not answered yet comes back (a reload is not a second look at a new pair); otherwise a pair
    never shown to this rater, among those with the fewest answers, picked at random; ``None`` once the rater
    answered ``study.pairs_per_rater`` pairs or every pair.
    """
    rng = rng or random.SystemRandom()
    total = study.pairs_per_rater
    answered = store.answered_count(rater_id)
    current = store.open_assignment(rater_id)
    if current is not None:
        return Next(current, answered, total)
    for _ in range(5):  # another request of the same rater may take the chosen pair first: choose again
        if answered >= total:
            return Next(None, answered, total)
        seen = store.seen_pairs(rater_id)
        candidates = [p.pair for p in study.pairs if p.pair not in seen]
        if not candidates:
            return Next(None, answered, total)
        counts = store.answers_per_pair()
        fewest = min(counts.get(p, 0) for p in candidates)
        pair = rng.choice([p for p in candidates if counts.get(p, 0) == fewest])
        made = store.add_assignment(rater_id, pair, left_is_a=rng.random() < 0.5)
        if made is not None:
            return Next(made, answered, total)
        current = store.open_assignment(rater_id)
        if current is not None:
            return Next(current, answered, total)
    raise RuntimeError(f"could not assign a pair to rater {rater_id} after 5 attempts (database contention)")
