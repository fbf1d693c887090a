"""Do the add-ons help? Q-Score regularization and spatial cross-attention against their baseline.

One method, one budget (the learning study's: benchmarks/learning.py, RESULTS.md), trained as
  baseline   the method script with the study's flags (--extra),
  qscore     the same plus --qscore-lambda 0.1 (Kalibhat et al., Eq. 4),
  xattn      the same plus --xattn (Seyfi et al., Eq. 7), clustering every
             --xattn-cluster-every epochs,
for each seed, one run at a time. Each run is then measured three ways:
  - online kNN top-1 at the end (learning.py's protocol: k = 200, t = 0.1, the fixed 10,000-image
    bank, the whole test split) and the training images/s;
  - eval_linear.py: the offline linear probe's top-1 on the frozen backbone;
  - interpret.py --only qscore,adai: Q-Score's AUROC and AUPRC as a label-free predictor of a
    correct probe prediction (correct as positive), mean |L_i| and mean confidence over the test
    images (Fig. 5's quantities), the share of empty L_i, and Average Drop / Average Increase of the
    class explanation maps (Seyfi et al., Eq. 8; lower AD and higher AI are better).

    python benchmarks/addons.py simclr --seeds 0 1 --images 16000 --batch-size 64 \\
        --warmup-images 1600 --workers 2 --extra "--projector lightly --lars-mode official"
    python benchmarks/addons.py byol --seeds 0 1 --images 16000 --batch-size 64 \\
        --warmup-images 1600 --workers 2 --extra "--lars-mode official"
    python benchmarks/addons.py simclr --table     # the table of what --out holds, and the verdicts

Resumable as a queue: a (config, seed) whose summary.json exists is not run again, so the same
command continues where a killed or time-limited session stopped; --force runs it again.

Outputs in --out (default benchmarks/results/addons): <method>_<config>_s<seed>/summary.json (every
number, the commands, the machine, the commit) beside learning.py's <method>_cleanssl.json; the run
folder with the weights under its runs/ (git-ignored); <method>.json, the aggregate: for each
config and measure the mean, the spread (half the range over seeds) and the values; and a
Markdown table. Verdict per add-on and measure: "helped" or "hurt" when the add-on's range over
seeds lies wholly above or below the baseline's, else "within seed noise" (with two seeds, the
range is all the noise estimate there is).
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import interpret  # noqa: E402
import learning  # noqa: E402

CONFIGS = {"baseline": [], "qscore": ["--qscore-lambda", "0.1"], "xattn": ["--xattn"]}
# (key in summary.json, label, higher is better)
MEASURES = [
    ("knn_top1", "kNN top-1", True),
    ("linear_top1", "linear top-1", True),
    ("qscore_auroc", "Q-Score AUROC", True),
    ("qscore_auprc", "Q-Score AUPRC", True),
    ("mean_L", "mean |L_i|", None),
    ("share_empty_L", "empty L_i", None),
    ("mean_confidence", "confidence", None),
    ("average_drop", "AD", False),
    ("average_increase", "AI", True),
    ("images_per_s", "img/s", None),  # set by the machine's load as much as by the add-on
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("method", help=f"one of {', '.join(learning.METHODS)}")
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every config")
    p.add_argument("--dataset", default="folder", help="as learning.py (digits for plumbing tests)")
    p.add_argument(
        "--data-dir", default=os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10")
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--images", type=int, default=16_000, help="budget: images seen in training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup-images", type=int, default=1600)
    p.add_argument("--knn-limit", type=int, default=10_000, help="kNN bank, as learning.py")
    p.add_argument(
        "--points",
        type=int,
        default=2,
        help="kNN points of each run's curve (2: as the learning study)",
    )
    p.add_argument("--epochs-per-point", type=int, default=5, help="as learning.py")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help="the study's flags for the script, as learning.py; a single flag as --extra=--FLAG",
    )
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument(
        "--xattn-cluster-every",
        type=int,
        default=5,
        help="the xattn config's --xattn-cluster-every: learning.py's epochs are 1/31 of a pass "
        "over CIFAR-10 (1,600 of 50,000 images), and each clustering embeds all 50,000 (3-4 min "
        "here); the paper clusters once a pass. 5: at the start and half-way, 2 clusterings in a "
        "10-epoch run",
    )
    p.add_argument("--linear-epochs", type=int, default=100, help="eval_linear.py --epochs")
    p.add_argument(
        "--linear-train-limit", type=int, default=0, help="eval_linear.py --train-limit (0: all)"
    )
    p.add_argument("--max-images", type=int, default=256, help="interpret.py --max-images (AD/AI)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "addons"))
    p.add_argument("--force", action="store_true", help="run again what has a summary.json")
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    return p.parse_args(argv)


def check(a):
    if a.method not in learning.METHODS:
        raise common.UserError(
            f"unknown method '{a.method}': choose one of {', '.join(learning.METHODS)}."
        )
    a.configs = [c for c in a.configs.split(",") if c]
    bad = [c for c in a.configs if c not in CONFIGS]
    if bad or not a.configs:
        raise common.UserError(
            f"unknown config '{','.join(bad)}': choose from {', '.join(CONFIGS)}."
        )
    for e in a.extra:
        if "--qscore-lambda" in e or "--xattn" in e.split():
            raise common.UserError("--extra may not set an add-on flag: the configs set them.")
    if not a.table:
        common.check_dataset(a.dataset, a.data_dir)


def run_step(cmd, log):
    """Run one command of the measurement, its output appended to log; fail with its last lines."""
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        fh.flush()
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        with open(log) as fh:
            tail = "".join(fh.readlines()[-15:])
        raise RuntimeError(f"{os.path.basename(cmd[1])} exited {rc} (log: {log}):\n{tail}")
    return time.time() - t0


def train_command(a, config, seed, folder):
    """learning.py's CleanSSL half for one (config, seed): the study's --extra, then the
    add-on's flags."""
    cmd = [
        sys.executable,
        os.path.join("benchmarks", "learning.py"),
        a.method,
        "--impl",
        "cleanssl",
        "--seed",
        str(seed),
        "--dataset",
        a.dataset,
        "--data-dir",
        a.data_dir,
        "--image-size",
        str(a.image_size),
        "--images",
        str(a.images),
        "--batch-size",
        str(a.batch_size),
        "--warmup-images",
        str(a.warmup_images),
        "--points",
        str(a.points),
        "--epochs-per-point",
        str(a.epochs_per_point),
        "--knn-limit",
        str(a.knn_limit),
        "--workers",
        str(a.workers),
        "--out",
        folder,
    ]
    # "--extra=VALUE", one token: argparse takes a lone "--extra --xattn" for two options
    own = CONFIGS[config] + (
        ["--xattn-cluster-every", str(a.xattn_cluster_every)] if config == "xattn" else []
    )
    return cmd + [f"--extra={e}" for e in a.extra + [" ".join(own)] if e]


