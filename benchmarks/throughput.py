"""Training throughput of every CleanSSL method script, against its ceiling and lightly.

For each method script found in the repository (any top-level *.py with `METHOD = "..."`,
so scripts that land later are measured too) and each variant (plain, --qscore-lambda 0.1,
--xattn), this measures, in one process:
  train     the script's own main() for 2 epochs of --steps steps each, with the real data
            path (--data-paths: cpu = PIL in DataLoader workers, tensor = decoded uint8 +
            batched augmentations on the device); images/s and peak memory of epoch 2 as the
            script logs them (epoch 1 is the warm-up: cuDNN autotuning, compilation, caches).
            Steps only: set-up, k-means of --xattn and checkpoints are outside the timing.
  no-data   the same main() with common.TrainLoader replaced by one that yields the same
            device tensors every step: the whole step (loss, optimizer, bookkeeping) without data.
  ceiling   the script's model (the module main() wraps in DDP and calls once a step):
            forward + backward alone on random tensors of the crop shapes, already on the
            device, bf16 autocast and channels_last on CUDA; no optimizer, no loss, no teacher.
  lightly   (--lightly, when `import lightly` works) lightly's own implementation of the
            method with its transforms in a DataLoader using every CPU core, same backbone,
            image size and batch; end-to-end images/s over the same timed steps.
Writes JSON (--out) and prints the Markdown table of BENCHMARKS.md; --grid writes a PNG of
augmented views from both data paths for a person to look at.

    python benchmarks/throughput.py --dataset cifar10 --data-dir data --batch-size 512 \\
        --lightly   # GPU
    python benchmarks/throughput.py --dataset folder --data-dir ../shared/data/cifar10 \\
        --image-size 32 --batch-size 64 --steps 3 --train-limit 1024 --methods simclr \\
        --lightly   # CPU
lightly is not a CleanSSL dependency: install it in the benchmark's own environment only
(see BENCHMARKS.md).
"""

import argparse
import contextlib
import datetime
import gc
import glob
import importlib
import io
import json
import os
import platform
import re
import sys
import tempfile
import time

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

VARIANTS = {"plain": [], "qscore": ["--qscore-lambda", "0.1"], "xattn": ["--xattn"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods", default="", help="comma-separated method names; default: every script found"
    )
    p.add_argument(
        "--variants", default="plain,qscore,xattn", help="comma-separated: plain, qscore, xattn"
    )
    p.add_argument(
        "--data-paths",
        default="cpu,tensor",
        help="comma-separated data paths of the train measurement",
    )
    p.add_argument("--dataset", default="cifar10", choices=common.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=512, help="global batch")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed steps (and as many warm-up steps); 0: a whole epoch",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count(),
        help="DataLoader workers of the cpu path and lightly",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="train on the first N images only (small CPU runs); 0: all",
    )
    p.add_argument(
        "--xattn-clusters", type=int, default=100, help="k-means clusters of the --xattn variant"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="pass --compile to the scripts and compile the ceiling's model",
    )
    p.add_argument(
        "--lightly",
        action="store_true",
        help="also measure lightly's implementation when it imports",
    )
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "throughput.json"))
    p.add_argument(
        "--grid",
        default=os.path.join(REPO, "benchmarks", "results", "views.png"),
        help="'' for none",
    )
    p.add_argument("--grid-only", action="store_true", help="write the grid of views and stop")
    return p.parse_args(argv)


def discover():
    """Method scripts: top-level files that declare METHOD = "<name>"."""
    found = {}
    for path in sorted(glob.glob(os.path.join(REPO, "*.py"))):
        with open(path) as fh:
            m = re.search(r'^METHOD = "(\w+)"', fh.read(), re.M)
        if m:
            found[m.group(1)] = os.path.splitext(os.path.basename(path))[0]
    return found


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def limited_train_set(limit):
    """make_dataset(train=True) returns its first `limit` images, so that small CPU runs (and
    the --xattn k-means over the whole training set) stay small."""
    if not limit:
        yield
        return
    original = common.make_dataset

    def make(name, data_dir, train=True, download=True):
        ds = original(name, data_dir, train, download)
        return torch.utils.data.Subset(ds, list(range(min(limit, len(ds))))) if train else ds

    common.make_dataset = make
    try:
        yield
    finally:
        common.make_dataset = original


