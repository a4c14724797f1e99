"""The batch-dimension decisions: which recorded calls carry the increment's samples.

A layer whose input or output does not carry the increment's ``n`` samples on its batch
dimension (``wpe(arange(T))`` added to a ``(B, T, C)`` tensor) is broadcast over the batch.
Where its sizes equal ``n`` (``B == T``) the model is run once more on one sample, without
gradients, and a layer whose sizes stay put is broadcast; that probe runs once per layer and
its verdict is kept. A broadcast call whose output was added into a batch-shaped tensor is
rewritten as a call over the batch (``expanded``); the others' parameters take the
whole-model fallback.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._fallback import Replay, batch_dims
from ._recorder import Call, Recorder, Sizes, Unit


class BatchDims:
    """The batch verdicts of a model's layers (probed once each) and the decisions they make.

    Args:
      model: the model run again on one sample for the probe.
      params: the parameters (the devices whose random state the probe leaves as it was).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        self._model = model
        self._params = params
        self._batched: dict[int, bool] = {}  # id(module) -> its calls follow the batch (probed once)

    def may_broadcast(self, call: Call, n: int) -> bool:
        """Whether the call's sizes, or an earlier probe, say it does not follow the batch."""
        in_dim, _ = batch_dims(call.unit.module, 1)  # type: ignore[union-attr]
        return in_dim == 0 and (call.in_size != n or call.out_size not in (n, None)
                                or self._batched.get(id(call.unit.module)) is False)  # type: ignore[union-attr]

    def expand(self, calls: list[Call], n: int) -> list[Call]:
        """The calls, each broadcast one whose output was added into the batch rewritten over it.

        The rewrite passes the check whatever it is (its per-sample gradients add up to the
        real one by construction), so only calls known to be broadcast (sizes, or an earlier
        single-sample probe) take it; an unknown ``B == T`` call is probed (``broadcast_units``)."""
        return [(c.broadcast_grad is not None and self.may_broadcast(c, n) and expanded(c, n)) or c for c in calls]

    def broadcast_units(self, calls: list[Call], n: int, recorder: Recorder, paths: dict[str, str]) -> list[Unit]:
        """Units with a call that does not carry the increment's samples on its batch dims
        (their path in ``paths`` becomes ``"broadcast -> model"``).

        Sizes that differ from n settle it; where they equal n (``B == T``), the model is
        run once more on one sample, without gradients, and a layer whose sizes stay put
        is broadcast. That probe runs once per layer; its verdict is kept.
        """
        broadcast: dict[int, Unit] = {}
        unknown = []
        for c in calls:
            unit = c.unit
            if c.expanded:
                continue
            if c.in_size != n or c.out_size not in (n, None) or self._batched.get(id(unit.module)) is False:  # type: ignore[union-attr]
                broadcast[id(unit)] = unit  # type: ignore[assignment]
            elif n > 1 and id(unit.module) not in self._batched:  # type: ignore[union-attr]
                unknown.append(c)
        if unknown:
            seen = self._probe_one_sample(n, recorder)
            for c in unknown:
                unit = c.unit
                sizes = seen.get(id(unit.module))  # type: ignore[union-attr]
                if sizes is None:
                    continue  # not called on the probe (data-dependent): sizes decide, asked again next time
                follows = all(a == 1 and b in (1, None) for a, b in sizes)
                self._batched[id(unit.module)] = follows  # type: ignore[union-attr]
                if not follows:
                    broadcast[id(unit)] = unit  # type: ignore[assignment]
        for unit in broadcast.values():
            paths[unit.label] = "broadcast -> model"
        return list(broadcast.values())

    def _probe_one_sample(self, n: int, recorder: Recorder) -> Sizes:
        call = recorder.model_call
        if call is None:
            raise ValueError("samples: the model's forward was not seen, so layers that see the batch cannot be told "
                             "from layers broadcast over it; call the model the statistics were built on")
        one = Replay.of_model(self._model, call.args, call.kwargs, [], n)
        args = tuple(a.narrow(0, 0, 1) if d is not None else a for a, d in zip(one.args, one.arg_dims))
        kwargs = {k: v.narrow(0, 0, 1) if one.kwarg_dims[k] is not None else v for k, v in one.kwargs.items()}
        devices = sorted({p.device.index for p in self._params if p.device.type == "cuda"})
        with recorder.sizes() as seen:
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. reentrant checkpointing warns that nothing requires grad
                    self._model(*args, **kwargs)
                return seen
            except Exception as error:
                raise ValueError(
                    f"samples: to tell layers that see the batch from layers broadcast over it, the model is run once "
                    f"more on its first sample (every input with leading size {n} cut to 1), and that failed: "
                    f"{type(error).__name__}: {error}") from error


def expanded(call: Call, n: int) -> Call | None:
    """A broadcast call rewritten as a call over the batch, or None where it cannot be.

    A layer called on inputs shared by every sample (``wpe(arange(T))``, shape ``(T, C)`` or
    ``(1, T, C)``) whose output is added into a tensor of shape ``(n, T, C)`` has, for sample
    ``i``, the per-sample gradient of the same layer called on the same inputs with output
    gradient ``g[i]``, where ``g`` is the gradient the addition received. So the call is the
    layer run on its inputs repeated over a batch of ``n`` with output gradient ``g``: every
    registered formula and fallback then applies, and the check against the real gradient
    still decides (exact or refused)."""
    g = call.broadcast_grad
    if g is None or call.tap_failed or call.out_shape is None or len(call.grads) != 1 or g.dim() < 1 \
            or g.shape[0] != n or any(isinstance(v, torch.Tensor) for v in call.kwargs.values()):
        return None
    rest, shape = tuple(g.shape[1:]), call.out_shape
    if shape == rest:  # no batch dimension: one is added
        args = tuple(a.unsqueeze(0).expand(n, *a.shape) if isinstance(a, torch.Tensor) else a for a in call.args)
    elif len(shape) == len(g.shape) and shape[0] == 1 and shape[1:] == rest:  # a batch dimension of 1
        if any(isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != 1) for a in call.args):
            return None
        args = tuple(a.expand(n, *a.shape[1:]) if isinstance(a, torch.Tensor) else a for a in call.args)
    else:
        return None
    return Call(call.unit, args, call.kwargs, n, n, [g], expanded=True)
