"""ICE's computation, private to ``ICELoss``: which path to take (``plan``), how
logits are computed (``logits``), which pairs are used (``pairs``), and the per-pair
losses on each path (``dense``, ``chunked``, ``symmetric_tiles``), which share their
last step (``pair_terms``)."""