class ConstantLoader:
    """Stands in for common.TrainLoader: the same random device tensors every step, so that
    main() runs its whole step without any data work. Records the views it was asked for."""

    last = None

    def __init__(
        self, dataset, views, batch_size, stats, device, seed=0, workers=2, positive=None, **_
    ):
        self.n, self.local, self.device, self.views = (
            len(dataset),
            batch_size // common.world_size(),
            device,
            views,
        )
        self.positive, self.p = positive or views[0], 0
        g = torch.Generator(device=device).manual_seed(seed)
        self.crops = [
            torch.randn(self.local, 3, v.size, v.size, generator=g, device=device) for v in views
        ]
        self.idx = torch.arange(self.local, device=device)
        ConstantLoader.last = self

    def __len__(self):
        return self.n // (self.local * common.world_size())

    def set_epoch(self, epoch, start_step=0, bad_images=0):
        self.bad_images = bad_images  # no file is read: none is unreadable

    def set_clusters(self, labels, positives):
        self.p = positives
        self.pos = torch.randn(
            self.local * positives, 3, self.positive.size, self.positive.size, device=self.device
        )

    def __iter__(self):
        for _ in range(len(self)):
            yield self.crops, self.idx, self.pos if self.p else None


def run_main(mod, argv, fake=False):
    """main() of a method script for 2 epochs; returns epoch 2's metrics line."""
    with tempfile.TemporaryDirectory() as run_dir:
        args = mod.parse_args(argv + ["--run-dir", run_dir])
        original = common.TrainLoader
        if fake:
            common.TrainLoader = ConstantLoader
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                rc = mod.main(args)
        finally:
            common.TrainLoader = original
        if rc:
            raise RuntimeError(f"main() returned {rc}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            return [json.loads(line) for line in fh][-1]


def model_class(mod):
    """The method's model: the nn.Module of the script built as Class(args, small_images)."""
    for obj in vars(mod).values():
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == mod.__name__:
            names = list(obj.__init__.__code__.co_varnames[1 : obj.__init__.__code__.co_argcount])
            if names == ["args", "small_images"]:
                return obj
    raise RuntimeError(f"no Module(args, small_images) in {mod.__name__}")


def ceiling(mod, argv, views, positive, positives, device, steps, compile_model):
    """Forward + backward of the model alone on device tensors: images/s and peak GiB."""
    args = mod.parse_args(argv)
    model = model_class(mod)(args, small_images=args.image_size <= 64).to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    step_fn = torch.compile(model) if compile_model else model
    local = args.batch_size
    mf = torch.channels_last if cuda else torch.contiguous_format
    crops = [
        torch.randn(local, 3, v.size, v.size, device=device).contiguous(memory_format=mf)
        for v in views
    ]
    pos = (
        torch.randn(local * positives, 3, positive.size, positive.size, device=device)
        if positives
        else None
    )

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = step_fn(crops, pos)
            loss = sum(
                v.float().mean() for v in out.values() if torch.is_tensor(v) and v.requires_grad
            )
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(steps):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": steps * local / seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
    }


# --- lightly: its own implementation, transforms and DataLoader ----------------------------
class _Transformed(torch.utils.data.Dataset):
    def __init__(self, base, tf):
        self.base, self.tf = base, tf

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, y = self.base[i]
        return self.tf(img.convert("RGB")), y


