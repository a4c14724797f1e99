"""The examples in ``examples/`` run as a user runs them, each in its own process, tiny setting.

Each script's ``--check`` trains fixed windows in float64 and compares the weights with a
full-batch reference the script computes itself (one big batch per window, the framework's
plain step); the script exits 1 when they differ by more than its tolerance. A control test per
loop shows that the check catches a wrong count. Every mode runs once, and the planned and
monitored runs end with the noise scale they measured. A script's three runs (planned, monitor,
then the check, which switches the process to float64) are its ``main(argv)`` called in turn in
one process, as ``python <script> <args>`` calls it, so that the frameworks are imported once per
script; each run's output and exit code are its own. The processes of the tests selected run as
many at a time as there are cores (each on one thread), started when the first of them is
reached; each test asserts on its own run.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("nanogpt.py", "accelerate_lm.py", "lightning_lm.py", "transformers_trainer.py", "flax_lm.py")
CHECKED = re.compile(r"^check: (\d+) windows against the full batch, max \|w - w_ref\| = (\S+) \(tolerance (\S+)\) ok$",
                     re.MULTILINE)
NOISE_SCALE = re.compile(r"^noise_scale=(\S+) \(", re.MULTILINE)
TIMEOUT = 600  # seconds; a tiny run takes a few seconds of CPU, more on a loaded machine
CHECK = ("--check", "--dtype", "float64")
RUNS = (("--mode", "planned"), ("--mode", "monitor"), CHECK)  # the check last: it sets float64 for the process
BEGIN, END = "=== gradaccum example run: ", "=== gradaccum example exit: "
EVERY_RUN = """
import sys, traceback
import {module}
for argv in {runs!r}:
    print({begin!r} + " ".join(argv), flush=True)
    try:
        {module}.main(list(argv))
        code = 0
    except SystemExit as done:  # the exit status the interpreter would make of it
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except Exception:
        traceback.print_exc(file=sys.stdout)
        code = 1
    sys.stderr.flush()
    print({end!r} + str(int(code)), flush=True)
"""


def run(*argv: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python examples/<script> <args>`` (or ``python -c code`` run from ``examples/``), one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", code, *argv] if code is not None else [sys.executable, *argv]
    return subprocess.run(command, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def command_of(item: pytest.Item) -> tuple[tuple[str, ...], str | None] | None:
    """The ``(argv, code)`` a test of this module runs through ``run``; None for one that runs none."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = getattr(item, "originalname", item.name)
    if name in ("test_fixed_windows_equal_the_full_batch_in_float64",
                "test_every_mode_runs_and_prints_its_noise_scale"):
        return (), EVERY_RUN.format(module=params["script"].removesuffix(".py"), runs=RUNS, begin=BEGIN, end=END)
    if name == "test_the_check_fails_when_the_count_is_wrong":
        return (), WRONG_COUNT.format(module=params["module"], what=params["what"], body=params["body"])
    return None


@pytest.fixture(scope="module")
def launched(request: pytest.FixtureRequest) -> Iterator[dict[tuple[tuple[str, ...], str | None], Future]]:
    """Every run the selected tests of this module need, started now, one per core at a time, in
    the tests' order (a test then waits for its own run only)."""
    wanted = [c for item in request.session.items if item.module is sys.modules[__name__]
              if (c := command_of(item)) is not None]
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        futures = {c: pool.submit(run, *c[0], code=c[1]) for c in dict.fromkeys(wanted)}
        yield futures
        for future in futures.values():
            future.cancel()  # those not started (a test failed with -x): not run at all


def result_of(launched: dict, request: pytest.FixtureRequest) -> subprocess.CompletedProcess[str]:
    """This test's run, started by ``launched`` (or here, if it was not)."""
    argv, code = command_of(request.node)
    future = launched.get((argv, code))
    return future.result() if future is not None else run(*argv, code=code)


def run_of(result: subprocess.CompletedProcess[str], argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """The run ``argv`` of a script's process (``EVERY_RUN``): its own output and exit code; the
    whole output and the process's exit code (1 if it was 0) when the run did not finish."""
    begin = result.stdout.find(BEGIN + " ".join(argv) + "\n")
    end = result.stdout.find(END, begin) if begin >= 0 else -1
    if end < 0:
        return subprocess.CompletedProcess(result.args, result.returncode or 1, result.stdout, result.stderr)
    code = int(result.stdout[end + len(END):].split("\n", 1)[0])
    return subprocess.CompletedProcess(result.args, code, result.stdout[begin:end], result.stderr)


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_fixed_windows_equal_the_full_batch_in_float64(script: str, launched: dict,
                                                       request: pytest.FixtureRequest) -> None:
    out = succeeded(run_of(result_of(launched, request), CHECK))
    match = CHECKED.search(out)
    assert match is not None, out[-2000:]
    windows, difference, tolerance = int(match[1]), float(match[2]), float(match[3])
    assert windows >= 3
    assert difference <= tolerance <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["planned", "monitor"])  # fixed mode is what --check runs
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_mode_runs_and_prints_its_noise_scale(script: str, mode: str, launched: dict,
                                                    request: pytest.FixtureRequest) -> None:
    out = succeeded(run_of(result_of(launched, request), ("--mode", mode)))
    found = NOISE_SCALE.findall(out)
    assert len(found) == 1, out[-2000:]
    value = float(found[0])
    assert not math.isnan(value) and value > 0, f"noise_scale={found[0]}"


WRONG_COUNT = """
import sys
import gradaccum
right = gradaccum.token_count
def wrong(labels, **kwargs):  # {what}
    {body}
gradaccum.token_count = wrong
sys.argv = [sys.argv[0], "--check"]
import {module}
{module}.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("module, what, body", [
    ("nanogpt", "every target, the ignored ones too: the mean of the micro-batches' means",
     "return labels.new_tensor(labels.numel())"),
    ("accelerate_lm", "labels != -100, each row's first label included (the model never predicts it)",
     "return right(labels, shift=False)"),
], ids=["nanogpt-mean-of-means", "accelerate-unshifted-count"])
def test_the_check_fails_when_the_count_is_wrong(module: str, what: str, body: str, launched: dict,
                                                 request: pytest.FixtureRequest) -> None:
    result = result_of(launched, request)
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert re.search(r"^check: .* FAILED$", result.stdout, re.MULTILINE), result.stdout[-2000:]


@pytest.mark.parametrize("argv, message", [
    (["--check", "--mode", "planned"], "--check compares fixed windows"),
    (["--check", "--dtype", "float32"], "--check runs in float64"),
])
def test_check_refuses_another_mode_or_dtype(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from _common import checked_args, parser
    finally:
        sys.path.remove(str(EXAMPLES))
    with pytest.raises(SystemExit) as exit_info:
        checked_args(parser("example"), argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
