"""Agreement of processes on their inputs before the inputs are gathered.

A process that refuses its inputs alone leaves the others waiting in the next
collective, and tensors that differ in width or dtype between processes crash the
gather itself (gloo aborts the process). So every process first checks its own
inputs; then one ``all_gather`` of a small fixed-size description of them (whether the
checks passed, batch sizes, widths, dtypes, which optional inputs are given) shows
every process all of them, and every process raises the same error, or none does.
"""

import torch
import torch.distributed as dist

from ..checks import check_embeddings, check_labels

# every torch dtype, numbered alike in every process running the same torch
DTYPES = sorted({value for value in vars(torch).values() if isinstance(value, torch.dtype)}, key=str)
ABSENT = -1


def dtype_name(code):
    return "not given" if code == ABSENT else str(DTYPES[code])


def count_name(value):
    return "not given" if value == ABSENT else str(value)


def yes_no(flag):
    return "yes" if flag else "no"


# the description of one process's inputs: (field, its name in errors, how its values read)
FIELDS = (
    ("failed", "whether the checks failed", yes_no),
    ("size", "batch size", count_name),
    ("width", "embedding width", count_name),
    ("dtype", "embeddings' dtype", dtype_name),
    ("label_dtype", "labels' dtype", dtype_name),
    ("indices_tuple", "whether an indices_tuple is given", yes_no),
    ("ref_size", "ref_emb's batch size", count_name),
    ("ref_width", "ref_emb's width", count_name),
    ("ref_dtype", "ref_emb's dtype", dtype_name),
    ("ref_label_dtype", "ref_labels' dtype", dtype_name),
    ("enqueue_mask", "whether an enqueue_mask is given", yes_no),
)
POSITION = {field: position for position, (field, _, _) in enumerate(FIELDS)}
SIZES = ("size", "ref_size")


def agree_on_inputs(
    owner, check, embeddings, labels=None, has_indices_tuple=False, ref_emb=None,
    ref_labels=None, enqueue_mask=None, equal_sizes=False,
):
    """Collective. Runs ``check()`` (which raises ValueError or TypeError on inputs it
    refuses) and ``owner``'s checks that the tensors can be gathered, then raises the
    same error in every process if any process failed them, or if the processes
    disagree on a width, a dtype, which optional inputs are given, or (with
    ``equal_sizes``) a batch size. Returns every process's batch size and ref_emb batch
    size (None without ref_emb), in rank order."""
    error = error_of(check)
    if error is None:
        error = error_of(
            check_gatherable, owner, embeddings, labels, ref_emb, ref_labels, enqueue_mask
        )
    own = (
        [1] + [0] * (len(FIELDS) - 1)
        if error is not None
        else describe(embeddings, labels, has_indices_tuple, ref_emb, ref_labels, enqueue_mask)
    )
    own = torch.tensor(own, dtype=torch.int64, device=collective_device())
    rows = [torch.empty_like(own) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, own)
    rows = torch.stack(rows).tolist()
    if any(row[POSITION["failed"]] for row in rows):
        raise_shared(error)
    for field, name, read in FIELDS[1:]:
        values = [row[POSITION[field]] for row in rows]
        if len(set(values)) > 1 and (field not in SIZES or equal_sizes):
            listed = ", ".join(f"process {rank}: {read(value)}" for rank, value in enumerate(values))
            advice = (
                f"{owner}(efficient=False) gathers with PML's code, which needs one batch "
                "size on every process: give every process the same batch size (e.g. "
                "drop_last=True), or use efficient=True, which allows unequal ones"
                if field in SIZES
                else "every process must pass embeddings (and ref_emb) of one width and "
                "dtype, labels of one dtype and the same optional arguments, since they "
                "are gathered into one batch"
            )
            raise ValueError(f"{owner}: the processes disagree on the {name} ({listed}); {advice}")
    sizes = [row[POSITION["size"]] for row in rows]
    ref_sizes = [row[POSITION["ref_size"]] for row in rows]
    return sizes, None if ref_emb is None else ref_sizes


def raise_together(error):
    """Collective: every process passes the error its own checks raised, or None; if
    any process has one, every process raises the same error."""
    failed = torch.tensor([error is not None], dtype=torch.int64, device=collective_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise_shared(error)


def raise_shared(error):
    """Collective, when some process has an error: every process raises one error of the
    first failing process's type, listing every failing process's message."""
    own = None if error is None else (type(error), str(error))
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, own)
    ranks_of = {}
    for rank, failure in enumerate(failures):
        if failure is not None:
            ranks_of.setdefault(failure[1], []).append(rank)
    lines = [
        f"{'process' if len(ranks) == 1 else 'processes'} {', '.join(map(str, ranks))}: {message}"
        for message, ranks in ranks_of.items()
    ]
    error_type = next(failure[0] for failure in failures if failure is not None)
    raise error_type("\n".join(lines)) from error


def error_of(check, *args):
    """The ValueError or TypeError ``check(*args)`` raises, or None."""
    try:
        check(*args)
    except (ValueError, TypeError) as error:
        return error
    return None


def check_gatherable(owner, embeddings, labels, ref_emb, ref_labels, enqueue_mask):
    """Tensors that :func:`describe` can describe and the wrappers can gather."""
    check_embeddings("embeddings", embeddings, owner)
    check_labels("labels", labels, len(embeddings), owner)
    if ref_emb is not None:
        check_embeddings("ref_emb", ref_emb, owner)
        check_labels("ref_labels", ref_labels, len(ref_emb), owner)
    elif ref_labels is not None:
        raise ValueError(f"{owner}: ref_labels were given without ref_emb")
    if enqueue_mask is not None and (
        not torch.is_tensor(enqueue_mask)
        or enqueue_mask.dtype != torch.bool
        or enqueue_mask.shape != (len(embeddings),)
    ):
        raise ValueError(
            f"{owner}: enqueue_mask must be a boolean tensor of shape ({len(embeddings)},)"
        )


def describe(embeddings, labels, has_indices_tuple, ref_emb, ref_labels, enqueue_mask):
    """The values of FIELDS for one process's inputs."""

    def dtype_code(tensor):
        return ABSENT if tensor is None else DTYPES.index(tensor.dtype)

    return [
        0,
        len(embeddings),
        embeddings.shape[1],
        dtype_code(embeddings),
        dtype_code(labels),
        int(has_indices_tuple),
        ABSENT if ref_emb is None else len(ref_emb),
        ABSENT if ref_emb is None else ref_emb.shape[1],
        dtype_code(ref_emb),
        dtype_code(ref_labels),
        int(enqueue_mask is not None),
    ]


def collective_device():
    """Where the descriptions are exchanged: the CPU under gloo (and mpi), else the
    current accelerator (NCCL takes only its tensors)."""
    if dist.get_backend() in ("gloo", "mpi"):
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())
