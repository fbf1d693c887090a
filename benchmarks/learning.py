"""Does a method learn on real images, and as well as lightly's implementation of it?

One method, one budget, trained twice on CIFAR-10 (the shared ImageFolder copy at
../shared/data/cifar10, 32 px, ResNet-18 with the CIFAR stem), and both backbones
evaluated with one kNN protocol beside a random ResNet-18:

  cleanssl  the method script itself, in a subprocess, exactly as a user runs it:
                python METHOD.py --dataset folder --data-dir DIR --image-size 32 --batch-size B
                    --epochs E --steps-per-epoch S --warmup-epochs W --knn-every K
                    --knn-limit 10000 ...
            A budget of N images is T = N // B steps, cut into E = P * K script "epochs" of S steps;
            the script's own kNN every K epochs gives the P points of the curve (its metrics.jsonl).
  lightly   lightly's implementation of the same method (lightly's heads, loss, momentum updates,
            transforms, schedules and LARS) in a plain loop written here, run by lightly's own
            Python (lightly is not a CleanSSL dependency): the backbone of common.build_backbone,
            the same batch, steps, seed, optimizer family, learning rate (lr * B / 256), warm-up and
            cosine schedule, every method flag as the script resolved it, and the augmentation
            parameters the script asks common.TrainLoader for. Its backbone is saved at each curve
            point and evaluated here. "differences" in its JSON lists what still differs.
  random    common.build_backbone('resnet18') after torch.manual_seed(0); cached in --out.

kNN protocol, the scripts' own (common.extract_features, common.knn_top1): eval-mode backbone,
pooled features h, a bank of the fixed seed-0 random 10,000 training images (--knn-limit), the
whole test split, k = 200, t = 0.1. The final CleanSSL backbone.pt is evaluated again here with
the function that evaluates lightly and random ("final_knn_recheck"): the protocols are one.

    python benchmarks/learning.py simclr  --images 500000 --batch-size 256
    python benchmarks/learning.py mocov2  --images 500000 --batch-size 256 \\
        --extra "--queue-size 4096"
    python benchmarks/learning.py mocov3  --images 500000 --batch-size 256   # lightly has none
    python benchmarks/learning.py byol    --images 500000 --batch-size 256
    python benchmarks/learning.py simsiam --images 500000 --batch-size 256
    python benchmarks/learning.py swav    --images 500000 --batch-size 256 \\
        --extra "--prototypes 1000"
    python benchmarks/learning.py dino    --images 500000 --batch-size 256
    python benchmarks/learning.py --table          # every result in --out, one Markdown table
    python benchmarks/learning.py simclr --dataset digits --images 64 \\
        --batch-size 16  # plumbing only

--impl cleanssl|lightly runs one half; --lightly-python PATH picks lightly's interpreter (default:
this one if it imports lightly, else ../lightly-venv/bin/python beside the checkout, else the
lightly half is skipped and says why). Make that environment with
    python3 -m venv ../lightly-venv
    ../lightly-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly scikit-learn

Budget knobs. `--extra "..."` goes to the script as is (last, so it wins; a single flag with no
value takes the = form, `--extra=--xattn`, since argparse reads a lone `--xattn` as its own option),
e.g. --queue-size, --queue-start, --prototypes, --teacher-momentum, --lr; the lightly half reads the
same resolved flags, so a knob lightly also has reaches both halves; one it has not is listed in
"differences". The scripts count some knobs in epochs of a 1000-epoch recipe (--warmup-epochs,
--queue-start, --freeze-prototypes-epochs, --warmup-teacher-temp-epochs, --freeze-last-layer).
Unless --extra sets them, each becomes the recipe's fraction of training, in the E epochs of this
budget (rounded where the flag takes whole epochs; --epochs-per-point sets the resolution);
--warmup-images overrides the warm-up. The JSON records every value ("knobs").

Outputs in --out: <method>_cleanssl.json and <method>_lightly.json (budget, commands, curve
[images seen, kNN top-1], final kNN, minutes, img/s, machine, date, git commit, versions,
knobs, differences), <method>.png (kNN against images seen), random_*.json; a Markdown row
| method | budget | CleanSSL kNN | lightly kNN | random kNN | minutes | command | is printed.
Run folders (checkpoints) go to --out/runs/ (git-ignored). JSON is written atomically.

Where the lightly half differs from the script, by method (the JSON says it per run):
  method    lightly classes
              differences beyond the common ones below
  simclr    SimCLRTransform, SimCLRProjectionHead, NTXentLoss, LARS
              the head unless --projector lightly (CleanSSL's default is solo-learn's,
              Linear-ReLU-Linear without BN)
  mocov2    MoCoV2Transform, MoCoProjectionHead, NTXentLoss(memory_bank_size), update_momentum,
            cosine_schedule
              one NTXentLoss call on both directions (the same symmetric mean) enqueues the keys of
              both views, 2B a step; CleanSSL enqueues view 2's, B a step
  mocov3    -
              lightly has none: a MoCoProjectionHead that can take v3's shape, but no v3 transform,
              predictor or loss
  byol      BYOLTransform, BYOLProjectionHead, BYOLPredictionHead, NegativeCosineSimilarity,
            update_momentum, cosine_schedule, LARS
              lightly's loss 0.5 (ncs(p1, z2) + ncs(p2, z1)) is 1/4 of BYOL's summed 2 - 2 cos: same
              optimum, 4x smaller gradients, so weight decay weighs 4x more and the LARS-free biases
              and norms move 4x slower (byol.py --loss-scale 0.25 takes lightly's scale)
  simsiam   SimSiamTransform, SimSiamProjectionHead, SimSiamPredictionHead, NegativeCosineSimilarity
              none beyond the common ones (SGD, predictor at the fixed base LR, as the script)
  swav      SwaVTransform, SwaVProjectionHead, SwaVPrototypes, SwaVLoss, MemoryBankModule, LARS
              prototypes have a bias in lightly; one blur probability for every crop and no
              solarization in SwaVTransform; no max-shift in lightly's Sinkhorn
  dino      DINOTransform, DINOProjectionHead, DINOLoss, update_momentum, cosine_schedule, LARS
              last layer weight-normalized (weight_v optimized, g fixed at 1) instead of normalized
              in the forward pass; the teacher head is a second DINOProjectionHead loaded with the
              student's weights (deepcopy cannot copy weight_norm)
Common to all: lightly's examples pass each view through the network on its own (BatchNorm
statistics per view), as the two-view scripts do by default (--per-view-bn), while swav.py and
dino.py concatenate the crops of one size; data order and augmentation randomness come from a torch
DataLoader over whole passes of the data, not from common.TrainLoader's fresh permutation every S
steps; lightly's crops resample bilinearly (DINO's bicubically, as CleanSSL), its blur is PIL's
GaussianBlur(radius=sigma), not a kernel of common.blur_kernel taps; lightly's cosine schedules end
one step earlier (max_steps - 1); lightly's LARS trust ratio is eta ||w|| / (||g|| + wd ||w||),
CleanSSL's eta ||w|| / ||g + wd w||; no add-ons (Q-Score, xattn).
"""

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

