"""DINO: a student learns to give, for every crop of an image, the output distribution of a
momentum teacher that sees only the two global crops. Centering and sharpening the teacher's
outputs keep them from collapsing: no negatives, no predictor. Here with a ResNet backbone.

Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021. Defaults: solo-learn's CIFAR recipe (2 crops of
32 px, no local crops); the ImageNet command is the official ResNet-50 one (facebookresearch/dino
README and main_dino.py). RECIPES.md compares both, flag for flag.

    python dino.py --dataset digits --epochs 1                    # offline demo
    python dino.py --dataset cifar10 --data-dir data              # 1000 epochs, 1 GPU
    torchrun --nproc_per_node=8 dino.py --dataset folder --data-dir /imagenet --backbone resnet50 \
        --epochs 100 --batch-size 512 --optimizer sgd --lr 0.03 --weight-decay 1e-4 \
        --prototypes 65536 --teacher-temp 0.04 --teacher-momentum 0.996 --clip-grad 3.0 \
        --local-crops 8 --global-scale 0.14 1 --local-scale 0.05 0.14 --blur-prob 1.0 0.1 0.5
"""

import argparse
import copy
import itertools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "dino"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument  # defaults: solo-learn's CIFAR recipe; RECIPES.md gives every source
    add("--epochs", type=int, default=1000, help="training epochs (solo-learn: 1000)")
    add("--batch-size", type=int, default=256, help="global batch, split over processes")
    add("--optimizer", default="lars", choices=["lars", "sgd"], help="optimizer (solo-learn: lars)")
    add("--lr", type=float, default=0.3, help="learning rate per 256 images (solo-learn: 0.3)")
    add("--weight-decay", type=float, default=1e-6, help="weight decay, not on biases and norms")
    add("--lars-mode", default="clip", choices=["clip", "official"], help="LARS form (common.LARS)")
    add("--lars-eta", type=float, default=0.02, help="LARS trust coefficient (solo-learn: 0.02)")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay")
    add("--local-crops", type=int, default=0, help="local crops besides the 2 global ones")
    crop2 = dict(type=float, nargs=2, metavar=("MIN", "MAX"))
    crop3 = dict(type=float, nargs=3, metavar=("G1", "G2", "L"))  # global crop 1, 2; each local
    add("--global-scale", **crop2, default=(0.08, 1.0), help="area range of the global crops")
    add("--local-scale", **crop2, default=(0.05, 0.4), help="area range of the local crops")
    add("--blur-prob", **crop3, default=(0.0, 0.0, 0.5), help="Gaussian blur probability per crop")
    add("--solarize-prob", **crop3, default=(0.0, 0.2, 0.0), help="solarize probability per crop")
    add("--proj-hidden", type=int, default=2048, help="head MLP hidden width")
    add("--proj-dim", type=int, default=256, help="head bottleneck width")
    add("--prototypes", type=int, default=4096, help="head output width K (solo-learn: 4096)")
    add("--student-temp", type=float, default=0.1, help="student temperature tau_s")
    add("--teacher-temp", type=float, default=0.07, help="teacher temperature tau_t after warm-up")
    add("--warmup-teacher-temp", type=float, default=0.04, help="tau_t at the first epoch")
    add("--warmup-teacher-temp-epochs", type=int, default=0, help="epochs of linear tau_t warm-up")
    add("--center-momentum", type=float, default=0.9, help="EMA rate m of the center (DINO Eq. 4)")
    add("--teacher-momentum", type=float, default=0.9995, help="teacher EMA rate, cosine to 1")
    add("--clip-grad", type=float, default=0.0, help="per-tensor gradient norm cap; 0: off")
    add("--freeze-last-layer", type=int, default=1, help="epochs with the head's last layer frozen")
    bool_flag = argparse.BooleanOptionalAction
    add("--zero-init-residual", action=bool_flag, default=False, help="last BN of each block at 0")
    add("--sync-bn", action=bool_flag, default=True, help="SyncBatchNorm (CUDA only)")
    add_addon_flags(p)
    common.add_run_flags(p)
    return p.parse_args(argv)


# --- the method ---------------------------------------------------------------------
def dino_views(
    size,
    local_crops,
    global_scale=(0.4, 1.0),
    local_scale=(0.05, 0.4),
    blur_p=(1.0, 0.1, 0.5),
    solarize_p=(0.0, 0.2, 0.0),
):
    """DINO's multi-crop (Caron et al. 2021, App.; main_dino.py's defaults here): colour jitter
    0.4/0.4/0.2/0.1 with p 0.8 and grey 0.2 on every crop; blur and solarization probabilities
    for global crop 1, 2 and every local crop."""
    kw = dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=blur_p, solarize_p=solarize_p)
    return common.multicrop_views(size, local_crops, global_scale, local_scale, **kw)


