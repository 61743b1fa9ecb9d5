"""NTXent as the harness trains it: PML's ``NTXentLoss`` on labels, computed as ICE without
reweighting.

For labels within a batch both losses are the mean over positive pairs ``(i, j)`` of
``-log( exp(s_ij / t) / (exp(s_ij / t) + sum_{k in N(i)} exp(s_ik / t)) )``, so
``ICELoss(scale=1/t)`` with lam 0 and batch normalisation equals ``NTXentLoss(temperature=t)``
in value and gradient. PML's ``NTXentLoss`` builds a (positive pairs x negative pairs)
matrix for it, ``B (m - 1) x B (B - m)`` entries for a batch of ``B`` with ``m`` per class
(6.1 million at 128 and 4 per class), where ICE needs the ``B x B`` logits.
"""

from pml_ice.losses import ICELoss
from pml_ice.reducers import ICEReweightReducer


class NTXentAsICE(ICELoss):
    """``NTXentLoss(temperature)`` on labels: ``ICELoss(scale=1/temperature)`` with
    ``ICEReweightReducer(lam=0, normalize="batch")``."""

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(scale=1 / temperature, reducer=ICEReweightReducer(lam=0, normalize="batch"), **kwargs)
        self.temperature = temperature
