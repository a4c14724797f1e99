"""The `gradaccum` command: reproduce, tune, train, report, plan, demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, cast


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


EXPERIMENT_MODULES = {"optuna", "matplotlib", "scipy", "mnist1d", "sqlalchemy", "alembic", "tqdm", "torch"}


TUNING_RANGES = tuple(f"{name}_{end}" for name in ("lr", "tau", "tau_mean", "theta", "ramp", "c")
                      for end in ("low", "high"))
"""Settings only tuning reads: ``train`` takes the values themselves (``--lr``, ``--tau``, ...)."""


def _field_default(f: Field[Any]) -> Any:
    """The default a config field takes when no flag or YAML sets it (its value or its factory's)."""
    if f.default is not MISSING:
        return f.default
    if callable(f.default_factory):
        return f.default_factory()
    raise TypeError(f"ExperimentConfig.{f.name} has no default: every setting needs one for its flag's help")


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per ExperimentConfig field (the YAML names, with dashes)."""
    from .experiments.config import ExperimentConfig

    parser.add_argument("--config", type=Path, help="YAML file with any of the settings below")
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests (2 trials, 2 seeds, "
                        "6,400 samples); explicit flags still win")
    for f in fields(ExperimentConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = _field_default(f)
        text = f"{f.metadata['help']} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=text)
        elif f.type in ("list", list):
            parser.add_argument(flag, nargs="+", choices=f.metadata["choices"], default=None, help=text)
        elif f.type in ("int", int):
            parser.add_argument(flag, type=int, default=None, help=text)
        elif f.type in ("float", float):
            parser.add_argument(flag, type=float, default=None, help=text)
        else:
            parser.add_argument(flag, type=str, default=None, choices=f.metadata.get("choices"), help=text)


def _config(args: argparse.Namespace, **fixed: Any):
    from .experiments.config import ExperimentConfig

    names = {f.name for f in fields(ExperimentConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    overrides.update(fixed)
    if args.config is not None:
        if args.quick:
            quick = ExperimentConfig.quick().to_dict()
            base = ExperimentConfig.from_yaml(args.config).to_dict()
            small = ("trials", "seeds", "lm_seeds", "budget", "eval_every", "front_trials", "lm_budget")
            return ExperimentConfig(**{**base, **{k: quick[k] for k in small}, **overrides})
        return ExperimentConfig.from_yaml(args.config, **overrides)
    return ExperimentConfig.quick(**overrides) if args.quick else ExperimentConfig(**overrides)


def _reproduce(args: argparse.Namespace) -> int:
    from .experiments.report import load_results, summarize
    from .experiments.reproduce import reproduce, up_to_date

    cfg = _config(args)
    if not args.force and up_to_date(cfg):
        print(f"gradaccum reproduce: nothing to do: {cfg.out} holds every section ({', '.join(cfg.sections)}) with "
              f"these settings and its report ({Path(cfg.out) / 'report.md'}); --force recomputes them")
        return 0
    out = reproduce(cfg, force=args.force, quick=args.quick)
    if "reference" not in cfg.sections:
        print(f"\nreport: {out / 'report.md'}")
        return 0
    summary = summarize(load_results(out), {})
    print("\nbest settings, test accuracy over seeds:")
    for arm, s in summary.items():
        tuned = ", ".join(f"{k}={v:.4g}" for k, v in s["params"].items())
        print(f"  {arm:12s} {100 * s['test_mean']:.2f} ± {100 * s['test_std']:.2f} %  ({tuned}; "
              f"mean effective batch {s['mean_batch']:.0f})")
    print(f"\nreport: {out / 'report.md'}\nresults: {out / 'results.json'}, {out / 'runs.csv'}; plots: {out}/*.png")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .experiments.reproduce import prepare_output
    from .experiments.tuning import completed, open_study, tune_arm

    cfg = _config(args, arms=[args.arm])
    _, data = prepare_output(cfg)
    done = min(completed(open_study(args.arm, cfg)), cfg.trials)
    with tqdm(total=cfg.trials, initial=done, desc=f"{args.arm}: complete trials", disable=cfg.quiet,
              file=sys.stderr) as bar:
        study = tune_arm(args.arm, cfg, data, on_trial=lambda complete: bar.update(min(complete, cfg.trials) - bar.n))
    print(f"{args.arm}: best final validation accuracy {study.best_value:.4f} with {study.best_trial.params} "
          f"(storage {cfg.storage_url})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .experiments.arms import PARAMETERS, check_params
    from .experiments.errors import SettingsError
    from .experiments.files import write_atomic
    from .experiments.reproduce import prepare_output
    from .experiments.run_record import progress
    from .experiments.runs import train_run

    cfg = _config(args, arms=[args.arm])
    if not (args.lr > 0 and args.lr < float("inf")):
        raise SettingsError(f"lr must be a positive finite number, got {args.lr}")
    given = {"lr": args.lr, **{name: getattr(args, name) for name in PARAMETERS if getattr(args, name) is not None}}
    try:
        params = check_params(args.arm, given, flags=True)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    out, data = prepare_output(cfg)
    with tqdm(total=cfg.budget, desc=f"{args.arm}: training samples", unit="sample", disable=cfg.quiet,
              file=sys.stderr) as bar, progress(bar.update):
        result = train_run(args.arm, params, cfg.seed, data, cfg)
    path = out / f"train-{args.arm}-seed{cfg.seed}.json"
    write_atomic(path, json.dumps(result.as_dict(), indent=1) + "\n")
    if result.diverged:
        print(f"{args.arm}: the run diverged (a non-finite loss or gradient) after {result.steps} steps: try a "
              f"smaller --lr; test accuracy at that point {result.test_accuracy:.4f} -> {path}")
        return 1
    batches = result.batch_sizes or [result.flushed_items]
    mean_batch = sum(batches) / len(batches)
    print(f"{args.arm}: test accuracy {result.test_accuracy:.4f}, final validation {result.final_val_accuracy:.4f}, "
          f"{result.steps} steps, mean effective batch {mean_batch:.0f}, {result.wall_seconds:.1f} s -> {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiments.report import write_full_report

    out = Path(args.out)
    sections = write_full_report(out)
    print(f"rebuilt {out / 'report.md'} ({', '.join(sections)}) and its tables and plots")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .experiments.plan import plan

    result = plan(args.model, args.effective_batch, args.max_memory, args.start, args.max_size, args.probes,
                  args.timeout)
    # plan() returns a dict[str, object] of a fixed layout: these two entries' types
    probed = cast(list[int], result["probed"])
    peak_range = cast("tuple[float, float] | None", result["peak_memory_mib_range"])
    low, high = peak_range or (float("nan"), float("nan"))
    spread = (f"{len(probed)} probes gave {', '.join(map(str, probed))}; the smallest is used. "
              if len(set(probed)) > 1 else f"{len(probed)} probes agreed. ")
    print(f"micro-batch {result['micro_batch']} (peak memory {low:.1f}-{high:.1f} MiB of {args.max_memory:g} MiB); "
          f"effective batch {args.effective_batch} = {result['micro_batches_per_window']} micro-batches "
          f"{result['sizes']}: Accumulator(..., FixedSteps({result['micro_batches_per_window']}))")
    print(f"{spread}The peak is measured in child processes and depends on this machine's state (free memory "
          "the allocator holds is reused without raising it): rerun on the machine that trains, and leave a margin.")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    result = run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, quiet=args.quiet)
    print("accumulated vs full-batch gradient, float64: max abs difference "
          f"{result['max_abs_error_vs_full_batch_float64']:.2e}")
    print(f"trained {result['optimizer_steps']} steps of effective batch {result['effective_batch']} "
          f"(micro-batch {result['micro_batch']}): test accuracy {result['test_accuracy']:.3f}")
    print(f"wrote {Path(args.out) / 'demo.json'}")
    return 0


def _plot_monitor(args: argparse.Namespace) -> int:
    from .experiments.monitor_plot import plot_monitor

    path = Path(args.csv)
    out = plot_monitor(path, Path(args.out) if args.out else path.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def _critical_batch(args: argparse.Namespace) -> int:
    from .experiments.config import ExperimentConfig
    from .experiments.critical_batch_section import run_critical_batch_section
    from .experiments.workers import executor, one_thread

    cfg = ExperimentConfig(out=args.out, data_dir=args.data_dir, workers=args.workers, seed=args.seed)
    with one_thread(), executor(cfg.processes) as pool:
        results = run_critical_batch_section(args.task, cfg, pool, Path(args.out), quick=args.quick)
    for c in results["checkpoints"]:
        online = ", ".join(f"{k} {v['b_simple']:.0f}" for k, v in c["online"].items())
        fitted = c.get("refused") or (f"B_noise {c['b_noise']:.0f}" + (
            " [{:.0f}, {:.0f}]".format(*c["b_noise_interval"]) if c["b_noise_interval"] else "")
            + f", Zhang {c['b_zhang']:.0f}")
        print(f"step {c['step']}: {fitted}; online B_simple: {online}")
    print(f"wrote {Path(args.out) / f'critical_batch_{args.task}'}.json, .csv, .png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser; no flag is matched by a prefix of its name (``--c`` once matched ``--config``
    or was "ambiguous"), so every flag means exactly what it says."""
    from .experiments.arms import ARM_TABLE, ARMS, PARAMETERS

    parser = argparse.ArgumentParser(prog="gradaccum", description="Exact and adaptive gradient accumulation.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    reproduce = sub.add_parser("reproduce", allow_abbrev=False, help="tune baseline and GAGA with Optuna on mnist1d, "
                               "train the best settings over seeds, write the report")
    _add_config_flags(reproduce)
    reproduce.add_argument("--force", action="store_true", help="recompute the chosen sections and their final runs "
                           "(by default a finished section, or final run, with the same settings is reused, and a "
                           "finished reproduce is not run again)")
    reproduce.set_defaults(func=_reproduce)

    tune = sub.add_parser("tune", allow_abbrev=False, help="run (or resume, or join) one arm's Optuna study")
    tune.add_argument("--arm", required=True, choices=ARMS)
    _add_config_flags(tune, skip=("arms",))
    tune.set_defaults(func=_tune)

    train = sub.add_parser("train", allow_abbrev=False, help="one training run with given settings")
    train.add_argument("--arm", required=True, choices=ARMS)
    train.add_argument("--lr", type=float, required=True, help="Adam learning rate")
    for name, (text, _) in PARAMETERS.items():
        users = [arm for arm, spec in ARM_TABLE.items() if name in spec.space]
        train.add_argument("--" + name, type=float, help=f"{text} (arms {', '.join(users)}; refused by the others)")
    _add_config_flags(train, skip=("arms", "trials", "seeds", "storage", "n_jobs", "front_trials", "front_points",
                                    "lm_seeds", "workers", "lm_budget", "lm_scale", *TUNING_RANGES))
    train.set_defaults(func=_train)

    report = sub.add_parser("report", allow_abbrev=False,
                            help="rebuild report.md, runs.csv and plots from saved results.json")
    report.add_argument("--out", default="gradaccum-out/reproduce", help="the results directory (default: %(default)s)")
    report.set_defaults(func=_report)

    plan = sub.add_parser("plan", allow_abbrev=False,
                          help="the largest micro-batch within a memory budget, and the window plan")
    plan.add_argument("--model", default="snn", help="mlp, snn (built in) or module:function, a callable "
                      "step(m) running one forward and backward at micro-batch m (default: %(default)s)")
    plan.add_argument("--effective-batch", type=_positive_int, default=64, help="target effective batch "
                      "(default: %(default)s)")
    plan.add_argument("--max-memory", type=float, required=True, help="memory budget in MiB, measured per try "
                      "in a child process")
    plan.add_argument("--start", type=_positive_int, default=1, help="first micro-batch to try (default: 1)")
    plan.add_argument("--max-size", type=_positive_int, help="largest micro-batch to try (default: the "
                      "effective batch)")
    plan.add_argument("--probes", type=_positive_int, default=3, help="probes to run; the peak depends on the "
                      "machine's state, so their spread is reported and the smallest result used "
                      "(default: %(default)s)")
    plan.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds a try may take before the "
                      "probe stops with an error (default: %(default)s)")
    plan.set_defaults(func=_plan)

    monitor = sub.add_parser("plot-monitor", allow_abbrev=False,
                             help="plot the noise scale (and GSNR) a Monitor wrote to CSV")
    monitor.add_argument("csv", help="the CSV file gradaccum.torch.Monitor(..., csv=...) wrote")
    monitor.add_argument("--out", help="the PNG to write (default: the CSV's name with .png)")
    monitor.set_defaults(func=_plot_monitor)

    critical = sub.add_parser("critical-batch", allow_abbrev=False, help="the critical batch size measured by "
                              "branching from checkpoints, beside the online noise scale (docs/experiment.md)")
    critical.add_argument("--task", required=True, choices=("mnist1d", "lm"))
    critical.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    critical.add_argument("--out", default="gradaccum-out/critical-batch",
                          help="output directory (default: %(default)s)")
    critical.add_argument("--data-dir", default="gradaccum-out/data", help="the mnist1d cache (default: %(default)s)")
    critical.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    critical.add_argument("--seed", type=int, default=0, help="seed of the run the checkpoints come from")
    critical.set_defaults(func=_critical_batch)

    demo = sub.add_parser("demo", allow_abbrev=False,
                          help="check exactness and train a small model with accumulation")
    demo.add_argument("--out", default="gradaccum-out/demo", help="output directory (default: %(default)s)")
    demo.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