def measure(a, config, seed):
    """Train, probe and interpret one (config, seed); returns its summary."""
    folder = os.path.abspath(os.path.join(a.out, f"{a.method}_{config}_s{seed}"))
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "log.txt")
    if os.path.exists(log):
        os.remove(log)
    for f in os.listdir(a.out):  # the random backbone's kNN, computed once for all runs
        if (
            f.startswith("random_")
            and f.endswith(".json")
            and not os.path.exists(os.path.join(folder, f))
        ):
            shutil.copy(os.path.join(a.out, f), folder)
    py = sys.executable
    train = train_command(a, config, seed, folder)
    seconds = {"train": run_step(train, log)}
    for f in os.listdir(folder):
        if f.startswith("random_") and not os.path.exists(os.path.join(a.out, f)):
            shutil.copy(os.path.join(folder, f), a.out)
    learned = learning.read_json(os.path.join(folder, f"{a.method}_cleanssl.json"))
    run_dir = learned["run_dir"]
    probe = [
        py,
        "eval_linear.py",
        run_dir,
        "--epochs",
        str(a.linear_epochs),
        "--workers",
        str(a.workers),
        "--train-limit",
        str(a.linear_train_limit),
    ]
    seconds["linear"] = run_step(probe, log)
    look = [py, "interpret.py", run_dir, "--only", "qscore,adai", "--max-images", str(a.max_images)]
    seconds["interpret"] = run_step(look, log)
    r = {
        "linear": learning.read_json(os.path.join(run_dir, "linear.json")),
        "interpret": learning.read_json(os.path.join(run_dir, "interpret", "interpret.json")),
    }
    q = r["interpret"]["qscore"]
    summary = {
        "method": a.method,
        "config": config,
        "seed": seed,
        "addon_flags": CONFIGS[config],
        "knn_top1": learned["final_knn"],
        "random_knn": learned["random_knn"],
        "linear_top1": interpret.final_value(r, "linear", "offline_linear_top1"),
        # eval_linear.py's reference: the same probe of the seed-0 random network (cached)
        "random_linear_top1": r["linear"].get("random_init", {}).get("offline_linear_top1"),
        "qscore_auroc": q.get("auroc_correct_positive"),
        "qscore_auprc": q.get("auprc_correct_positive"),
        "mean_L": interpret.final_value(r, "interpret", "all.mean_L"),
        "share_empty_L": q.get("share_empty_L"),
        "mean_confidence": interpret.final_value(r, "interpret", "all.mean_confidence"),
        "average_drop": r["interpret"]["adai"]["average_drop"],
        "average_increase": r["interpret"]["adai"]["average_increase"],
        "images_per_s": learned["images_per_s"],
        "budget": learned["budget"],
        "minutes": {k: v / 60 for k, v in seconds.items()},
        "commands": [" ".join(shlex.quote(c) for c in cmd[1:]) for cmd in (train, probe, look)],
        "run_dir": os.path.relpath(run_dir, REPO),
        "git": learned["git"],
        "machine": learning.machine(),
        "date": learning.now(),
    }
    learning.write_json(summary, os.path.join(folder, "summary.json"))
    return summary


