"""Transformers (issue 15): PlannedTrainer trains a real (tiny, float64) GPT-2 with windows a
planner sizes: each window equals the full-batch AdamW step (clipping, the linear schedule over
samples, -100 labels), the records and the Trainer's logs agree, a noise-scale planner's
statistics equal the per-sample loop, and a resumed run ends where the uninterrupted one does."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from gradaccum import GSNR, BatchRamp, NoiseScalePlanner
from gradaccum.integrations.transformers import PlannedTrainer

LR, CLIP, LENGTH, VOCAB = 0.01, 0.5, 10, 32


def model() -> GPT2LMHeadModel:
    """GPT-2 from a config (tied head, no dropout), float64 throughout (Llama's RMSNorm computes
    in float32 whatever the dtype, which would leave 1e-8 of rounding in any comparison)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config).double()


def dataset(n: int = 21, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token sequences with about a quarter of the labels -100 (left out of the loss), the first
    always: nothing predicts it, and the Trainer counts GPT-2's items over the unshifted labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        labels = ids.clone()
        labels[torch.rand(LENGTH, generator=g) < 0.25] = -100
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_loss(outputs, labels, num_items_in_batch=None):
    """The shifted token cross-entropy summed in float64 over the labels that count, divided by
    ``num_items_in_batch`` (the Trainer's count over the window): Llama's own loss upcasts the
    logits to float32 (GPT-2's too), which would hide a wrong gradient below its rounding."""
    logits = outputs["logits"][:, :-1]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum())