class DINOHead(nn.Module):
    """DINO's head (Sec. 3.1): a 3-layer MLP (GELU, no BN) to a bottleneck, L2 normalization, a
    weight-normalized linear layer to K outputs with g fixed at 1 (DINO's norm_last_layer):
    each output is the cosine with one learned direction v."""

    def __init__(self, d_in, hidden, bottleneck, out):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # DINO's initialization of the MLP
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, out, bias=False)  # row k: the direction v_k

    def forward(self, h):  # h (N, D) -> z (N, bottleneck) normalized, logits (N, K)
        z = F.normalize(self.mlp(h), dim=1)
        with torch.autocast(z.device.type, enabled=False):  # the loss divides by 0.04-0.1: fp32
            return z, F.linear(z.float(), F.normalize(self.last_layer.weight.float(), dim=1))


class DINO(nn.Module):
    """Student: backbone -> h -> head -> logits over K outputs. Downstream tasks use h."""

    def __init__(self, args, small_images):
        super().__init__()
        self.backbone = common.build_backbone(
            args.backbone, small_images, zero_init_residual=args.zero_init_residual
        )
        d = self.backbone.dim
        self.head = DINOHead(d, args.proj_hidden, args.proj_dim, args.prototypes)
        self.xattn = (
            CrossAttentionHead(d, args.xattn_clusters, args.xattn_temp) if args.xattn else None
        )

    def forward(self, crops, positives=None):
        b = crops[0].shape[0]
        # one backbone pass per crop size, as DINO's MultiCropWrapper; the positives have the
        # global crops' size and ride along with them. h (V*b, D), crop-major: the 2 global crops
        # first; f (b + b*P, D, h, w): the first global crop's maps, then the positives'
        h, f = common.multicrop_pass(self.backbone, crops, positives)
        z, logits = self.head(h)  # (V*b, bottleneck), (V*b, K)
        # the loss sees every crop's logits; Q-Score sees the 2 global crops only
        out = {"h": h[: 2 * b], "z": z[: 2 * b], "student_logits": logits}
        if self.xattn is not None and positives is not None:
            out["f"] = f  # anchors (first global crop), then positives
            out["beta"], out["logits"] = self.xattn(out["f"])
        return out


class Teacher(nn.Module):
    """A copy of the student's backbone and head (DINO's start), moved only by `ema_update`; it
    sees the global crops only. Not DDP-wrapped: it gets no gradient. Its BN runs on batch
    statistics, without running averages: those would be unused state that each process
    updates from its own batch, and the teacher would differ between processes."""

    def __init__(self, student):
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone).requires_grad_(False)
        self.head = copy.deepcopy(student.head).requires_grad_(False)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None

    @torch.no_grad()
    def forward(self, global_crops):  # [(b, 3, s, s)] * 2 -> logits (2b, K)
        _, h = self.backbone(torch.cat(global_crops))  # one BN batch of both crops, as DINO's
        _, logits = self.head(h)
        return logits


def dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04):
    """DINO's loss, Eq. (3) of Caron et al. 2021, with Sec. 3.1's centering and sharpening:
        P_t(x) = softmax((g_t(x) - c) / tau_t),  P_s(x') = softmax(g_s(x') / tau_s)  (Eq. 1)
        L = sum over x in {x1g, x2g}, x' in V, x' != x of H(P_t(x), P_s(x'))  (Eq. 3)
        with H(a, b) = -sum a log b,
    averaged over the 2(V-1) pairs and the images, as DINO's code does. student: (V*b, K)
    logits, crop-major, the 2 global crops first; teacher: (2b, K), detached here; center (1, K).
    Returns the mean over this process's b images: with the center given, no image's loss
    involves another, so the DDP-averaged gradient is that of one process on the whole batch."""
    b = teacher.shape[0] // 2
    v = student.shape[0] // b
    t = (teacher.detach().float() - center) / teacher_temp
    p_t = F.softmax(t, dim=1).view(2, b, -1)  # (2, b, K)
    log_p_s = F.log_softmax(student.float() / student_temp, dim=1).view(v, b, -1)  # (V, b, K)
    # a product under bf16 autocast is bf16 whatever its inputs
    with torch.autocast(student.device.type, enabled=False):
        ce = -torch.einsum("tbk,vbk->tvb", p_t, log_p_s)  # (2, V, b): H(P_t(global t), P_s(crop v))
    # a global crop is not its own target: the 2(V-1) pairs off the diagonal, in slices (a boolean
    # mask would call nonzero, a host sync)
    return torch.cat([ce[0, 1:], ce[1, :1], ce[1, 2:]]).mean()  # (2(V-1), b) -> scalar


