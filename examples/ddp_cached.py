"""ICE on a large global batch: DDP, the exact sharded loss and gradient caching.

    torchrun --nproc_per_node 2 examples/ddp_cached.py

Runs on the CPU (gloo; NCCL on GPUs). Each process embeds its share of the batch
``--chunk-size`` samples at a time (cached_backward); ICE is computed over the whole
global batch, each process its own anchors (DistributedLossWrapper(efficient=True)).
The data: Gaussian clusters, one class per cluster, in 32 dimensions.
"""

import argparse
import os

import torch
import torch.distributed as dist

from pml_ice import losses
from pml_ice.utils import cached_backward
from pml_ice.utils.distributed import DistributedLossWrapper


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-per-process", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=64)
    return parser.parse_args()


def make_model():
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 64)
    )


def sample_batch(centers, size, generator):
    """``size`` samples, 4 per class."""
    labels = torch.randint(len(centers), (size // 4,), generator=generator).repeat_interleave(4)
    return centers[labels] + 0.5 * torch.randn(size, centers.shape[1], generator=generator), labels


def main():
    args = parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the same initial weights on every process
    model = torch.nn.parallel.DistributedDataParallel(make_model().to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_func = DistributedLossWrapper(losses.ICELoss(scale=16.0), efficient=True)
    centers = 2 * torch.randn(args.classes, 32, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(100 + rank)  # each process its own data
    torch.manual_seed(200 + rank)  # and its own dropout masks
    if rank == 0:
        print(
            f"{world_size} processes x {args.batch_per_process} samples = global batch "
            f"{world_size * args.batch_per_process}, chunks of {args.chunk_size}"
        )
    for step in range(1, args.steps + 1):
        inputs, labels = sample_batch(centers, args.batch_per_process, generator)
        optimizer.zero_grad()
        loss = cached_backward(
            model, inputs.to(device), labels.to(device), loss_func, args.chunk_size
        )
        optimizer.step()
        if rank == 0 and (step == 1 or step % 10 == 0):
            print(f"step {step:3d}  global ICE loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
