"""Transformers: PlannedTrainer trains a real (tiny, float64) GPT-2 with fixed or planned windows:
fixed windows equal the native Trainer with gradient_accumulation_steps (the schedule over
optimizer steps, warmup, clipping, AdamW, the model's own loss); planned windows equal the
full-batch steps with the schedule over micro-batches; the records and the Trainer's logs
agree; a noise-scale planner's statistics equal the per-sample loop; a resumed run ends where
the uninterrupted one does, and a tampered checkpoint or an impossible plan is refused."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradaccum import GSNR, BatchRamp, FixedSteps, NoiseScalePlanner, NormTest
from gradaccum.integrations.transformers import PlannedTrainer

LR, CLIP, LENGTH, VOCAB = 0.01, 0.5, 10, 32


def model(layers: int = 2) -> GPT2LMHeadModel:
    """GPT-2 from a config (tied head, no dropout), float64 throughout."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config).double()


def dataset(n: int = 21, seed: int = 0, first_ignored: bool = True) -> list[dict[str, torch.Tensor]]:
    """Token sequences with about a quarter of the labels -100 (left out of the loss), with
    ``first_ignored`` the first always: nothing predicts it, and the native Trainer counts GPT-2's
    items over the unshifted labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        labels = ids.clone()
        labels[torch.rand(LENGTH, generator=g) < 0.25] = -100
        if first_ignored:
            labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_loss(outputs, labels, num_items_in_batch=None):
    """The shifted token cross-entropy summed in float64 over the labels that count, divided by
    ``num_items_in_batch`` (the Trainer's count over the window); the model returns logits only,
    as the per-sample statistics need of GPT-2 for now."""
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


def own_loss(net: GPT2LMHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """GPT-2's own loss of a whole window: its summed token loss over the labels it predicts."""
    items = (batch["labels"][:, 1:] != -100).sum()
    return net(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=items).loss


def full_batch_steps(net: GPT2LMHeadModel, data: list, windows: list[list[int]], total: int,
                     clip: float | None = CLIP, micro: int = 2, warmup: int = 0, loss=None) -> GPT2LMHeadModel:
    """One SGD step per window of sample indices on the window's mean token loss (``loss``:
    GPT-2's own by default), clipped, with the linear schedule (``warmup`` first) at the
    micro-batches (of ``micro`` samples) taken before the window (of ``total``)."""
    reference = copy.deepcopy(net)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    taken = 0
    for window in windows:
        factor = taken / warmup if taken < warmup else max(0.0, (total - taken) / (total - warmup))
        for group in optimizer.param_groups:
            group["lr"] = LR * factor
        batch = {k: torch.stack([data[i][k] for i in window]) for k in ("input_ids", "labels")}
        optimizer.zero_grad()
        if loss is None:
            own_loss(reference, batch).backward()
        else:
            loss(reference(input_ids=batch["input_ids"]), batch["labels"]).backward()
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


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, tolerance: float) -> None:
    for ours, theirs in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------------- fixed windows
def native_arguments(tmp_path, **kwargs) -> TrainingArguments:
    """AdamW, a linear schedule with warmup, clipping: the Trainer as people run it."""
    values = dict(optim="adamw_torch", warmup_steps=2, num_train_epochs=2)
    values.update(kwargs)
    return arguments(tmp_path, **values)