def load(a):
    """{config: [summary of each seed]} of what --out holds for the method."""
    runs = {}
    for name in sorted(os.listdir(a.out)):
        path = os.path.join(a.out, name, "summary.json")
        if name.startswith(f"{a.method}_") and os.path.isfile(path):
            s = learning.read_json(path)
            runs.setdefault(s["config"], []).append(s)
    return runs


def random_row(runs):
    """The random network's kNN (learning.py's, every summary has it) and linear probe (eval_linear
    .py's random_init in a summary, or in a run's linear.json when its summary predates it)."""
    row = {}
    for rs in runs.values():
        for r in rs:
            if isinstance(r.get("random_knn"), (int, float)):
                row["knn_top1"] = r["random_knn"]
            lin = r.get("random_linear_top1")
            if lin is None and r.get("run_dir"):
                path = os.path.join(REPO, r["run_dir"], "linear.json")
                if os.path.isfile(path):
                    lin = learning.read_json(path).get("random_init", {}).get("offline_linear_top1")
            if lin is not None:
                row["linear_top1"] = lin
    return row


def aggregate(runs):
    agg = {}
    for config, rs in runs.items():
        agg[config] = {"seeds": [r["seed"] for r in rs]}
        for key, _, _ in MEASURES:
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            agg[config][key] = (
                {
                    "mean": sum(vals) / len(vals),
                    "spread": (max(vals) - min(vals)) / 2,
                    "values": vals,
                }
                if vals
                else None
            )
    return agg


