"""MoCo: a query encoder learns to pick its own image's key out of negatives; keys come from
a momentum encoder, a moving average of the query encoder (He et al., CVPR 2020).

v2 (default): Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020:
MLP head, a queue of negative keys from all processes, shuffled BN, SGD; loss symmetrized
as in solo-learn's mocov2plus (--no-symmetric-loss: the paper's one direction). v3: Chen,
Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021,
ResNet form: predictor, in-batch keys of all processes, global BN, LARS.
Defaults: solo-learn's CIFAR recipes, scripts/pretrain/cifar/mocov2plus.yaml with
augmentations/symmetric_weak.yaml (v2) and mocov3.yaml with augmentations/asymmetric.yaml
(v3). The ImageNet commands are the official ones: facebookresearch/moco's README (MoCo v2,
ResNet-50, 200 epochs) and facebookresearch/moco-v3's CONFIG.md (ResNet-50, 100 epochs).
RECIPES.md compares them, flag for flag.

    python moco.py --dataset digits --epochs 1                    # offline demo
    python moco.py --dataset cifar10 --data-dir data              # v2, 1000 epochs, 1 GPU
    python moco.py --dataset cifar10 --data-dir data --moco-version 3
    torchrun --nproc_per_node=8 moco.py --dataset folder --data-dir /imagenet --moco-version 2 \
        --backbone resnet50 --epochs 200 --batch-size 256 --lr 0.03 --warmup-epochs 0 --proj-dim 128 \
        --queue-size 65536 --tau-base 0.999 --crop-min-scale 0.2 --no-symmetric-loss
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 moco.py --dataset folder \
        --data-dir /imagenet --moco-version 3 --backbone resnet50 --epochs 100 --batch-size 4096 \
        --lr 0.6 --lars-mode official --lars-eta 0.001 --temperature 1.0 --crop-min-scale 0.2 \
        --blur-prob 1.0 0.1 --zero-init-residual
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "moco"
# Defaults that depend on --moco-version: solo-learn's mocov2plus.yaml + symmetric_weak.yaml
# (v2) and mocov3.yaml + asymmetric.yaml (v3). parse_args resolves them.
VERSION_DEFAULTS = {
    2: dict(weight_decay=1e-4, proj_hidden=2048, tau_end=0.999, sync_bn=False, blur_prob=(0.5, 0.5),
            solarize_prob=(0.0, 0.0)),
    3: dict(weight_decay=1e-6, proj_hidden=4096, tau_end=1.0, sync_bn=True, blur_prob=(0.0, 0.0),
            solarize_prob=(0.0, 0.2)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=common.DATASETS, help="data set; digits needs no download")
    p.add_argument("--data-dir", default="data", help="where torchvision data sets are downloaded, or the ImageFolder root")
    p.add_argument("--backbone", default="resnet18", choices=list(common.BACKBONES),
                   help="ResNet; resnet18-half/-quarter/-eighth have 1/2, 1/4, 1/8 of the channels")
    p.add_argument("--image-size", type=int, default=0, help="crop side in pixels; 0: the data set's native size")
    p.add_argument("--moco-version", type=int, default=2, choices=[2, 3], help="2: queue of negatives, SGD; 3: predictor, in-batch keys, LARS")
    p.add_argument("--epochs", type=int, default=1000,
                   help="training epochs (solo-learn CIFAR: 1000; official ImageNet: v2 200, v3 100)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="global batch, split over processes (solo-learn CIFAR: 256; official ImageNet: v2 256, v3 4096)")
    p.add_argument("--lr", type=float, default=0.3,
                   help="learning rate per 256 images, v2 SGD, v3 LARS (solo-learn CIFAR: 0.3; official: v2 0.03, v3 0.6)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="v2: SGD weight decay on every weight, biases and norms included; v3: LARS weight decay, not "
                        "on biases and norms (solo-learn CIFAR and official ImageNet: v2 1e-4, v3 1e-6)")
    p.add_argument("--lars-mode", default="clip", choices=["clip", "official"],
                   help="v3 only, LARS form (see class LARS): clip as solo-learn's CIFAR recipe, official as MoCo v3's code"
                        "; the learning study (RESULTS.md) passes official, as at small batches the clipped step does not shrink with lr")
    p.add_argument("--lars-eta", type=float, default=0.02,
                   help="v3 only, LARS trust coefficient (solo-learn CIFAR: 0.02; official ImageNet: 0.001)")
    p.add_argument("--warmup-epochs", type=float, default=10,
                   help="linear warm-up, then cosine decay per step (solo-learn CIFAR: 10; official ImageNet: v2 0, v3 10)")
    p.add_argument("--temperature", type=float, default=0.2,
                   help="InfoNCE temperature (solo-learn CIFAR: 0.2; official ImageNet: v2 0.2, v3 1.0)")
    p.add_argument("--symmetric-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="both directions, view 1 -> 2 and 2 -> 1 (solo-learn CIFAR and official v3: yes; "
                        "official v2: no, queries of view 1 against keys of view 2 only)")
    p.add_argument("--proj-hidden", type=int, default=None,
                   help="projector hidden width (solo-learn CIFAR and official ImageNet: v2 2048, v3 4096)")
    p.add_argument("--proj-dim", type=int, default=256,
                   help="projector output width (solo-learn CIFAR: 256; official ImageNet: v2 128, v3 256)")
    p.add_argument("--pred-hidden", type=int, default=4096,
                   help="v3 only, predictor hidden width (solo-learn CIFAR, official: 4096)")
    p.add_argument("--queue-size", type=int, default=32768,
                   help="v2 only, negative keys, a multiple of --batch-size (solo-learn CIFAR: 32768; official: 65536)")
    p.add_argument("--tau-base", type=float, default=0.99,
                   help="momentum of the key encoder at step 0 (solo-learn CIFAR: 0.99; official ImageNet: v2 0.999, v3 0.99)")
    p.add_argument("--tau-end", type=float, default=None,
                   help="momentum at the last step, cosine per step (solo-learn CIFAR and official ImageNet: v2 0.999, v3 1.0)")
    p.add_argument("--crop-min-scale", type=float, default=0.08,
                   help="smallest crop area of RandomResizedCrop (solo-learn CIFAR: 0.08; official ImageNet: 0.2)")
    p.add_argument("--jitter-strength", type=float, default=0.5,
                   help="colour jitter strength s: v2 0.8s/0.8s/0.8s/0.2s (brightness, contrast, saturation, hue), "
                        "v3 0.8s/0.8s/0.4s/0.2s, BYOL's; p 0.8 (solo-learn CIFAR and official: 0.5, i.e. "
                        "0.4/0.4/0.4/0.1 and 0.4/0.4/0.2/0.1)")
    p.add_argument("--blur-prob", type=float, nargs="+", default=None, metavar="P",
                   help="Gaussian blur probability, one for both views or one per view (solo-learn CIFAR: v2 0.5 0.5, "
                        "v3 0 0; official ImageNet: v2 0.5 0.5, v3 1.0 0.1)")
    p.add_argument("--solarize-prob", type=float, nargs="+", default=None, metavar="P",
                   help="solarization probability, one for both views or one per view (solo-learn CIFAR and official "
                        "ImageNet: v2 0 0, v3 0 0.2)")
    p.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=False,
                   help="each residual branch's last BN starts at 0 (solo-learn CIFAR: no; official ImageNet: v2 no, v3 yes)")
    p.add_argument("--per-view-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="each view through the network on its own, BatchNorm statistics per view (solo-learn CIFAR "
                        "and the official code); --no-per-view-bn: both views in one batch")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="global BatchNorm (SyncBatchNorm, CUDA) in both encoders (default v3, as MoCo v3's code); "
                        "--no-sync-bn: shuffled BN in the key encoder (default v2, MoCo Sec. 3.3), which exchanges "
                        "the crops once per step instead of the statistics once per BN layer")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentations")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loader processes per training process (default: 4, or fewer CPU cores)")
    p.add_argument("--data-path", default="auto", choices=common.DATA_PATHS, help="tensor: decode once, augment batches on "
                   "the device; cpu: PIL in --workers processes; auto: tensor on CUDA when the data set fits in memory, else cpu")
    p.add_argument("--precision", default="auto", choices=common.PRECISIONS,
                   help="bf16: bf16 autocast and channels_last (the losses stay float32); fp32: neither; "
                        "auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward pass and the tensor data path's augmentations")
    p.add_argument("--run-dir", default="", help="output folder; default runs/<method>_<dataset>_s<seed>_<time>. A "
                   "folder that holds a checkpoint.pt is continued (auto-resume: torchrun --max-restarts, a requeued job)")
    p.add_argument("--resume", default="", help="run folder (or checkpoint.pt) of a stopped run to continue; the flags "
                   "that change what a run computes must be its own (README: Long runs and clusters)")
    p.add_argument("--checkpoint-every-min", type=float, default=30, help="also checkpoint every M minutes inside an "
                   "epoch (process 0's clock), and the rest of the epoch replays exactly on resume; 0: at epoch ends only. "
                   "SIGTERM or SIGUSR1 checkpoint after the current step and exit 75")
    p.add_argument("--check-data", action="store_true", help="decode every file of a --dataset folder before training "
                   "and stop (exit 2) naming unreadable ones; without it, each is replaced by the next readable image "
                   "and counted (bad_images in metrics.jsonl)")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap on steps per epoch, for tests and benchmarks; 0: all")
    p.add_argument("--knn-every", type=int, default=1, help="kNN evaluation every N epochs (and after the last); 0: never")
    p.add_argument("--knn-limit", type=int, default=None,
                   help="kNN bank: this many training images (fixed subset); 0: all; default: all, 50000 for folders")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    p.add_argument("--log-seconds", type=float, default=30, help="progress line also every S seconds; an epoch's "
                   "first comes at the end of its first step past 10 s (or S, if smaller)")
    add_addon_flags(p)
    args = p.parse_args(argv)
    for k, v in VERSION_DEFAULTS[args.moco_version].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("blur_prob", "solarize_prob"):  # one probability means both views
        v = tuple(getattr(args, k))
        if len(v) not in (1, 2):
            p.error(f"--{k.replace('_', '-')} takes one probability (both views) or two (view 1, view 2)")
        setattr(args, k, v * 2 if len(v) == 1 else v)
    return args


# --- the method ---------------------------------------------------------------------
def mlp(d_in, hidden, d_out, version):
    """v2: MoCo v2's head, Linear-ReLU-Linear. v3: BN after each layer, the last without affine."""
    if version == 2:
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))
    return nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out, bias=False), nn.BatchNorm1d(d_out, affine=False))