def logged_steps(trainer: Trainer) -> list[tuple[float, float, float]]:
    return [(e["learning_rate"], e["grad_norm"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


@pytest.mark.slow
def test_fixed_windows_equal_the_native_trainer_with_gradient_accumulation(tmp_path) -> None:
    """FixedSteps(3) over 11 micro-batches an epoch (the last of one sample), two epochs, GPT-2's
    own loss (float32 inside: equal only with the Trainer's arithmetic), AdamW, a linear schedule
    with 2 warmup steps, clipping, shuffled data: the native Trainer's weights, learning rates,
    gradient norms, losses and steps. The schedule counts optimizer steps (1.2e-3 off when it
    counted micro-batches); the last window of each epoch (2 micro-batches) is stepped."""
    data, initial = dataset(), model(layers=1)
    native_net, ours_net = copy.deepcopy(initial), copy.deepcopy(initial)
    native = Trainer(model=native_net, args=native_arguments(tmp_path, gradient_accumulation_steps=3),
                     train_dataset=data)
    native.train()
    ours = PlannedTrainer(model=ours_net, args=native_arguments(tmp_path), train_dataset=data, planner=FixedSteps(3))
    ours.train()
    assert_same_weights(ours_net, native_net, 1e-12)
    assert ours.state.global_step == native.state.global_step == 8
    assert [r.micro_batches for r in ours.history] == [3, 3, 3, 2] * 2
    assert [r.reason for r in ours.history] == ["rule", "rule", "rule", "flush"] * 2
    for got, want in zip(logged_steps(ours), logged_steps(native), strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    assert [lr for lr, _, _ in logged_steps(ours)][:3] == [0.0, LR / 2, LR]  # warmup_steps counts windows
    assert ours.state.epoch == native.state.epoch == 2.0


@pytest.mark.slow
def test_fixed_windows_with_max_steps_equal_the_native_trainer(tmp_path) -> None:
    """max_steps counts optimizer steps with fixed windows, as in the native Trainer: 4 windows
    of 2 micro-batches, the schedule sized by them."""
    data, initial = dataset(), model(layers=1)
    native_net, ours_net = copy.deepcopy(initial), copy.deepcopy(initial)
    native = Trainer(model=native_net, args=native_arguments(tmp_path, gradient_accumulation_steps=2, max_steps=4),
                     train_dataset=data)
    native.train()
    ours = PlannedTrainer(model=ours_net, args=native_arguments(tmp_path, max_steps=4), train_dataset=data,
                          planner=FixedSteps(2))
    ours.train()
    assert_same_weights(ours_net, native_net, 1e-12)
    assert ours.state.global_step == native.state.global_step == 4
    assert [r.micro_batches for r in ours.history] == [2] * 4
    for got, want in zip(logged_steps(ours), logged_steps(native), strict=True):
        assert got == pytest.approx(want, rel=1e-12)


def test_fixed_windows_can_schedule_over_samples(tmp_path) -> None:
    """schedule_over="samples" with FixedSteps(2): the schedule steps once per micro-batch (11
    an epoch, the last window of one), as for a planner."""
    data, net = dataset(), model(layers=1)
    initial = copy.deepcopy(net)
    trainer = InOrder(model=net, args=arguments(tmp_path), train_dataset=data, planner=FixedSteps(2),
                      schedule_over="samples")
    trainer.train()
    assert [r.micro_batches for r in trainer.history] == [2] * 5 + [1]
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([LR * (11 - t) / 11 for t in range(0, 11, 2)], rel=1e-12)
    assert_same_weights(net, full_batch_steps(initial, data, windows_of(trainer.history, len(data)), total=11), 1e-12)


# ---------------------------------------------------------------------- planned windows
def test_planned_windows_equal_the_full_batch_steps_in_float64(tmp_path) -> None:
    """A ramp with GPT-2's own loss, the schedule over micro-batches (3 warmup micro-batches),
    and first labels that count: the items are the labels the shifted loss predicts."""
    data = dataset(first_ignored=False)
    net = model()
    initial = copy.deepcopy(net)
    trainer = InOrder(model=net, args=arguments(tmp_path, warmup_steps=3), train_dataset=data, planner=ramp())
    trainer.train()
    # 11 micro-batches (the last of one sample): windows 1, 2, 2, 3 and the 3 left of a planned 4
    assert [r.micro_batches for r in trainer.history] == [1, 2, 2, 3, 3]
    assert [r.reason for r in trainer.history] == ["rule"] * 4 + ["flush"]
    assert trainer.state.global_step == 5
    windows = windows_of(trainer.history, len(data))
    for record, window in zip(trainer.history, windows):  # items: the labels that count, shifted
        assert record.items == sum(int((data[i]["labels"][1:] != -100).sum()) for i in window)
    reference = full_batch_steps(initial, data, windows, total=11, warmup=3)
    assert_same_weights(net, reference, 1e-12)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["gradaccum/micro_batches"] for entry in logged] == [1, 2, 2, 3, 3]
    # the schedule runs over micro-batches: the windows start after 0, 1, 3, 5 and 8 of 11
    factors = [0.0, 1 / 3, 1.0, 6 / 8, 3 / 8]
    assert [entry["learning_rate"] for entry in logged] == pytest.approx([LR * f for f in factors], rel=1e-12)
    assert trainer.state.epoch == pytest.approx(1.0)


def test_windows_end_with_each_epoch_and_every_one_is_stepped(tmp_path) -> None:
    """Two epochs of 11 micro-batches under the ramp: each epoch's last window is cut short by
    the data, stepped and counted in global_step (as the native Trainer steps at an epoch's end);
    no micro-batch is left out of a window."""
    data = dataset()
    trainer = InOrder(model=model(), args=arguments(tmp_path, num_train_epochs=2), train_dataset=data,
                      planner=ramp())
    trainer.train()
    sizes = [r.micro_batches for r in trainer.history]
    assert sizes == [1, 2, 2, 3, 3, 4, 4, 3]
    assert sum(sizes) == 22 and trainer.state.global_step == len(sizes)
    assert [r.reason for r in trainer.history] == ["rule"] * 4 + ["flush"] + ["rule"] * 2 + ["flush"]
    assert not any(r.skipped for r in trainer.history)


class TokenModel(torch.nn.Module):
    """A token model without a parameter broadcast over the batch (an embedding and a head
    per token), returning its own loss as HF causal LMs do: the shifted token cross-entropy
    summed and divided by ``num_items_in_batch``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(VOCAB, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, VOCAB, dtype=torch.float64)

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.head(torch.tanh(self.embedding(input_ids)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = token_loss(out, labels, num_items_in_batch)
        return out


def per_sample_norm_terms(net: torch.nn.Module, data: list, window: list[int]) -> tuple[float, float]:
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


@pytest.mark.parametrize("own", [False, True], ids=["compute_loss_func", "own_loss"])
def test_a_noise_scale_planner_reads_statistics_equal_to_the_per_sample_loop(tmp_path, own: bool) -> None:
    """GPT-2 returning logits to compute_loss_func, or a token model returning its own loss: the
    records' noise terms are in units of each sequence's summed loss, whatever the window's items."""
    data = dataset(16)
    net = TokenModel() if own else model()
    initial = copy.deepcopy(net)
    planner = NoiseScalePlanner(1.0, min_batch=4, max_batch=8, micro_batch=2, source="per_sample")
    trainer = InOrder(model=net, args=arguments(tmp_path, max_grad_norm=0.0), train_dataset=data,
                      compute_loss_func=None if own else token_loss, planner=planner)
    trainer.train()
    first = trainer.history[0]
    assert first.micro_batches == 2  # min_batch before anything is measured
    trace, squared = per_sample_norm_terms(initial, data, list(range(4)))
    assert first.info["trace"] == pytest.approx(trace, rel=1e-11)
    assert first.info["squared_norm"] == pytest.approx(squared, rel=1e-9)
    # the next plan is the planner's own from what was recorded
    assert trainer.history[1].micro_batches == planner.plan(trainer.history[:1])
    reference = full_batch_steps(initial, data, windows_of(trainer.history, len(data)), total=8, clip=None,
                                 loss=token_loss)
    assert_same_weights(net, reference, 1e-12)


def micro_batch_norm_terms(net: torch.nn.Module, data: list, micro_batches: list[list[int]]) -> tuple[float, float]:
    """tr(Sigma) and |G|^2 of a window from its micro-batches' gradients (each the sum of its
    sequences' gradients of their summed token loss), by a loop: ``sum_j |S_j|^2 / b_j - |S|^2 / n``
    over ``k - 1`` (docs/design.md, "Micro-batch statistics")."""
    sums = []
    for micro_batch in micro_batches:
        total = 0.0
        for i in micro_batch:
            net.zero_grad()
            labels = data[i]["labels"][None]
            token_loss(net(input_ids=data[i]["input_ids"][None]), labels, num_items_in_batch=1).backward()
            total = total + torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        sums.append(total)
    n, k = sum(len(m) for m in micro_batches), len(micro_batches)
    window = sum(sums)
    trace = (sum(float(s @ s) / len(m) for s, m in zip(sums, micro_batches)) - float(window @ window) / n) / (k - 1)
    return trace, float(window @ window) / n**2 - trace / n


@pytest.mark.parametrize("own", [False, True], ids=["compute_loss_func", "own_loss"])
def test_a_micro_batch_noise_scale_planner_reads_the_micro_batches_terms(tmp_path, own: bool) -> None:
    """NoiseScalePlanner(source="micro_batch") in PlannedTrainer: the first window's terms equal a
    float64 loop over its two micro-batches' gradients (units: one sequence's summed loss), every
    planned window has two or more micro-batches, and the next plan is the planner's own."""
    data = dataset(16)
    net = TokenModel() if own else model()
    initial = copy.deepcopy(net)
    planner = NoiseScalePlanner(1.0, min_batch=4, max_batch=8, micro_batch=2, source="micro_batch")
    trainer = InOrder(model=net, args=arguments(tmp_path, max_grad_norm=0.0), train_dataset=data,
                      compute_loss_func=None if own else token_loss, planner=planner)
    trainer.train()
    first = trainer.history[0]
    assert first.micro_batches == 2 and first.info["samples"] == 4
    trace, squared = micro_batch_norm_terms(initial, data, [[0, 1], [2, 3]])
    assert first.info["trace"] == pytest.approx(trace, rel=1e-10)
    assert first.info["squared_norm"] == pytest.approx(squared, rel=1e-9, abs=1e-12 * trace)
    assert all(r.micro_batches >= 2 for r in trainer.history if r.reason == "rule")
    assert trainer.history[1].micro_batches == planner.plan(trainer.history[:1])


def test_a_non_finite_loss_is_refused_not_stepped_on(tmp_path) -> None:
    """A NaN loss raises the Accumulator's NonFiniteError at its micro-batch (the Trainer would step
    on it): no window is applied."""
    from gradaccum.torch import NonFiniteError

    net = TokenModel()
    with torch.no_grad():
        net.head.bias[3] = math.nan
    initial = [p.detach().clone() for p in net.parameters()]
    trainer = PlannedTrainer(model=net, args=arguments(tmp_path), train_dataset=dataset(8), planner=FixedSteps(2))
    with pytest.raises(NonFiniteError):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(initial, net.parameters()) if not a.isnan().any())


# ---------------------------------------------------------------------- checkpoints
def resumable(tmp_path, planner, output: str = "a", data=None, **kwargs) -> PlannedTrainer:
    args = arguments(tmp_path, output_dir=str(tmp_path / output), num_train_epochs=2, save_strategy="steps",
                     save_steps=3, **kwargs)
    loss = token_loss if planner.needs_statistics else None  # GPT-2 returns logits to the statistics for now
    return PlannedTrainer(model=model(), args=args, train_dataset=data or dataset(29), compute_loss_func=loss,
                          planner=planner)


@pytest.mark.slow
@pytest.mark.parametrize("planner", [ramp, lambda: FixedSteps(3),
                                     lambda: NoiseScalePlanner(1.0, min_batch=2, max_batch=8, micro_batch=2)],
                         ids=["ramp", "fixed", "noise_scale"])
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, planner) -> None:
    uninterrupted = resumable(tmp_path, planner())
    uninterrupted.train()
    resumed = resumable(tmp_path, planner())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert [r.micro_batches for r in resumed.history] == [r.micro_batches for r in uninterrupted.history]
    assert [r.info for r in resumed.history] == [r.info for r in uninterrupted.history]
    assert resumed.state.global_step == uninterrupted.state.global_step
    for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def tampered(saved: dict) -> list[tuple[str, object, str]]:
    """(case, the file's new content, what the refusal names): the checkpoint after 3 windows of
    1, 2, 2 micro-batches, 15 micro-batches an epoch, 2 epochs."""
    def edited(**changes):
        return {**saved, **changes}

    def record(k, **changes):
        history = [dict(r) for r in saved["history"]]
        history[k].update(changes)
        return edited(history=history)

    return [
        ("negative position", edited(position=-5), r"'position' must be an int >= 0, got -5"),
        ("position past the epoch", edited(position=16), r"'position' is 16, past the epoch's 15"),
        ("position off the windows", edited(position=4), r"'history' holds 5 micro-batches"),
        ("epoch past the last", edited(epoch=2), r"'epoch' is 2, but this run trains 2 epoch"),
        ("emptied history", edited(history=[]), r"'history' holds 0 records for 'global_step' 3"),
        ("history not a list", edited(history="x"), r"'history' must be a list"),
        ("missing key", {k: v for k, v in saved.items() if k != "position"}, r"missing position"),
        ("unknown key", edited(extra=1), r"unknown extra"),
        ("not an object", [1, 2], r"must hold a JSON object"),
        ("negative items", record(1, items=-1000), r"'history\[1\]\['items'\]' must be an int >= 0"),
        ("no micro-batch", record(0, micro_batches=0), r"'history\[0\]\['micro_batches'\]' must be an int >= 1"),
        ("step out of place", record(2, step=7), r"'history\[2\]\['step'\]' must be 2"),
        ("record missing a key", edited(history=[{"step": 0}] + saved["history"][1:]), r"'history\[0\]' must be"),
        ("bad reason", record(0, reason="why"), r"'history\[0\]\['reason'\]' must be one of"),
        ("negative trace", record(0, info={"trace": -1e6}), r"'history\[0\]\['info'\]\['trace'\]' must be >= 0"),
        ("NaN squared norm", record(0, info={"trace": 1.0, "squared_norm": math.nan, "samples": 2}),
         r"'history\[0\]\['info'\]\['squared_norm'\]' must be finite"),
        ("float step", edited(global_step=3.0), r"'global_step' must be an int >= 0"),
        ("another checkpoint's step", edited(global_step=2, history=saved["history"][:2]),
         r"'global_step' is 2, but .*trainer_state.json is of step 3"),
    ]


@pytest.mark.slow
def test_a_tampered_or_malformed_checkpoint_state_is_refused_by_key_and_file(tmp_path) -> None:
    """gradaccum_planner.json: every value validated before anything is loaded (the model's
    weights unchanged by the refused call), the refusal naming the key and the file."""
    data = dataset(29)
    resumable(tmp_path, ramp(), data=data).train()
    folder = tmp_path / "a" / "checkpoint-3"
    path = folder / "gradaccum_planner.json"
    saved = json.loads(path.read_text())
    cases = [(case, json.dumps(content), match) for case, content, match in tampered(saved)]
    cases += [("not JSON", "{", r"not a gradaccum_planner.json written by PlannedTrainer"),
              ("not UTF-8", b"\xff\xfe".decode("latin-1"), r"not a gradaccum_planner.json")]
    for case, text, match in cases:
        path.write_text(text, encoding="latin-1" if case == "not UTF-8" else "utf-8")
        trainer = resumable(tmp_path, ramp(), data=data)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        with pytest.raises(ValueError, match=match) as error:
            trainer.train(resume_from_checkpoint=str(folder))
        assert str(path) in str(error.value), case
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())), case
    path.write_text(json.dumps(saved))
    resumable(tmp_path, ramp(), data=data).train(resume_from_checkpoint=str(folder))  # the real one resumes