@torch.no_grad()
def update_center(center, teacher, momentum=0.9):
    """c <- m c + (1 - m) (1/B) sum_i g_t(x_i)  (Eq. 4): the mean runs over the teacher outputs
    of the whole global batch (summed over processes), so every process keeps the same center.
    teacher: (2b, K) this process's teacher logits; center: (1, K). Returns the new center."""
    total = teacher.float().sum(0, keepdim=True)  # (1, K)
    if common.world_size() > 1:
        dist.all_reduce(total)
    return center * momentum + total / (teacher.shape[0] * common.world_size()) * (1 - momentum)


def teacher_temp_at(epoch, warmup_epochs, start, end):
    """tau_t: linear from `start` to `end` over the first epochs, then constant (DINO)."""
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / max(1, warmup_epochs - 1)


def momentum_at(step, total, base):
    """Teacher EMA rate, cosine from `base` to 1 over training (DINO Sec. 3.1)."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


@torch.no_grad()
def ema_update(teacher, student, m):
    """theta_t <- m theta_t + (1 - m) theta_s over parameters only. The student's parameters are
    the same on every process after the DDP step, so the teacher stays the same everywhere too."""
    online = itertools.chain(student.backbone.parameters(), student.head.parameters())
    pairs = list(zip(teacher.parameters(), online))
    teachers = [t for t, _ in pairs]
    # one multi-tensor kernel per operation, not two per parameter
    torch._foreach_mul_(teachers, m)
    torch._foreach_add_(teachers, [s.detach() for _, s in pairs], alpha=1 - m)


def clip_gradients(model, clip):
    """DINO's rule: each parameter's gradient on its own to a norm of at most `clip`; no sync."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))


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
def main(args):
    run = common.Run(args, METHOD)  # flags checked, device, processes, seeds, run folder, data
    aug = (args.global_scale, args.local_scale, args.blur_prob, args.solarize_prob)
    views = dino_views(run.size, args.local_crops, *aug)
    run.loader(views, positive=common.positive_view(run.size))
    model = DINO(args, small_images=run.size <= 64).to(run.device)
    if args.sync_bn and run.distributed and run.cuda:  # BN over the global batch, as DINO's code
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.bf16:
        model = model.to(memory_format=torch.channels_last)
    teacher = Teacher(model)  # after the SyncBN conversion: the teacher's BN is synced too
    center = torch.zeros(1, args.prototypes, device=run.device)  # c of Eq. 4
    groups = xattn_groups(common.param_groups(model), model, args.xattn_lr_scale)
    if args.optimizer == "lars":
        optimizer = common.LARS(
            groups, lr=0.0, weight_decay=args.weight_decay, eta=args.lars_eta, mode=args.lars_mode
        )
    else:
        optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay)
    saved = run.resume()
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        teacher.load_state_dict(saved["teacher"])
        center.copy_(saved["center"])
    pseudo = common.PseudoLabels(saved, run.device)  # --xattn's k-means labels
    # the student alone: the teacher gets no gradient, and update_center all-reduces the center
    ddp = run.ddp(model)

    def state():  # what a checkpoint holds of this run, besides the harness's position
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "teacher": teacher.state_dict(),
            "center": center,
            **pseudo.state(),
        }

    def embed(m, x):  # the memory bank holds the head's normalized bottleneck z (Seyfi et al. 2.1)
        _, h = m.backbone(x)
        z, _ = m.head(h)
        return z

    for epoch in run.epochs(state, model.backbone):
        if args.xattn:
            pseudo.new_epoch(run, model, embed)
        model.train()
        teacher_temp = teacher_temp_at(
            epoch, args.warmup_teacher_temp_epochs, args.warmup_teacher_temp, args.teacher_temp
        )
        for step, it, crops, idx, positives in run.steps():
            run.schedule(optimizer, it)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                out = ddp(crops, positives if args.xattn else None)
                teacher_logits = teacher(crops[:2])  # (2b, K): the teacher sees the global crops
                b = crops[0].shape[0]
                loss = dino_loss(
                    out["student_logits"], teacher_logits, center, args.student_temp, teacher_temp
                )
                loss, terms, qstats = addon_losses(args, out, loss, pseudo, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                clip_gradients(model, args.clip_grad)
            if epoch < args.freeze_last_layer:  # a moving last layer early on destabilizes training
                model.head.last_layer.weight.grad = None
            optimizer.step()
            teacher_momentum = momentum_at(it, run.total, args.teacher_momentum)
            ema_update(teacher, model, teacher_momentum)
            center = update_center(center, teacher_logits, args.center_momentum)

            collapse = F.normalize(out["z"].detach().float(), dim=1).std(0).mean()  # solo-learn's
            terms.update(loss=loss, collapse_std=collapse, **qstats)
            if (code := run.step_done(loss, terms, b)) is not None:
                return code
        code = run.end_epoch(
            model.backbone, teacher_temp=teacher_temp, teacher_momentum=teacher_momentum
        )
        if code is not None:
            return code
    return run.finish()


if __name__ == "__main__":
    common.main_of(main, parse_args)
