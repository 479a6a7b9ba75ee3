"""Weights per step (pure): percent of the managed pair's total, in the user's own scale."""

from __future__ import annotations

from dataclasses import dataclass

PERCENT_SCALE = 100


@dataclass(frozen=True)
class PairWeights:
    stable: int
    canary: int


def pair_scale(stable_weight: int, canary_weight: int) -> int:
    """The total the two managed weights will share.

    Their current sum keeps the user's scale (e.g. 1000 for per-mille weights), so any other
    backendRef in the rule keeps its share. Sums below 100 (e.g. the default weight 1 on both)
    cannot express percent steps and are lifted to 100; that changes the share of other
    backendRefs only when the pair's sum was below 100.
    """
    total = stable_weight + canary_weight
    return total if total >= PERCENT_SCALE else PERCENT_SCALE


def weights_at(canary_percent: int, scale: int) -> PairWeights:
    """Split ``scale`` so the canary gets ``canary_percent`` percent (rounded half up)."""
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"canary percent {canary_percent} outside 0..100")
    canary = (canary_percent * scale + 50) // 100
    return PairWeights(stable=scale - canary, canary=canary)


def canary_percent(stable_weight: int, canary_weight: int) -> float:
    total = stable_weight + canary_weight
    return 0.0 if total == 0 else 100.0 * canary_weight / total
