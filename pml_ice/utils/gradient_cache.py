"""Gradient caching: a metric loss on a batch larger than its activations fit, for
any PML loss and miner.

With embeddings ``E = f(X)`` of the batch split into chunks ``X_k``:

    dL/dtheta = sum_k (dL/dE_k) . (dE_k/dtheta)

so ``E`` is computed chunk by chunk without a graph, the miner and the loss run once
on the whole ``E`` (a leaf), and ``dL/dE_k`` is pushed back through a re-forward of
each chunk, with the chunk's random state restored (its dropout masks and in-model
augmentation are those of the first pass). Peak memory: one chunk's activations plus
the batch's embeddings.
"""

import contextlib

import torch

from ..checks import check_positive_integer

BATCHNORM = "BatchNorm"


def cached_backward(
    model, inputs, labels, loss_func, chunk_size, miner=None, freeze_batchnorm=False, scaler=None
):
    """``loss_func(E, labels, miner(E, labels))`` with ``E = model(inputs)``, and its
    gradients accumulated into the parameters' ``.grad``, ``chunk_size`` samples of
    activations at a time. Returns the loss, detached.

    Exact for the random draws of the chunks (the batch pushed through the model chunk
    by chunk) for models without layers that couple the samples of a batch; equal to
    one forward and backward of the whole batch under the same seed where the whole
    batch's draws are the chunks' draws in turn: no random layer, or on the CPU one
    that draws row by row (a single Dropout), not two or more (each chunk draws all
    its layers' masks before the next). BatchNorm in train mode normalises each chunk
    by its own statistics (as with a batch of ``chunk_size``) and updates its running
    statistics once per chunk; ``freeze_batchnorm=True`` runs it in eval mode
    (running statistics, not updated), where caching is exact. ``scaler``: a
    ``torch.amp.GradScaler``, which scales the loss's backward. Under DDP every
    process must run the same number of chunks.
    """
    cache = GradientCache(model, inputs, chunk_size, freeze_batchnorm)
    indices_tuple = None if miner is None else miner(cache.embeddings, labels)
    loss = loss_func(cache.embeddings, labels, indices_tuple)
    (loss if scaler is None else scaler.scale(loss)).backward()
    cache.backward()
    return loss.detach()


class GradientCache:
    """The embeddings of ``inputs``, computed ``chunk_size`` at a time without a graph,
    as a leaf requiring grad; :meth:`backward` pushes the leaf's ``.grad`` into the
    model's parameters.

    Args:
        model: a callable ``inputs -> embeddings``.
        modules: the ``nn.Module``s it runs (default: ``model`` itself), whose
            BatchNorm layers and DDP gradient synchronisation are managed.
    """

    def __init__(self, model, inputs, chunk_size, freeze_batchnorm=False, modules=None):
        if not torch.is_tensor(inputs):
            raise TypeError(f"GradientCache: inputs must be a torch.Tensor, got {type(inputs)}")
        check_positive_integer("GradientCache", "chunk_size", chunk_size)
        self.model = model
        self.modules = [model] if modules is None else list(modules)
        self.freeze_batchnorm = freeze_batchnorm
        self.chunks = inputs.split(int(chunk_size))
        self.rng_states = []
        self.backward_done = False
        parts = []
        with torch.no_grad(), self.batchnorm_mode():
            for chunk in self.chunks:
                self.rng_states.append(RNGState())
                parts.append(check_model_output(model(chunk), len(chunk)))
        self.embeddings = torch.cat(parts).requires_grad_()

    def backward(self):
        """Re-forward each chunk with its random state and back-propagate its slice of
        ``embeddings.grad`` (once: a second call raises); BatchNorm's running
        statistics are left as the first pass set them, the random state as the loss
        and the miner left it. Under DDP only the last chunk's backward synchronises."""
        if self.backward_done:
            raise RuntimeError(
                "GradientCache.backward() was already called: the embeddings' gradient is "
                "in the parameters' .grad once, and a second call would add it again; make "
                "a new GradientCache for the next step"
            )
        grad = self.embeddings.grad
        if grad is None:
            return
        self.backward_done = True
        rng_after_loss = RNGState()
        grads = grad.split([len(chunk) for chunk in self.chunks])
        with self.batchnorm_mode(), kept_batchnorm_buffers(self.batchnorm_layers()):
            for index, (chunk, rng_state, chunk_grad) in enumerate(
                zip(self.chunks, self.rng_states, grads)
            ):
                last = index == len(self.chunks) - 1
                with contextlib.nullcontext() if last else self.no_sync():
                    rng_state.restore()
                    embeddings = self.model(chunk)
                    if not embeddings.requires_grad:  # no parameter of the model trains
                        break
                    # d/dE_k of sum(E_k * G_k) is G_k exactly; a scalar's backward
                    # peaks lower than backward(E_k, G_k)
                    torch.sum(embeddings * chunk_grad).backward()
        rng_after_loss.restore()

    def batchnorm_layers(self):
        return [
            layer
            for module in self.modules
            for layer in module.modules()
            if BATCHNORM in type(layer).__name__
        ]

    @contextlib.contextmanager
    def batchnorm_mode(self):
        """With ``freeze_batchnorm``: BatchNorm in eval mode, then its mode restored."""
        layers = self.batchnorm_layers() if self.freeze_batchnorm else []
        modes = [layer.training for layer in layers]
        for layer in layers:
            layer.eval()
        try:
            yield
        finally:
            for layer, mode in zip(layers, modes):
                layer.train(mode)

    @contextlib.contextmanager
    def no_sync(self):
        """DDP's ``no_sync`` of every wrapped module: gradients accumulate locally."""
        with contextlib.ExitStack() as stack:
            for module in self.modules:
                for layer in module.modules():
                    if isinstance(layer, torch.nn.parallel.DistributedDataParallel):
                        stack.enter_context(layer.no_sync())
            yield


@contextlib.contextmanager
def kept_batchnorm_buffers(layers):
    """Restores the layers' buffers (running statistics) on exit."""
    saved = [(buffer, buffer.clone()) for layer in layers for buffer in layer.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def check_model_output(embeddings, num_inputs):
    """The model's output for a chunk: one tensor with a row per input."""
    if not torch.is_tensor(embeddings) or embeddings.ndim == 0 or len(embeddings) != num_inputs:
        got = (
            f"a tensor of shape {tuple(embeddings.shape)}"
            if torch.is_tensor(embeddings)
            else f"a {type(embeddings).__name__}"
        )
        raise TypeError(
            "GradientCache: the model must return the embeddings as one tensor with a row "
            f"per input ({num_inputs} rows for this chunk), got {got}; wrap it in an "
            "nn.Module whose forward returns the embeddings alone"
        )
    return embeddings


class RNGState:
    """The CPU random state, and every CUDA device's once CUDA is initialised."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
