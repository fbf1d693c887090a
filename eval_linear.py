"""Offline linear evaluation and kNN of a frozen backbone, with per-sample predictions.

The backbone of a finished run (RUN_DIR/backbone.pt) is frozen and kept in eval mode
(BatchNorm running statistics). Two measures of what it learned:
  - offline linear probe: a linear classifier trained on the pooled representation h;
  - weighted kNN top-1 (Wu et al., "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination", CVPR 2018): cosine similarity, k = 20 and 200, t = 0.1.
"Offline" sets these apart from the online numbers a method script logs while it trains
(its knn_top1 in metrics.jsonl).

Recipe of the probe (also written to linear.json):
  - default: h of every training image extracted once (eval transform, all processes
    under torchrun, gathered), standardized with the training mean and std (a BatchNorm
    without affine, as in MAE's linear probe), then nn.Linear(D, C), zero-initialized,
    trained with SGD (momentum 0.9, nesterov) for --epochs epochs, batch 256, lr --lr
    per 256 images with a cosine decay to 0, weight decay --weight-decay;
  - --augment: the classic recipe (e.g. MoCo, SimCLR): random resized crop (scale 0.08-1)
    and horizontal flip, h recomputed every epoch through the frozen eval-mode backbone;
    the standardization statistics come from the un-augmented features.
The evaluation split (the test or val split) always uses the eval transform.

Outputs, in --out (default: RUN_DIR, or the folder of --weights):
  linear.json        every number, named (offline_linear_top1/top5, knn_top1_k20/k200), the recipe,
                     and random_init: the same numbers of the same architecture at its seed-0
                     random initialization through the same probe (what training has to beat;
                     measured once per protocol, cached in $CLEANSSL_CACHE; --no-reference skips it)
  predictions.npz    for the evaluation split in data-set order: index, label, prediction,
                     confidence (max softmax), correct, logits (N, C), h (N, D) float32
  linear_head.pt     {"state_dict": nn.Linear(D, C), "mean": (D,), "std": (D,)}:
                     logits = linear((h - mean) / std)

Long runs and clusters (see README): SIGTERM or SIGUSR1 stops the probe after its current step
with exit code 75 and nothing written (there is no checkpoint: the same command starts over), the
outputs are written to temporary names then renamed, a full disk is one sentence and exit code 74;
an unreadable image is replaced by the next readable one and counted (bad_images in linear.json),
or named before any work with --check-data (exit 2). Mid-epoch checkpoints and auto-resume are the
method scripts' only.

    python eval_linear.py runs/simclr_digits_s0_1700000000
    python eval_linear.py --weights backbone.pt --backbone resnet18 --dataset cifar10 \
        --data-dir data
    torchrun --nproc_per_node=4 eval_linear.py runs/my_run --augment --epochs 100
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "run_dir",
        nargs="?",
        default="",
        help="run folder of a method script (backbone.pt, args.json)",
    )
    p.add_argument(
        "--weights", default="", help="a backbone.pt to evaluate instead of RUN_DIR/backbone.pt"
    )
    # None: take the value from RUN_DIR/args.json (flags override it), else the default in the help
    p.add_argument(
        "--backbone",
        default=None,
        choices=list(common.BACKBONES),
        help="the backbone of the weights (default: args.json, else resnet18)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=common.DATASETS,
        help="data set (default: args.json; needed with --weights)",
    )
    p.add_argument("--data-dir", default=None, help="data folder (default: args.json, else 'data')")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side in pixels (default: args.json); 0: native",
    )
    p.add_argument(
        "--out", default="", help="output folder (default: RUN_DIR, or the folder of --weights)"
    )
    p.add_argument("--epochs", type=int, default=100, help="epochs of the linear probe")
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="batch of the probe, and per process of feature extraction",
    )
    p.add_argument(
        "--lr", type=float, default=0.1, help="SGD learning rate per 256 images, cosine decay to 0"
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="weight decay of the linear layer"
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="classic recipe: random resized crop + flip, features recomputed every epoch",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the probe's batches and of the augmentations"
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when there is one",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data-loader processes per process (default: 4, or fewer CPU cores)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=common.PRECISIONS,
        help="the backbone's forward pass: bf16 autocast or fp32; auto: bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="train on this many training images (fixed subset); 0: all",
    )
    p.add_argument(
        "--test-limit",
        type=int,
        default=0,
        help="evaluate on this many images (fixed subset); 0: all",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the random-init reference: the same probe and kNN of the architecture at its "
        "seed-0 initialization (measured once per protocol, cached in $CLEANSSL_CACHE)",
    )
    p.add_argument(
        "--check-data",
        action="store_true",
        help="decode every file of a --dataset folder first and stop (exit 2) naming unreadable "
        "ones; without it each is replaced by the next readable image and counted",
    )
    return p.parse_args(argv)


def resolve(args):
    """Fill dataset, data_dir, backbone, image_size, weights and out from the flags, then
    RUN_DIR/args.json, then defaults; bad input raises UserError before any work."""
    if not args.run_dir and not args.weights:
        raise common.UserError(
            "name a run folder (python eval_linear.py RUN_DIR) or a backbone with --weights PATH."
        )
    saved = {}
    if args.run_dir:
        if not os.path.isdir(args.run_dir):
            raise common.UserError(f"run folder '{args.run_dir}' does not exist.")
        path = os.path.join(args.run_dir, "args.json")
        if os.path.isfile(path):
            with open(path) as fh:
                saved = json.load(fh)
    weights = args.weights or os.path.join(args.run_dir, "backbone.pt")
    if not os.path.isfile(weights):
        raise common.UserError(
            f"no backbone weights at '{weights}': train a method script first, or pass --weights."
        )
    for key, default in (
        ("backbone", "resnet18"),
        ("dataset", None),
        ("data_dir", "data"),
        ("image_size", 0),
    ):
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, default))
    if args.dataset is None:
        raise common.UserError("no args.json tells the data set: pass --dataset.")
    common.check_dataset(args.dataset, args.data_dir)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise common.UserError("--device cuda was asked for, but no GPU is visible.")
    args.weights = weights
    args.out = args.out or args.run_dir or os.path.dirname(os.path.abspath(weights))
    return args


def load_backbone(args, size):
    """build_backbone, with a clear sentence when the weights' stem does not fit the image size."""
    small = size <= 64
    try:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        k = (
            state["stem.0.weight"].shape[-1]
            if isinstance(state, dict) and "stem.0.weight" in state
            else None
        )
    except Exception:  # OSError, RuntimeError, EOFError, UnpicklingError (an HTML page)...
        k = None  # build_backbone says what is wrong with the file
    if k is not None and (k == 3) != small:
        kind = "images of 64 px or less (3x3 stem)" if k == 3 else "images above 64 px (7x7 stem)"
        raise common.UserError(
            f"'{args.weights}' is a backbone for {kind}, but --dataset {args.dataset} "
            f"is evaluated at {size} px; pass a matching --image-size or dataset."
        )
    return common.build_backbone(args.backbone, small_images=small, weights=args.weights)