def lightly_simclr(b, size, stats):
    """lightly's SimCLR (docs' example): SimCLRTransform, projection head, NTXentLoss, LARS."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from lightly.utils.lars import LARS

    tf = SimCLRTransform(
        **_kw(size, stats, cj_strength=0.5)
    )  # 0.4/0.4/0.4/0.1 jitter, as simclr.py
    model = nn.ModuleDict(
        {
            "backbone": common.build_backbone(b.backbone, size <= 64),
            "head": SimCLRProjectionHead(512 if b.backbone != "resnet50" else 2048, 2048, 256),
        }
    )
    criterion = NTXentLoss(temperature=0.2)

    def loss_fn(views):
        z = [model["head"](model["backbone"](v)[1]) for v in views]
        return criterion(z[0], z[1])

    return (
        tf,
        model,
        loss_fn,
        lambda params: LARS(params, lr=0.4 * b.batch_size / 256, momentum=0.9, weight_decay=1e-5),
    )


def _blur(size):
    return 0.0 if size <= 32 else None  # None: the transform's own default


def _kw(size, stats, **kw):
    blur = _blur(size)
    return dict(
        input_size=size,
        normalize={"mean": list(stats[0]), "std": list(stats[1])},
        **({"gaussian_blur": blur} if blur is not None else {}),
        **kw,
    )


def _momentum_pair(backbone, head):
    """A student (backbone, head) and its frozen momentum copy, as lightly's examples build them."""
    import copy

    from lightly.models.utils import deactivate_requires_grad

    teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(head)})
    deactivate_requires_grad(teacher)
    return teacher


def lightly_byol(b, size, stats):
    """lightly's BYOL example: BYOLTransform, projection and prediction heads, momentum copy,
    NegativeCosineSimilarity, LARS."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import BYOLTransform
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
    from lightly.utils.lars import LARS

    tf = BYOLTransform(
        BYOLView1Transform(**_kw(size, stats)), BYOLView2Transform(**_kw(size, stats))
    )
    d = 512 if b.backbone != "resnet50" else 2048
    model = nn.ModuleDict(
        {
            "backbone": common.build_backbone(b.backbone, size <= 64),
            "head": BYOLProjectionHead(d, 4096, 256),
            "predictor": BYOLPredictionHead(256, 4096, 256),
        }
    )
    model["teacher"] = _momentum_pair(model["backbone"], model["head"])
    criterion = NegativeCosineSimilarity()

    def loss_fn(views):
        update_momentum(model["backbone"], model["teacher"]["backbone"], 0.99)
        update_momentum(model["head"], model["teacher"]["head"], 0.99)
        p = [model["predictor"](model["head"](model["backbone"](v)[1])) for v in views]
        with torch.no_grad():
            t = [model["teacher"]["head"](model["teacher"]["backbone"](v)[1]) for v in views]
        return 0.5 * (criterion(p[0], t[1]) + criterion(p[1], t[0]))

    return (
        tf,
        model,
        loss_fn,
        lambda params: LARS(params, lr=1.0 * b.batch_size / 256, momentum=0.9, weight_decay=1e-5),
    )


def lightly_simsiam(b, size, stats):
    """lightly's SimSiam example: SimSiamTransform, projection and prediction heads,
    NegativeCosineSimilarity with stop-gradient, SGD."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform

    tf = SimSiamTransform(**_kw(size, stats))
    d = 512 if b.backbone != "resnet50" else 2048
    model = nn.ModuleDict(
        {
            "backbone": common.build_backbone(b.backbone, size <= 64),
            "head": SimSiamProjectionHead(d, 2048, 2048),
            "predictor": SimSiamPredictionHead(2048, 512, 2048),
        }
    )
    criterion = NegativeCosineSimilarity()

    def loss_fn(views):
        z = [model["head"](model["backbone"](v)[1]) for v in views]
        p = [model["predictor"](x) for x in z]
        return 0.5 * (criterion(p[0], z[1].detach()) + criterion(p[1], z[0].detach()))

    return (
        tf,
        model,
        loss_fn,
        lambda params: torch.optim.SGD(
            params, lr=0.05 * b.batch_size / 256, momentum=0.9, weight_decay=1e-4
        ),
    )


