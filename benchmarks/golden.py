"""Golden runs: prove that a refactor changes nothing a run computes.

Runs each of the seven method variants (SimCLR, MoCo v2, MoCo v3, BYOL, SimSiam, SwAV, DINO), plus
`--qscore-lambda 0.1` and `--xattn` on two of them, for 2 epochs of 3 steps on digits, and one
SIGTERM + resume, on the CPU; records a fingerprint of each: the SHA-256 of every tensor of
backbone.pt and checkpoint.pt's model, and metrics.jsonl without its times. Two recordings made on
the same machine must be equal, key for key.

    python benchmarks/golden.py --out /tmp/before.json           # on the old code
    python benchmarks/golden.py --out /tmp/after.json            # on the new code
    python benchmarks/golden.py --compare /tmp/before.json /tmp/after.json
"""

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = [
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--steps-per-epoch",
    "3",
    "--workers",
    "0",
    "--knn-every",
    "2",
    "--knn-limit",
    "128",
    "--log-every",
    "1",
    "--backbone",
    "resnet18-eighth",
]
NARROW = {
    "simclr": ["--proj-hidden", "64", "--proj-dim", "32"],
    "moco": [
        "--proj-hidden",
        "64",
        "--pred-hidden",
        "64",
        "--proj-dim",
        "32",
        "--queue-size",
        "64",
    ],
    "byol": ["--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32"],
    "simsiam": ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "16"],
    "swav": [
        "--local-crops",
        "2",
        "--prototypes",
        "30",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
        "--queue-size",
        "32",
        "--queue-start",
        "1",
    ],
    "dino": [
        "--local-crops",
        "2",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
        "--prototypes",
        "128",
    ],
}
RUNS = {  # name -> (script, extra flags)
    "simclr": ("simclr", []),
    "mocov2": ("moco", ["--moco-version", "2"]),
    "mocov3": ("moco", ["--moco-version", "3"]),
    "byol": ("byol", []),
    "simsiam": ("simsiam", []),
    "swav": ("swav", []),
    "dino": ("dino", []),
    "simclr_qscore": ("simclr", ["--qscore-lambda", "0.1"]),
    "simclr_xattn": ("simclr", ["--xattn", "--xattn-clusters", "8"]),
    "swav_qscore": ("swav", ["--qscore-lambda", "0.1"]),
    "swav_xattn": ("swav", ["--xattn", "--xattn-clusters", "8"]),
    "dino_xattn": ("dino", ["--xattn", "--xattn-clusters", "8"]),
    "simclr_full_width": ("simclr", ["--backbone", "resnet18", "--epochs", "1"]),
}
TIMES = {"seconds", "images_per_s", "peak_mem_gb"}


def command(name, run_dir):
    script, extra = RUNS[name]
    return [sys.executable, f"{script}.py", *BASE, *NARROW[script], *extra, "--run-dir", run_dir]


def fingerprint(run_dir):
    """sha256 of each tensor (backbone.pt; checkpoint.pt's every state) and the metrics less
    times."""

    def digest(obj, prefix, out):
        if torch.is_tensor(obj):
            out[prefix] = hashlib.sha256(
                obj.detach().contiguous().cpu().numpy().tobytes()
            ).hexdigest()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                digest(v, f"{prefix}.{k}", out)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                digest(v, f"{prefix}.{i}", out)
        return out

    fp = digest(torch.load(os.path.join(run_dir, "backbone.pt"), weights_only=True), "backbone", {})
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    for part in (
        "model",
        "optimizer",
        "teacher",
        "key_encoder",
        "queue",
        "center",
        "centroids",
        "pseudo_labels",
    ):
        if ckpt.get(part) is not None:
            digest(ckpt[part], part, fp)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        fp["metrics"] = [
            {k: v for k, v in json.loads(line).items() if k not in TIMES} for line in fh
        ]
    return fp


def record(out, only=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in (only or RUNS) if n in RUNS]:
            d = os.path.join(tmp, name)
            subprocess.run(command(name, d), cwd=REPO, env=env, check=True, capture_output=True)
            found[name] = fingerprint(d)
            print(f"{name}: {found[name]['metrics'][-1]}", flush=True)
        if only and "simclr_xattn_stopped" not in only:
            return write(found, out)
        # SIGTERM after epoch 1's first step, then the same command: ends where the unbroken
        # run does
        d = os.path.join(tmp, "simclr_xattn_stopped")
        p = subprocess.Popen(
            command("simclr_xattn", d),
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for line in p.stdout:
            if "epoch 1/2  step 1/3" in line:
                p.send_signal(signal.SIGTERM)
        p.wait()
        subprocess.run(
            command("simclr_xattn", d), cwd=REPO, env=env, check=True, capture_output=True
        )
        found["simclr_xattn_stopped"] = fingerprint(d)
    write(found, out)


def write(found, out):
    with open(out, "w") as fh:
        json.dump(found, fh, indent=1, sort_keys=True)
    print(f"wrote {out}")


def compare(a_path, b_path):
    with open(a_path) as fh:
        a = json.load(fh)
    with open(b_path) as fh:
        b = json.load(fh)
    bad = 0
    for name in sorted(set(a) & set(b)):
        if a.get(name) != b.get(name):
            keys = sorted(
                k
                for k in set(a.get(name, {})) | set(b.get(name, {}))
                if a.get(name, {}).get(k) != b.get(name, {}).get(k)
            )
            print(f"{name}: differs in {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
            bad += 1
        else:
            print(f"{name}: identical ({len(a[name])} entries)")
    missing = sorted(set(a) ^ set(b))
    if missing:
        print(f"in one recording only: {', '.join(missing)}")
    print("all identical" if not bad else f"{bad} run(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="record the golden runs of this checkout into this JSON file")
    p.add_argument(
        "--only", nargs="+", choices=[*RUNS, "simclr_xattn_stopped"], help="record these runs only"
    )
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two recordings")
    a = p.parse_args()
    if a.compare:
        raise SystemExit(compare(*a.compare))
    if not a.out:
        p.error("give --out FILE or --compare BEFORE AFTER")
    record(a.out, a.only)
