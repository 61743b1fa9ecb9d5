import torch
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.utils import common_functions as c_f


class PerAnchorReducer(pml_reducers.PerAnchorReducer):
    """PML's PerAnchorReducer, also when pairs point into a reference set larger
    than the batch (PML's sizes its anchor x reference matrix by the batch)."""

    def tuple_reduction_helper(self, losses, loss_indices, embeddings, labels):
        anchors, others = loss_indices
        num_anchors = embeddings.shape[0]
        num_others = max(num_anchors, int(others.max()) + 1 if len(others) else 0)
        per_anchor = torch.full(
            (num_anchors, num_others), c_f.pos_inf(losses.dtype), dtype=losses.dtype,
            device=losses.device,
        )
        per_anchor[anchors, others] = losses
        missing = per_anchor == c_f.pos_inf(losses.dtype)
        per_anchor[missing] = 0
        num_per_row = num_others - torch.sum(missing, dim=1)
        loss_dict = {
            "loss": {
                "losses": self.aggregation_func(per_anchor, num_per_row),
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        return self.reducer(loss_dict, embeddings, labels)
