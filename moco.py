"""MoCo: a query encoder learns to pick its own image's key out of negatives; keys come from a
momentum encoder, a moving average of the query encoder (He et al., CVPR 2020).

v2 (default): Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020: MLP
head, a queue of negative keys from all processes, shuffled BN, SGD; loss symmetrized as in
solo-learn's mocov2plus (--no-symmetric-loss: the paper's one direction). v3: Chen, Xie, He,
"An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021, ResNet form:
predictor, in-batch keys of all processes, global BN, LARS. Defaults: solo-learn's CIFAR
recipes; the ImageNet commands are the official ones (RECIPES.md compares them, flag for flag).

    python moco.py --dataset digits --epochs 1                    # offline demo
    python moco.py --dataset cifar10 --data-dir data              # v2, 1000 epochs, 1 GPU
    python moco.py --dataset cifar10 --data-dir data --moco-version 3
    torchrun --nproc_per_node=8 moco.py --dataset folder --data-dir /imagenet --moco-version 2 \
        --backbone resnet50 --epochs 200 --batch-size 256 --lr 0.03 --warmup-epochs 0 \
        --proj-dim 128 --queue-size 65536 --tau-base 0.999 --crop-min-scale 0.2 --no-symmetric-loss
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 moco.py --dataset folder \
        --data-dir /imagenet --moco-version 3 --backbone resnet50 --epochs 100 --batch-size 4096 \
        --lr 0.6 --lars-mode official --lars-eta 0.001 --temperature 1.0 --crop-min-scale 0.2 \
        --blur-prob 1.0 0.1 --zero-init-residual
"""