# ---------------------------------------------------------------------- refusals
class Plans:
    """A planner whose plans are given: ``plans[k]`` for window ``k`` (the last one after)."""

    needs_statistics = False
    micro_batch = 2

    def __init__(self, *plans) -> None:
        self.plans = plans

    def plan(self, history) -> int:
        return self.plans[min(len(history), len(self.plans) - 1)]


@pytest.mark.parametrize("plan", [0, -1, 2.5, True], ids=["zero", "negative", "fraction", "bool"])
def test_a_plan_that_is_not_a_positive_int_is_refused(tmp_path, plan) -> None:
    """At construction for the first window; later, by train(), before the window that planned
    it is applied (no silent end of training after one window, no truncation of 2.5)."""
    with pytest.raises(ValueError, match=rf"Plans.plan\(history\) must return a positive int .*got {plan}"):
        PlannedTrainer(model=model(), args=arguments(tmp_path), train_dataset=dataset(8), planner=Plans(plan))
    net = model()
    initial = [p.detach().clone() for p in net.parameters()]
    trainer = PlannedTrainer(model=net, args=arguments(tmp_path), train_dataset=dataset(8), planner=Plans(1, plan))
    with pytest.raises((TypeError, ValueError), match="positive int"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(initial, net.parameters()))


def test_max_steps_set_after_construction_is_refused_by_train(tmp_path) -> None:
    net = model()
    initial = [p.detach().clone() for p in net.parameters()]
    trainer = PlannedTrainer(model=net, args=arguments(tmp_path), train_dataset=dataset(8), planner=ramp())
    trainer.args.max_steps = 5
    with pytest.raises(ValueError, match="max_steps=5"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(initial, net.parameters()))
    assert trainer.history == []


