"""SimSiam: two augmented views of an image go through one shared encoder (backbone +
projector); a predictor maps one view's projection to the other's, which is cut off from the
gradient (stop-gradient). No negatives, no momentum encoder, no large batch: the stop-gradient
alone keeps the outputs from collapsing to a constant.

Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021. Defaults: solo-learn's
CIFAR recipe (scripts/pretrain/cifar/simsiam.yaml, augmentations/symmetric_weak.yaml); the
ImageNet command is facebookresearch/simsiam's README command. RECIPES.md compares both.

    python simsiam.py --dataset digits --epochs 1                  # offline demo
    python simsiam.py --dataset cifar10 --data-dir data            # 1000 epochs, 1 GPU
    torchrun --nproc_per_node=8 simsiam.py --dataset folder --data-dir /imagenet \
        --backbone resnet50 --epochs 100 --batch-size 512 --lr 0.05 --weight-decay 1e-4 \
        --warmup-epochs 0 --fix-pred-lr --crop-min-scale 0.2 --zero-init-residual
    # the paper's own CIFAR-10 setting (App. D: 800 epochs, 2-layer projector, no blur):
    python simsiam.py --dataset cifar10 --data-dir data --epochs 800 --batch-size 512 --lr 0.03 \
        --weight-decay 5e-4 --warmup-epochs 0 --proj-layers 2 --blur-prob 0 --crop-min-scale 0.2
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "simsiam"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add, yes_no = p.add_argument, argparse.BooleanOptionalAction
    add("--epochs", type=int, default=1000, help="training epochs (solo-learn: 1000)")
    add("--batch-size", type=int, default=256, help="global batch, split over processes")
    add("--lr", type=float, default=0.5, help="SGD learning rate per 256 images (solo-learn: 0.5)")
    add("--weight-decay", type=float, default=1e-5, help="weight decay, biases and norms included")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay to 0")
    add("--fix-pred-lr", action=yes_no, default=True, help="the predictor keeps the base LR")
    add("--proj-hidden", type=int, default=2048, help="projector hidden width")
    add("--proj-dim", type=int, default=2048, help="projector output width")
    add("--proj-layers", type=int, default=3, choices=[2, 3], help="projector depth (App. D: 2)")
    add("--pred-hidden", type=int, default=512, help="predictor bottleneck width")
    add("--crop-min-scale", type=float, default=0.08, help="smallest random-crop area")
    add("--jitter-strength", type=float, default=0.5, help="colour jitter s: 0.8s each, hue 0.2s")
    add("--blur-prob", type=float, default=0.5, help="Gaussian-blur probability of each view")
    add("--zero-init-residual", action=yes_no, default=False, help="zero-init each block's last BN")
    add("--per-view-bn", action=yes_no, default=True, help="BN statistics per view, one at a time")
    add("--sync-bn", action=yes_no, default=True, help="BN over the global batch (CUDA only)")
    add_addon_flags(p)
    common.add_run_flags(p)
    return p.parse_args(argv)


# --- the method ---------------------------------------------------------------------
class SimSiam(nn.Module):
    """Encoder f = backbone -> h -> projector -> z; predictor -> p. The loss compares p of
    one view with z of the other; downstream tasks use h."""

    def __init__(self, args, small_images):
        super().__init__()
        self.backbone = common.build_backbone(
            args.backbone, small_images, zero_init_residual=args.zero_init_residual
        )
        d, hid, out = self.backbone.dim, args.proj_hidden, args.proj_dim
        layers, width = [], d  # BN on every layer, so no bias in front of one
        for _ in range(args.proj_layers - 1):
            layers += [
                nn.Linear(width, hid, bias=False),
                nn.BatchNorm1d(hid),
                nn.ReLU(inplace=True),
            ]
            width = hid
        self.projector = nn.Sequential(
            *layers, nn.Linear(width, out, bias=False), nn.BatchNorm1d(out, affine=False)
        )
        self.predictor = nn.Sequential(  # a bottleneck; BN at its output is unstable (Table 3)
            nn.Linear(out, args.pred_hidden, bias=False),
            nn.BatchNorm1d(args.pred_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(args.pred_hidden, out),
        )
        self.xattn = (
            CrossAttentionHead(d, args.xattn_clusters, args.xattn_temp) if args.xattn else None
        )
        self.per_view_bn = args.per_view_bn

    def each_view(self, fn, x, b):
        """fn on x (V*b, ...): one view of b rows at a time with --per-view-bn, else at once."""
        return torch.cat([fn(v) for v in x.split(b)]) if self.per_view_bn else fn(x)

    def forward(self, crops, positives=None):
        b = crops[0].shape[0]
        parts = crops + ([positives] if positives is not None else [])  # all views share one size
        if self.per_view_bn:  # one pass per view, as the official code: BN statistics per view
            f, h = (torch.cat(t) for t in zip(*(self.backbone(x) for x in parts)))
        else:  # one pass for all: BN statistics mix the two views
            f, h = self.backbone(torch.cat(parts))
        # f, h: (2b [+ b*P], D, h, w), (2b [+ b*P], D)
        z = self.each_view(self.projector, h[: 2 * b], b)  # (2b, d): views 1 then 2
        out = {"h": h[: 2 * b], "z": z, "p": self.each_view(self.predictor, z, b)}
        if self.xattn is not None and positives is not None:
            out["f"] = torch.cat([f[:b], f[2 * b :]])  # anchors (the first view), then positives
            out["beta"], out["logits"] = self.xattn(out["f"])
        return out


def negative_cosine_loss(p1, p2, z1, z2):
    """Symmetrized negative cosine similarity with stop-gradient, Eq. (1) and (4) of Chen & He:
        D(p, z) = -(p / ||p||_2) . (z / ||z||_2)
        L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)),
    averaged over the images. p1, p2, z1, z2: (b, d), the two views on this process. z gets no
    gradient here, whatever the caller passes. Each image's term uses only its own rows, so the
    mean over this process's b images and DDP's gradient average give the global batch's
    gradient, with no gathering."""

    def d(p, z):  # (b, d), (b, d) -> mean of -cos over the b rows
        return (
            -(F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(1).mean()
        )

    return 0.5 * d(p1, z2) + 0.5 * d(p2, z1)


def param_groups(model, weight_decay, fix_pred_lr):
    """Every weight is decayed, biases and norms too (official code; solo-learn's SGD). With
    `fix_pred_lr` the predictor's group is marked `fix_lr` and keeps the base LR (Sec. 4.2: a
    predictor that keeps adapting to the latest representation trains better)."""
    groups = []
    for fixed in (False, True):
        params = [
            p
            for n, p in model.named_parameters()
            if p.requires_grad and (fix_pred_lr and n.startswith("predictor.")) == fixed
        ]
        if params:
            groups.append({"params": params, "weight_decay": weight_decay, "fix_lr": fixed})
    return groups


def train_views(args, size):
    """Two views of one distribution (the paper's): crop from `--crop-min-scale`, flip,
    colour jitter of `--jitter-strength`, grey, blur `--blur-prob`."""
    return common.simclr_views(
        size, crop_min=args.crop_min_scale, strength=args.jitter_strength, blur_p=args.blur_prob
    )


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
    run.loader(train_views(args, run.size), positive=common.positive_view(run.size))
    model = SimSiam(args, small_images=run.size <= 64).to(run.device)
    if args.sync_bn and run.distributed and run.cuda:  # the recipes normalize over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.bf16:
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, args.weight_decay, args.fix_pred_lr)  # the predictor's: fix_lr
    groups = xattn_groups(groups, model, args.xattn_lr_scale)
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=args.momentum)
    saved = run.resume()
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    pseudo = common.PseudoLabels(saved, run.device)  # --xattn's k-means labels
    ddp = run.ddp(model)  # each image's loss term uses its own rows: DDP's gradient average is all

    def state():  # what a checkpoint holds of this run, besides the harness's position
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **pseudo.state()}

    def embed(m, x):  # the memory bank holds the projections z, the stop-gradient targets
        return m.projector(m.backbone(x)[1])  # (Seyfi et al., Sec. 2.1)

    for epoch in run.epochs(state, model.backbone):
        if args.xattn:
            pseudo.new_epoch(run, model, embed)
        model.train()
        for step, it, crops, idx, positives in run.steps():
            run.schedule(optimizer, it)  # a fix_lr group (the predictor) keeps the base lr
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                out = ddp(crops, positives if args.xattn else None)
                b = crops[0].shape[0]
                p, z = out["p"], out["z"]
                loss = negative_cosine_loss(p[:b], p[b:], z[:b], z[b:])
                loss, terms, qstats = addon_losses(args, out, loss, pseudo, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            # SimSiam Fig. 2: about 1/sqrt(d) while healthy, 0 once collapsed to a constant
            collapse = F.normalize(z.detach().float(), dim=1).std(0).mean()  # solo-learn's monitor
            terms.update(loss=loss, collapse_std=collapse, **qstats)
            if (code := run.step_done(loss, terms, b)) is not None:
                return code
        if (code := run.end_epoch(model.backbone)) is not None:
            return code
    return run.finish()


if __name__ == "__main__":
    common.main_of(main, parse_args)
