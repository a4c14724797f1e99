"""Micro-batch plans: sizes that add up to exactly the effective batch (framework-agnostic)."""

from __future__ import annotations

from .validation import check_positive_int


def plan_micro_batches(effective_batch: int, micro_batch: int, world_size: int = 1) -> list[list[int]]:
    """Per rank, the micro-batch sizes of one window: at most ``micro_batch`` each, adding up
    over all ranks to exactly ``effective_batch`` (e.g. 100 with 48 -> [[48, 48, 4]]).

    Every rank gets the same number of micro-batches (DDP ranks must call backward the same
    number of times per window); the remainder is spread so that sizes differ by at most
    one across ranks at each position. Feed them to the Accumulator with
    ``FixedSteps(len(plan[rank]))``: it weights the uneven ones by their counts.
    """
    effective_batch = check_positive_int("effective_batch", effective_batch)
    micro_batch = check_positive_int("micro_batch", micro_batch)
    world_size = check_positive_int("world_size", world_size)
    if effective_batch < world_size:
        raise ValueError(f"effective_batch ({effective_batch}) must be >= world_size ({world_size}): "
                         "every rank needs at least one sample")
    per_rank = [effective_batch // world_size + (r < effective_batch % world_size) for r in range(world_size)]
    steps = -(-max(per_rank) // micro_batch)  # ceil: micro-batches per window on every rank
    plans = []
    for total in per_rank:
        sizes = [micro_batch] * (total // micro_batch)
        if total % micro_batch:
            sizes.append(total % micro_batch)
        if len(sizes) < steps:  # a rank with fewer samples: split its last micro-batch to match
            while len(sizes) < steps:
                largest = max(range(len(sizes)), key=lambda i: sizes[i])
                if sizes[largest] < 2:
                    raise ValueError(
                        f"cannot give every rank {steps} micro-batches of at most {micro_batch}: a rank has only "
                        f"{total} samples (use a larger micro_batch or an effective_batch that splits evenly)")
                half = sizes[largest] // 2
                sizes[largest] -= half
                sizes.append(half)
        plans.append(sizes)
    return plans
