from pytorch_metric_learning import losses as pml_losses


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """PML's CrossBatchMemory, accepting ICELoss as well as PML's own losses, with a
    clear error when a batch does not fit the memory."""

    @staticmethod
    def supported_losses():
        return pml_losses.CrossBatchMemory.supported_losses() + ["ICELoss"]

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if enqueue_mask is None and len(embeddings) > self.memory_size:
            raise ValueError(
                f"CrossBatchMemory: a batch of {len(embeddings)} embeddings does not fit "
                f"a memory_size of {self.memory_size}; use memory_size >= the batch size"
            )
        return super().forward(embeddings, labels, indices_tuple, enqueue_mask)
