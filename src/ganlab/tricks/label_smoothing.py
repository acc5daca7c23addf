"""One-sided label smoothing (Salimans et al. 2016 §3.4)."""

from __future__ import annotations

from ganlab.tricks.base import Trick


class LabelSmoothing(Trick):
    """Real examples get target ``alpha`` (e.g. 0.9) in D's loss; fake examples keep target 0.

    Smoothing only the real side matters: a fake target beta > 0 would reward G for samples where p_data is
    zero (the optimal D becomes (alpha p_data + beta p_model) / (p_data + p_model)).
    """

    def __init__(self, alpha: float = 0.9) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"tricks.label_smoothing.alpha must be in (0, 1] (got {alpha})")
        self.real_target = float(alpha)
