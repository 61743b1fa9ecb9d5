"""Inputs of the measured steps."""

import torch


def class_labels(size: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` labels, ``per_class`` samples per class, in a random order."""
    return (torch.arange(size) // per_class)[torch.randperm(size, generator=generator)]