def verdict(base, other, higher_better):
    """helped / hurt / within seed noise: do the seed ranges overlap?"""
    if base is None or other is None:
        return "-"
    lo_b, hi_b, lo_o, hi_o = (
        min(base["values"]),
        max(base["values"]),
        min(other["values"]),
        max(other["values"]),
    )
    if len(base["values"]) < 2 or len(other["values"]) < 2:
        return "one seed: no verdict"
    if lo_o > hi_b:
        return "higher" if higher_better is None else ("helped" if higher_better else "hurt")
    if hi_o < lo_b:
        return "lower" if higher_better is None else ("hurt" if higher_better else "helped")
    return "within seed noise"


def table(a):
    runs = load(a)
    if not runs:
        return f"no results for {a.method} in {a.out}."
    agg = aggregate(runs)
    fmt = lambda m, key: (
        "-"
        if m is None
        else (
            f"{m['mean']:.1f} ± {m['spread']:.1f}"
            if key == "images_per_s"
            else f"{m['mean']:.3f} ± {m['spread']:.3f}"
        )
    )
    head = "| config | seeds | " + " | ".join(label for _, label, _ in MEASURES) + " |"
    lines = [head, "|" + "---|" * (len(MEASURES) + 2)]
    for config in CONFIGS:
        if config in agg:
            lines.append(
                f"| {config} | {len(agg[config]['seeds'])} | "
                + " | ".join(fmt(agg[config][k], k) for k, _, _ in MEASURES)
                + " |"
            )
    ref = random_row(runs)
    if ref:
        cells = {"knn_top1": ref.get("knn_top1"), "linear_top1": ref.get("linear_top1")}
        lines.append(
            "| random init (seed 0) | - | "
            + " | ".join("-" if cells.get(k) is None else f"{cells[k]:.3f}" for k, _, _ in MEASURES)
            + " |"
        )
    verdicts = {}
    if "baseline" in agg:
        for config in (c for c in CONFIGS if c != "baseline" and c in agg):
            verdicts[config] = {
                k: verdict(agg["baseline"][k], agg[config][k], hb) for k, _, hb in MEASURES
            }
            lines.append(
                f"\n{config} against baseline: "
                + "; ".join(f"{label} {verdicts[config][k]}" for k, label, _ in MEASURES)
                + "."
            )
    learning.write_json(
        {
            "method": a.method,
            "aggregate": agg,
            "verdicts": verdicts,
            "random_init": ref,
            "measures": [k for k, _, _ in MEASURES],
            "date": learning.now(),
        },
        os.path.join(a.out, f"{a.method}.json"),
    )
    return "\n".join(lines)


def main(a):
    check(a)
    os.makedirs(a.out, exist_ok=True)
    if a.table:
        print(table(a))
        return 0
    todo = [(c, s) for s in a.seeds for c in a.configs]
    for i, (config, seed) in enumerate(todo):
        done = os.path.join(a.out, f"{a.method}_{config}_s{seed}", "summary.json")
        if os.path.isfile(done) and not a.force:
            print(
                f"[{i + 1}/{len(todo)}] {config} seed {seed}: done before "
                f"({os.path.relpath(done, REPO)})",
                flush=True,
            )
            continue
        print(
            f"[{i + 1}/{len(todo)}] {config} seed {seed}: training, probe, interpret ...",
            flush=True,
        )
        t0 = time.time()
        s = measure(a, config, seed)
        print(
            f"[{i + 1}/{len(todo)}] {config} seed {seed}: kNN {s['knn_top1']:.4f}, "
            f"linear {s['linear_top1']:.4f}, Q-Score AUROC {s['qscore_auroc']:.3f}, "
            f"AD {s['average_drop']:.3f} AI {s['average_increase']:.3f} "
            f"({(time.time() - t0) / 60:.1f} min)",
            flush=True,
        )
    print(table(a))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(parse_args()))
    except common.UserError as e:
        common.fail(str(e))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