def test_what_cannot_work_is_refused_by_name(tmp_path) -> None:
    data = dataset(8)

    def build(planner=None, schedule_over=None, **kwargs):
        return PlannedTrainer(model=model(), args=arguments(tmp_path, **kwargs), train_dataset=data,
                              planner=ramp() if planner is None else planner, schedule_over=schedule_over)

    for rule in (GSNR(1.0, increment=2), NormTest(0.5)):
        with pytest.raises(ValueError, match=f"planner: {type(rule).__name__} is not a planner"):
            build(rule)
    for kwargs, name in (({"gradient_accumulation_steps": 2}, "FixedSteps"),
                         ({"max_steps": 5}, "max_steps"),
                         ({"num_train_epochs": 1.5}, "num_train_epochs=1.5"),
                         ({"per_device_train_batch_size": 4}, "planner.micro_batch"),
                         ({"fp16": True}, "fp16"),
                         ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "reduce_lr_on_plateau")):
        with pytest.raises(ValueError, match=name):
            build(**kwargs)
    with pytest.raises(ValueError, match="schedule_over='steps': the planner's windows vary"):
        build(schedule_over="steps")
    with pytest.raises(ValueError, match="schedule_over must be"):
        build(FixedSteps(2), schedule_over="windows")
    with pytest.raises(ValueError, match="max_steps=5: .* schedule is over samples"):
        build(FixedSteps(2), schedule_over="samples", max_steps=5)