import argparse
import copy
import math
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "moco"
BOOL = argparse.BooleanOptionalAction  # --flag / --no-flag
# Defaults of the flags left unset: solo-learn's mocov2plus.yaml (v2) and mocov3.yaml (v3)
VERSIONED = ("weight_decay", "proj_hidden", "tau_end", "sync_bn", "blur_prob", "solarize_prob")
V2_DEFAULTS = dict(zip(VERSIONED, (1e-4, 2048, 0.999, False, (0.5, 0.5), (0.0, 0.0))))
V3_DEFAULTS = dict(zip(VERSIONED, (1e-6, 4096, 1.0, True, (0.0, 0.0), (0.0, 0.2))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument  # defaults: solo-learn's CIFAR recipes; RECIPES.md gives every source
    add("--moco-version", type=int, default=2, choices=[2, 3], help="2: queue, SGD; 3: predictor")
    add("--epochs", type=int, default=1000, help="training epochs")
    add("--batch-size", type=int, default=256, help="global batch, split over the processes")
    add("--lr", type=float, default=0.3, help="learning rate per 256 images (v2 SGD, v3 LARS)")
    add("--weight-decay", type=float, help="weight decay; None: v2 1e-4, v3 1e-6")
    add("--lars-mode", default="clip", choices=["clip", "official"], help="v3: see common.LARS")
    add("--lars-eta", type=float, default=0.02, help="v3: LARS trust coefficient")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay")
    add("--temperature", type=float, default=0.2, help="InfoNCE temperature t (Eq. 1)")
    add("--symmetric-loss", action=BOOL, default=True, help="both directions, views 1->2, 2->1")
    add("--proj-hidden", type=int, help="projector hidden width; None: v2 2048, v3 4096")
    add("--proj-dim", type=int, default=256, help="projector output width")
    add("--pred-hidden", type=int, default=4096, help="v3: predictor hidden width")
    add("--queue-size", type=int, default=32768, help="v2: negative keys, whole global batches")
    add("--tau-base", type=float, default=0.99, help="momentum of the key encoder at step 0")
    add("--tau-end", type=float, help="momentum at the last step; None: v2 0.999, v3 1.0")
    add("--crop-min-scale", type=float, default=0.08, help="smallest crop area")
    add("--jitter-strength", type=float, default=0.5, help="colour jitter strength s (views_of)")
    probs = dict(type=float, nargs="+", metavar="P")  # one for both views, or one per view
    add("--blur-prob", **probs, help="Gaussian blur probability; None: v2 0.5, v3 0")
    add("--solarize-prob", **probs, help="solarization probability; None: v2 0, v3 0 0.2")
    add("--zero-init-residual", action=BOOL, default=False, help="each block starts as identity")
    add("--per-view-bn", action=BOOL, default=True, help="BatchNorm statistics per view")
    add("--sync-bn", action=BOOL, help="global BN, else shuffled (Sec. 3.3); None: v2 no, v3 yes")
    add_addon_flags(p)
    common.add_run_flags(p)
    args = p.parse_args(argv)
    for k, v in (V2_DEFAULTS if args.moco_version == 2 else V3_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("blur_prob", "solarize_prob"):  # one probability means both views
        v = tuple(getattr(args, k))
        if len(v) not in (1, 2):
            p.error(f"--{k.replace('_', '-')} takes one probability (both views) or two (per view)")
        setattr(args, k, v * 2 if len(v) == 1 else v)
    return args


# --- the method ---------------------------------------------------------------------
def mlp(d_in, hidden, d_out, version, last_bn=True):
    """v2: MoCo v2's head, Linear-ReLU-Linear. v3: BN after each layer, the last without affine;
    last_bn=False: none after the last (v3's predictor, MoCo v3 Sec. 3)."""
    if version == 2:
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(True), nn.Linear(hidden, d_out))
    first = [nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    last = [nn.BatchNorm1d(d_out, affine=False)] if last_bn else []
    return nn.Sequential(*first, nn.Linear(hidden, d_out, bias=False), *last)


class MoCo(nn.Module):
    """Query encoder: backbone -> h (for downstream tasks) -> projector -> z [-> predictor] -> q."""

    def __init__(self, args, small_images):
        super().__init__()
        zero = args.zero_init_residual
        self.backbone = common.build_backbone(args.backbone, small_images, zero_init_residual=zero)
        a, d, p = args, self.backbone.dim, args.proj_dim
        self.projector = mlp(d, a.proj_hidden, p, a.moco_version)
        self.predictor = mlp(p, a.pred_hidden, p, 3, last_bn=False) if a.moco_version == 3 else None
        self.xattn = CrossAttentionHead(d, a.xattn_clusters, a.xattn_temp) if a.xattn else None
        self.per_view_bn = a.per_view_bn

    def each_view(self, fn, x, b):
        """fn on x (V*b, ...): with --per-view-bn one view of b rows at a time, else all at once."""
        return torch.cat([fn(v) for v in x.split(b)]) if self.per_view_bn else fn(x)

    def forward(self, crops, positives=None):
        """crops: the V views (V = 2, or 1 for the one-directional loss), each (b, 3, s, s)."""
        b, n = crops[0].shape[0], len(crops) * crops[0].shape[0]
        parts = crops + ([positives] if positives is not None else [])  # all views share one size
        if self.per_view_bn:  # one pass per view (and for the positives), as the official code
            f, h = (torch.cat(t) for t in zip(*(self.backbone(x) for x in parts)))
        else:  # one pass for all: BN normalizes the views together
            f, h = self.backbone(torch.cat(parts))
        # f, h: (n [+ b*P], D, h, w), (n [+ b*P], D)
        z = self.each_view(self.projector, h[:n], b)  # (n, d)
        q = z if self.predictor is None else self.each_view(self.predictor, z, b)
        out = {"h": h[:n], "q": q}
        if self.xattn is not None and positives is not None:
            out["f"] = torch.cat([f[:b], f[n:]])  # anchors (the first view), then their positives
            out["beta"], out["logits"] = self.xattn(out["f"])
        return out


class KeyEncoder(nn.Module):
    """Momentum copy of backbone and projector (keys are projections); no gradient, ever."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.projector = map(copy.deepcopy, (model.backbone, model.projector))
        self.requires_grad_(False)

    def forward(self, x):
        return self.projector(self.backbone(x)[1])


@torch.no_grad()
def ema_update(model, key_encoder, tau):
    """theta_k <- tau theta_k + (1 - tau) theta_q (MoCo, Eq. 2); BN statistics stay the key
    encoder's own. One multi-tensor kernel per operation, not two per parameter."""
    keys = [*key_encoder.backbone.parameters(), *key_encoder.projector.parameters()]
    queries = [p.detach() for p in (*model.backbone.parameters(), *model.projector.parameters())]
    torch._foreach_mul_(keys, tau)
    torch._foreach_add_(keys, queries, alpha=1 - tau)


def momentum_at(step, total, base, end):
    """Cosine schedule per step from `base` (step 0) to `end` (step `total`), as MoCo v3's code."""
    return end - (end - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


@torch.no_grad()
def momentum_keys(key_encoder, x, shuffle=True):
    """Normalized keys (n, d) of this process's images x (n, 3, s, s). Shuffled BN (MoCo, Sec.
    3.3): under DDP the key encoder sees a random share of the global batch, so that no key's BN
    statistics come from its query's sub-batch (a shortcut); keys are put back in order."""
    world, r, n = common.world_size(), common.rank(), x.shape[0]
    if world == 1 or not shuffle:
        k = key_encoder(x)
    else:
        x_all, mine = common.all_gather(x), slice(r * n, (r + 1) * n)  # (W n, 3, s, s)
        perm = torch.randperm(len(x_all), device=x.device)
        dist.broadcast(perm, 0)
        k_all = common.all_gather(key_encoder(x_all[perm[mine]]))  # (W n, d), shuffled order
        k = torch.empty_like(k_all)
        k[perm] = k_all  # undo the shuffle
        k = k[mine]
    if world > 1:  # BN running statistics: the copy stays the same on every process
        common.average_buffers(key_encoder)
    return F.normalize(k.float(), dim=1)


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """FIFO: the keys of every process (rank order) replace the oldest entries of the queue
    (K, d); K is a multiple of the global batch, so a write never wraps. Returns the pointer."""
    k = common.all_gather(keys)  # (W b, d)
    queue[ptr : ptr + len(k)] = k.to(queue.dtype)
    return (ptr + len(k)) % len(queue)


def infonce_loss(q, k, queue=None, temperature=0.2):
    """InfoNCE, Eq. (1) of He et al. 2020 (MoCo), averaged over this process's queries:
        L_q = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k-} exp(q.k- / t))
    q: (b, d) queries (normalized here); k: (b, d) normalized keys, never with gradient. With a
    queue (K, d) (v2), the negatives are its entries and k+ is each query's own key. Without (v3,
    Eq. 1 of Chen et al. 2021), the candidates are the global batch's keys, k+ at rank*b + i.
    Queue and keys are the same on every process: the DDP-averaged gradient is the whole batch's."""
    q, k = F.normalize(q.float(), dim=1), k.detach().float()
    with torch.autocast(q.device.type, enabled=False):  # else products are bf16 under autocast
        if queue is not None:
            pos = (q * k).sum(1, keepdim=True)  # (b, 1)
            logits = torch.cat([pos, q @ queue.T.float()], 1) / temperature  # (b, 1 + K)
            labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
        else:
            logits = q @ common.all_gather(k).T / temperature  # (b, W b)
            labels = torch.arange(len(q), device=q.device) + common.rank() * len(q)
    return F.cross_entropy(logits, labels)


def moco_loss(q, k, queue, temperature, symmetric=True):
    """Symmetrized: q, k (2b, d), view 1 then view 2; queries of view 1 against keys of view 2
    and the other way round. v2 (queue given): the mean of the two terms (solo-learn's mocov2plus);
    v3: their sum, each scaled by 2t (MoCo v3, Alg. 1). symmetric=False: q (b, d) of view 1
    against k (b, d) of view 2 only, as MoCo v2's code."""
    if not symmetric:
        loss = infonce_loss(q, k, queue, temperature)
        return loss if queue is not None else 2 * temperature * loss
    b = len(q) // 2
    l12 = infonce_loss(q[:b], k[b:], queue, temperature)
    l21 = infonce_loss(q[b:], k[:b], queue, temperature)
    return (l12 + l21) / 2 if queue is not None else 2 * temperature * (l12 + l21)


def make_optimizer(model, args):
    """v2: SGD, momentum 0.9, weight decay on every parameter, biases and BN too (MoCo v2's code,
    solo-learn). v3: LARS, biases and norms without decay or adaptation (MoCo v3, solo-learn)."""
    v2, kw = args.moco_version == 2, dict(lr=0.0, weight_decay=args.weight_decay)
    groups = common.param_groups(model, exclude_bias_norm=not v2)
    groups = xattn_groups(groups, model, args.xattn_lr_scale)  # the add-on's head at its own lr
    if v2:
        return torch.optim.SGD(groups, momentum=0.9, **kw)
    return common.LARS(groups, eta=args.lars_eta, mode=args.lars_mode, **kw)


def views_of(args, size):
    """The two views of the recipe, then blur and solarization per view. v2: MoCo v2's (SimCLR's
    at jitter strength s); v3: BYOL's, whose jitter 0.4/0.4/0.2/0.1 is s = 0.5, half saturation."""
    s, crop = args.jitter_strength, args.crop_min_scale
    if args.moco_version == 2:
        views = common.simclr_views(size, crop, s)
    else:
        jitter = (0.8 * s, 0.8 * s, 0.4 * s, 0.2 * s)
        views = [replace(v, jitter=jitter) for v in common.byol_views(size, crop)]
    per_view = zip(views, args.blur_prob, args.solarize_prob)
    return [replace(v, blur_p=b, solarize_p=z) for v, b, z in per_view]


# --- add-ons: Q-Score regularization and spatial cross-attention ------------------------
# The same text in every method script (tests/test_addons_block.py checks it), so that a
# copied script stands alone. Kalibhat et al. (Q-Score) and Seyfi et al. (cross-attention).
def add_addon_flags(p):
    add = p.add_argument  # the papers' values in parentheses; README explains each
    add("--qscore-lambda", type=float, default=0.0, help="Q-Score weight lambda (Eq. 4); 0: off")
    add("--qscore-alpha-quantile", type=float, default=0.25, help="quantile alpha: a departure")
    add("--qscore-alpha", type=float, default=0.2, help="with quantile 0: Eq. 4's fixed alpha")
    add("--qscore-eps", type=float, default=3.0, help="L_i: h_ij > mu_i + eps sigma_i (Eq. 2: 3)")
    add("--xattn", action="store_true", help="the spatial cross-attention add-on")
    add("--xattn-lr-scale", type=float, default=0.03 / 3.6, help="head lr / backbone lr (0.03/3.6)")
    add("--xattn-positives", type=int, default=1, help="positives P per image (Sec. 2.3)")
    add("--xattn-clusters", type=int, default=100, help="k-means clusters K_c (50-3000)")
    add("--xattn-cluster-every", type=common.at_least_one, default=1, help="k-means every N epochs")
    add("--xattn-temp", type=float, default=0.05, help="classifier temperature tau_c (Eq. 6: 0.05)")
    add("--xattn-w-mask", type=float, default=0.05, help="weight w1 of L_mu (Eq. 7: 0.05)")
    add("--xattn-w-cls", type=float, default=0.1, help="weight w2 of L_cls (Eq. 7: 0.1)")
    add("--xattn-mask", default="eq3", choices=["eq3", "cosine"], help="mu; cosine: a departure")


def qscore(h, eps=3.0):
    """Q-Score of each sample, label-free (Kalibhat et al., Eq. 2 and 3). h: (B, D), pooled;
    L2-normalized here. L_i = {j : h_ij > mu_i + eps sigma_i}; Q_i = mean_{j in L_i} (h_ij - mu_i).
    An empty L_i becomes the single largest feature for Q alone (Eq. 2 as eps falls; it keeps a
    gradient). Returns Q (B,) and the mask of L (B, D) as Eq. 2 gives it (empty: all False)."""
    h = F.normalize(h.float(), dim=1)
    mu, sigma = h.mean(1, keepdim=True), h.std(1, correction=0, keepdim=True)  # (B, 1)
    mask = h > mu + eps * sigma
    # the largest feature by scatter: F.one_hot would read its indices back to the host
    top = torch.zeros_like(mask).scatter_(1, h.argmax(1, keepdim=True), True)  # (B, D)
    used = torch.where(mask.any(1, keepdim=True), mask, top)
    q = ((h - mu) * used).sum(1) / used.sum(1)
    return q, mask


def qscore_regularizer(h, lam, alpha, eps=3.0, quantile=0.0):
    """Eq. 4's Q-Score term as a loss to add: -lambda * mean_i[1{Q_i < alpha} Q_i]. The indicator
    carries no gradient; Q_i does, so low-quality samples are pushed up and the rest left alone.
    quantile > 0: alpha is that quantile of the global batch's detached Q (gathered under DDP),
    a departure from the paper's fixed alpha (README). Returns the loss and device statistics."""
    q, mask = qscore(h, eps)
    if quantile > 0:
        alpha = torch.quantile(common.all_gather(q.detach()), quantile)
    low = (q < alpha).float().detach()
    loss = -lam * (low * q).mean()
    size = mask.sum(1)
    stats = {
        "qscore": q.mean().detach(),
        "qscore_active": size.float().mean(),
        "qscore_under_alpha": low.mean(),
        "qscore_empty": (size == 0).float().mean(),
    }
    return loss, stats


def qscore_stats(h, args):
    """The Q-Score statistics of a batch when the regularizer is off (no loss, no gradient)."""
    a = args
    return qscore_regularizer(
        h.detach(), 0.0, a.qscore_alpha, a.qscore_eps, a.qscore_alpha_quantile
    )[1]


def correlation_mask(f_s, f_p, form="eq3"):
    """Correlation mask mu (Seyfi et al., Eq. 3 and 4), the attention head's target. f_s: (B, D,
    H, W) the images' feature maps; f_p: (B, P, D, H', W') their P positives'. Eq. 3: rho_ij =
    (1/D) max over (i', j') of <f_s[:, i, j], f'[:, i', j']>; Eq. 4: mu, the mean over the
    positives. beta is a sigmoid, so mu is divided by one detached scale, its largest value in the
    global batch (every process): mu lies in [0, 1] and keeps Eq. 3's relative levels across
    positions, positives and images, so a weak, unrelated positive stays muted (never per image).
    form "cosine" (--xattn-mask cosine, a departure): the cosine of the channel vectors, which puts
    every position on one scale whatever its magnitude. No gradient (it supervises), float32.
    Returns mu (B, H, W)."""
    with torch.no_grad(), torch.autocast(f_s.device.type, enabled=False):
        b, _, hgt, wid = f_s.shape
        s, p = f_s.float().flatten(2), f_p.float().flatten(3)  # (B, D, HW), (B, P, D, H'W')
        if form == "cosine":
            s, p = F.normalize(s, dim=1), F.normalize(p, dim=2)  # unit vectors (0 if all 0)
        corr = torch.einsum("bdi,bpdj->bpij", s, p)  # (B, P, HW, H'W'): inner products
        mu = corr.max(dim=3).values.mean(dim=1).view(b, hgt, wid)  # best match, averaged
        if form == "eq3":  # over the global batch's largest value (Eq. 3's 1/D cancels in it)
            mu = mu / common.all_gather(mu.amax().view(1)).max().clamp_min(1e-12)
        return mu


class CrossAttentionHead(nn.Module):
    """Attention head and classifier (Seyfi et al., Sec. 2.3, App. 1.1): beta = sigmoid(conv1x1(
    relu(f))), one channel; f * beta pooled and classified over the K_c clusters, logits / tau_c.
    Dropped after training: backbone.pt never holds it."""

    def __init__(self, dim, clusters, temperature=0.05):
        super().__init__()
        self.attn = nn.Conv2d(dim, 1, kernel_size=1)
        self.classifier = nn.Linear(dim, clusters)
        self.temperature = temperature

    def forward(self, f):  # f (N, D, H, W) -> beta (N, 1, H, W), logits (N, K_c)
        beta = torch.sigmoid(self.attn(F.relu(f)))
        with torch.autocast(f.device.type, enabled=False):  # logits / 0.05: float32 always
            logits = self.classifier((f * beta).mean(dim=(2, 3)).float()) / self.temperature
        return beta, logits


def xattn_losses(f, beta, logits, labels, positives, mask="eq3"):
    """L_mu (Eq. 5) and L_cls (Eq. 6). f: (B + B*P, D, H, W), anchors then their positives;
    beta, logits: the head's outputs for those rows; labels: (B,) the anchors' pseudo-labels;
    mask: correlation_mask's form."""
    b = labels.shape[0]
    fs, fp = f[:b], f[b:].unflatten(0, (b, positives))  # (B, D, H, W), (B, P, D, H, W)
    loss_mask = F.mse_loss(beta[:b, 0].float(), correlation_mask(fs, fp, mask))
    targets = torch.cat([labels, labels.repeat_interleave(positives)])  # positives share them
    return loss_mask, F.cross_entropy(logits.float(), targets)


def xattn_groups(groups, model, scale):
    """The attention head's own optimizer groups (App. 1.2: lr_attn far below lr_core): each
    group gives the head's parameters to a copy of itself marked lr_scale (common.Run.schedule)."""
    head = {id(p) for n, p in model.named_parameters() if n.startswith("xattn.")}
    out = []
    for g in groups:
        params = list(g["params"])
        core, attn = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
        out += [{**g, "params": core}] if core else []
        out += [{**g, "params": attn, "lr_scale": scale}] if attn else []
    return out


def addon_losses(args, out, loss, pseudo, idx):
    """The method's loss plus the add-ons': Kalibhat et al. Eq. 4 and Seyfi et al. Eq. 7 (w1 L_mu
    + w2 L_cls). out: the model's h (and f, beta, logits with --xattn); pseudo: the run's
    common.PseudoLabels; idx: the batch's image indices. Returns (loss, terms, Q-Score stats)."""
    a, terms = args, {"loss_ssl": loss}
    if a.qscore_lambda > 0:
        terms["loss_qscore"], qstats = qscore_regularizer(
            out["h"], a.qscore_lambda, a.qscore_alpha, a.qscore_eps, a.qscore_alpha_quantile
        )
        loss = loss + terms["loss_qscore"]
    else:
        qstats = qscore_stats(out["h"], a)
    if a.xattn:
        f, beta, logits = out["f"], out["beta"], out["logits"]
        terms["loss_mask"], terms["loss_cls"] = xattn_losses(
            f, beta, logits, pseudo.labels[idx], a.xattn_positives, a.xattn_mask
        )
        loss = loss + a.xattn_w_mask * terms["loss_mask"] + a.xattn_w_cls * terms["loss_cls"]
    return loss, terms, qstats


# --- end add-ons


# --- training -----------------------------------------------------------------------
def check_args(args, ckpt):
    """v2's queue takes whole global batches; a checkpoint (None: a new run) is of this version."""
    q, b, v = args.queue_size, args.batch_size, args.moco_version
    if v == 2 and (q < b or q % b):
        raise common.UserError(f"--queue-size {q} is not a multiple of --batch-size {b}.")
    if ckpt is not None and (was := ckpt["args"].get("moco_version")) != v:
        path = common.checkpoint_to_resume(args.resume, args.run_dir)  # the one check_run loaded
        raise common.UserError(f"--resume: '{path}' is MoCo v{was}, not --moco-version {v}.")


def main(args):
    run = common.Run(args, METHOD, check=check_args)  # flags checked, device, seeds, folder, data
    views = views_of(args, run.size)
    run.loader(views, positive=views[0])
    model = MoCo(args, small_images=run.size <= 64).to(run.device)
    if args.sync_bn and run.distributed and run.cuda:  # global BN (v3's default, as its code)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the key encoder, a copy, too
    model = model.to(memory_format=torch.channels_last) if run.bf16 else model
    key_encoder = KeyEncoder(model)  # starts as a copy of the query encoder (MoCo, Alg. 1)
    queue, ptr = None, 0
    if args.moco_version == 2:  # (K, d) random unit vectors until keys push them out (MoCo's init)
        queue = F.normalize(torch.randn(args.queue_size, args.proj_dim, device=run.device), dim=1)
    optimizer = make_optimizer(model, args)
    saved = run.resume()
    if saved:
        model.load_state_dict(saved["model"])
        key_encoder.load_state_dict(saved["key_encoder"])
        if queue is not None:
            queue.copy_(saved["queue"])
            ptr = saved["queue_ptr"]
        optimizer.load_state_dict(saved["optimizer"])
    pseudo = common.PseudoLabels(saved, run.device)  # --xattn's k-means labels
    embed = lambda m, x: m.projector(m.backbone(x)[1])  # the bank holds z (Seyfi, Sec. 2.1)
    if run.distributed and queue is not None:
        dist.broadcast(queue, 0)  # the same negatives on every process from the start
    # DDP averages the query encoder's gradients; keys cross processes in momentum_keys, enqueue
    ddp = run.ddp(model)
    bn = ("global" if run.cuda else "per process") if args.sync_bn else "shuffled"
    bn = bn if run.distributed else "of one process"

    def state():  # what a checkpoint holds of this run, besides the harness's position
        s = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        s.update(key_encoder=key_encoder.state_dict(), queue=queue, queue_ptr=ptr)
        return {**s, "momentum_step": run.steps_done, **pseudo.state()}

    for epoch in run.epochs(
        state, model.backbone, title=f"{METHOD} v{args.moco_version}", details=f"BN {bn}, "
    ):
        if args.xattn:
            pseudo.new_epoch(run, model, embed)
        model.train()
        key_encoder.train()
        for step, it, crops, idx, positives in run.steps():
            run.schedule(optimizer, it)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                # symmetric: queries and keys of both views; else queries of view 1, keys of view 2
                q_views, k_views = (crops, crops) if args.symmetric_loss else (crops[:1], crops[1:])
                out = ddp(q_views, positives if args.xattn else None)
                b = crops[0].shape[0]
                tau = momentum_at(it, run.total, args.tau_base, args.tau_end)
                ema_update(model, key_encoder, tau)  # before the keys, as in MoCo's Alg. 1
                # keys k (2b or b, d): one batch per view with --per-view-bn
                batches = k_views if args.per_view_bn else [torch.cat(k_views)]
                k = torch.cat([momentum_keys(key_encoder, x, not args.sync_bn) for x in batches])
                loss = moco_loss(out["q"], k, queue, args.temperature, args.symmetric_loss)
                loss, terms, qstats = addon_losses(args, out, loss, pseudo, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if queue is not None:  # view 2's keys, after the loss: never a batch's own negatives
                ptr = enqueue(queue, ptr, k[-b:])
            collapse = F.normalize(out["q"].detach().float(), dim=1).std(0).mean()  # solo-learn's
            terms.update(loss=loss, collapse_std=collapse, **qstats)
            if (code := run.step_done(loss, terms, b)) is not None:
                return code
        if (code := run.end_epoch(model.backbone, tau=tau)) is not None:
            return code
    return run.finish()


if __name__ == "__main__":
    common.main_of(main, parse_args)
