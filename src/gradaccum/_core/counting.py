"""The item count of a language-model micro-batch: the positions its loss is a mean over.

The Accumulator's window is the mean over every item of the window, so each micro-batch's
``count`` must be exactly the number of terms its mean loss divided by. For a causal LM that
is the number of *predicted* labels, which depends on who shifts them:

- models that shift inside (Hugging Face ``*ForCausalLM(labels=input_ids)``): position ``t``
  predicts label ``t + 1``, so each row's first label is never predicted;
- models given the next tokens already (nanoGPT's ``targets``): every label that is not the
  ignore index counts.

Read the count from the micro-batch the loss was computed on, before anything that reuses
its buffers (nanoGPT's loop fetches the next batch into the same names right after the
forward: a count read after that is the next batch's).
"""

from __future__ import annotations

from typing import Any

import array_api_compat


def token_count(labels: Any, *, shift: bool = True, ignore_index: int = -100) -> Any:
    """The number of labels a causal LM's mean loss is over, as a 0-d integer array.

    Args:
      labels: integer labels of shape ``(..., T)`` (torch, JAX or NumPy).
      shift: True when the model shifts the labels itself (Hugging Face causal LMs given
        ``labels=input_ids``): the first label of each row is not counted. False when the
        labels are already the next tokens (nanoGPT's ``targets``).
      ignore_index: the label value the loss skips (-100 in Hugging Face and PyTorch's
        ``cross_entropy``; nanoGPT uses -1).

    Pass it to ``Accumulator.backward(loss, count)`` as it is: an integer tensor is read once
    the window needs it, with no extra synchronisation before the backward.
    """
    xp = array_api_compat.array_namespace(labels)
    if getattr(labels, "ndim", 0) < 1:
        raise ValueError(f"labels must have a sequence dimension (shape (..., T)), got shape {tuple(labels.shape)}")
    if xp.isdtype(labels.dtype, ("real floating", "complex floating", "bool")):
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    predicted = labels[..., 1:] if shift else labels
    return xp.sum(predicted != ignore_index)  # summed booleans: the default integer dtype