# ---------------------------------------------------------------------- DDP, evaluation
DDP_SAMPLES = 24  # 12 micro-batches of 2: 6 per process, none padded


def ddp_ramp() -> BatchRamp:
    """Windows of 1, 2, 2, then 3 micro-batches per process (4 samples per global micro-batch)."""
    return BatchRamp(start=4, end=16, over=4, micro_batch=4, unit="steps")


def rank_samples(rank: int, micro_batches: range) -> list[int]:
    """Accelerate shards the in-order batches of 2 round-robin: process r's micro-batch j holds
    samples 4j + 2r and 4j + 2r + 1."""
    return [4 * j + 2 * rank + k for j in micro_batches for k in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory):
    """Both PlannedTrainer runs under DDP, once, on one pair of ranks (tests/_multi_worker.py)."""
    from .test_ddp import run_modes

    return run_modes(tmp_path_factory.mktemp("transformers_ddp"), ["transformers", "transformers_noise"])


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_stepping_on_both(two_ranks) -> None:
    ranks = two_ranks("transformers")
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
    reference = full_batch_steps(model(), data, windows, total=6, micro=4, loss=token_loss)
    for rank in ranks:
        for ours, theirs in zip(rank["params"], reference.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_under_ddp_the_noise_terms_pool_each_process_norm_sums(two_ranks) -> None:
    """Each process's per-sample norms and |S1_r|^2, added over the processes: the pooled
    unbiased estimates, equal to the loop's over each process's samples."""
    from gradaccum._core.noise_scale import NormSums, pooled_terms

    ranks = two_ranks("transformers_noise")
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
    reference = full_batch_steps(model(), data, windows, total=6, clip=None, micro=4, loss=token_loss)
    for rank in ranks:
        for ours, theirs in zip(rank["params"], reference.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


def test_evaluation_runs_every_eval_steps_windows(tmp_path) -> None:
    """eval_steps counts windows (Trainer steps): evaluations after windows 2 and 4 of 5, each on
    the weights of that step, logged with the window's step (the float64 loss: GPT-2's own is a
    float32 mean, which the Trainer's evaluation averages again in float32)."""
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
