"""Shared test helpers: run a script as a user would (subprocess, torchrun) or as its __main__ in
this process (run_here), and run a function in 2 gloo processes to compare distributed code with
one process."""

import contextlib
import io
import os
import pathlib
import pickle
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# A tiny but real training job: digits at 16 px, 3 steps an epoch, a small kNN bank, on the
# ResNet-18 with 1/8 of its channels (the plumbing is the same; 64x fewer multiply-adds).
BACKBONE = "resnet18-eighth"
TINY = [
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--batch-size",
    "32",
    "--steps-per-epoch",
    "3",
    "--workers",
    "0",
    "--knn-limit",
    "256",
    "--log-every",
    "1",
    "--backbone",
    BACKBONE,
]


# Disk: every tiny run still writes full ResNet-18 checkpoints (80-210 MB each), and pytest keeps
# every tmp_path until the session ends, so the suite used to leave 12 GB behind and failed with
# ENOSPC on a CI machine with less free disk. Weights are deleted as soon as the test (or module,
# for module-scoped runs) that made them is over; logs and metrics stay for reading a failure.
WEIGHTS = ("*.pt", "*.pt.*", "*.pth")


def drop_weights(folder):
    """Delete the weight files under `folder`."""
    for pattern in WEIGHTS:
        for f in pathlib.Path(folder).rglob(pattern):
            if f.is_file():
                f.unlink()


@pytest.fixture(autouse=True)
def _drop_weights_after_test(request):
    yield
    if "tmp_path" in request.fixturenames:
        drop_weights(request.node.funcargs["tmp_path"])


@pytest.fixture(autouse=True, scope="module")
def _drop_weights_after_module(tmp_path_factory):
    yield  # module-scoped runs live under the session's base folder; modules run one after another
    drop_weights(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True, scope="session")
def _reference_cache_in_tmp(tmp_path_factory):
    """interpret.py's random-init reference (common.random_init_knn) caches in $CLEANSSL_CACHE:
    the suite's in its own temporary folder, never the user's ~/.cache (scripts inherit it)."""
    before = os.environ.get("CLEANSSL_CACHE")
    os.environ["CLEANSSL_CACHE"] = str(tmp_path_factory.getbasetemp() / "cleanssl_cache")
    yield
    if before is None:
        os.environ.pop("CLEANSSL_CACHE", None)
    else:
        os.environ["CLEANSSL_CACHE"] = before


# The suite runs in 2 pytest-xdist workers (pyproject.toml's addopts), one per core: each worker
# and the scripts it starts then compute on one thread, so that the two workers share the 2 cores
# instead of fighting over them. Alone (-n 0), a test and its scripts use 2 threads.
THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
if THREADS == "1":
    torch.set_num_threads(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(env=None):
    """The environment a script runs in: this one, THREADS threads, `env` on top, and none of a
    process group's variables unless `env` sets them."""
    e = {**os.environ, "OMP_NUM_THREADS": THREADS, **(env or {})}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or k not in env:
            e.pop(k, None)
    return e


def run(args, timeout=300, env=None, check=True):
    """Run `python ARGS` in the repo; fail the test with its output when it fails."""
    p = subprocess.run(
        [sys.executable] + list(args),
        cwd=REPO,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        pytest.fail(
            f"python {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def run_here(args, env=None, check=True):
    """`run` without a new interpreter: the script as __main__ (runpy) in this process, with its
    argv, the environment `run` gives it and the repo as the working folder; its stdout, stderr and
    exit code returned as `run` returns them. A process start costs 2-3 s here (torch and
    torchvision's imports), as much as a tiny run; use it where a test reads what a run wrote or
    printed, and `run` where the process itself is under test (signals, a kill, an interpreter's
    exit). The state a script leaves behind is put back: environment, argv, working folder, torch's
    thread count, the stop-signal handlers and common's record of them."""
    import common

    script, *rest = args
    environ, argv, cwd, threads = dict(os.environ), sys.argv, os.getcwd(), torch.get_num_threads()
    caught, handlers = dict(common._caught), {s: signal.getsignal(s) for s in common.STOP_SIGNALS}
    inside = script_env(env)  # read from this environment, so before it is cleared
    os.environ.clear()
    os.environ.update(inside)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = [script] + list(rest)
    os.chdir(REPO)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            except SystemExit as e:  # as the interpreter ends on it
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.argv = argv
        os.chdir(cwd)
        torch.set_num_threads(threads)
        common._caught.clear()
        common._caught.update(caught)
        for s, h in handlers.items():
            signal.signal(s, h)
    p = subprocess.CompletedProcess([script] + list(rest), code, out.getvalue(), err.getvalue())
    if check and code != 0:
        pytest.fail(
            f"{' '.join(args)} exited {code} (in this process)\n"
            f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def torchrun(script, args, nproc=2, timeout=400, env=None):
    """`torchrun --nproc_per_node=N script args` on CPU (gloo); env: more variables."""
    return run(
        [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            script,
            "--device",
            "cpu",
        ]
        + list(args),
        timeout=timeout,
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )


def _worker(rank, world, port, fn, args, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out, f"{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world=2):
    """Run fn(rank, world, *args) in `world` gloo processes; return the list of results.
    fn must be a module-level function of the test file (it is pickled)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker,
            args=(world, free_port(), fn, args, out),
            nprocs=world,
            join=True,
            start_method="fork",
        )
        results = []
        for r in range(world):
            with open(os.path.join(out, f"{r}.pkl"), "rb") as fh:
                results.append(pickle.load(fh))
        return results


def read_metrics(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def kill_after_first_checkpoint(args, run_dir, deadline=600, env=None):
    """Run `python ARGS --run-dir RUN_DIR` until it kills itself with SIGKILL after step 1 of epoch
    2 (a user's killed job; common.RunControl's test hook, so at that step whatever the machine's
    speed), and return its checkpoint, which must be epoch 1's. env: more variables."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, **(env or {})}
    env["CLEANSSL_TEST_SIGNAL"] = "SIGKILL@2:1"
    p = subprocess.run(
        [sys.executable] + list(args) + ["--run-dir", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline,
        check=False,
    )
    out = p.stdout[-3000:] + p.stderr[-3000:]
    assert p.returncode == -signal.SIGKILL, f"exit {p.returncode}, not the SIGKILL\n{out}"
    first = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert first["epoch"] == 1 and not first.get("at"), "the checkpoint is not epoch 1's end"
    return first


def online_knn_of(run_dir):
    """The online kNN top-1 of a run's last epoch recomputed in this one process from its
    backbone.pt, with the run's own protocol (bank, test split, eval transform): what a torchrun
    run's sharded kNN pass must have logged."""
    import json

    import common

    with open(os.path.join(run_dir, "args.json")) as fh:
        a = json.load(fh)
    size, native = (
        a["image_size"] or common.IMAGE_SIZE[a["dataset"]],
        common.IMAGE_SIZE[a["dataset"]],
    )
    net = common.build_backbone(a["backbone"], size <= 64, os.path.join(run_dir, "backbone.pt"))
    train = common.make_dataset(a["dataset"], a["data_dir"], train=True)
    bank = common.knn_bank(a["dataset"], a["data_dir"], train, a["knn_limit"])
    test = common.make_dataset(a["dataset"], a["data_dir"], train=False)
    feats = [
        common.extract_features(
            net, d, size, common.STATS[a["dataset"]], native, torch.device("cpu"), workers=0
        )
        for d in (bank, test)
    ]
    return common.knn_top1(*feats[0], *feats[1], len(test.classes)), len(test)
