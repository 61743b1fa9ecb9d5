from pytorch_metric_learning import losses as pml_losses


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """PML's CrossBatchMemory, accepting ICELoss as well as PML's own losses."""

    @staticmethod
    def supported_losses():
        return pml_losses.CrossBatchMemory.supported_losses() + ["ICELoss"]
