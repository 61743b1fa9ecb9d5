"""ICE's logits ``Z = coef * S`` and the gradients through them: a plain matrix product
for (normalised) inner products, any PML distance otherwise."""

import torch
from pytorch_metric_learning.distances import DotProductSimilarity

from . import plan


def accumulation_dtype(dtype):
    """Logits, log-sum-exp and the gradient of the logits are at least float32."""
    return torch.promote_types(dtype, torch.float32)


def add_matmul(out, a, b, alpha):
    """``out += alpha * a @ b`` with the product in ``b``'s dtype (tensor cores for
    half inputs) and the sum in ``out``'s dtype."""
    a = a.to(b.dtype)
    if out.dtype == b.dtype:
        return out.addmm_(a, b, alpha=alpha)
    return out.add_(torch.mm(a, b), alpha=alpha)


def is_inner_product(distance):
    """True when the distance matrix is exactly ``normalize(q) @ normalize(r).T``."""
    return (
        isinstance(distance, DotProductSimilarity)
        and type(distance).compute_mat is DotProductSimilarity.compute_mat
        and distance.power == 1
    )


def logits_kernel(distance, scale, embeddings, ref_emb):
    """Embeddings ready for the logits, and how to compute them.

    Cosine and dot-product similarities become a plain matrix product of the
    (normalised) embeddings, in the autocast dtype under ``torch.autocast``; any
    other distance is evaluated chunk by chunk in at least float32. A distance that
    is not a similarity gives ``Z = -scale * d``.
    """
    sign = 1.0 if distance.is_inverted else -1.0
    if not is_inner_product(distance):
        return embeddings, ref_emb, DistanceLogits(distance, sign * scale)
    queries = distance.maybe_normalize(embeddings)
    refs = queries if ref_emb is embeddings else distance.maybe_normalize(ref_emb)
    distance.set_default_stats(embeddings, ref_emb, queries, refs)
    device_type = embeddings.device.type
    if torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        queries, refs = queries.to(autocast_dtype), refs.to(autocast_dtype)
    return queries, refs, InnerProductLogits(sign * scale)


class LogitsKernel:
    """How a chunk of logits and the gradients through it are computed."""

    def add_grads_from_exp(
        self, queries, refs, exp_logits, exp_factor, positives, pos_grad, grad_queries, grad_refs
    ):
        """Add the gradients for ``dZ = exp_factor * exp_logits`` on negatives and
        ``-pos_grad`` on the positive pairs ``positives = (rows, cols)``.
        ``grad_refs`` is None when the references need no gradient (a memory bank)."""
        grad_logits = exp_logits * exp_factor[:, None]
        # pairs are unique, so a gather-subtract-scatter suffices (an accumulating
        # index_put would sort its indices on the host)
        grad_logits[positives] -= pos_grad
        self.add_grads(queries, refs, grad_logits, grad_queries, grad_refs)


class InnerProductLogits(LogitsKernel):
    """``Z = coef * q @ r.T`` for embeddings that are already normalised (or not meant to be)."""

    def __init__(self, coef):
        self.coef = coef

    def logits(self, queries, refs, out):
        if queries.dtype == out.dtype:
            return torch.mm(queries * self.coef, refs.T, out=out)
        return out.copy_(torch.mm(queries, refs.T)).mul_(self.coef)

    def differentiable_logits(self, queries, refs, dtype):
        """``Z`` in ``dtype`` with ordinary (twice differentiable) operations."""
        return self.coef * (queries.to(dtype) @ refs.to(dtype).T)

    def add_grads(self, queries, refs, grad_logits, grad_queries, grad_refs):
        """Add the gradients of ``sum(grad_logits * Z)`` to ``grad_queries`` and ``grad_refs``.
        When the references are the queries (``Z = c Q Q^T``, one gradient buffer),
        ``dQ = c (G + G^T) Q``: one product instead of two."""
        if refs is queries and grad_refs is grad_queries:
            add_matmul(grad_queries, grad_logits + grad_logits.T, queries, self.coef)
            return
        add_matmul(grad_queries, grad_logits, refs, self.coef)
        if grad_refs is not None:
            add_matmul(grad_refs, grad_logits.T, queries, self.coef)

    def add_grads_from_exp(
        self, queries, refs, exp_logits, exp_factor, positives, pos_grad, grad_queries, grad_refs
    ):
        """On a CPU the row factor moves onto the embeddings and the positives form a
        sparse matrix, so no elementwise pass over ``exp_logits`` is needed: two products.
        On a GPU that pass is cheap and the sparse matrix's coalescing is not (host
        time), so the generic form is used."""
        if not plan.sparse_positives_pay_off(exp_logits.device):
            return super().add_grads_from_exp(
                queries, refs, exp_logits, exp_factor, positives, pos_grad, grad_queries, grad_refs
            )
        acc_dtype = exp_logits.dtype
        queries, refs = queries.to(acc_dtype), refs.to(acc_dtype)
        pos_matrix = torch.sparse_coo_tensor(
            torch.stack(positives),
            -pos_grad,
            exp_logits.shape,
            is_coalesced=True,
            check_invariants=False,
        )
        grad_queries.add_(
            torch.mm(exp_logits, refs).mul_(exp_factor[:, None])
            + torch.sparse.mm(pos_matrix, refs),
            alpha=self.coef,
        )
        if grad_refs is None:
            return
        grad_refs.add_(
            torch.mm(exp_logits.T, queries * exp_factor[:, None])
            + torch.sparse.mm(pos_matrix.t(), queries),
            alpha=self.coef,
        )


class DistanceLogits(LogitsKernel):
    """``Z = coef * distance(q, r)`` for any PML distance, evaluated in at least
    float32 (``torch.cdist`` has no bfloat16 kernel); its backward goes through autograd."""

    def __init__(self, distance, coef):
        self.distance = distance
        self.coef = coef

    def logits(self, queries, refs, out):
        with torch.no_grad():
            mat = self.distance(queries.to(out.dtype), refs.to(out.dtype))
            return out.copy_(mat).mul_(self.coef)

    def differentiable_logits(self, queries, refs, dtype):
        """``Z`` in ``dtype`` through the distance's own (differentiable) operations."""
        return self.coef * self.distance(queries.to(dtype), refs.to(dtype))

    def add_grads(self, queries, refs, grad_logits, grad_queries, grad_refs):
        queries = queries.detach().to(grad_logits.dtype).requires_grad_(True)
        refs = refs.detach().to(grad_logits.dtype).requires_grad_(grad_refs is not None)
        inputs = (queries, refs) if grad_refs is not None else (queries,)
        with torch.enable_grad():
            mat = self.distance(queries, refs)
            grads = torch.autograd.grad(mat, inputs, grad_logits * self.coef)
        grad_queries.add_(grads[0])
        if grad_refs is not None:
            grad_refs.add_(grads[1])
