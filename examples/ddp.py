"""DDP: watch a DistributedDataParallel training loop on every rank; rank 0 writes the run.

An MLP learns a generated 10-class problem (64 features, Gaussian class clusters) with
SGD + momentum. Each process trains a DDP replica on its share of every global batch
(a ``DistributedSampler``); ``trainprobe.watch`` runs on every rank with the same
``run_dir``: the default probes plus ``Sharpness`` every 50 steps, whose Hessian-vector
products on the step's batch are averaged over ranks (so it is the global batch's
Hessian). Rank 0 alone writes the store, then prints the findings.

    torchrun --nproc_per_node 2 examples/ddp.py --run-dir runs/ddp   # 2 CPU processes, gloo
    python examples/ddp.py --run-dir runs/ddp-single                 # one process, no group

``--backend nccl`` (one GPU per process) is used only when asked and CUDA is available;
the default is gloo on the CPU. ``--overwrite`` replaces a run already in ``--run-dir``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trainprobe
from trainprobe.curvature import criterion_loss
from trainprobe.probes import Sharpness, default_probes, every

FEATURES, CLASSES, SAMPLES = 64, 10, 4096


def make_data(gen: torch.Generator) -> TensorDataset:
    """``SAMPLES`` points ``[N, FEATURES]`` around ``CLASSES`` random centres, labels ``[N]``."""
    centres = 0.4 * torch.randn(CLASSES, FEATURES, generator=gen)  # [C, F]
    labels = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)  # [N]
    points = centres[labels] + 2.0 * torch.randn(SAMPLES, FEATURES, generator=gen)  # [N, F]
    return TensorDataset(points, labels)


def start(backend: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (if launched by it): rank, world size, device."""
    if "WORLD_SIZE" not in os.environ:  # plain `python examples/ddp.py`: one process
        return 0, 1, torch.device("cpu")
    use_cuda = backend == "nccl"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--backend nccl needs CUDA; use the default gloo backend on the CPU")
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)  # MASTER_ADDR, MASTER_PORT, RANK from torchrun
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def global_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean over ranks of this rank's ``values`` (what rank 0 then logs)."""
    if world > 1:
        values = values.detach().clone()
        dist.all_reduce(values)
        values /= world
    return values


def train(run_dir: Path, *, steps: int, batch: int, backend: str, overwrite: bool) -> int:
    """Train ``steps`` steps of global batch ``batch``, watched; returns this rank."""
    rank, world, device = start(backend)
    if batch % world:
        raise SystemExit(f"--batch {batch} does not split over {world} processes")
    data = make_data(torch.Generator().manual_seed(0))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch // world, sampler=sampler, drop_last=True)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    net = nn.Sequential(
        nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, CLASSES)
    ).to(device)
    model = DDP(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probes = [*default_probes(), Sharpness(schedule=every(50))]
    loss_fn = criterion_loss(nn.CrossEntropyLoss())
    with trainprobe.watch(
        model, probes, run_dir=run_dir, optimizer=opt, loss_fn=loss_fn, overwrite=overwrite
    ) as mon:
        step, epoch = 0, 0
        while step < steps:
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                with mon.step(step, batch=(x, y)) as s:
                    logits = model(x)
                    loss = nn.functional.cross_entropy(logits, y)
                    loss.backward()
                    accuracy = (logits.argmax(1) == y).float().mean()
                    mean = global_mean(torch.stack([loss, accuracy]), world)
                    s.log(loss=mean[0], accuracy=mean[1])  # the global batch's
                opt.step()
                opt.zero_grad()
                step += 1
                if step == steps:
                    break
            epoch += 1
    return rank


def summarise(run_dir: Path, world: int) -> None:
    """What rank 0 prints: where the run is, its findings, the command to see them again."""
    run = trainprobe.Run(run_dir)
    findings = trainprobe.analyze(run)
    loss = run.series("scalars/loss").values
    sharpness = run.series("sharpness/lambda_max")
    print(f"run stored in {run_dir} by rank 0 of {world} ({run.state().name})")
    print(f"loss {loss[0]:.3f} -> {loss[-1]:.3f} over {len(loss)} steps")
    pairs = ", ".join(
        f"{s}: {v:.2f}" for s, v in zip(sharpness.steps, sharpness.values, strict=True)
    )
    print(f"sharpness (global batch) at steps {pairs}")
    for f in findings:
        print(f"{f.severity}: steps {f.start_step}-{f.end_step} {f.detector}: {f.message}")
    print(f"{len(findings)} findings; again later: trainprobe report {run_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/ddp"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch (all ranks)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--overwrite", action="store_true", help="replace a run in --run-dir")
    args = parser.parse_args(argv)
    try:
        rank = train(
            args.run_dir,
            steps=args.steps,
            batch=args.batch,
            backend=args.backend,
            overwrite=args.overwrite,
        )
        world = dist.get_world_size() if dist.is_initialized() else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        summarise(args.run_dir, world)


if __name__ == "__main__":
    main()
