"""ICE's computation, private to ``ICELoss`` (``ICELoss.computation_plan`` is the public
face of the choice):

- ``plan``: which path to take, its chunk or tile sizes, the logits it holds;
- ``logits``: how the logits and the gradients through them are computed;
- ``pairs``: which pairs are used, as sorted pair lists;
- the per-pair losses of each path, one autograd Function each:
  ``label_mask_losses`` (``ICELabelLosses``), ``pair_list_losses`` (``ICEPairLosses``,
  whose backward the label mask shares) and ``symmetric_tile_losses`` (``ICESymmetricTiles``);
- ``pair_terms``: the last step of every path's forward;
- ``twice_differentiable``: the gradient as a differentiable graph, under ``create_graph``.
"""
