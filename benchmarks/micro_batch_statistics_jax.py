"""What the JAX micro-batch statistics source costs: the fixed train step against the same
windows with the noise scale (or the per-element GSNR) measured, side by side in one process.

Every runner closes windows of ``k`` micro-batches with the jitted, donated train step
(``make_train_step(donate=True)``, AdamW): ``FixedSteps(k)``; ``NoiseScalePlanner`` pinned to
``k`` micro-batches (``min_batch = max_batch``) on the micro-batch source (norm statistics, no
parameter-sized buffer); ``GSNRPlanner`` pinned the same way on the micro-batch source
(per-element variance, one parameter-sized buffer); with ``--per-sample``, the noise-scale
planner on the per-sample source too. Rounds interleave the runners (their order rotating); each
ratio is the median over rounds of the per-round ratio, with the interval between the 25th and
75th percentiles of those ratios. Written as JSON beside the printed table.

    python benchmarks/micro_batch_statistics_jax.py [--rounds 15] [--windows 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradaccum import FixedSteps, GSNRPlanner, NoiseScalePlanner
from gradaccum.jax import AccumulatingTrainState, make_train_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from _rounds import interleaved_seconds  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from flax_lm import TransformerConfig, TransformerLM, make_loss_fn  # noqa: E402  (lm1b's model, cut down)


class MLP(fnn.Module):
    """The 1.6M-parameter MLP 512-1024-1024-10."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = fnn.relu(fnn.Dense(1024)(x))
        return fnn.Dense(10)(fnn.relu(fnn.Dense(1024)(x)))


def mlp_case(m: int) -> tuple[Any, Callable, Callable[[np.random.Generator], dict]]:
    model = MLP()

    def loss_fn(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, batch["x"]), batch["y"])

    def batch(rng: np.random.Generator) -> dict:
        return {"x": rng.normal(size=(m, 512)).astype(np.float32), "y": rng.integers(0, 10, size=m)}

    return model.init(jax.random.key(0), jnp.zeros((1, 512)))["params"], loss_fn, batch


def lm_case(m: int) -> tuple[Any, Callable, Callable[[np.random.Generator], dict]]:
    """lm1b's decoder-only LM (examples/flax_lm.py): 2 layers, d 128, T 64, vocabulary 256."""
    config = TransformerConfig(vocab_size=256, emb_dim=128, num_heads=4, num_layers=2, qkv_dim=128, mlp_dim=512,
                               max_len=64, deterministic=True)
    model = TransformerLM(config)

    def batch(rng: np.random.Generator) -> dict:
        return {"inputs": rng.integers(1, 256, size=(m, 64)).astype(np.int32)}

    params = model.init(jax.random.key(0), jnp.ones((1, 64), jnp.int32))["params"]
    return params, make_loss_fn(model), batch


CASES = {  # name: (case maker, micro-batch, k)
    "MLP 512-1024-1024-10, micro-batch 64 x 4": (mlp_case, 64, 4),
    "lm1b-style LM 2 layers, d 128, T 64, micro-batch 16 x 4": (lm_case, 16, 4),
}


def runner(params: Any, loss_fn: Callable, rule: Any, data: list[dict]) -> Callable[[], None]:
    """A closure running ``data`` through a donated train step under ``rule``, waited for."""
    step = make_train_step(loss_fn, donate=True)
    holder = [AccumulatingTrainState.create(apply_fn=None, params=jax.tree.map(jnp.copy, params),
                                            tx=optax.adamw(1e-4), rule=rule)]

    def run() -> None:
        state = holder[0]
        for batch in data:
            state, _ = step(state, batch)
        holder[0] = jax.block_until_ready(state)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--windows", type=int, default=10, help="windows per timed round")
    parser.add_argument("--per-sample", action="store_true", help="also time the per-sample source")
    parser.add_argument("--out", default="benchmarks/results/micro_batch_statistics_jax.json")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}\n")
    names = ["micro-batch norms", "micro-batch per element"] + (["per-sample norms"] if args.per_sample else [])
    print("| model | fixed ms/window | " + " | ".join(f"{n} / fixed [IQR]" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    results = []
    for name, (make, m, k) in CASES.items():
        params, loss_fn, make_batch = make(m)
        rng = np.random.default_rng(0)
        data = [make_batch(rng) for _ in range(k * args.windows)]
        pinned = dict(min_batch=k * m, max_batch=k * m, micro_batch=m)
        rules = [FixedSteps(k), NoiseScalePlanner(c=1.0, **pinned, source="micro_batch"),
                 GSNRPlanner(tau=2.0, **pinned, source="micro_batch")]
        if args.per_sample:
            rules.append(NoiseScalePlanner(c=1.0, **pinned, source="per_sample"))
        runners = [runner(params, loss_fn, rule, data) for rule in rules]
        times = interleaved_seconds(runners, args.rounds, args.windows)
        row: dict[str, Any] = {"model": name, "fixed_ms_per_window": 1e3 * statistics.median(times[0]),
                               "rounds": args.rounds, "windows_per_round": args.windows}
        cells = []
        for j, label in enumerate(names, 1):
            ratios = [t / f for t, f in zip(times[j], times[0])]
            q = statistics.quantiles(ratios, n=4)
            key = label.replace("-", "_").replace(" ", "_")
            row[f"{key}_over_fixed"] = statistics.median(ratios)
            row[f"{key}_iqr"] = [q[0], q[2]]
            cells.append(f"{statistics.median(ratios):.3f}x [{q[0]:.3f}, {q[2]:.3f}]")
        results.append(row)
        print(f"| {name} | {row['fixed_ms_per_window']:.1f} | " + " | ".join(cells) + " |", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"command": " ".join(["python benchmarks/micro_batch_statistics_jax.py", *sys.argv[1:]]),
                   "jax": jax.__version__, "platform": jax.devices()[0].platform, "results": results}, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
