"""The first command to run on a CUDA machine: does each method script behave on the GPU?

Per method script, on one small data set (digits by default: no download), each check runs the
script's own main() for a few steps and compares what metrics.jsonl logs:
  precision   first-epoch loss with --precision bf16 against --precision fp32 (same seed, data
              path and batches): bf16 autocast may move it by rounding only
  processes   1 process against `torchrun --nproc_per_node=2` on the same global batch, with
              --sync-bn (needs 2 GPUs; each process draws its own augmentations, so this is a
              coarse check, not an equality)
  data_path   --data-path tensor against cpu (PIL) on one seed: other random draws of the same
              distributions, so again a coarse check
  compile     --compile against eager on the tensor path, same seed: equal up to rounding
  sync        torch.cuda.set_sync_debug_mode("error") over a whole training step after the
              first (augmentation, forward, loss, backward, optimizer, bookkeeping): a host
              sync (.item(), a pageable copy, torch.tensor(..., device="cuda")) fails it (CUDA only)
  memory      the training peak (peak_mem_gb, before the kNN pass) and images/s, reported
Prints one pass/fail table and writes JSON (--out). On a machine without CUDA it says so and
runs the checks that mean something there (precision, data_path, compile) on the CPU.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --methods simclr --checks precision,data_path --image-size 16 \\
        --steps 2   # CPU smoke
"""

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

METHODS = ["simclr", "moco", "byol", "simsiam", "swav", "dino"]
CHECKS = ["precision", "processes", "data_path", "compile", "sync", "memory"]
CUDA_ONLY = {"processes", "sync", "memory"}
# Relative first-epoch loss differences that pass: rounding, or other augmentation draws.
TOLERANCE = {"precision": 0.02, "compile": 0.01, "processes": 0.1, "data_path": 0.1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method scripts")
    p.add_argument(
        "--checks", default=",".join(CHECKS), help="comma-separated: " + ", ".join(CHECKS)
    )
    p.add_argument("--dataset", default="digits", choices=common.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=3, help="training steps per run")
    p.add_argument("--out", default="", help="JSON output file")
    return p.parse_args(argv)


def base_argv(args, run_dir):
    return [
        "--dataset",
        args.dataset,
        "--data-dir",
        args.data_dir,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        "1",
        "--steps-per-epoch",
        str(args.steps),
        "--warmup-epochs",
        "0",
        "--knn-every",
        "0",
        "--workers",
        "2",
        "--log-every",
        "1000",
        "--run-dir",
        run_dir,
    ]


def run_main(method, args, extra):
    """The script's main() in this process; returns its first metrics.jsonl line."""
    mod = importlib.import_module(method)
    with tempfile.TemporaryDirectory() as d:
        with contextlib.redirect_stdout(io.StringIO()):
            code = mod.main(mod.parse_args(base_argv(args, d) + extra))
        if code != 0:
            raise RuntimeError(f"{method} {' '.join(extra)} exited {code}")
        with open(os.path.join(d, "metrics.jsonl")) as fh:
            return json.loads(fh.readline())


def run_torchrun(method, args, extra):
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            os.path.join(REPO, f"{method}.py"),
        ]
        p = subprocess.run(
            cmd + base_argv(args, d) + extra, cwd=REPO, capture_output=True, text=True
        )
        if p.returncode != 0:
            raise RuntimeError(
                f"torchrun {method} exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"
            )
        with open(os.path.join(d, "metrics.jsonl")) as fh:
            return json.loads(fh.readline())


def compare(name, a, b):
    rel = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
    return {
        "pass": rel <= TOLERANCE[name],
        "detail": f"loss {a['loss']:.5f} vs {b['loss']:.5f} (rel. diff {rel:.2%}, "
        f"tolerance {TOLERANCE[name]:.0%})",
    }


def sync_check(method, args):
    """set_sync_debug_mode("error") from the end of the first step to the start of the last:
    one whole step and the next batch's augmentation run without a host sync."""
    real_iter = common.TrainLoader.__iter__

    def guarded(self):
        for i, batch in enumerate(real_iter(self)):
            torch.cuda.set_sync_debug_mode("error" if 0 < i < args.steps - 1 else "default")
            yield batch
        torch.cuda.set_sync_debug_mode("default")

    common.TrainLoader.__iter__ = guarded
    try:
        run_main(method, args, ["--data-path", "tensor"])
        return {"pass": True, "detail": "no host sync in a step"}
    except RuntimeError as e:
        return {"pass": False, "detail": str(e).splitlines()[0][:200]}
    finally:
        common.TrainLoader.__iter__ = real_iter
        torch.cuda.set_sync_debug_mode("default")


def check(method, name, args, cuda):
    if name in CUDA_ONLY and not cuda:
        return {"pass": None, "detail": "CUDA only"}
    if name == "processes" and torch.cuda.device_count() < 2:
        return {"pass": None, "detail": "needs 2 GPUs"}
    if name == "precision":
        return compare(
            name,
            run_main(method, args, ["--precision", "bf16"]),
            run_main(method, args, ["--precision", "fp32"]),
        )
    if name == "data_path":
        return compare(
            name,
            run_main(method, args, ["--data-path", "tensor"]),
            run_main(method, args, ["--data-path", "cpu"]),
        )
    if name == "compile":
        tensor = ["--data-path", "tensor"]
        return compare(
            name, run_main(method, args, tensor + ["--compile"]), run_main(method, args, tensor)
        )
    if name == "processes":
        return compare(
            name, run_torchrun(method, args, ["--sync-bn"]), run_main(method, args, ["--sync-bn"])
        )
    if name == "sync":
        return sync_check(method, args)
    m = run_main(method, args, ["--data-path", "tensor"])
    return {
        "pass": m["peak_mem_gb"] > 0,
        "detail": f"peak {m['peak_mem_gb']:.2f} GiB, {m['images_per_s']:.0f} img/s",
        "peak_mem_gb": m["peak_mem_gb"],
        "images_per_s": m["images_per_s"],
    }


def main(args):
    cuda = torch.cuda.is_available()
    if not cuda:
        print(
            "No CUDA device here: running the CPU half (precision, data_path, compile) on the CPU.",
            flush=True,
        )
    methods, checks = args.methods.split(","), args.checks.split(",")
    results = {}
    for method in methods:
        for name in checks:
            try:
                r = check(method, name, args, cuda)
            except Exception as e:  # a crash is a failed check, and the others still run
                r = {
                    "pass": False,
                    "detail": f"{type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}",
                }
            results[f"{method}/{name}"] = r
            mark = {True: "pass", False: "FAIL", None: "skip"}[r["pass"]]
            print(f"| {method} | {name} | {mark} | {r['detail']} |", flush=True)
    failed = [k for k, r in results.items() if r["pass"] is False]
    print(
        f"{len(failed)} failed of {sum(r['pass'] is not None for r in results.values())} run"
        + (f": {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    if args.out:
        info = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "gpus": torch.cuda.device_count(),
            "args": vars(args),
        }
        with open(args.out, "w") as fh:
            json.dump({"machine": info, "results": results}, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