class InOrder(PlannedTrainer):
    """The data in order, so that the reference can take the same windows."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def arguments(tmp_path, **kwargs) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_train_epochs=1,
                  learning_rate=LR, max_grad_norm=CLIP, optim="sgd", logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    values.update(kwargs)
    return TrainingArguments(**values)


def ramp() -> BatchRamp:
    """Windows of 1, 2, 2, 3, then 4 micro-batches (unit "steps")."""
    return BatchRamp(start=2, end=8, over=4, micro_batch=2, unit="steps")


def full_batch_steps(net: GPT2LMHeadModel, data: list, windows: list[list[int]], total: int,
                     clip: float | None = CLIP, micro: int = 2) -> GPT2LMHeadModel:
    """One SGD step per window of sample indices on the window's mean token loss, clipped,
    with the linear schedule at the micro-batches (of ``micro`` samples) taken before the window
    (of ``total``)."""
    reference = copy.deepcopy(net)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    taken = 0
    for window in windows:
        for group in optimizer.param_groups:
            group["lr"] = LR * max(0.0, (total - taken) / total)
        batch = {k: torch.stack([data[i][k] for i in window]) for k in ("input_ids", "labels")}
        optimizer.zero_grad()
        token_loss(reference(input_ids=batch["input_ids"]), batch["labels"]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        optimizer.step()
        taken += math.ceil(len(window) / micro)
    return reference


def windows_of(history, n: int, micro: int = 2) -> list[list[int]]:
    out, start = [], 0
    for record in history:
        stop = min(start + record.micro_batches * micro, n)
        out.append(list(range(start, stop)))
        start = stop
    return out


def test_planned_windows_equal_the_full_batch_steps_in_float64(tmp_path) -> None:
    data = dataset()
    net = model()
    initial = copy.deepcopy(net)
    trainer = InOrder(model=net, args=arguments(tmp_path), train_dataset=data, compute_loss_func=token_loss, planner=ramp())
    trainer.train()
    # 11 micro-batches (the last of one sample): windows 1, 2, 2, 3 and the 3 left of a planned 4
    assert [r.micro_batches for r in trainer.history] == [1, 2, 2, 3, 3]
    assert [r.reason for r in trainer.history] == ["rule"] * 4 + ["flush"]
    assert trainer.state.global_step == 5
    windows = windows_of(trainer.history, len(data))
    for record, window in zip(trainer.history, windows):  # items: the labels that count, shifted
        assert record.items == sum(int((data[i]["labels"][1:] != -100).sum()) for i in window)
    reference = full_batch_steps(initial, data, windows, total=11)
    for ours, theirs in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["gradaccum/micro_batches"] for entry in logged] == [1, 2, 2, 3, 3]
    # the schedule runs over micro-batches: before the last window 8 of 11 were taken
    assert logged[-1]["learning_rate"] == pytest.approx(LR * 3 / 11, rel=1e-12)
    assert trainer.state.epoch == pytest.approx(1.0)


def per_sample_norm_terms(net: GPT2LMHeadModel, data: list, window: list[int]) -> tuple[float, float]:
    """tr(Sigma) and |G|^2 of a window from each sequence's gradient of its summed token loss, by
    a loop (the unbiased estimates, docs/design.md "Noise scale")."""
    grads = []
    for i in window:
        net.zero_grad()
        labels = data[i]["labels"][None]
        token_loss(net(input_ids=data[i]["input_ids"][None]), labels, num_items_in_batch=1).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    g = torch.stack(grads)
    n = len(window)
    total = float((g * g).sum())
    squared_sum = float(g.sum(0).square().sum())
    trace = (total - squared_sum / n) / (n - 1)
    return trace, (squared_sum / n - trace) / n


def test_a_noise_scale_planner_reads_statistics_equal_to_the_per_sample_loop(tmp_path) -> None:
    data = dataset(16)
    net = model()
    initial = copy.deepcopy(net)
    planner = NoiseScalePlanner(1.0, min_batch=4, max_batch=8, micro_batch=2)
    trainer = InOrder(model=net, args=arguments(tmp_path, max_grad_norm=0.0), train_dataset=data, compute_loss_func=token_loss, planner=planner)
    trainer.train()
    first = trainer.history[0]
    assert first.micro_batches == 2  # min_batch before anything is measured
    trace, squared = per_sample_norm_terms(initial, data, list(range(4)))
    assert first.info["trace"] == pytest.approx(trace, rel=1e-11)
    assert first.info["squared_norm"] == pytest.approx(squared, rel=1e-9)
    # the next plan is the planner's own from what was recorded
    assert trainer.history[1].micro_batches == planner.plan(trainer.history[:1])
    reference = full_batch_steps(initial, data, windows_of(trainer.history, len(data)), total=8, clip=None)
    for ours, theirs in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path) -> None:
    data = dataset(29)

    def run(output, resume=None):
        net = model()
        args = arguments(tmp_path, output_dir=str(tmp_path / output), num_train_epochs=2, save_strategy="steps",
                         save_steps=3)
        trainer = PlannedTrainer(model=net, args=args, train_dataset=data, compute_loss_func=token_loss, planner=ramp())
        trainer.train(resume_from_checkpoint=resume)
        return net, trainer

    whole, uninterrupted = run("a")
    resumed_net, resumed = run("a", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert [r.micro_batches for r in resumed.history] == [r.micro_batches for r in uninterrupted.history]
    assert resumed.state.global_step == uninterrupted.state.global_step
    for a, b in zip(whole.parameters(), resumed_net.parameters()):
        assert torch.equal(a, b)


def test_what_cannot_work_is_refused_by_name(tmp_path) -> None:
    data = dataset(8)
    with pytest.raises(ValueError, match="planner: GSNR is not a planner"):
        PlannedTrainer(model=model(), args=arguments(tmp_path), train_dataset=data, compute_loss_func=token_loss, planner=GSNR(1.0, increment=2))
    for kwargs, name in (({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
                         ({"max_steps": 5}, "max_steps"),
                         ({"per_device_train_batch_size": 4}, "planner.micro_batch"),
                         ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "reduce_lr_on_plateau")):
        with pytest.raises(ValueError, match=name):
            PlannedTrainer(model=model(), args=arguments(tmp_path, **kwargs), train_dataset=data, compute_loss_func=token_loss, planner=ramp())


DDP_SAMPLES = 24  # 12 micro-batches of 2: 6 per process, none padded


def ddp_ramp() -> BatchRamp:
    """Windows of 1, 2, 2, then 3 micro-batches per process (4 samples per global micro-batch)."""
    return BatchRamp(start=4, end=16, over=4, micro_batch=4, unit="steps")


def rank_samples(rank: int, micro_batches: range) -> list[int]:
    """Accelerate shards the in-order batches of 2 round-robin: process r's micro-batch j holds
    samples 4j + 2r and 4j + 2r + 1."""
    return [4 * j + 2 * rank + k for j in micro_batches for k in range(2)]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_stepping_on_both(tmp_path) -> None:
    from .test_ddp import run_two_ranks

    ranks = run_two_ranks(tmp_path, "transformers")
    assert [r["micro_batches"] for r in ranks[0]["history"]] == [1, 2, 2, 1]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    data = dataset(DDP_SAMPLES)
    windows, start = [], 0
    for record in ranks[0]["history"]:
        windows.append(list(range(4 * start, 4 * (start + record["micro_batches"]))))
        start += record["micro_batches"]
    # the items of a window are both processes' (num_items_in_batch is gathered)
    assert [r["items"] for r in ranks[0]["history"]] == [sum(int((data[i]["labels"] != -100).sum()) for i in w)
                                                         for w in windows]
    reference = full_batch_steps(model(), data, windows, total=6, micro=4)
    for rank in ranks:
        for ours, theirs in zip(rank["params"], reference.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_under_ddp_the_noise_terms_pool_each_process_norm_sums(tmp_path) -> None:
    """Each process's per-sample norms and |S1_r|^2, added over the processes (one all-reduce of
    five scalars): the pooled unbiased estimates, equal to the loop's over each process's samples."""
    from gradaccum._core.noise_scale import NormSums, pooled_terms

    from .test_ddp import run_two_ranks

    ranks = run_two_ranks(tmp_path, "transformers_noise")
    first = ranks[0]["history"][0]
    assert first["micro_batches"] == 2 and first["samples"] == 8
    net, data = model(), dataset(DDP_SAMPLES)
    total = NormSums(0.0, 0.0, 0.0, 0.0, 0.0)
    for rank in range(2):
        grads = []
        for i in rank_samples(rank, range(2)):
            net.zero_grad()
            token_loss(net(input_ids=data[i]["input_ids"][None]), data[i]["labels"][None], 1).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        g = torch.stack(grads)
        total = total + NormSums.of(len(grads), float((g * g).sum()), float(g.sum(0).square().sum()))
    pooled = pooled_terms(total)
    for rank in ranks:
        assert rank["history"][0]["info"]["trace"] == pytest.approx(pooled.trace, rel=1e-11)
        assert rank["history"][0]["info"]["squared_norm"] == pytest.approx(pooled.squared_norm, rel=1e-9)
    assert [r["micro_batches"] for r in ranks[0]["history"]] == [r["micro_batches"] for r in ranks[1]["history"]]
    windows, start = [], 0
    for record in ranks[0]["history"]:
        windows.append(list(range(4 * start, 4 * (start + record["micro_batches"]))))
        start += record["micro_batches"]
    reference = full_batch_steps(model(), data, windows, total=6, clip=None, micro=4)
    for rank in ranks:
        for ours, theirs in zip(rank["params"], reference.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


def test_evaluation_runs_every_eval_steps_windows(tmp_path) -> None:
    """eval_steps counts windows (Trainer steps): evaluations after windows 2 and 4 of 5, each on
    the weights of that step, logged with the window's step."""
    data = dataset()
    held_out = dataset(6, seed=1)
    net = model()
    trainer = InOrder(model=net, args=arguments(tmp_path, eval_strategy="steps", eval_steps=2,
                                                per_device_eval_batch_size=3),
                      train_dataset=data, eval_dataset=held_out, compute_loss_func=token_loss, planner=ramp())
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    final = trainer.evaluate()  # the Trainer's eval loss: the mean of its batches' losses
    losses = []
    with torch.no_grad():
        for start in (0, 3):
            batch = {k: torch.stack([d[k] for d in held_out[start:start + 3]]) for k in ("input_ids", "labels")}
            losses.append(float(token_loss(net(input_ids=batch["input_ids"]), batch["labels"])))
    assert final["eval_loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