TRAINING = ("reproduce", "tune", "train", "demo", "critical-batch")
"""The commands that train: one thread each, as reproduce's workers, so a run gives the same
numbers whichever command (or worker) ran it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``), raised in the main thread so that the workers are ended and the pool's
    semaphores released on the way out, as for Ctrl-C (a default SIGTERM left them leaked)."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (in the main thread only; elsewhere nothing changes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .experiments.errors import SettingsError

    try:
        if args.command not in TRAINING:
            return int(args.func(args))
        from .experiments.workers import one_thread

        with _terminate_as_interrupt(), one_thread():
            return int(args.func(args))
    except SettingsError as error:  # bad settings, unwritable output, unreadable config, data or storage
        print(f"gradaccum {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or kill: one line, the shell's code for SIGINT (SIGTERM)
        resume = {"reproduce": " (rerun the same command to resume: finished trials and runs are kept)",
                  "tune": " (rerun the same command to resume: finished trials are kept)"}.get(args.command, "")
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"\ngradaccum {args.command}: {what}{resume}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except ModuleNotFoundError as error:  # the experiment stack is an optional extra
        if error.name is None or error.name.split(".")[0] not in EXPERIMENT_MODULES:
            raise
        print(f"gradaccum {args.command}: error: this command needs the experiments extra ({error.name} is "
              "missing): pip install -c constraints.txt -e '.[experiments]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
