"""Models written the way popular training code writes them, for the real-code tests.

``TinyGPT`` is nanoGPT's ``GPT`` as ``examples/_models.py`` copies it (token and position
embeddings, the position embedding of ``arange(T)`` broadcast over the batch, a LayerNorm module
of its own, causal attention through ``F.scaled_dot_product_attention``, a head tied to the token
embedding, ``forward(idx, targets) -> (logits, loss)`` over the targets that are not ``-1``), at a
tiny size by default.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _models import GPT as TinyGPT  # noqa: E402
from _models import GPTConfig as _GPTConfig  # noqa: E402

__all__ = ["GPTConfig", "TinyGPT"]


def GPTConfig(**overrides: object) -> _GPTConfig:  # noqa: N802 - stands for the config class
    """nanoGPT's config at the tests' tiny size (block 16, vocab 32, one layer, width 16, no dropout)."""
    sizes = dict(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    return _GPTConfig(**{**sizes, **overrides})  # type: ignore[arg-type]