# method -> (script, flags that pick the variant)
METHODS = {
    "simclr": ("simclr", []),
    "mocov2": ("moco", ["--moco-version", "2"]),
    "mocov3": ("moco", ["--moco-version", "3"]),
    "byol": ("byol", []),
    "simsiam": ("simsiam", []),
    "swav": ("swav", []),
    "dino": ("dino", []),
}
NO_LIGHTLY = {
    "mocov3": "lightly has none: lightly's MoCoProjectionHead (1.6.0 checked) can take MoCo v3's "
    "shape, but the package has no MoCo v3 transform, predictor or loss"
}
# Flags counted in epochs of the recipe; scaled to the budget unless --extra sets them.
EPOCH_KNOBS = (
    "warmup_epochs",
    "queue_start",
    "freeze_prototypes_epochs",
    "warmup_teacher_temp_epochs",
    "freeze_last_layer",
)
# Flags learning.py sets from the budget: --extra may not.
OWN_FLAGS = (
    "--dataset",
    "--data-dir",
    "--image-size",
    "--batch-size",
    "--epochs",
    "--steps-per-epoch",
    "--knn-every",
    "--knn-limit",
    "--run-dir",
    "--resume",
    "--moco-version",
)
# What every lightly half reads from the script's flags, besides its method's own knobs.
LOOP_KNOBS = {
    "dataset",
    "data_dir",
    "image_size",
    "batch_size",
    "epochs",
    "steps_per_epoch",
    "warmup_epochs",
    "lr",
    "weight_decay",
    "seed",
    "device",
    "workers",
    "backbone",
    "knn_every",
    "knn_limit",
    "log_every",
    "data_path",
}
LIGHTLY_PYTHON = os.path.join(os.path.dirname(REPO), "lightly-venv", "bin", "python")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("method", nargs="?", default="", help=f"one of {', '.join(METHODS)}")
    p.add_argument(
        "--impl", default="both", choices=["both", "cleanssl", "lightly"], help="which half to run"
    )
    p.add_argument(
        "--dataset",
        default="folder",
        help="folder (an ImageFolder tree), or digits for plumbing tests; any of common.DATASETS",
    )
    p.add_argument(
        "--data-dir",
        default=os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10"),
        help="ImageFolder root with train/ and test/ or val/",
    )
    p.add_argument("--image-size", type=int, default=32, help="crop side in pixels")
    p.add_argument(
        "--images",
        type=int,
        default=500_000,
        help="budget: images seen in training (steps = images // batch)",
    )
    p.add_argument("--batch-size", type=int, default=0, help="global batch; 0: the script's recipe")
    p.add_argument(
        "--warmup-images",
        type=int,
        default=-1,
        help="linear warm-up, in images; -1: the recipe's share of training",
    )
    p.add_argument("--points", type=int, default=4, help="kNN points of the curve")
    p.add_argument(
        "--epochs-per-point",
        type=int,
        default=5,
        help="script epochs between kNN points: the resolution of epoch-counted knobs",
    )
    p.add_argument(
        "--knn-limit",
        type=int,
        default=10_000,
        help="kNN bank: this many training images (the scripts' fixed seed-0 subset)",
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help='flags for the method script, e.g. "--queue-size 4096" (repeatable)',
    )
    p.add_argument("--seed", type=int, default=0, help="seed of both halves")
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader processes"
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="progress line every N steps (lightly: also every 30 s)",
    )
    p.add_argument(
        "--lightly-python", default="", help="interpreter whose environment has lightly (see above)"
    )
    p.add_argument(
        "--out",
        default=os.path.join(REPO, "benchmarks", "results", "learning"),
        help="output folder",
    )
    p.add_argument(
        "--table", action="store_true", help="print the table of every result in --out and stop"
    )
    p.add_argument(
        "--half", default="", help=argparse.SUPPRESS
    )  # internal: "lightly" runs the lightly half of --plan
    p.add_argument("--plan", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- small helpers --------------------------------------------------------------------------
def write_json(obj, path):
    """Temp file, then rename: a killed run never leaves half a JSON."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def git_state(paths):
    def git(*a):
        p = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "--", *paths).splitlines(),
    }


def machine():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }  # a shared machine skews minutes


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def stream(cmd, tag):
    """Run cmd in the repo, passing its output through line by line; returns the exit code."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    for line in proc.stdout:
        print(f"[{tag}] {line}", end="", flush=True)
    return proc.wait()


def flag_groups(tokens):
    """['--a', '1', '--b'] -> [['--a', '1'], ['--b']]"""
    groups = []
    for t in tokens:
        if t.startswith("--") or not groups:
            groups.append([t])
        else:
            groups[-1].append(t)
    return groups


def dest(flag):
    return flag.split("=", 1)[0].lstrip("-").replace("-", "_")


# --- kNN: one protocol for the lightly points and the random backbone -------------------------
_KNN_DATA = {}


def knn_eval(backbone, b, workers=None):
    """kNN top-1 of a Backbone as the scripts measure it (their kNN code, their fixed bank)."""
    key = (b.dataset, b.data_dir, b.knn_limit)
    if key not in _KNN_DATA:
        bank = common.eval_dataset(b.dataset, b.data_dir)
        if b.knn_limit and b.knn_limit < len(bank):
            keep = np.random.RandomState(0).permutation(len(bank))[
                : b.knn_limit
            ]  # the scripts' subset
            bank = torch.utils.data.Subset(bank, keep.tolist())
        _KNN_DATA[key] = bank, common.make_dataset(b.dataset, b.data_dir, train=False)
    bank, test = _KNN_DATA[key]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = backbone.to(device)
    stats, native = common.STATS[b.dataset], common.IMAGE_SIZE[b.dataset]
    w = b.workers if workers is None else workers
    htr, ytr = common.extract_features(
        backbone, bank, b.image_size, stats, native, device, workers=w
    )
    hte, yte = common.extract_features(
        backbone, test, b.image_size, stats, native, device, workers=w
    )
    return common.knn_top1(htr, ytr, hte, yte, len(test.classes))


def random_baseline(b, backbone_name):
    """kNN of a seed-0 random backbone, computed once per data set and protocol."""
    key = {
        "dataset": b.dataset,
        "data_dir": os.path.abspath(b.data_dir),
        "image_size": b.image_size,
        "knn_limit": b.knn_limit,
        "backbone": backbone_name,
    }
    path = os.path.join(
        b.out,
        f"random_{b.dataset}_{os.path.basename(os.path.normpath(b.data_dir))}_{b.image_size}px_{backbone_name}.json",
    )
    if os.path.isfile(path) and read_json(path).get("key") == key:
        return read_json(path)["knn_top1"]
    print(f"random {backbone_name}: kNN on {b.dataset} ...", flush=True)
    t0 = time.time()
    torch.manual_seed(0)
    knn = knn_eval(common.build_backbone(backbone_name, small_images=b.image_size <= 64), b)
    write_json(
        {
            "key": key,
            "knn_top1": knn,
            "seconds": time.time() - t0,
            "date": now(),
            "torch": torch.__version__,
        },
        path,
    )
    print(f"random {backbone_name}: kNN top-1 {knn:.4f}", flush=True)
    return knn


# --- the plan: budget, the script's flags, its views ------------------------------------------
def make_plan(b):
    """Everything both halves share, decided before any training."""
    script, variant = METHODS[b.method]
    mod = importlib.import_module(script)
    extra = [t for e in b.extra for t in shlex.split(e)]
    for flag in OWN_FLAGS:
        if any(t.split("=", 1)[0] == flag for t in extra):
            raise common.UserError(
                f"--extra may not set {flag}: learning.py sets it from the budget."
            )
    recipe = quiet_parse(mod, variant, script)  # the script's defaults: the recipe
    batch = b.batch_size or recipe.batch_size
    n_train = len(common.make_dataset(b.dataset, b.data_dir, train=True))
    per_pass = n_train // batch
    if per_pass < 1:
        raise common.UserError(
            f"--batch-size {batch} is larger than the {n_train} training images."
        )
    steps = b.images // batch
    if steps < 1:
        raise common.UserError(f"--images {b.images} is less than one batch of {batch}.")
    points = max(1, min(b.points, steps))
    per_point = max(
        b.epochs_per_point, math.ceil(steps / (points * per_pass))
    )  # an epoch is at most one pass
    per_point = max(1, min(per_point, steps // points))
    epochs = points * per_point
    spe = steps // epochs
    steps = epochs * spe
    set_by_extra = {dest(g[0]) for g in flag_groups(extra)}
    knobs = {}
    if "warmup_epochs" not in set_by_extra:
        warm = (
            b.warmup_images // batch
            if b.warmup_images >= 0
            else round(recipe.warmup_epochs / recipe.epochs * steps)
        )
        w = min(warm, steps) / spe
        knobs["warmup_epochs"] = (
            w + 1e-9 if int(w * spe) < min(warm, steps) else w
        )  # the script takes int(w * S)
    for k in EPOCH_KNOBS[1:]:
        if hasattr(recipe, k) and k not in set_by_extra:
            v = getattr(recipe, k) / recipe.epochs * epochs
            knobs[k] = round(v) if isinstance(getattr(recipe, k), int) else v
    argv = variant + [
        "--dataset",
        b.dataset,
        "--data-dir",
        b.data_dir,
        "--image-size",
        str(b.image_size),
        "--batch-size",
        str(batch),
        "--epochs",
        str(epochs),
        "--steps-per-epoch",
        str(spe),
        "--knn-every",
        str(per_point),
        "--knn-limit",
        str(b.knn_limit),
        "--seed",
        str(b.seed),
        "--workers",
        str(b.workers),
        "--log-every",
        str(b.log_every),
    ]
    argv += [t for k, v in knobs.items() for t in (f"--{k.replace('_', '-')}", repr(v))] + extra
    args = quiet_parse(mod, argv, script)
    views = capture_views(mod, args)
    return {
        "method": b.method,
        "script": script + ".py",
        "argv": argv,
        "args": vars(args),
        "views": views,
        "extra": extra,
        "scaled_knobs": knobs,
        "n_train": n_train,
        "budget": {
            "images": steps * batch,
            "requested_images": b.images,
            "batch_size": batch,
            "steps": steps,
            "epochs": epochs,
            "steps_per_epoch": spe,
            "knn_every_epochs": per_point,
            "points": points,
            "warmup_steps": int(args.warmup_epochs * spe),
            "lr_per_256": args.lr,
            "lr": args.lr * batch / 256,
            "lr_schedule": "per step: linear warm-up, then cosine to 0",
        },
        "view_flags": view_flags(mod, argv, extra, views),
        "git": git_state([script + ".py", "common.py", "benchmarks/learning.py"]),
    }  # the code as the run starts


def quiet_parse(mod, argv, script):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return mod.parse_args(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        why = lines[-1].split("error: ", 1)[-1] if lines else "a parse error"
        raise common.UserError(f"{script}.py does not take these flags ({why}).") from None


class _ViewsCaptured(Exception):
    pass


def capture_views(mod, args):
    """The augmentations the script asks common.TrainLoader for: main() runs up to the loader
    (flag checks, data sets) and stops there, as benchmarks/throughput.py's stand-in loader does."""
    found = {}

    def stand_in(*a, **kw):
        found["views"] = kw.get("views", a[1] if len(a) > 1 else None)
        raise _ViewsCaptured

    original = common.TrainLoader
    common.TrainLoader = stand_in
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            mod.main(argparse.Namespace(**{**vars(args), "run_dir": tmp}))
    except _ViewsCaptured:
        pass
    finally:
        common.TrainLoader = original
    if "views" not in found:
        raise RuntimeError(f"{mod.__name__}.main() built no common.TrainLoader")
    return [asdict(v) for v in found["views"]]


def view_flags(mod, argv, extra, views):
    """The --extra flags that change the script's augmentations (the lightly half copies those)."""
    changed = []
    for g in flag_groups(extra):
        rest = [t for h in flag_groups(extra) if h is not g for t in h]
        base = argv[: len(argv) - len(extra)] + rest
        if capture_views(mod, mod.parse_args(base)) != views:
            changed.append(dest(g[0]))
    return changed


# --- the two halves, from the main process ----------------------------------------------------
def run_cleanssl(b, plan, random_knn, run_root):
    run_dir = os.path.join(run_root, f"{b.method}_cleanssl")
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    cmd = (
        [sys.executable, os.path.join(REPO, plan["script"])] + plan["argv"] + ["--run-dir", run_dir]
    )
    print("cleanssl: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    rc = stream(cmd, "cleanssl")
    if rc:
        print(f"cleanssl: {plan['script']} exited {rc}; no result written.", flush=True)
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        metrics = [json.loads(line) for line in fh]
    spe, batch = plan["budget"]["steps_per_epoch"], plan["budget"]["batch_size"]
    curve = [[m["epoch"] * spe * batch, m["knn_top1"]] for m in metrics if "knn_top1" in m]
    train_s = sum(m["seconds"] for m in metrics)
    minutes = (time.time() - t0) / 60
    a = SimpleNamespace(**plan["args"])
    recheck = knn_eval(
        common.build_backbone(a.backbone, b.image_size <= 64, os.path.join(run_dir, "backbone.pt")),
        b,
    )
    print(
        f"cleanssl: final kNN {curve[-1][1]:.4f} (script), {recheck:.4f} (evaluated here)",
        flush=True,
    )
    return result_json(
        b,
        plan,
        "cleanssl",
        curve,
        random_knn,
        minutes,
        train_s,
        " ".join(shlex.quote(c) for c in cmd),
        {"final_knn_recheck": recheck, "run_dir": run_dir, "metrics": metrics},
    )


def find_lightly(requested):
    """(python, versions) of an interpreter that imports lightly, or (None, why not)."""
    probe = (
        "import lightly, sklearn, torch, torchvision; "  # sklearn: common's digits
        "print(lightly.__version__, torch.__version__, torchvision.__version__)"
    )
    candidates = [requested] if requested else [sys.executable, LIGHTLY_PYTHON]
    reasons = []
    for py in candidates:
        if py == sys.executable and not requested and importlib.util.find_spec("lightly") is None:
            reasons.append(f"not in {py}")
            continue
        if not os.path.exists(py):
            reasons.append(f"no {py}")
            continue
        p = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=REPO)
        if p.returncode == 0:
            lv, tv, tvv = p.stdout.split()[-3:]
            return py, {"lightly": lv, "torch": tv, "torchvision": tvv}
        reasons.append(f"{py} cannot import it ({(p.stderr.strip().splitlines() or ['?'])[-1]})")
    return None, "lightly does not import: " + "; ".join(reasons)


def run_lightly(b, plan, random_knn, run_root, py, versions):
    run_dir = os.path.join(run_root, f"{b.method}_lightly")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    plan_path = os.path.join(run_dir, "plan.json")
    write_json({**plan, "run_dir": run_dir}, plan_path)
    cmd = [py, os.path.abspath(__file__), "--half", "lightly", "--plan", plan_path]
    print("lightly: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    rc = stream(cmd, "lightly")
    if rc:
        print(f"lightly: the lightly half exited {rc}; no result written.", flush=True)
        return None
    res = read_json(os.path.join(run_dir, "result.json"))
    a = SimpleNamespace(**plan["args"])
    curve = []
    for i, pt in enumerate(res["points"]):
        t1 = time.time()
        knn = knn_eval(common.build_backbone(a.backbone, b.image_size <= 64, pt["path"]), b)
        curve.append([pt["images"], knn])
        print(
            f"lightly: point {i + 1}/{len(res['points'])}: {pt['images']:,} images, "
            f"kNN top-1 {knn:.4f} ({time.time() - t1:.0f} s)",
            flush=True,
        )
    differences = list(res["differences"])
    honoured = LOOP_KNOBS | set(res["reads"]) | set(plan["view_flags"])
    for g in flag_groups(plan["extra"]):
        if dest(g[0]) not in honoured:
            differences.append(
                f"{' '.join(g)} (from --extra) reaches the CleanSSL script only: "
                "the lightly half has no such knob"
            )
    if versions["torch"] != torch.__version__:
        differences.append(
            f"torch {versions['torch']} in lightly's environment, {torch.__version__} here"
        )
    return result_json(
        b,
        plan,
        "lightly",
        curve,
        random_knn,
        (time.time() - t0) / 60,
        res["train_seconds"],
        " ".join(shlex.quote(c) for c in cmd),
        {
            "lightly": versions["lightly"],
            "lightly_torch": versions["torch"],
            "lightly_python": py,
            "lightly_classes": res["classes"],
            "differences": differences,
            "run_dir": run_dir,
        },
    )


def result_json(b, plan, impl, curve, random_knn, minutes, train_s, half_command, more):
    images = plan["budget"]["images"]
    out = {
        "method": b.method,
        "impl": impl,
        "dataset": b.dataset,
        "data_dir": b.data_dir,
        "image_size": b.image_size,
        "budget": plan["budget"],
        "command": "python benchmarks/learning.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "half_command": half_command,
        "curve": curve,
        "final_knn": curve[-1][1] if curve else None,
        "random_knn": random_knn,
        "knn_protocol": {
            "k": 200,
            "t": 0.1,
            "bank": f"fixed seed-0 subset of {b.knn_limit} training images",
            "test": "whole test split",
            "features": "pooled h, eval mode",
        },
        "minutes": minutes,
        "train_minutes": train_s / 60,
        "images_per_s": images / train_s if train_s else None,
        "knobs": {
            "extra": plan["extra"],
            "scaled_to_budget": plan["scaled_knobs"],
            "resolved": plan["args"],
        },
        "views": plan["views"],
        "machine": machine(),
        "date": now(),
        "git": plan["git"],
        "torch": torch.__version__,
        "differences": [],
        **more,
    }
    write_json(out, os.path.join(b.out, f"{b.method}_{impl}.json"))
    return out


# --- figure and table -------------------------------------------------------------------------
def load_runs(out, method):
    runs = {}
    for impl in ("cleanssl", "lightly"):
        path = os.path.join(out, f"{method}_{impl}.json")
        if os.path.isfile(path):
            runs[impl] = read_json(path)
    return runs


def random_label(runs):
    """(kNN, legend) of the random network the runs were measured against, named by its
    backbone (a run JSON records the one its script resolved); None when no run has one."""
    r = next((r for r in runs.values() if r.get("random_knn") is not None), None)
    if r is None:
        return None
    backbone = r.get("knobs", {}).get("resolved", {}).get("backbone", "resnet18")
    return r["random_knn"], f"random {backbone} ({r['random_knn']:.3f})"


def plot(out, method):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(out, method)
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, label, color in (
        ("cleanssl", "CleanSSL", "tab:blue"),
        ("lightly", "lightly", "tab:orange"),
    ):
        r = runs.get(impl)
        if r and r.get("curve"):
            x, y = zip(*r["curve"])
            ax.plot(x, y, "o-", color=color, label=f"{label} ({r['curve'][-1][1]:.3f})")
        elif r and r.get("status"):
            ax.plot([], [], " ", label=f"{label}: {r['status']}")
    label = random_label(runs)
    if label:
        ax.axhline(label[0], ls="--", color="gray", label=label[1])
    r = next(iter(runs.values()), {})
    bud = r.get("budget", {})
    ax.set_xlabel("images seen")
    ax.set_ylabel("kNN top-1 (k=200, t=0.1)")
    data = (
        os.path.basename(os.path.normpath(r.get("data_dir", "")))
        if r.get("dataset") == "folder"
        else r.get("dataset")
    )
    ax.set_title(
        f"{method} on {data}, {bud.get('images', 0):,} images, batch {bud.get('batch_size', '?')}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, f"{method}.png")
    fig.savefig(path + ".tmp", dpi=110, format="png")
    plt.close(fig)
    os.replace(path + ".tmp", path)
    return path


HEADER = (
    "| method | budget | CleanSSL kNN | lightly kNN | random kNN | minutes | command |\n"
    "|---|---|---|---|---|---|---|"
)


def table_row(out, method):
    runs = load_runs(out, method)
    if not runs:
        return None
    ours, theirs = runs.get("cleanssl"), runs.get("lightly")
    ref = ours or theirs
    bud = ref["budget"]

    def knn(r):
        if r is None:
            return "-"
        if r.get("status"):
            return r["status"]
        s = f"{r['final_knn']:.3f}" if r.get("final_knn") is not None else "-"
        return s if r is ref or r["budget"] == bud else s + f" ({r['budget']['images']:,} images)"

    mins = " / ".join(
        f"{r['minutes']:.{1 if r['minutes'] < 10 else 0}f}"
        for r in (ours, theirs)
        if r and r.get("minutes") is not None
    )
    rnd = ref.get("random_knn")
    return (
        f"| {method} | {bud['images']:,} images, batch {bud['batch_size']} | "
        f"{knn(ours)} | {knn(theirs)} | {'-' if rnd is None else f'{rnd:.3f}'} | {mins} | "
        f"`{ref['command']}` |"
    )


# --- the lightly half (runs in lightly's environment) -----------------------------------------
class _Transformed(torch.utils.data.Dataset):
    """(PIL image, label) items through a lightly transform: (list of view tensors, label)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, y = self.base[i]
        return self.transform(img.convert("RGB")), y


def _seed_worker(worker_id):
    s = torch.initial_seed() % 2**32  # lightly's blur and solarization draw from numpy
    np.random.seed(s)
    random.seed(s)


def _colour(v):
    """A CleanSSL View's colour, grey and flip parameters as lightly's transform arguments."""
    b, c, s, h = v.jitter
    return dict(
        cj_prob=v.jitter_p,
        cj_strength=1.0,
        cj_bright=b,
        cj_contrast=c,
        cj_sat=s,
        cj_hue=h,
        random_gray_scale=v.gray_p,
        hf_prob=v.flip_p,
        sigmas=(0.1, 2.0),
    )


def _view_notes(views, one_distribution=False, bicubic=False):
    """What the script's views ask for that lightly's transform does otherwise."""
    notes = []
    if one_distribution and views[0] != views[1]:
        notes.append(
            "lightly's transform draws both views from one distribution: "
            "view 1's parameters are used for both"
        )
    if any(tuple(v.ratio) != (3 / 4, 4 / 3) for v in views):
        notes.append("lightly's crops use the aspect ratios (3/4, 4/3), not the script's")
    if one_distribution and any(v.scale[1] != 1.0 for v in views):
        notes.append("lightly's crop scale ends at 1.0, not the script's maximum")
    if not bicubic:
        notes.append("crops are resampled bilinearly by lightly, bicubically by CleanSSL")
    if any(v.blur_p > 0 for v in views):
        taps = common.blur_kernel(views[0].size) if hasattr(common, "blur_kernel") else "its"
        notes.append(
            "lightly blurs with PIL GaussianBlur(radius=sigma), CleanSSL with torchvision's "
            f"GaussianBlur of {taps} taps"
        )
    return notes


PER_VIEW_NOTE = (
    "each view goes through the network on its own, as in lightly's examples (BatchNorm "
    "statistics per view); CleanSSL passes the views of one size as one batch (--no-per-view-bn, "
    "or SwAV and DINO)"
)
COMMON_NOTES = [
    "data order and augmentation randomness: a torch DataLoader over whole passes of the data set "
    "(same seed value), not common.TrainLoader's fresh permutation every script epoch",
    "lightly's cosine schedules reach their end value one step earlier (max_steps - 1)",
]
LARS_NOTE = (
    "lightly.utils.lars.LARS steps lr * eta ||w|| / (||g|| + wd ||w||), unclipped; CleanSSL's "
    "default (--lars-mode clip, solo-learn's CIFAR recipe) steps min(lr, eta ||w|| / (||g|| + "
    "wd ||w||)), and --lars-mode official lr * eta ||w|| / ||g + wd w||; both exempt biases and "
    "norm weights from weight decay and LARS"
)


def _groups(decayed, fixed=(), wd=0.0):
    """lightly's split (get_weight_decay_parameters): norm layers and biases without weight decay,
    so lightly's LARS does not adapt them either. `fixed` modules are marked to keep the base LR."""
    from lightly.models.utils import get_weight_decay_parameters

    groups = []
    for mods, fix in ((decayed, False), (fixed, True)):
        if mods:
            dec, no = get_weight_decay_parameters(mods)
            groups += [
                {"params": [p for p in dec if p.requires_grad], "weight_decay": wd, "fix_lr": fix},
                {"params": [p for p in no if p.requires_grad], "weight_decay": 0.0, "fix_lr": fix},
            ]
    return [g for g in groups if g["params"]]


def _lars(groups, a):
    from lightly.utils.lars import LARS

    return LARS(groups, lr=0.0, momentum=0.9, trust_coefficient=a.lars_eta)


def _momentum_copy(*modules):
    import copy

    from lightly.models.utils import deactivate_requires_grad

    twins = [copy.deepcopy(m) for m in modules]
    for t in twins:
        deactivate_requires_grad(t)
    return twins


def _h(backbone, x):
    return backbone(x)[1]  # common's Backbone gives (feature map, pooled h)


def lightly_simclr(a, views, stats, total, spe):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    v = views[0]
    tf = SimCLRTransform(
        input_size=v.size,
        min_scale=v.scale[0],
        gaussian_blur=v.blur_p,
        normalize=stats,
        **_colour(v),
    )
    backbone = common.build_backbone(a.backbone, v.size <= 64)
    head = SimCLRProjectionHead(backbone.dim, a.proj_hidden, a.proj_dim)
    criterion = NTXentLoss(temperature=a.temperature)

    def loss(x, step, epoch):
        return criterion(*(head(_h(backbone, xi)) for xi in x))

    return dict(
        transform=tf,
        backbone=backbone,
        modules=[backbone, head],
        loss=loss,
        optimizer=_lars(_groups([backbone, head], wd=a.weight_decay), a),
        classes=["SimCLRTransform", "SimCLRProjectionHead", "NTXentLoss", "LARS"],
        reads=["temperature", "proj_hidden", "proj_dim", "projector", "lars_eta"],
        differences=(
            []
            if getattr(a, "projector", "") == "lightly"
            else [
                "lightly's SimCLRProjectionHead has bias-free Linears and BatchNorm1d after each; "
                f"CleanSSL's projector is --projector {getattr(a, 'projector', '?')} "
                "(pass --projector lightly for lightly's head)"
            ]
        )
        + [LARS_NOTE]
        + _view_notes(views, True),
    )


def lightly_mocov2(a, views, stats, total, spe):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import MoCoV2Transform
    from lightly.utils.scheduler import cosine_schedule

    v = views[0]
    tf = MoCoV2Transform(
        input_size=v.size,
        min_scale=v.scale[0],
        gaussian_blur=v.blur_p,
        normalize=stats,
        **_colour(v),
    )
    backbone = common.build_backbone(a.backbone, v.size <= 64)
    head = MoCoProjectionHead(backbone.dim, a.proj_hidden, a.proj_dim)
    key_backbone, key_head = _momentum_copy(backbone, head)
    criterion = NTXentLoss(temperature=a.temperature, memory_bank_size=(a.queue_size, a.proj_dim))

    def loss(x, step, epoch):
        m = cosine_schedule(step, total, a.tau_base, a.tau_end)
        update_momentum(backbone, key_backbone, m)
        update_momentum(head, key_head, m)
        q = [head(_h(backbone, xi)) for xi in x]
        with torch.no_grad():
            k = [key_head(_h(key_backbone, xi)) for xi in x]
        # One call for both directions: the bank's negatives are the same for both, as in CleanSSL.
        return criterion(torch.cat([q[0], q[1]]), torch.cat([k[1], k[0]]))

    return dict(
        transform=tf,
        backbone=backbone,
        modules=[backbone, head, key_backbone, key_head],
        loss=loss,
        optimizer=torch.optim.SGD(
            _groups([backbone, head], wd=a.weight_decay), lr=0.0, momentum=0.9
        ),
        classes=[
            "MoCoV2Transform",
            "MoCoProjectionHead",
            "NTXentLoss(memory_bank_size)",
            "update_momentum",
            "cosine_schedule",
        ],
        reads=["temperature", "proj_hidden", "proj_dim", "queue_size", "tau_base", "tau_end"],
        differences=[
            "the memory bank receives the keys of both views (2B a step, from the one symmetric "
            "NTXentLoss call); CleanSSL's queue receives view 2's keys (B a step)",
            "no shuffled BN: it only acts across processes in CleanSSL, and both run one process",
        ]
        + _view_notes(views, True),
    )


def lightly_byol(a, views, stats, total, spe):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import BYOLTransform
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    v1, v2 = views[:2]
    tf = BYOLTransform(
        BYOLView1Transform(
            input_size=v1.size,
            min_scale=v1.scale[0],
            gaussian_blur=v1.blur_p,
            solarization_prob=v1.solarize_p,
            normalize=stats,
            **_colour(v1),
        ),
        BYOLView2Transform(
            input_size=v2.size,
            min_scale=v2.scale[0],
            gaussian_blur=v2.blur_p,
            solarization_prob=v2.solarize_p,
            normalize=stats,
            **_colour(v2),
        ),
    )
    backbone = common.build_backbone(a.backbone, v1.size <= 64)
    head = BYOLProjectionHead(backbone.dim, a.proj_hidden, a.proj_dim)
    predictor = BYOLPredictionHead(a.proj_dim, a.pred_hidden, a.proj_dim)
    target_backbone, target_head = _momentum_copy(backbone, head)
    criterion = NegativeCosineSimilarity()

    def loss(x, step, epoch):
        m = cosine_schedule(step, total, a.tau_base, a.tau_final)
        update_momentum(backbone, target_backbone, m)
        update_momentum(head, target_head, m)
        p = [predictor(head(_h(backbone, xi))) for xi in x]
        with torch.no_grad():
            z = [target_head(_h(target_backbone, xi)) for xi in x]
        return 0.5 * (criterion(p[0], z[1]) + criterion(p[1], z[0]))

    return dict(
        transform=tf,
        backbone=backbone,
        modules=[backbone, head, predictor, target_backbone, target_head],
        loss=loss,
        optimizer=_lars(_groups([backbone, head, predictor], wd=a.weight_decay), a),
        classes=[
            "BYOLTransform",
            "BYOLView1Transform",
            "BYOLView2Transform",
            "BYOLProjectionHead",
            "BYOLPredictionHead",
            "NegativeCosineSimilarity",
            "update_momentum",
            "cosine_schedule",
            "LARS",
        ],
        reads=["tau_base", "tau_final", "proj_hidden", "proj_dim", "pred_hidden", "lars_eta"],
        differences=[
            "loss scale: lightly's 0.5 (ncs(p1, z2) + ncs(p2, z1)) is 1/4 of BYOL's 2 - 2 cos "
            "summed over both views (CleanSSL): the same optimum, 4x smaller gradients, so weight "
            "decay weighs 4x more against them and the biases and norms (plain SGD, no LARS) move "
            "4x slower (byol.py --loss-scale 0.25 takes lightly's; benchmarks/parity.py byol finds "
            "it the one difference in the step)",
            "the target keeps BatchNorm running statistics (unused: it runs in train mode); "
            "CleanSSL's has none",
            LARS_NOTE,
        ]
        + _view_notes(views),
    )


def lightly_simsiam(a, views, stats, total, spe):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform

    v = views[0]
    tf = SimSiamTransform(
        input_size=v.size,
        min_scale=v.scale[0],
        gaussian_blur=v.blur_p,
        normalize=stats,
        **_colour(v),
    )
    backbone = common.build_backbone(a.backbone, v.size <= 64)
    head = SimSiamProjectionHead(backbone.dim, a.proj_hidden, a.proj_dim)
    predictor = SimSiamPredictionHead(a.proj_dim, a.pred_hidden, a.proj_dim)
    criterion = NegativeCosineSimilarity()

    def loss(x, step, epoch):
        z = [head(_h(backbone, xi)) for xi in x]
        p = [predictor(zi) for zi in z]
        return 0.5 * (criterion(p[0], z[1].detach()) + criterion(p[1], z[0].detach()))

    fixed = [predictor] if a.fix_pred_lr else []
    decayed = [backbone, head] + ([] if a.fix_pred_lr else [predictor])
    return dict(
        transform=tf,
        backbone=backbone,
        modules=[backbone, head, predictor],
        loss=loss,
        optimizer=torch.optim.SGD(
            _groups(decayed, fixed, wd=a.weight_decay), lr=0.0, momentum=a.momentum
        ),
        classes=[
            "SimSiamTransform",
            "SimSiamProjectionHead",
            "SimSiamPredictionHead",
            "NegativeCosineSimilarity",
        ],
        reads=[
            "proj_hidden",
            "proj_dim",
            "pred_hidden",
            "momentum",
            "fix_pred_lr",
            "crop_min_scale",
        ],
        differences=_view_notes(views, True),
    )


def lightly_swav(a, views, stats, total, spe):
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.models.modules.memory_bank import MemoryBankModule
    from lightly.transforms import SwaVTransform

    g, loc = views[0], (views[2] if len(views) > 2 else None)
    n_local = len(views) - 2
    sizes, counts = (g.size,) + ((loc.size,) if loc else ()), (2,) + ((n_local,) if loc else ())
    tf = SwaVTransform(
        crop_sizes=sizes,
        crop_counts=counts,
        crop_min_scales=(g.scale[0],) + ((loc.scale[0],) if loc else ()),
        crop_max_scales=(g.scale[1],) + ((loc.scale[1],) if loc else ()),
        gaussian_blur=g.blur_p,
        normalize=stats,
        **_colour(g),
    )
    backbone = common.build_backbone(a.backbone, g.size <= 64)
    head = SwaVProjectionHead(backbone.dim, a.proj_hidden, a.proj_dim)
    freeze = int(a.freeze_prototypes_epochs * spe)
    prototypes = SwaVPrototypes(a.proj_dim, a.prototypes, n_steps_frozen_prototypes=freeze)
    queue_len = a.queue_size - a.queue_size % a.batch_size  # whole batches, as CleanSSL
    queues = (
        [MemoryBankModule(size=(queue_len, a.proj_dim), feature_dim_first=False) for _ in range(2)]
        if queue_len
        else []
    )
    start = a.queue_start * spe
    criterion = SwaVLoss(
        temperature=a.temperature,
        sinkhorn_iterations=a.sinkhorn_iters,
        sinkhorn_epsilon=a.sinkhorn_epsilon,
    )

    def loss(x, step, epoch):
        prototypes.normalize()
        z = [torch.nn.functional.normalize(head(_h(backbone, xi)), dim=1) for xi in x]
        scores = [prototypes(zi, step) for zi in z]
        queue_scores = None
        if (
            queues and step >= start
        ):  # filled from queue_start on, used once full of real embeddings (as CleanSSL)
            with torch.no_grad():
                banks = [qu(z[i].detach(), update=True)[1] for i, qu in enumerate(queues)]
                if (step - start) * x[0].shape[0] >= queue_len:
                    queue_scores = [prototypes(bk.to(z[0].device), step) for bk in banks]
        return criterion(scores[:2], scores[2:], queue_scores)

    notes = [
        "lightly's SwaVPrototypes is a Linear with a bias (normalize() scales the weights only); "
        "CleanSSL's prototypes have none",
        "lightly's Sinkhorn exponentiates the scores without subtracting their maximum",
        LARS_NOTE,
    ]
    if len({v.blur_p for v in views}) > 1:
        notes.append(
            "SwaVTransform has one blur probability for every crop: the first global crop's is used"
        )
    if any(v.solarize_p > 0 for v in views):
        notes.append("SwaVTransform has no solarization; the script's views ask for some")
    if loc and any(v != loc for v in views[2:]) or views[0] != views[1]:
        notes.append(
            "SwaVTransform has one distribution per crop size: the first crop of each size is used"
        )
    return dict(
        transform=tf,
        backbone=backbone,
        modules=[backbone, head, prototypes] + queues,
        loss=loss,
        optimizer=_lars(_groups([backbone, head, prototypes], wd=a.weight_decay), a),
        classes=[
            "SwaVTransform",
            "SwaVProjectionHead",
            "SwaVPrototypes",
            "SwaVLoss",
            "MemoryBankModule",
            "LARS",
        ],
        reads=[
            "temperature",
            "prototypes",
            "sinkhorn_epsilon",
            "sinkhorn_iters",
            "queue_size",
            "queue_start",
            "freeze_prototypes_epochs",
            "proj_hidden",
            "proj_dim",
            "local_crops",
            "lars_eta",
        ],
        differences=notes + _view_notes(views),
    )


def lightly_dino(a, views, stats, total, spe):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    g1, g2 = views[:2]
    loc = views[2] if len(views) > 2 else views[0]
    tf = DINOTransform(
        global_crop_size=g1.size,
        global_crop_scale=tuple(g1.scale),
        local_crop_size=loc.size,
        local_crop_scale=tuple(loc.scale),
        n_local_views=len(views) - 2,
        gaussian_blur=(g1.blur_p, g2.blur_p, loc.blur_p),
        solarization_prob=g2.solarize_p,
        normalize=stats,
        **_colour(g1),
    )
    backbone = common.build_backbone(a.backbone, g1.size <= 64)

    def dino_head():
        return DINOProjectionHead(
            backbone.dim,
            a.proj_hidden,
            a.proj_dim,
            a.prototypes,
            batch_norm=False,
            freeze_last_layer=a.freeze_last_layer,
            norm_last_layer=True,
        )

    head = dino_head()
    # deepcopy cannot copy a weight-normalized layer: a second head takes the student's weights
    # (DINO's start)
    (teacher_backbone,), teacher_head = _momentum_copy(backbone), dino_head()
    teacher_head.load_state_dict(head.state_dict())
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(
        output_dim=a.prototypes,
        warmup_teacher_temp=a.warmup_teacher_temp,
        teacher_temp=a.teacher_temp,
        warmup_teacher_temp_epochs=a.warmup_teacher_temp_epochs,
        student_temp=a.student_temp,
        center_momentum=a.center_momentum,
    )
    trained = [backbone, head]

    def loss(x, step, epoch):
        m = cosine_schedule(step, total, a.teacher_momentum, 1.0)
        update_momentum(backbone, teacher_backbone, m)
        update_momentum(head, teacher_head, m)
        with torch.no_grad():
            t = [teacher_head(_h(teacher_backbone, xi)) for xi in x[:2]]
        s = [head(_h(backbone, xi)) for xi in x]
        return criterion(t, s, epoch=epoch)

    def before_step(step, epoch):
        if a.clip_grad > 0:  # DINO's rule, as dino.py: each gradient tensor on its own
            for mod in trained:
                for p in mod.parameters():
                    if p.grad is not None:
                        p.grad.mul_((a.clip_grad / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        head.cancel_last_layer_gradients(current_epoch=epoch)

    groups = _groups(trained, wd=a.weight_decay)
    opt = (
        _lars(groups, a) if a.optimizer == "lars" else torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    )
    notes = [
        "lightly's last layer is weight-normalized (weight_v is optimized, g fixed at 1); CleanSSL "
        "optimizes the weight itself and normalizes it in the forward pass: the same function, "
        "other optimizer dynamics",
        "the teacher keeps BatchNorm running statistics (unused: it runs in train mode); "
        "CleanSSL's has none",
    ]
    if a.optimizer == "lars":
        notes.append(LARS_NOTE)
    if g1.solarize_p > 0 or any(v.solarize_p > 0 for v in views[2:]):
        notes.append(
            "DINOTransform solarizes only the second global crop; "
            "the script's views solarize others too"
        )
    if any(v != loc for v in views[2:]) or g1.jitter != g2.jitter:
        notes.append(
            "DINOTransform has one colour distribution for every crop: "
            "the first global crop's is used"
        )
    return dict(
        transform=tf,
        backbone=backbone,
        modules=[backbone, head, teacher_backbone, teacher_head],
        loss=loss,
        before_step=before_step,
        optimizer=opt,
        classes=[
            "DINOTransform",
            "DINOProjectionHead",
            "DINOLoss",
            "update_momentum",
            "cosine_schedule",
        ]
        + (["LARS"] if a.optimizer == "lars" else []),
        reads=[
            "optimizer",
            "lars_eta",
            "local_crops",
            "global_scale",
            "local_scale",
            "proj_hidden",
            "proj_dim",
            "prototypes",
            "student_temp",
            "teacher_temp",
            "warmup_teacher_temp",
            "warmup_teacher_temp_epochs",
            "center_momentum",
            "teacher_momentum",
            "clip_grad",
            "freeze_last_layer",
        ],
        differences=notes + _view_notes(views, bicubic=True),
    )


LIGHTLY = {
    "simclr": lightly_simclr,
    "mocov2": lightly_mocov2,
    "byol": lightly_byol,
    "simsiam": lightly_simsiam,
    "swav": lightly_swav,
    "dino": lightly_dino,
}


def lightly_half(plan_path):
    """Train with lightly's implementation for the plan's steps; save the backbone at each point."""
    import warnings

    import lightly
    from lightly.utils.scheduler import cosine_warmup_schedule

    warnings.filterwarnings(
        "ignore", message=".*weight_norm.*"
    )  # lightly's DINO head uses the old API
    plan = read_json(plan_path)
    a = SimpleNamespace(**plan["args"])
    bud = plan["budget"]
    total, spe, batch = bud["steps"], bud["steps_per_epoch"], bud["batch_size"]
    views = [SimpleNamespace(**v) for v in plan["views"]]
    mean, std = common.STATS[a.dataset]
    torch.manual_seed(a.seed)  # the backbone first, as in the script
    np.random.seed(a.seed)
    random.seed(a.seed)
    spec = LIGHTLY[plan["method"]](a, views, {"mean": list(mean), "std": list(std)}, total, spe)
    use_cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    for m in spec["modules"]:
        m.to(device).train()
    opt = spec["optimizer"]
    base_lr, warmup = a.lr * batch / 256, int(a.warmup_epochs * spe)
    data = _Transformed(common.make_dataset(a.dataset, a.data_dir, train=True), spec["transform"])
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=a.workers,
        generator=torch.Generator().manual_seed(a.seed),
        worker_init_fn=_seed_worker,
        persistent_workers=a.workers > 0,
        pin_memory=use_cuda,
    )
    print(
        f"lightly {lightly.__version__} {plan['method']}: {len(data)} images at {views[0].size}px, "
        f"batch {batch}, {total} steps on {device.type}; {', '.join(spec['classes'])}",
        flush=True,
    )
    points, it, train_s, last_print, t_start = [], iter(loader), 0.0, time.time(), time.time()
    for step in range(total):
        epoch = step // spe  # the script's epoch: epoch-counted knobs count in these
        try:
            x, _ = next(it)
        except StopIteration:  # a whole pass of the data set is done: reshuffle
            it = iter(loader)
            x, _ = next(it)
        t0 = time.time()
        x = [xi.to(device, non_blocking=True) for xi in x]
        lr = cosine_warmup_schedule(
            step, total, base_lr, 0.0, warmup, 0.0
        )  # linear warm-up from 0, then cosine to 0
        for gr in opt.param_groups:
            gr["lr"] = base_lr if gr.get("fix_lr") else lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            loss = spec["loss"](x, step, epoch)
        if not torch.isfinite(loss):
            print(
                f"error: the lightly loss became non-finite at step {step + 1}; stopping.",
                flush=True,
            )
            return 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if "before_step" in spec:
            spec["before_step"](step, epoch)
        opt.step()
        train_s += time.time() - t0
        if (
            (step + 1) % max(1, a.log_every) == 0
            or time.time() - last_print >= 30
            or step + 1 == total
        ):
            left = (time.time() - t_start) / (step + 1) * (total - step - 1)
            print(
                f"step {step + 1}/{total} (epoch {epoch + 1}/{bud['epochs']}) "
                f"loss {loss.item():.4f} lr {lr:.4g} "
                f"{(step + 1) * batch / max(train_s, 1e-9):.0f} img/s, {left / 60:.1f} min left",
                flush=True,
            )
            last_print = time.time()
        done = step + 1
        if done % spe == 0 and ((done // spe) % bud["knn_every_epochs"] == 0 or done == total):
            path = os.path.join(plan["run_dir"], f"backbone_step{done}.pt")
            torch.save(spec["backbone"].state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
            points.append({"step": done, "images": done * batch, "path": path})
    write_json(
        {
            "points": points,
            "train_seconds": train_s,
            "lightly": lightly.__version__,
            "torch": torch.__version__,
            "classes": spec["classes"],
            "reads": spec["reads"],
            "differences": spec["differences"]
            + COMMON_NOTES
            + ([] if getattr(a, "per_view_bn", False) else [PER_VIEW_NOTE]),
        },
        os.path.join(plan["run_dir"], "result.json"),
    )
    return 0


# --- main -------------------------------------------------------------------------------------
def main(b):
    if b.half == "lightly":
        return lightly_half(b.plan)
    if b.table:
        rows = [r for r in (table_row(b.out, m) for m in METHODS) if r]
        print(HEADER + ("\n" + "\n".join(rows) if rows else ""))
        return 0
    if b.method not in METHODS:
        raise common.UserError(
            f"unknown method '{b.method}': choose one of {', '.join(METHODS)}."
            if b.method
            else f"name a method ({', '.join(METHODS)}) or pass --table."
        )
    common.check_dataset(b.dataset, b.data_dir)
    lightly_py, versions, skip = None, None, None
    if b.impl in ("both", "lightly"):
        if b.method in NO_LIGHTLY:
            skip = NO_LIGHTLY[b.method]
        else:
            lightly_py, found = find_lightly(b.lightly_python)
            if lightly_py:
                versions = found
            else:
                skip = found
        if skip and b.impl == "lightly":
            raise common.UserError(f"the lightly half cannot run: {skip}.")
        if skip:
            print(f"lightly half skipped: {skip}; the CleanSSL half runs alone.", flush=True)
    os.makedirs(b.out, exist_ok=True)
    run_root = os.path.join(b.out, "runs")  # checkpoints: git-ignored
    plan = make_plan(b)
    bud = plan["budget"]
    print(
        f"{b.method}: {bud['images']:,} images = {bud['steps']} steps of {bud['batch_size']} "
        f"= {bud['epochs']} script epochs of {bud['steps_per_epoch']} steps, "
        f"kNN every {bud['knn_every_epochs']}; "
        f"warm-up {bud['warmup_steps']} steps; knobs scaled to the budget: {plan['scaled_knobs']}",
        flush=True,
    )
    random_knn = random_baseline(b, plan["args"]["backbone"])
    failed = False
    if b.impl in ("both", "cleanssl"):
        failed |= run_cleanssl(b, plan, random_knn, run_root) is None
    if b.impl in ("both", "lightly"):
        if lightly_py:
            failed |= run_lightly(b, plan, random_knn, run_root, lightly_py, versions) is None
        elif b.method in NO_LIGHTLY:
            write_json(
                {
                    "method": b.method,
                    "impl": "lightly",
                    "status": "lightly has none",
                    "reason": skip,
                    "budget": bud,
                    "command": "python benchmarks/learning.py "
                    + " ".join(shlex.quote(x) for x in sys.argv[1:]),
                    "date": now(),
                },
                os.path.join(b.out, f"{b.method}_lightly.json"),
            )
    if load_runs(b.out, b.method):
        print(f"wrote {plot(b.out, b.method)}", flush=True)
        print(HEADER)
        print(table_row(b.out, b.method), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(parse_args()))
    except common.UserError as e:
        common.fail(str(e))
