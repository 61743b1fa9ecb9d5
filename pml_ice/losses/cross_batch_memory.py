from pytorch_metric_learning import losses as pml_losses

from ..checks import check_embeddings, check_labels


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """PML's CrossBatchMemory, accepting ICELoss as well as PML's own losses, with
    clear errors for a batch it cannot enqueue, raised before the memory changes."""

    @staticmethod
    def supported_losses():
        return pml_losses.CrossBatchMemory.supported_losses() + ["ICELoss"]

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        self.check_batch(embeddings, labels)
        if enqueue_mask is None and len(embeddings) > self.memory_size:
            raise ValueError(
                f"CrossBatchMemory: a batch of {len(embeddings)} embeddings does not fit "
                f"a memory_size of {self.memory_size}; use memory_size >= the batch size"
            )
        return super().forward(embeddings, labels, indices_tuple, enqueue_mask)

    def check_batch(self, embeddings, labels):
        """Floating-point embeddings of ``embedding_size``, and a real label for each."""
        check_embeddings("embeddings", embeddings, "CrossBatchMemory")
        if labels is None:
            raise ValueError("CrossBatchMemory: labels are required")
        check_labels("labels", labels, len(embeddings), "CrossBatchMemory")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"CrossBatchMemory: embeddings have size {embeddings.shape[1]} but "
                f"embedding_size is {self.embedding_size}"
            )