class MoCo(nn.Module):
    """Query encoder: backbone -> h -> projector -> z [-> predictor (v3)] -> q.
    The loss sees q; downstream tasks use h."""

    def __init__(self, args, small_images):
        super().__init__()
        self.backbone = common.build_backbone(args.backbone, small_images, zero_init_residual=args.zero_init_residual)
        d = self.backbone.dim
        self.projector = mlp(d, args.proj_hidden, args.proj_dim, args.moco_version)
        self.predictor = None
        if args.moco_version == 3:  # 2-layer predictor, BN on the hidden layer only (MoCo v3, Sec. 3)
            self.predictor = nn.Sequential(
                nn.Linear(args.proj_dim, args.pred_hidden, bias=False), nn.BatchNorm1d(args.pred_hidden),
                nn.ReLU(inplace=True), nn.Linear(args.pred_hidden, args.proj_dim, bias=False))
        self.xattn = CrossAttentionHead(d, args.xattn_clusters, args.xattn_temp) if args.xattn else None
        self.per_view_bn = args.per_view_bn

    def each_view(self, fn, x, b):
        """fn on x (V*b, ...), one view of b rows at a time with --per-view-bn (BN statistics per view), else at once."""
        return torch.cat([fn(v) for v in x.split(b)]) if self.per_view_bn else fn(x)

    def forward(self, crops, positives=None):
        """crops: the V views (V = 2, or 1 for the one-directional loss), each (b, 3, s, s)."""
        b, n = crops[0].shape[0], len(crops) * crops[0].shape[0]
        parts = crops + ([positives] if positives is not None else [])  # all views share one size
        if self.per_view_bn:  # one pass per view (and one for the positives) through every network: BN statistics
            f, h = (torch.cat(t) for t in zip(*(self.backbone(x) for x in parts)))  # per view, as the official code
        else:  # one pass for all: BN normalizes the views together
            f, h = self.backbone(torch.cat(parts))
        # f, h: (n [+ b*P], D, h, w), (n [+ b*P], D)
        z = self.each_view(self.projector, h[:n], b)  # (n, d)
        out = {"h": h[:n], "q": z if self.predictor is None else self.each_view(self.predictor, z, b)}
        if self.xattn is not None and positives is not None:
            out["f"] = torch.cat([f[:b], f[n:]])  # anchors (the first view), then their positives
            out["beta"], out["logits"] = self.xattn(out["f"])
        return out


