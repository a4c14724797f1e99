import os
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from gradaccum import FixedSteps
from gradaccum.torch import Accumulator

if "WORLD_SIZE" in os.environ:  # started by torchrun: join its group (env:// reads RANK, WORLD_SIZE, MASTER_*)
    dist.init_process_group("gloo")
else:  # run alone: a group of one process
    rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
torch.manual_seed(0)  # the same initial weights on every rank
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
for layer in model:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # over the sharded parameters
acc = Accumulator(model, optimizer, FixedSteps(4))
g = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data
x, y = torch.randn(96, 10, generator=g), torch.randint(0, 2, (96,), generator=g)
for i in range(0, 96, 8):
    acc.backward(torch.nn.functional.cross_entropy(model(x[i:i + 8]), y[i:i + 8]), 8)
# a window's items are summed over the ranks: [64, 64, 64] on each of 2 ranks
print([r.items for r in acc.history])  # [32, 32, 32]
dist.destroy_process_group()
