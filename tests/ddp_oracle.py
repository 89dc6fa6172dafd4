"""torch DDP on a 2-process gloo group with a communication hook: what compressed sync must equal.

At module level so spawned workers can import it. Data order is unison's shard partition:
each rank's DistributedSampler permutation, in consecutive batches.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
from torch.nn.parallel import DistributedDataParallel

from unison import compression as cx

from reference import sampler_order


def with_unison_first_q(state, model, seed):
    """powerSGD_hook whose first Q is unison's (compression.initial_q), laid out as DDP lays out
    a bucket's Qs: compressed tensors grouped by matrix shape, in the bucket's order. With warm
    start DDP then orthogonalizes this Q instead of drawing one from its own generator."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    shapes = [tuple(p.shape) for p in model.parameters()]
    rank = state.matrix_approximation_rank
    ranks = [cx.powersgd_rank(s, rank, state.min_compression_rate) for s in shapes]
    flat = cx.initial_q(shapes, rank, state.min_compression_rate, seed)
    sizes = [cx.matrix_shape(s)[1] * r for s, r in zip(shapes, ranks) if r]
    qs = dict(zip([i for i, r in enumerate(ranks) if r], flat.split(sizes)))

    def hook(state, bucket):
        index = bucket.index()
        if state.iter >= state.start_powerSGD_iter and index not in state.p_memory_dict:
            groups = {}
            for p in bucket.parameters():
                i = order[id(p)]
                if ranks[i]:
                    groups.setdefault(cx.matrix_shape(shapes[i]), []).append(i)
            members = [i for group in groups.values() for i in group]
            state.q_memory_dict[index] = torch.cat([qs[i] for i in members])
            state.p_memory_dict[index] = torch.empty(sum(shapes[i][0] * ranks[i] for i in members))
        return psgd.powerSGD_hook(state, bucket)

    return hook


def _worker(rank, store, out, hook, options, model, x, y, epochs, batch_size, lr, momentum):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=options["rank"],
                                   start_powerSGD_iter=options["start"], min_compression_rate=2,
                                   use_error_feedback=True, warm_start=True, random_seed=0)
        chosen = with_unison_first_q(state, model, options["seed"]) if options.get("same_q") else psgd.powerSGD_hook
        ddp.register_comm_hook(state, chosen)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum)
    for epoch in range(epochs):
        order = sampler_order(len(x), 2, rank, epoch, 0)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            F.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()
    # gloo's teardown at interpreter exit can abort (SIGABRT, seen once in 3 full runs), as in
    # unison's own workers: leave without it once the model is saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ddp_train(tmp_path, model, x, y, *, hook, options=None, epochs=2, batch_size=8, lr=0.1, momentum=0.0):
    """The model rank 0 ends with after DDP training with ``hook`` ("fp16" or "powersgd")."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out), hook, options or {}, model, x, y, epochs,
                            batch_size, lr, momentum), nprocs=2, join=True)
    trained = copy.deepcopy(model)
    trained.load_state_dict(torch.load(out))
    return trained