def lightly_moco(b, size, stats):
    """lightly's MoCo v2 example: MoCoV2Transform, projection head, momentum key encoder,
    NTXentLoss with a memory bank of negatives, SGD."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import MoCoV2Transform

    tf = MoCoV2Transform(**_kw(size, stats))
    d = 512 if b.backbone != "resnet50" else 2048
    model = nn.ModuleDict(
        {
            "backbone": common.build_backbone(b.backbone, size <= 64),
            "head": MoCoProjectionHead(d, 2048, 128),
        }
    )
    model["teacher"] = _momentum_pair(model["backbone"], model["head"])
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(32768, 128))

    def loss_fn(views):
        update_momentum(model["backbone"], model["teacher"]["backbone"], 0.99)
        update_momentum(model["head"], model["teacher"]["head"], 0.99)
        q = model["head"](model["backbone"](views[0])[1])
        with torch.no_grad():
            k = model["teacher"]["head"](model["teacher"]["backbone"](views[1])[1])
        return criterion(q, k)

    return (
        tf,
        model,
        loss_fn,
        lambda params: torch.optim.SGD(
            params, lr=0.3 * b.batch_size / 256, momentum=0.9, weight_decay=1e-4
        ),
    )


# SwAV and DINO (multi-crop) have no lightly counterpart here yet: their rows say so.
LIGHTLY = {
    "simclr": lightly_simclr,
    "byol": lightly_byol,
    "simsiam": lightly_simsiam,
    "moco": lightly_moco,
}


def lightly_run(method, b, device, steps):
    build = LIGHTLY[method]
    size = b.image_size
    tf, model, loss_fn, make_opt = build(b, size, common.STATS[b.dataset])
    with limited_train_set(b.train_limit):
        base = common.make_dataset(b.dataset, b.data_dir, train=True)
    cuda = device.type == "cuda"
    model = model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = make_opt(model.parameters())
    loader = torch.utils.data.DataLoader(
        _Transformed(base, tf),
        batch_size=b.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=b.workers,
        pin_memory=cuda,
        persistent_workers=b.workers > 0,
    )
    need, done, t0 = 2 * steps, 0, None
    while done < need:
        for views, _ in loader:
            if done == steps:
                sync(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
            views = [v.to(device, non_blocking=True) for v in views]
            if cuda:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn(views)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == need:
                break
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": steps * b.batch_size / seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
        "lightly_version": __import__("lightly").__version__,
    }


# --- the grid of augmented views ----------------------------------------------------------
def view_grid(b, path, rows=6, per_path=5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision.transforms.functional as TF

    stats = common.STATS[b.dataset]
    ds = common.make_dataset(
        b.dataset, b.data_dir, train=True
    )  # all of it, for images of every class
    views = common.byol_views(b.image_size)  # view 2 has solarization as well
    pick = list(range(0, len(ds), max(1, len(ds) // rows)))[:rows]
    x = common.decode_uint8(ds)[pick]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in stats)
    cols = 1 + 2 * per_path
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.15))
    for r, i in enumerate(pick):
        pil = ds[i][0].convert("RGB")
        cpu = [common.cpu_transform(views[c % 2], stats)(pil) for c in range(per_path)]
        ten = [common.augment(x[r : r + 1], views[c % 2], stats, g)[0] for c in range(per_path)]
        tiles = [TF.to_tensor(pil)] + [(t * std + mean).clamp(0, 1) for t in cpu + ten]
        for c, t in enumerate(tiles):
            ax = axes[r, c]
            ax.imshow(t.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(
                    "image" if c == 0 else ("cpu (PIL)" if c <= per_path else "tensor"), fontsize=8
                )
    fig.suptitle(
        f"BYOL's two views, alternating, at {b.image_size} px: torchvision/PIL path | tensor path",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }  # other processes on a shared machine skew CPU figures


def table(rows):
    head = (
        "| method | variant | data path | train img/s | no-data step img/s | "
        "fwd+bwd ceiling img/s | train / ceiling | peak GiB | lightly img/s | train / lightly |"
    )
    lines = [head, "|" + "---|" * 10]
    fmt = lambda v, d=None: (
        "-" if v is None else f"{v:.{d if d is not None else (0 if v >= 100 else 1)}f}"
    )  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['variant']} | {r['data_path']} | {fmt(r.get('train'))} | "
            f"{fmt(r.get('no_data'))} | {fmt(r.get('ceiling'))} | "
            f"{fmt(r.get('train_over_ceiling'), 2)} | {fmt(r.get('peak_mem_gb'), 2)} | "
            f"{fmt(r.get('lightly'))} | {fmt(r.get('train_over_lightly'), 2)} |"
        )
    return "\n".join(lines)


def main(b):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    at_start = machine(device)
    scripts = discover()
    methods = [m for m in (b.methods.split(",") if b.methods else scripts) if m]
    unknown = [m for m in methods if m not in scripts]
    if unknown:
        raise SystemExit(f"error: no script for {', '.join(unknown)}; found {', '.join(scripts)}.")
    have_lightly = False
    if b.lightly:
        try:
            import lightly  # noqa: F401

            have_lightly = True
        except ImportError:
            print("lightly does not import here: its column stays empty", flush=True)
    if b.grid:
        view_grid(b, b.grid)
        print(f"wrote {b.grid}", flush=True)
        if b.grid_only:
            return 0
    rows, notes = [], {}
    for method in methods:
        mod = importlib.import_module(scripts[method])
        common_argv = [
            "--dataset",
            b.dataset,
            "--data-dir",
            b.data_dir,
            "--image-size",
            str(b.image_size),
            "--backbone",
            b.backbone,
            "--batch-size",
            str(b.batch_size),
            "--epochs",
            "2",
            "--knn-every",
            "0",
            "--log-every",
            "1000000",
            "--workers",
            str(b.workers),
            "--xattn-clusters",
            str(b.xattn_clusters),
        ]
        if b.compile:
            common_argv.append("--compile")
        if b.steps:
            common_argv += ["--steps-per-epoch", str(b.steps)]
        lightly_ips = None
        if have_lightly and method not in LIGHTLY:
            notes[f"lightly_{method}"] = "no lightly counterpart in this benchmark yet"
        if have_lightly and method in LIGHTLY:
            try:
                with limited_train_set(b.train_limit):
                    n = len(common.make_dataset(b.dataset, b.data_dir, train=True))
                lightly_ips = lightly_run(method, b, device, b.steps or n // b.batch_size)
                notes[f"lightly_{method}"] = lightly_ips
                lightly_ips = lightly_ips["images_per_s"]
            except Exception as e:  # noqa: BLE001 -- a benchmark reports what failed and goes on
                notes[f"lightly_{method}"] = f"failed: {type(e).__name__}: {e}"
        for variant in b.variants.split(","):
            argv = common_argv + VARIANTS[variant]
            base = {"method": method, "variant": variant}
            try:
                with limited_train_set(b.train_limit):
                    no_data = run_main(mod, argv, fake=True)
                fake = ConstantLoader.last
                with limited_train_set(b.train_limit):
                    n = len(common.make_dataset(b.dataset, b.data_dir, train=True))
                steps = b.steps or n // b.batch_size
                ceil = ceiling(
                    mod, argv, fake.views, fake.positive, fake.p, device, steps, b.compile
                )
            except Exception as e:  # noqa: BLE001
                rows.append({**base, "data_path": "-", "error": f"{type(e).__name__}: {e}"})
                continue
            for path in b.data_paths.split(","):
                row = {
                    **base,
                    "data_path": path,
                    "no_data": no_data["images_per_s"],
                    "ceiling": ceil["images_per_s"],
                    "ceiling_peak_mem_gb": ceil["peak_mem_gb"],
                    "lightly": lightly_ips if variant == "plain" else None,
                }
                try:
                    with limited_train_set(b.train_limit):
                        m = run_main(mod, argv + ["--data-path", path])
                    row.update(
                        train=m["images_per_s"],
                        peak_mem_gb=m["peak_mem_gb"],
                        train_over_ceiling=m["images_per_s"] / ceil["images_per_s"],
                    )
                    if row["lightly"]:
                        row["train_over_lightly"] = m["images_per_s"] / row["lightly"]
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # the add-ons' cost, from the whole step without data (no data-path noise)
    for method in methods:
        step = {
            r["variant"]: 1 / r["no_data"]
            for r in rows
            if r["method"] == method and r.get("no_data")
        }
        if "plain" in step and "qscore" in step:
            notes[f"{method}_qscore_step_overhead"] = step["qscore"] / step["plain"] - 1
        if "plain" in step and "xattn" in step:
            notes[f"{method}_xattn_step_overhead_per_positive"] = (
                step["xattn"] / step["plain"] - 1
            )  # --xattn-positives 1
    at_start["load_average_1min"] = [
        at_start["load_average_1min"],
        os.getloadavg()[0],
    ]  # start, end
    result = {
        "machine": at_start,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "settings": vars(b),
        "rows": rows,
        "notes": notes,
    }
    result["table"] = table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(b.out)), exist_ok=True)
    with open(b.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(result["table"])
    print(json.dumps(notes, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
