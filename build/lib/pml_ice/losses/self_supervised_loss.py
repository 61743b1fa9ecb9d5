from pytorch_metric_learning import losses as pml_losses


class SelfSupervisedLoss(pml_losses.SelfSupervisedLoss):
    """PML's SelfSupervisedLoss, accepting ICELoss as well as PML's own losses."""

    @staticmethod
    def supported_losses():
        return pml_losses.SelfSupervisedLoss.supported_losses() + ["ICELoss"]
