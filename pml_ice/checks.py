"""Argument and input checks of ICELoss, ICEReweightReducer and the wrappers and
tools around them: clear errors for values and tensors they cannot use."""

import numbers

import torch
from pytorch_metric_learning.utils import common_functions as c_f


def check_positive_real(owner, name, value, strictly):
    """A real number (not a bool), > 0 (``strictly``) or >= 0, that float32 can hold:
    logits and weights are computed in at least float32."""
    bound = torch.finfo(torch.float32).max
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not abs(float(value)) <= bound
        or (float(value) <= 0 if strictly else float(value) < 0)
    ):
        relation = "> 0" if strictly else ">= 0"
        raise ValueError(
            f"{owner}: {name} must be a real number {relation} and at most {bound:.3g} "
            f"(float32's largest), got {value!r}"
        )


def check_positive_integer(owner, name, value):
    """An integer (numpy's too, not a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The inputs of ``ICELoss.forward``."""
    check_loss_tensors(embeddings, labels, indices_tuple is not None, ref_emb, ref_labels)
    if indices_tuple is not None:
        num_refs = len(embeddings) if ref_emb is None else len(ref_emb)
        check_indices_tuple(indices_tuple, len(embeddings), num_refs)


def check_loss_tensors(embeddings, labels, has_indices_tuple, ref_emb, ref_labels):
    """``ICELoss.forward``'s checks of everything but the values of the indices_tuple
    (whether one is given: ``has_indices_tuple``)."""
    check_embeddings("embeddings", embeddings)
    if labels is None and not has_indices_tuple:
        raise ValueError("ICELoss: labels and indices_tuple cannot both be None")
    check_labels("labels", labels, len(embeddings))
    if ref_emb is not None:
        check_embeddings("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ICELoss: ref_emb has embedding size {ref_emb.shape[1]} but embeddings "
                f"have {embeddings.shape[1]}"
            )
        if ref_emb.dtype != embeddings.dtype:
            raise TypeError(
                f"ICELoss: ref_emb dtype {ref_emb.dtype} differs from embeddings dtype "
                f"{embeddings.dtype}"
            )
        if not has_indices_tuple and ref_labels is None:
            raise ValueError(
                "ICELoss: ref_labels are required with ref_emb when pairs come from labels"
            )
        check_labels("ref_labels", ref_labels, len(ref_emb))
    elif ref_labels is not None:
        raise ValueError("ICELoss: ref_labels were given without ref_emb")


def describe(value):
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(type(value))


def check_embeddings(name, embeddings, owner="ICELoss"):
    if not torch.is_tensor(embeddings):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(embeddings)}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"{owner}: {name} must be 2-D (batch_size, embedding_size), "
            f"got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"{owner}: {name} must be floating point, got {embeddings.dtype}")


def check_labels(name, labels, expected_length, owner="ICELoss"):
    if labels is None:
        return
    if not torch.is_tensor(labels):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(labels)}")
    if labels.ndim != 1 or len(labels) != expected_length:
        raise ValueError(
            f"{owner}: {name} must have shape ({expected_length},), "
            f"got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() and bool(torch.isnan(labels).any()):
        raise ValueError(
            f"{owner}: {name} contain NaN; NaN is not equal to itself, so it names no "
            "class (give every sample a real label)"
        )


def check_indices_tuple(indices_tuple, num_anchors, num_refs):
    if not c_f.is_list_or_tuple(indices_tuple) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "ICELoss: indices_tuple must be (anchors, positives, negatives) or "
            "(anchors1, positives, anchors2, negatives)"
        )
    for position, index in enumerate(indices_tuple):
        if (
            not torch.is_tensor(index)
            or index.ndim != 1
            or index.is_floating_point()
            or index.is_complex()
            or index.dtype == torch.bool
        ):
            raise ValueError(
                f"ICELoss: indices_tuple[{position}] must be a 1-D integer tensor of "
                f"indices, got {describe(index)}"
            )
        is_anchor = position == 0 or (len(indices_tuple) == 4 and position == 2)
        bound = num_anchors if is_anchor else num_refs
        if len(index) > 0 and (index.min() < 0 or index.max() >= bound):
            raise ValueError(
                f"ICELoss: indices_tuple[{position}] has indices outside [0, {bound})"
            )
    groups = [indices_tuple] if len(indices_tuple) == 3 else [indices_tuple[:2], indices_tuple[2:]]
    for group in groups:
        if len({len(index) for index in group}) != 1:
            raise ValueError(
                "ICELoss: the tensors of indices_tuple that form tuples must have equal lengths"
            )