class KeyEncoder(nn.Module):
    """Momentum copy of backbone and projector (keys are projections); no gradient, ever."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.projector = copy.deepcopy(model.backbone), copy.deepcopy(model.projector)
        self.requires_grad_(False)

    def forward(self, x):
        return self.projector(self.backbone(x)[1])


@torch.no_grad()
def ema_update(model, key_encoder, tau):
    """theta_k <- tau theta_k + (1 - tau) theta_q (MoCo, Eq. 2); BN statistics stay the copy's own."""
    keys, queries = [], []
    for part in ("backbone", "projector"):
        for pq, pk in zip(getattr(model, part).parameters(), getattr(key_encoder, part).parameters()):
            keys.append(pk)
            queries.append(pq.detach())
    # one multi-tensor kernel per operation, not two per parameter; the same arithmetic as
    # pk.mul_(tau).add_(pq, alpha=1 - tau)
    torch._foreach_mul_(keys, tau)
    torch._foreach_add_(keys, queries, alpha=1 - tau)


def momentum_at(step, total, base, end):
    """Cosine schedule per step from `base` (step 0) to `end` (step `total`), as in BYOL."""
    return end - (end - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


@torch.no_grad()
def momentum_keys(key_encoder, x, shuffle=True):
    """Normalized keys (n, d) of this process's images x (n, 3, s, s), no gradient; one view at a
    time with --per-view-bn (the official code), else both views in one batch.
    Shuffled BN (MoCo, Sec. 3.3): under DDP the key encoder sees a random share of the
    global batch, so a key's BN statistics do not come from its query's sub-batch (a
    shortcut to the positive); keys are put back in order. BN running statistics are
    averaged so that the copy stays the same on every process (`average_buffers`)."""
    world, r, n = common.world_size(), common.rank(), x.shape[0]
    if world == 1 or not shuffle:
        k = key_encoder(x)
    else:
        x_all = common.all_gather(x)  # (W n, 3, s, s)
        perm = torch.randperm(len(x_all), device=x.device)
        dist.broadcast(perm, 0)
        k_all = common.all_gather(key_encoder(x_all[perm[r * n:(r + 1) * n]]))  # (W n, d), shuffled order
        k = torch.empty_like(k_all)
        k[perm] = k_all  # undo the shuffle
        k = k[r * n:(r + 1) * n]
    if world > 1:
        average_buffers(key_encoder)
    return F.normalize(k.float(), dim=1)


@torch.no_grad()
def average_buffers(module):
    """Average the floating-point buffers (BN running statistics) of `module` over all processes,
    in one all-reduce of their concatenation rather than one per buffer (about 100 for a
    ResNet-50). Under SyncBatchNorm every process updates them from the same global statistics,
    so they are equal already and nothing is sent."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    flat = torch._utils._flatten_dense_tensors(bufs)  # (sum of sizes,), as DDP packs its buckets
    dist.all_reduce(flat)
    flat.div_(common.world_size())
    torch._foreach_copy_(bufs, torch._utils._unflatten_dense_tensors(flat, bufs))


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """FIFO: the keys of every process (rank order) replace the oldest entries of the queue
    (K, d); K is a multiple of the global batch, so a write never wraps. Returns the pointer."""
    k = common.all_gather(keys)  # (W b, d)
    queue[ptr:ptr + len(k)] = k.to(queue.dtype)
    return (ptr + len(k)) % len(queue)


def infonce_loss(q, k, queue=None, temperature=0.2):
    """InfoNCE, Eq. (1) of He et al. 2020 (MoCo), averaged over this process's queries:
        L_q = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k-} exp(q.k- / t))
    q: (b, d) queries (normalized here), with gradient; k: (b, d) normalized keys, which
    never get gradient. With a queue (K, d) (v2) the negatives are its entries and k+ is
    each query's own key. Without (v3, Eq. 1 of Chen et al. 2021) the candidates are the
    keys of the global batch, gathered from every process, and k+ sits at rank*b + i.
    The queue and gathered keys are the same on every process, so the DDP-averaged
    gradient is that of one process holding the whole batch."""
    q, k = F.normalize(q.float(), dim=1), k.detach().float()
    with torch.autocast(q.device.type, enabled=False):  # a product under bf16 autocast is bf16 whatever its inputs
        if queue is not None:
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T.float()], 1) / temperature  # (b, 1 + K)
            labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
        else:
            logits = q @ common.all_gather(k).T / temperature  # (b, W b)
            labels = torch.arange(len(q), device=q.device) + common.rank() * len(q)
    return F.cross_entropy(logits, labels)


def moco_loss(q, k, queue, temperature, symmetric=True):
    """Symmetrized: queries of view 1 against keys of view 2 and the other way round.
    q, k: (2b, d), view 1 then view 2. v2 (queue given): the mean of the two terms
    (solo-learn's mocov2plus). v3: their sum, each scaled by 2t (MoCo v3, Alg. 1).
    symmetric=False: q (b, d) of view 1 against k (b, d) of view 2 only, as MoCo v2's code."""
    if not symmetric:
        loss = infonce_loss(q, k, queue, temperature)
        return loss if queue is not None else 2 * temperature * loss
    b = len(q) // 2
    l12, l21 = infonce_loss(q[:b], k[b:], queue, temperature), infonce_loss(q[b:], k[:b], queue, temperature)
    return (l12 + l21) / 2 if queue is not None else 2 * temperature * (l12 + l21)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARS (You et al. 2017) in the two forms the references run.
    For each weight w with gradient g (groups with `lars=False`, i.e. biases and norms, get
    plain SGD with momentum and no weight decay, as in SimCLR, BYOL and solo-learn):
      official (SimCLR, BYOL, MoCo v3 and DINO code; eta 0.001 on ImageNet):
          d = g + wd w,  d *= eta ||w|| / ||d||
      clip (solo-learn's LARS with clip_lr, used by its CIFAR recipes; eta 0.02):
          d = g + wd w,  d *= min(eta ||w|| / (||g|| + wd ||w||) / lr, 1),
          so that a layer's step min(eta ||w|| / (...), lr) is never larger than plain SGD's.
    SwAV's apex LARC (unclipped) uses the clip form's ratio without the cap; with SwAV's
    wd of 1e-6 that ratio and the official one differ by far less than a percent.
    A zero ||w|| or ||g|| leaves the trust at 1. Momentum accumulates the scaled d."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, mode="official"):
        if mode not in ("official", "clip"):
            raise ValueError(f"LARS mode '{mode}': choose official or clip")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True, mode=mode))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["lars"]:
                    w_norm, g_norm = p.norm(), d.norm()
                    d = d.add(p, alpha=g["weight_decay"])
                    if g["mode"] == "clip":
                        trust = g["eta"] * w_norm / (g_norm + g["weight_decay"] * w_norm)
                        if g["lr"] > 0:
                            trust = (trust / g["lr"]).clamp(max=1.0)
                    else:
                        g_norm = d.norm()
                        trust = g["eta"] * w_norm / g_norm
                    d = d * torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0)  # on the device: no host sync
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def param_groups(model):
    """Biases and norm weights (1-d tensors) get no weight decay and no LARS adaptation."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars": False}]


def make_optimizer(model, args):
    """v2: SGD, momentum 0.9, weight decay on every parameter, biases and BN included, as both
    MoCo v2's code and solo-learn's SGD (exclude_bias_n_norm_wd off) do. v3: LARS, biases and
    norms without decay or adaptation (MoCo v3's LARS; solo-learn's exclude_bias_n_norm)."""
    if args.moco_version == 2:
        groups = [{"params": list(model.parameters())}]
        return torch.optim.SGD(xattn_groups(groups, model, args.xattn_lr_scale), lr=0.0, momentum=0.9, weight_decay=args.weight_decay)
    return LARS(xattn_groups(param_groups(model), model, args.xattn_lr_scale), lr=0.0, weight_decay=args.weight_decay,
                eta=args.lars_eta, mode=args.lars_mode)


def views_of(args, size):
    """The two views of the recipe. v2: MoCo v2's (SimCLR's at jitter strength 0.5); v3: BYOL's,
    whose jitter 0.4/0.4/0.2/0.1 is strength 0.5 with half the saturation. Per view: blur, solarize."""
    s = args.jitter_strength
    if args.moco_version == 2:
        views = common.simclr_views(size, args.crop_min_scale, s)
    else:
        views = [replace(v, jitter=(0.8 * s, 0.8 * s, 0.4 * s, 0.2 * s)) for v in common.byol_views(size, args.crop_min_scale)]
    return [replace(v, blur_p=b, solarize_p=z) for v, b, z in zip(views, args.blur_prob, args.solarize_prob)]


# --- add-ons: Q-Score regularization and spatial cross-attention ------------------------
# The same text in every method script (tests/test_addons_block.py checks it), so that a
# copied script stands alone.
def add_addon_flags(p):
    p.add_argument("--qscore-lambda", type=float, default=0.0,
                   help="Q-Score regularization weight lambda (Kalibhat et al. Eq. 4); 0 turns it off")
    p.add_argument("--qscore-alpha-quantile", type=float, default=0.25,
                   help="alpha of Eq. 4 is this quantile of the global batch's Q-Scores (detached), so that the "
                        "regularizer acts on the batch's lowest-scoring share on any backbone: Q's scale depends on "
                        "the width D of h and on training, and no fixed alpha selects a minority on every backbone "
                        "(benchmarks/qscore_distribution.py). 0.25: a minority (Eq. 4's 'low-score samples'), wider "
                        "than a linear probe's error rate on CIFAR-10 (about 10 %%) because Q ranks mistakes only "
                        "roughly (the paper's AUROC: 65-73 %%), and 64 samples of a 256 batch: a steady threshold. "
                        "0: the absolute --qscore-alpha")
    p.add_argument("--qscore-alpha", type=float, default=0.2,
                   help="with --qscore-alpha-quantile 0: regularize samples with Q_i < alpha, the paper's form "
                        "(Eq. 4; it gives no value). On CIFAR-10, Q's 5th-95th percentiles are 0.04-0.06 for a random "
                        "ResNet-18, 0.02-0.03 for a random ResNet-50 and 0.06-0.11 for a briefly trained ResNet-18, "
                        "so 0.2 takes every sample")
    p.add_argument("--qscore-eps", type=float, default=3.0, help="highly activating: h_ij > mu_i + eps sigma_i (Eq. 2; paper: 3)")
    p.add_argument("--xattn", action="store_true", help="spatial cross-attention add-on (Seyfi et al.)")
    p.add_argument("--xattn-lr-scale", type=float, default=0.03 / 3.6,
                   help="the attention head's learning rate (its own parameter group) as this multiple of the "
                        "backbone's, at every step of the script's schedule. Default 0.03/3.6: Seyfi et al. App. 1.2's "
                        "peak lr_attn / lr_core. Their own schedules also warm up over 10 epochs, the head's from "
                        "half its peak (0.015 -> 0.03, the core's 0.3 -> 3.6), and end near 0 (1e-6 and 0.0036); "
                        "scaling the core's schedule keeps the peak ratio and the end, and warms the head from 0")
    p.add_argument("--xattn-positives", type=int, default=1, help="positives P per image, from its k-means cluster (Sec. 2.3)")
    p.add_argument("--xattn-clusters", type=int, default=100, help="k-means clusters K_c = classifier outputs (paper: 50-3000)")
    p.add_argument("--xattn-cluster-every", type=at_least_one, default=1,
                   help="k-means on the memory bank at every N-th epoch (Sec. 2.1: every epoch, i.e. every pass over "
                        "the data). Each clustering embeds the whole training set, so where --steps-per-epoch makes an "
                        "epoch a fraction of a pass (benchmarks), N > 1 keeps its cost and rate nearer the paper's")
    p.add_argument("--xattn-temp", type=float, default=0.05, help="classifier temperature tau_c (Eq. 6; paper: 0.05)")
    p.add_argument("--xattn-w-mask", type=float, default=0.05, help="weight w1 of L_mu (Eq. 7; paper: 0.05)")
    p.add_argument("--xattn-w-cls", type=float, default=0.1, help="weight w2 of L_cls (Eq. 7; paper: 0.1)")


def at_least_one(text):
    """argparse type: a whole number >= 1 (else argparse's one-line error, exit 2)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return int(text)


def qscore(h, eps=3.0):
    """Q-Score of each sample (Kalibhat et al., Eq. 2 and 3), label-free.
    h: (B, D) pooled backbone representations; they are L2-normalized here.
    L_i = {j : h_ij > mu_i + eps * sigma_i} (population std over the D features);
    Q_i = mean over j in L_i of (h_ij - mu_i). An empty L_i becomes the single largest
    feature for Q alone: the limit of Eq. 2 as eps falls, and it keeps a gradient.
    Returns Q (B,) with gradient through h, and the mask of L (B, D) bool as Eq. 2 gives it
    (an empty L_i is all False, so |L_i| counts 0: the fallback stays inside Q)."""
    h = F.normalize(h.float(), dim=1)
    mu, sigma = h.mean(1, keepdim=True), h.std(1, correction=0, keepdim=True)  # (B, 1)
    mask = h > mu + eps * sigma
    # the largest feature, by scatter: F.one_hot reads its indices' range back to the host (a sync
    # that CUDA skips, but the dispatch trace of tests/test_host_sync.py would see)
    top = torch.zeros_like(mask).scatter_(1, h.argmax(1, keepdim=True), True)  # (B, D)
    used = torch.where(mask.any(1, keepdim=True), mask, top)
    q = ((h - mu) * used).sum(1) / used.sum(1)
    return q, mask


def qscore_regularizer(h, lam, alpha, eps=3.0, quantile=0.0):
    """The Q-Score term of Eq. 4, as a loss to add: -lambda * mean_i[1{Q_i < alpha} Q_i].
    The indicator carries no gradient; Q_i does, through h, so minimizing this raises the
    Q-Score of low-quality samples and leaves samples above alpha alone. With quantile > 0,
    alpha is that quantile of the Q-Scores of the global batch (detached; under DDP the B
    values of every process are gathered, so each process uses the threshold one process
    would on the whole batch), and the share under it is about `quantile` on any backbone.
    Returns the loss (scalar) and statistics (device tensors, no host sync)."""
    q, mask = qscore(h, eps)
    if quantile > 0:
        alpha = torch.quantile(common.all_gather(q.detach()), quantile)
    low = (q < alpha).float().detach()
    loss = -lam * (low * q).mean()
    stats = {"qscore": q.mean().detach(), "qscore_active": mask.sum(1).float().mean(), "qscore_under_alpha": low.mean(),
             "qscore_empty": (mask.sum(1) == 0).float().mean()}
    return loss, stats


def correlation_mask(f_s, f_p):
    """Correlation mask mu (Seyfi et al., Eq. 3 and 4), the supervision of the attention head.
    f_s: (B, D, H, W) feature maps of the images; f_p: (B, P, D, H', W') of their P positives.
    rho_ij(I_s, I') = max_{i',j'} cos(f_s[:, i, j], f'[:, i', j']), averaged over the P
    positives. Eq. 3 divides the raw inner product by D instead; the cosine of channel-normalized
    features keeps the best match's position and puts every image on one scale, [0, 1] for the
    post-ReLU maps, with no per-image rescaling: a positive that shares nothing with the image
    gives a low mask, which the paper relies on ("consistently muted", Sec. 2.3), and a matching
    one a high mask. Computed without gradient (it supervises) and in float32 (autocast off).
    Returns mu (B, H, W)."""
    with torch.no_grad(), torch.autocast(device_type=f_s.device.type, enabled=False):
        b, _, hgt, wid = f_s.shape
        s = F.normalize(f_s.float().flatten(2), dim=1)  # (B, D, HW): a unit vector per position (0 if all 0)
        p = F.normalize(f_p.float().flatten(3), dim=2)  # (B, P, D, H'W')
        corr = torch.einsum("bdi,bpdj->bpij", s, p)  # (B, P, HW, H'W'): cosines
        mu = corr.max(dim=3).values.mean(dim=1)  # (B, HW): best match in each positive, averaged
        return mu.view(b, hgt, wid)


class CrossAttentionHead(nn.Module):
    """Attention head and classifier of the add-on (Seyfi et al., Sec. 2.3, App. 1.1).
    beta = sigmoid(conv1x1(relu(f))), one channel; the explanation map f * beta is
    pooled and classified over the K_c k-means clusters, logits divided by tau_c.
    Dropped after training: backbone.pt never holds it."""

    def __init__(self, dim, clusters, temperature=0.05):
        super().__init__()
        self.attn = nn.Conv2d(dim, 1, kernel_size=1)
        self.classifier = nn.Linear(dim, clusters)
        self.temperature = temperature

    def forward(self, f):  # f (N, D, H, W) -> beta (N, 1, H, W), logits (N, K_c)
        beta = torch.sigmoid(self.attn(F.relu(f)))
        with torch.autocast(f.device.type, enabled=False):  # logits / 0.05: float32 under bf16 autocast too
            logits = self.classifier((f * beta).mean(dim=(2, 3)).float()) / self.temperature
        return beta, logits


def xattn_losses(f, beta, logits, labels, positives):
    """L_mu (Eq. 5) and L_cls (Eq. 6). f: (B + B*P, D, H, W) anchors then their positives
    (anchor-major); beta, logits: the head's outputs for those rows; labels: (B,) pseudo-labels
    of the anchors, which their positives share."""
    b = labels.shape[0]
    fs, fp = f[:b], f[b:].unflatten(0, (b, positives))  # (B, D, H, W), (B, P, D, H, W)
    mu = correlation_mask(fs, fp)
    loss_mask = F.mse_loss(beta[:b, 0].float(), mu)
    loss_cls = F.cross_entropy(logits.float(), torch.cat([labels, labels.repeat_interleave(positives)]))
    return loss_mask, loss_cls


def xattn_groups(groups, model, scale):
    """The attention head's own parameter groups (Seyfi et al., App. 1.2: lr_attn far below
    lr_core): each of the method's optimizer groups gives the head's parameters to a copy of
    itself (same weight decay, LARS or not) marked lr_scale, and the training loop sets each
    group's lr to lr_scale times the schedule's. Without the head the groups stay as they are."""
    head = {id(p) for n, p in model.named_parameters() if n.startswith("xattn.")}
    out = []
    for g in groups:
        params = list(g["params"])
        core, attn = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
        out += [{**g, "params": core}] if core else []
        out += [{**g, "params": attn, "lr_scale": scale}] if attn else []
    return out


def cluster_bank(model, embed, train_set, args, size, stats, native, device, epoch, centroids=None):
    """Sec. 2.1: embed the whole training set, cluster it with k-means, and return each
    image's pseudo-label (N,) on `device` and the centroids (K_c, d), identical on every process.
    k-means starts from `centroids`, the previous epoch's (None: k-means++ seeding). Lloyd
    iterations from the old centroids reach the old assignment again where the embeddings have
    not moved, so a cluster keeps its id from one epoch to the next and the classifier of L_cls,
    which is kept, keeps its meaning; re-seeded k-means would number the clusters anew."""
    # Seyfi et al. embed theta(T(I)), a training view through the network as it trains; here the eval
    # transform in eval mode (BN running statistics), so that one image has one embedding on every process
    z, _ = common.extract_features(model, train_set, size, stats, native, device, workers=args.workers, embed=embed,
                                  data_path=args.data_path, precision=args.precision, progress="xattn memory bank")
    bank = common.MemoryBank(len(train_set), z.shape[1], device)
    bank.z.copy_(F.normalize(z, dim=1))
    return bank.kmeans(args.xattn_clusters, seed=args.seed * 1000 + epoch, init=centroids)
# --- end add-ons


# --- training -----------------------------------------------------------------------
def check_args(args):
    """Bad input gets one sentence (common.UserError -> exit 2) before any work."""
    common.check_dataset(args.dataset, args.data_dir)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise common.UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise common.UserError("--device cuda was asked for, but no GPU is visible.")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.compile and args.sync_bn and world > 1 and cuda:  # SyncBatchNorm is used on CUDA with several processes only
        raise common.UserError("--compile with SyncBatchNorm under DDP hits an open PyTorch bug (pytorch/pytorch#107372): "
                               "pass --no-sync-bn or leave out --compile.")
    if args.moco_version == 2 and (args.queue_size < args.batch_size or args.queue_size % args.batch_size):
        raise common.UserError(f"--queue-size {args.queue_size} is not a multiple of --batch-size {args.batch_size}.")
    path = common.checkpoint_to_resume(args.resume, args.run_dir)  # --resume's, or one in --run-dir (auto-resume)
    if path:
        if not os.path.isfile(path):
            raise common.UserError(f"--resume: no checkpoint at '{path}'.")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt.get("method") != METHOD:
            raise common.UserError(f"--resume: '{path}' is a {ckpt.get('method')} checkpoint, not {METHOD}.")
        if ckpt["args"]["backbone"] != args.backbone:
            raise common.UserError(f"--resume: '{path}' holds a {ckpt['args']['backbone']}, not --backbone {args.backbone}.")
        if ckpt["args"].get("moco_version") != args.moco_version:
            raise common.UserError(f"--resume: '{path}' is MoCo v{ckpt['args'].get('moco_version')}, not --moco-version {args.moco_version}.")
        common.check_resume(ckpt["args"], args, path)  # the same run, or one sentence
        return ckpt, os.path.dirname(path)
    return None, None


def lr_at(step, total, warmup, base):
    """Per-step schedule: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill or a full disk leaves the previous file whole."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:  # a file object: a full disk is OSError ENOSPC, not torch's opaque RuntimeError
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename, so that a node's crash cannot leave an empty file
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            e.filename = path
        raise


def main(args):
    ckpt, resume_dir = check_args(args)
    # set-up: device, processes, seed, run folder
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    bf16 = common.use_bf16(args.precision, device)  # bf16 autocast + channels_last: the CUDA configuration
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = common.rank(), common.world_size()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True  # convolutions
        # Under bf16 autocast the only float32 matrix products are the ones asked for (the losses, DINO's
        # last layer, SwAV's scores and queue): TF32 would cost them ~1% after a division by 0.05.
        torch.set_float32_matmul_precision("highest")
    run_dir = resume_dir or args.run_dir or os.path.join("runs", f"{METHOD}_{args.dataset}_s{args.seed}_{int(time.time())}")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as fh:
            json.dump(vars(args), fh, indent=2)
        tensorboard = tensorboard_writer(run_dir)  # rank 0 alone writes

    # data
    native = common.IMAGE_SIZE[args.dataset]
    size = args.image_size or native
    stats = common.STATS[args.dataset]
    train_set = common.make_dataset(args.dataset, args.data_dir, train=True)
    knn_train = common.knn_bank(args.dataset, args.data_dir, train_set, args.knn_limit)  # one decoded copy of a split
    knn_test = common.make_dataset(args.dataset, args.data_dir, train=False)
    if args.check_data:  # every file decoded now: a bad one is named before any work, not hours in
        common.check_images([train_set, knn_test], args.workers)
    num_classes = len(knn_test.classes)
    views = views_of(args, size)
    loader = common.TrainLoader(train_set, views, args.batch_size, stats, device,
                                seed=args.seed, workers=args.workers, positive=views[0],
                                data_path=args.data_path, compile=args.compile)
    steps = min(len(loader), args.steps_per_epoch) if args.steps_per_epoch else len(loader)

    # model, momentum copy, queue and optimizer
    model = MoCo(args, small_images=size <= 64).to(device)
    if args.sync_bn and distributed and use_cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the key encoder, a copy, gets it too
    elif args.sync_bn and distributed and rank == 0:
        print("note: SyncBatchNorm needs CUDA; on CPU each process normalizes its own share of the batch.", flush=True)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    key_encoder = KeyEncoder(model)  # starts as a copy of the query encoder (MoCo, Alg. 1)
    queue, ptr = None, 0
    if args.moco_version == 2:  # random unit vectors until real keys push them out (MoCo's init)
        queue = F.normalize(torch.randn(args.queue_size, args.proj_dim, device=device), dim=1)  # (K, d)
    optimizer = make_optimizer(model, args)
    # centroids, labels_all: the last k-means clustering of --xattn (where the next one starts) and its pseudo-labels;
    # resume_at: the position inside start_epoch of a mid-epoch checkpoint (step, running sums, ...; see
    # common.RunControl.position)
    start_epoch, centroids, labels_all, resume_at = 0, None, None, {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        key_encoder.load_state_dict(ckpt["key_encoder"])
        if queue is not None:
            queue.copy_(ckpt["queue"])
            ptr = ckpt["queue_ptr"]
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, centroids, resume_at = ckpt["epoch"], ckpt.get("centroids"), ckpt.get("at") or {}
        labels_all = ckpt["pseudo_labels"].to(device) if ckpt.get("pseudo_labels") is not None else None
    if distributed and queue is not None:
        dist.broadcast(queue, 0)  # the same negatives on every process from the start
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None) if distributed else model
    if args.compile:  # graph capture of the forward (and, through autograd, the backward) pass
        ddp = torch.compile(ddp)
    base_lr = args.lr * args.batch_size / 256
    total, warmup = args.epochs * steps, int(args.warmup_epochs * steps)
    bn = ("global" if use_cuda else "per process") if args.sync_bn else "shuffled"
    bn = bn if distributed else "of one process"
    if rank == 0:
        print(f"{METHOD} v{args.moco_version}: {args.dataset} {len(train_set)} images at {size}px, {args.backbone}, "
              f"{world} process(es) on {device.type}, BN {bn}, batch {args.batch_size}, {steps} steps/epoch -> {run_dir}",
              flush=True)

    if rank == 0 and ckpt is not None:
        common.resume_note(ckpt, run_dir, world, args.batch_size)
    control = common.RunControl(args.checkpoint_every_min)  # stop signals and the checkpoint clock, agreed by all processes

    def checkpoint(epoch, at=None):  # epochs done, and for a mid-epoch checkpoint the position inside the next one
        if rank == 0:
            save_atomic({"method": METHOD, "args": vars(args), "world": world, "epoch": epoch, "at": at,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "key_encoder": key_encoder.state_dict(), "queue": queue, "queue_ptr": ptr,
                         "momentum_step": epoch * steps + (at or {}).get("step", 0), "centroids": centroids,
                         "pseudo_labels": labels_all},
                        os.path.join(run_dir, "checkpoint.pt"))
        control.saved()

    def embed(m, x):  # the memory bank holds the projections z of the query encoder (Seyfi et al., Sec. 2.1)
        return m.projector(m.backbone(x)[1])

    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(args.seed * 1000 + epoch)  # a resumed epoch replays the same randomness
        at = resume_at if epoch == start_epoch else {}  # where a mid-epoch checkpoint stopped in this epoch
        loader.set_epoch(epoch, start_step=at.get("step", 0), bad_images=at.get("bad_images", 0) if rank == 0 else 0)
        if args.xattn:  # k-means every --xattn-cluster-every epochs; an epoch resumed part-way keeps its labels
            if labels_all is None or (epoch % args.xattn_cluster_every == 0 and not at.get("step")):
                labels_all, centroids = cluster_bank(model, embed, train_set, args, size, stats, native, device, epoch,
                                                     centroids)
            loader.set_clusters(labels_all.cpu().numpy(), args.xattn_positives)
        model.train()
        key_encoder.train()
        sums = {k: v.to(device) for k, v in at.get("sums", {}).items()}  # the running sums of the steps done
        bad = torch.zeros((), device=device)  # first non-finite step + 1, or 0
        t0, seen = time.time() - at.get("seconds", 0.0), at.get("seen", 0)
        next_line = t0 + min(10.0, args.log_seconds)  # a first progress line soon, then every --log-seconds
        if use_cuda:
            torch.cuda.reset_peak_memory_stats()
        for step, (crops, idx, positives) in enumerate(loader, start=at.get("step", 0)):
            if step >= steps:
                break
            it = epoch * steps + step
            torch.manual_seed(args.seed * 1000003 + it)  # what a step draws (MoCo's BN shuffle) replays from any step
            lr = lr_at(it, total, warmup, base_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # the attention head's group: --xattn-lr-scale
            if bf16:  # the positives too: a torch.cat of mixed memory formats is a copy to the default one
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
                positives = positives.contiguous(memory_format=torch.channels_last) if positives is not None else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                # symmetric: queries and keys of both views; else queries of view 1, keys of view 2
                q_views, k_views = (crops, crops) if args.symmetric_loss else (crops[:1], crops[1:])
                out = ddp(q_views, positives if args.xattn else None)
                b = crops[0].shape[0]
                tau = momentum_at(it, total, args.tau_base, args.tau_end)
                ema_update(model, key_encoder, tau)  # before the keys, as in MoCo's Alg. 1
                k = torch.cat([momentum_keys(key_encoder, v, shuffle=not args.sync_bn) for v in k_views]  # (2b or b, d)
                              if args.per_view_bn else [momentum_keys(key_encoder, torch.cat(k_views), shuffle=not args.sync_bn)])
                terms = {"loss_ssl": moco_loss(out["q"], k, queue, args.temperature, args.symmetric_loss)}
                loss = terms["loss_ssl"]
                if args.qscore_lambda > 0:
                    terms["loss_qscore"], qstats = qscore_regularizer(out["h"], args.qscore_lambda, args.qscore_alpha,
                                                                      args.qscore_eps, args.qscore_alpha_quantile)
                    loss = loss + terms["loss_qscore"]
                else:
                    _, qstats = qscore_regularizer(out["h"].detach(), 0.0, args.qscore_alpha, args.qscore_eps,
                                                   args.qscore_alpha_quantile)
                if args.xattn:
                    terms["loss_mask"], terms["loss_cls"] = xattn_losses(
                        out["f"], out["beta"], out["logits"], labels_all[idx], args.xattn_positives)
                    loss = loss + args.xattn_w_mask * terms["loss_mask"] + args.xattn_w_cls * terms["loss_cls"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if queue is not None:
                ptr = enqueue(queue, ptr, k[-b:])  # view 2's keys, after the loss: a batch is never its own negative

            # bookkeeping on the device; the host reads it only at log steps
            terms["loss"] = loss
            terms["collapse_std"] = F.normalize(out["q"].detach().float(), dim=1).std(0).mean()  # solo-learn's monitor
            for k_, v in {**terms, **qstats}.items():
                sums[k_] = sums.get(k_, 0.0) + v.detach().float()
            bad = torch.where((bad == 0) & ~torch.isfinite(loss.detach()), torch.full_like(bad, step + 1.0), bad)
            seen += b * world
            log = (step + 1) % args.log_every == 0 or step + 1 == steps  # by steps: the same on every process
            if log and check_finite(bad, epoch, run_dir):  # an all-reduce, so never on a time-based line
                return 1
            if rank == 0 and (log or time.time() >= next_line):  # by time: rank 0 alone, no collective
                next_line = progress(args, epoch, step, steps, loss, lr, seen, t0)
            stop, due = control.poll()  # the same answer on every process, at the same step
            if (stop or due) and step + 1 < steps:  # at an epoch's last step its end-of-epoch checkpoint follows
                if check_finite(bad, epoch, run_dir):  # never a checkpoint of a broken run
                    return 1
                checkpoint(epoch, control.position(step + 1, seen, time.time() - t0, sums, loader.bad_images))
                if stop:
                    return control.stop(f"at epoch {epoch + 1} step {step + 1}/{steps}", run_dir)

        # end of epoch: metrics, kNN, checkpoint
        seconds = time.time() - t0
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else 0.0  # the training steps', before the kNN pass
        stop = check_finite(bad, epoch, run_dir)
        if stop:
            return stop
        metrics = {"epoch": epoch + 1, "lr": lr, "tau": tau}
        for k_, v in sums.items():
            if distributed:
                dist.all_reduce(v)
                v = v / world
            metrics[k_] = v.item() / steps
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            htr, ytr = common.extract_features(model.backbone, knn_train, size, stats, native, device,  # this share
                                               workers=args.workers, data_path=args.data_path,
                                               precision=args.precision, gather=False)
            hte, yte = common.extract_features(model.backbone, knn_test, size, stats, native, device,
                                               workers=args.workers, data_path=args.data_path,
                                               precision=args.precision)
            metrics["knn_top1"] = common.knn_top1(htr, ytr, hte, yte, num_classes, sharded=True)
        metrics.update(images_per_s=seen / seconds, seconds=seconds,
                       peak_mem_gb=peak_gb, bad_images=control.total(loader.bad_images))
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
        checkpoint(epoch + 1)
        if rank == 0:
            save_atomic(model.backbone.state_dict(), os.path.join(run_dir, "backbone.pt"))
            tensorboard(metrics)
            print(epoch_line(metrics, args.epochs), flush=True)
        if distributed:
            dist.barrier()
        if epoch + 1 < args.epochs and control.poll(force=True)[0]:  # a stop signal in the last step or the kNN pass
            return control.stop(f"at the end of epoch {epoch + 1}", run_dir)
    if distributed:
        dist.destroy_process_group()
    return 0


def check_finite(bad, epoch, run_dir):
    """Stop every process at once when a loss went non-finite; the last checkpoint stays."""
    if common.world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() == 0:
        return 0
    if common.rank() == 0:
        print(f"error: the loss became non-finite at epoch {epoch + 1}, step {int(bad.item())}; "
              f"stopping, the last good checkpoint stays in {run_dir}.", flush=True)
    return 1


def progress(args, epoch, step, steps, loss, lr, seen, t0):
    """A progress line from rank 0 (loss.item() waits for the device); returns when the next is due by time."""
    el = time.time() - t0
    left = el / (step + 1) * ((args.epochs - epoch) * steps - step - 1)
    print(f"epoch {epoch + 1}/{args.epochs}  step {step + 1}/{steps}  loss {loss.item():.4f}  lr {lr:.4g}  "
          f"{seen / el:.1f} img/s  {duration(left)} left", flush=True)
    return time.time() + args.log_seconds


def epoch_line(m, epochs):
    """For a person, rounded: loss terms | online kNN | Q-Score | collapse monitor | speed (metrics.jsonl: all)."""
    terms = " ".join(f"{k[5:].replace('qscore', 'qscore-reg')} {v:.3f}" for k, v in m.items() if k.startswith("loss_"))
    knn = f"  online-knn {m['knn_top1']:.3f}" if "knn_top1" in m else ""
    mem = f"  {m['peak_mem_gb']:.1f} GB" if m["peak_mem_gb"] else ""
    return (f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.3f} ({terms}){knn}  qscore {m['qscore']:.3f} "
            f"|L| {m['qscore_active']:.1f} under-alpha {m['qscore_under_alpha']:.0%}  "
            f"collapse-std {m['collapse_std']:.3f}  {m['images_per_s']:.1f} img/s{mem}  {duration(m['seconds'])}")


def duration(s):
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def tensorboard_writer(run_dir):
    """Each epoch's metrics as TensorBoard events in the run folder (`tensorboard --logdir runs`, as in cleanRL)
    when the optional tensorboard package is installed; else a function that does nothing, silently."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return lambda metrics: None
    writer = SummaryWriter(run_dir)

    def write(metrics):
        for k, v in metrics.items():
            if k != "epoch":
                writer.add_scalar(k, v, metrics["epoch"])  # step: the epoch
        writer.flush()
    return write


if __name__ == "__main__":
    common.catch_stop_signals()  # in the training loop SIGTERM, SIGUSR1 checkpoint after the step: common.EXIT_STOPPED
    try:
        raise SystemExit(main(parse_args()))
    except common.UserError as e:
        common.fail(str(e))
    except OSError as e:  # a full disk: one sentence and common.EXIT_WRITE
        common.fail_write(e)