def fixed_subset(dataset, limit):
    """A fixed random subset (seed 0) kept in data-set order, so that index stays meaningful
    and classes stay balanced (ImageFolder is sorted by class). Returns (dataset, indices)."""
    n = len(dataset)
    if not limit or limit >= n:
        return dataset, np.arange(n)
    keep = np.sort(np.random.RandomState(0).permutation(n)[:limit])
    return torch.utils.data.Subset(dataset, keep.tolist()), keep


class RandomCrops(torch.utils.data.Dataset):
    """The classic probe augmentation on PIL images: random resized crop and flip. The crop
    is taken at the side that common.eval_transform resizes to, so the eval transform that
    extract_features applies next leaves a small image unchanged (and for large images keeps
    the centre 224/256 of the crop, as a centre crop does at test time)."""

    def __init__(self, base, size):
        side = (
            size if size <= 64 else int(round(size * 256 / 224))
        )  # common.eval_transform's resize
        self.base = base
        self.tf = T.Compose(
            [
                T.RandomResizedCrop(
                    side, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.RandomHorizontalFlip(),
            ]
        )

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, y = self.base[i]
        return self.tf(img.convert("RGB")), y


def train_linear(
    x,
    y,
    num_classes,
    epochs=100,
    batch_size=256,
    lr=0.1,
    weight_decay=0.0,
    seed=0,
    features_at=None,
    stop=None,
    progress="",
    every=30.0,
):
    """Multinomial logistic regression on standardized features, SGD with nesterov momentum
    and a per-step cosine schedule. x (N, D) standardized, y (N,). With `features_at(epoch)`,
    each epoch trains on the features it returns (the --augment recipe) instead of x.
    Every process runs the same steps on the same gathered features, so they agree.
    Returns the trained nn.Linear(D, C) on x's device, or None when `stop()`, asked after every
    step on every process, said so (a stop signal, common.RunControl). progress: a label; then
    process 0 prints, at the end of an epoch when `every` seconds have passed since the last line,
    the epoch, the mean training loss of that epoch and the time left; and a line at the end."""
    n, d = x.shape
    head = nn.Linear(d, num_classes).to(x.device)
    nn.init.zeros_(head.weight)  # zero start: a feature constant on the training set keeps weight 0
    nn.init.zeros_(head.bias)
    base_lr = lr * batch_size / 256
    opt = torch.optim.SGD(
        head.parameters(), lr=base_lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    steps = math.ceil(n / batch_size)
    g = torch.Generator().manual_seed(seed)
    start = shown = time.time()
    for epoch in range(epochs):
        xe = features_at(epoch) if features_at is not None else x
        perm = torch.randperm(n, generator=g).to(x.device)
        total = torch.zeros(
            (), device=x.device
        )  # the epoch's summed loss, read only when a line is printed
        for s in range(steps):
            for group in opt.param_groups:  # cosine decay to 0 over every step of the run
                group["lr"] = (
                    base_lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + s) / (epochs * steps)))
                )
            i = perm[s * batch_size : (s + 1) * batch_size]
            loss = F.cross_entropy(head(xe[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            if stop is not None and stop():
                return None
        now = time.time()
        if progress and common.rank() == 0 and (now - shown >= every or epoch + 1 == epochs):
            shown = now
            left = (now - start) / (epoch + 1) * (epochs - epoch - 1)
            when = (
                f"{common.duration(left)} left"
                if left > 0
                else f"done in {common.duration(now - start)}"
            )
            print(
                f"{progress}: epoch {epoch + 1}/{epochs}  loss {total.item() / steps:.4f}  {when}",
                flush=True,
            )
    return head


def topk_accuracy(logits, y, k):
    """Share of rows whose label is among the k highest logits (k capped at the classes)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return (top == y[:, None]).any(1).sum().item() / len(y)  # an exact fraction, not a float32 mean


def write_atomic(path, write):
    """write(file object) to a temporary file, then rename; on failure the temporary file goes and a
    full disk is OSError ENOSPC with the path (common.fail_write)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            e.filename = path
        raise


def main(args):
    args = resolve(args)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = common.rank()
    torch.manual_seed(args.seed)
    control = common.RunControl(
        0
    )  # a stop signal, agreed by every process at the same step; no checkpoint
    t0 = time.time()

    native = common.IMAGE_SIZE[args.dataset]
    size = args.image_size or native
    stats = common.STATS[args.dataset]
    backbone = (
        load_backbone(args, size).to(device).eval()
    )  # before the data: a mismatch fails at once
    for p in backbone.parameters():
        p.requires_grad_(False)

    # data: the probe trains on the split kNN uses, and is scored on the test (or val) split
    train_set, train_index = fixed_subset(
        common.eval_dataset(args.dataset, args.data_dir), args.train_limit
    )
    test_full = common.make_dataset(args.dataset, args.data_dir, train=False)
    test_set, test_index = fixed_subset(test_full, args.test_limit)
    if args.check_data:  # every file decoded now: a bad one is named before any work
        common.check_images([train_set, test_full], args.workers)
    classes = list(test_full.classes)
    num_classes = len(classes)
    if rank == 0:
        print(
            f"eval_linear: {args.weights} ({args.backbone}) on {args.dataset} at {size}px, "
            f"{len(train_set)} train / {len(test_set)} test images, {common.world_size()} "
            f"process(es) on {device.type} -> {args.out}",
            flush=True,
        )

    faults = []  # unreadable images replaced, per extraction (common.load_image)

    def features(net, dataset, label="", faults=faults):
        # (N, D) float32 h, not normalized, and labels (N,), identical on every process
        return common.extract_features(
            net,
            dataset,
            size,
            stats,
            native,
            device,
            args.batch_size,
            args.workers,
            precision=args.precision,
            faults=faults,
            progress=label,
        )

    def probe(net, label="", faults=faults):
        """kNN and the linear probe of one frozen eval-mode backbone: a dict of its numbers, the
        head, the standardization, and the test split's h, labels and logits; None when a stop
        signal came during the probe."""
        # progress lines every 30 s: minutes on a large split
        htr, ytr = features(net, train_set, f"{label}train features", faults)
        hte, yte = features(net, test_set, f"{label}test features", faults)
        # kNN on the raw h (knn_predict normalizes it), the same bank the probe trains on
        numbers = {
            f"knn_top1_k{k}": common.knn_top1(htr, ytr, hte, yte, num_classes, k=k, t=0.1)
            for k in (20, 200)
        }
        # linear probe on standardized features; eps: a dead feature is divided by 1e-3, not 0
        mean, std = htr.mean(0), (htr.var(0, unbiased=False) + 1e-6).sqrt()
        features_at = None
        if args.augment:
            augmented = RandomCrops(train_set, size)

            def features_at(epoch):
                # a different draw per process and epoch; extract_features' all_gather joins them
                torch.manual_seed(args.seed * 100003 + epoch * 1009 + rank)
                return (features(net, augmented, "", faults)[0] - mean) / std

        head = train_linear(
            (htr - mean) / std,
            ytr,
            num_classes,
            args.epochs,
            args.batch_size,
            args.lr,
            args.weight_decay,
            args.seed,
            features_at,
            stop=lambda: control.poll()[0] is not None,
            progress=f"{label}linear probe",
        )
        if head is None:
            return None
        with torch.no_grad():
            logits = head((hte - mean) / std)  # (N, C)
        numbers["offline_linear_top1"] = topk_accuracy(logits, yte, 1)
        numbers["offline_linear_top5"] = topk_accuracy(logits, yte, 5)
        return numbers, head, mean, std, hte, yte, logits

    done = probe(backbone)
    if done is None:
        return control.stop("during the linear probe")
    knn, head, mean, std, hte, yte, logits = done
    top1, top5 = knn.pop("offline_linear_top1"), knn.pop("offline_linear_top5")
    prob = logits.softmax(1)
    confidence, prediction = prob.max(1)
    if rank == 0:  # the result first: the reference after it may take as long again
        print(
            f"offline linear top-1 {top1:.4f} top-5 {top5:.4f} | "
            f"kNN top-1 k=20 {knn['knn_top1_k20']:.4f} k=200 {knn['knn_top1_k200']:.4f} | "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )

    # the reference: the same probe of the same architecture at its seed-0 random initialization
    reference = {}
    if not args.no_reference:
        where = "" if args.dataset == "digits" else os.path.abspath(args.data_dir)
        protocol = "|".join(
            str(v)
            for v in (
                args.dataset,
                where,
                args.backbone,
                f"{size}px",
                f"train {args.train_limit}",
                f"test {args.test_limit}",
                f"epochs {args.epochs}",
                f"batch {args.batch_size}",
                f"lr {args.lr}",
                f"wd {args.weight_decay}",
                f"augment {args.augment}",
                f"seed {args.seed}",
                f"bf16 {common.use_bf16(args.precision, device)}",
            )
        )
        cache = common.read_reference_cache("random_init_probe.json")
        if protocol not in cache:
            if rank == 0:
                print("random-init reference: the same probe of the untrained network", flush=True)
            with torch.random.fork_rng(devices=[]):  # the weights from seed 0, not the stream
                torch.manual_seed(0)
                net = common.build_backbone(args.backbone, size <= 64).to(device).eval()
            for p in net.parameters():
                p.requires_grad_(False)
            done = probe(net, "random init: ", faults=[])
            if done is None:
                return control.stop("during the random-init reference")
            n = {"n_train": len(train_set), "n_bank": len(train_set), "n_test": len(test_set)}
            cache[protocol] = {**done[0], **n}
            common.write_reference_cache("random_init_probe.json", {protocol: cache[protocol]})
        reference = {**cache[protocol], "protocol": protocol}

    recipe = {
        "features": "pooled backbone output h, eval transform, backbone frozen in eval mode",
        "standardize": "(h - train mean) / sqrt(train var + 1e-6)",
        "classifier": "nn.Linear(D, C), zero init",
        "optimizer": "SGD momentum 0.9 nesterov, cosine decay to 0 per step",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr_per_256": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "augment": "random resized crop (0.08, 1) + flip, features recomputed each epoch"
        if args.augment
        else "none",
        "knn": "cosine, exp(sim / 0.1) weighted votes, k = 20 and 200 (Wu et al. 2018)",
        "train_split": "STL-10 train" if args.dataset == "stl10" else "train",
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
    }
    result = {
        "offline_linear_top1": top1,
        "offline_linear_top5": top5,
        **knn,
        "recipe": recipe,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "image_size": size,
        "backbone": args.backbone,
        "weights": os.path.abspath(args.weights),
        "n_train": len(train_set),
        "n_test": len(test_set),
        "classes": classes,
        "random_init": reference,
        "bad_images": sum(faults),
        "seconds": time.time() - t0,
    }
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        # each file to a temporary name, then renamed: a kill or a full disk never leaves half a
        # file; linear.json last, so that it is there only when the others are
        write_atomic(
            os.path.join(args.out, "predictions.npz"),
            lambda fh: np.savez(
                fh,
                index=test_index.astype(np.int64),
                label=yte.cpu().numpy().astype(np.int64),
                prediction=prediction.cpu().numpy().astype(np.int64),
                confidence=confidence.cpu().numpy(),
                correct=(prediction == yte).cpu().numpy(),
                logits=logits.cpu().numpy(),
                h=hte.cpu().numpy().astype(np.float32),
            ),
        )
        write_atomic(
            os.path.join(args.out, "linear_head.pt"),
            lambda fh: torch.save(
                {
                    "state_dict": {k: v.cpu() for k, v in head.state_dict().items()},
                    "mean": mean.cpu(),
                    "std": std.cpu(),
                },
                fh,
            ),
        )
        write_atomic(
            os.path.join(args.out, "linear.json"),
            lambda fh: fh.write(json.dumps(result, indent=2).encode()),
        )
        if result["bad_images"]:
            print(
                f"note: {result['bad_images']} unreadable images were replaced by the next "
                "readable one (--check-data names them).",
                flush=True,
            )
        if reference:
            r, below = reference, top1 <= reference["offline_linear_top1"]
            print(
                f"random init (the same probe, seed-0 weights): linear top-1 "
                f"{r['offline_linear_top1']:.4f}, kNN top-1 k=200 {r['knn_top1_k200']:.4f}"
                + (" | the trained backbone's probe is not above it" if below else ""),
                flush=True,
            )
        print(
            f"-> {args.out}: linear.json, predictions.npz, linear_head.pt "
            f"({common.duration(time.time() - t0)})",
            flush=True,
        )
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # in the probe SIGTERM, SIGUSR1 stop after the step: common.EXIT_STOPPED
    common.catch_stop_signals()
    try:
        raise SystemExit(main(parse_args()))
    except common.UserError as e:
        common.fail(str(e))
    except OSError as e:  # a full disk: one sentence and common.EXIT_WRITE
        common.fail_write(e)
