"""Data parallelism with ``jax.sharding``: split each micro-batch over devices, replicate the state.

The jitted step is unchanged: XLA sees the batch sharded along the mesh's data axis
and inserts the all-reduces behind every sum over examples (gradient sums, moments,
item counts), so the window, the statistics and the decision are those of one device
over the whole micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (axis ``"data"``) over ``devices`` (default: every device)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    return Mesh(np.array(devices), (DATA_AXIS,))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place ``batch`` with its leading (example) axis split over the mesh's devices."""
    devices = mesh.devices.size
    for leaf in jax.tree.leaves(batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % devices:
            raise ValueError(f"every batch array's leading size must be a multiple of the {devices} devices, "
                             f"got shape {np.shape(leaf)}; pad it and pass a mask")
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a full copy of ``tree`` (a train state, say) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
