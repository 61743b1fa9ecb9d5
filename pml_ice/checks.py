"""Argument checks shared by ICELoss and ICEReweightReducer."""

import numbers

import torch


def check_positive_real(owner, name, value, strictly):
    """A real number (not a bool), > 0 (``strictly``) or >= 0, that float32 can hold:
    logits and weights are computed in at least float32."""
    bound = torch.finfo(torch.float32).max
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not abs(float(value)) <= bound
        or (float(value) <= 0 if strictly else float(value) < 0)
    ):
        relation = "> 0" if strictly else ">= 0"
        raise ValueError(
            f"{owner}: {name} must be a real number {relation} and at most {bound:.3g} "
            f"(float32's largest), got {value!r}"
        )
