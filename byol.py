"""BYOL: from one view of an image, an online network predicts a target network's projection
of another view. The target is a slow moving average of the online network; no negatives.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020. Defaults: solo-learn's CIFAR recipe (scripts/pretrain/cifar/byol.yaml with
augmentations/asymmetric.yaml). The ImageNet command is the paper's 1000-epoch ResNet-50 recipe
(App. B and C) as deepmind-research byol/configs/byol.py sets it. RECIPES.md lists every flag
against both sources.

    python byol.py --dataset digits --epochs 1            # offline demo
    python byol.py --dataset cifar10 --data-dir data      # solo-learn CIFAR: 1000 epochs, 1 GPU
    torchrun --nproc_per_node=8 byol.py --dataset folder --data-dir /imagenet --backbone resnet50 \
        --batch-size 4096 --epochs 1000 --lr 0.2 --weight-decay 1.5e-6 --lars-mode official \
        --lars-eta 0.001 --tau-base 0.996 --blur-prob 1.0 0.1 --solarize-prob 0.0 0.2
(official presets for 300 epochs: --epochs 300 --lr 0.3 --weight-decay 1e-6 --tau-base 0.99)
"""

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "byol"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add, on_off = p.add_argument, argparse.BooleanOptionalAction  # defaults: solo-learn CIFAR
    add("--epochs", type=int, default=1000, help="training epochs")
    add("--batch-size", type=int, default=256, help="global batch, split over processes")
    add("--lr", type=float, default=1.0, help="LARS learning rate, times batch / 256")
    add("--weight-decay", type=float, default=1e-5, help="weight decay, not on biases and norms")
    add("--lars-mode", default="clip", choices=["clip", "official"], help="LARS form (common.LARS)")
    add("--lars-eta", type=float, default=0.02, help="LARS trust coefficient")
    add("--loss-scale", type=float, default=1.0, help="multiplies L_BYOL (Eq. 2, both directions)")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay to 0")
    add("--tau-base", type=float, default=0.99, help="target EMA decay at the first step")
    add("--tau-final", type=float, default=1.0, help="target EMA decay at the last step (Sec. 3.2)")
    add("--proj-hidden", type=int, default=4096, help="projector hidden width")
    add("--proj-dim", type=int, default=256, help="projector output width")
    add("--pred-hidden", type=int, default=4096, help="predictor hidden width")
    add("--crop-min-scale", type=float, default=0.08, help="smallest random-crop area")
    views = dict(type=float, nargs=2, metavar=("P1", "P2"))
    add("--blur-prob", **views, default=(0.0, 0.0), help="Gaussian-blur probability per view")
    add("--solarize-prob", **views, default=(0.0, 0.2), help="solarization probability per view")
    add("--zero-init-residual", action=on_off, default=False, help="zero-init each block's last BN")
    add("--per-view-bn", action=on_off, default=True, help="BatchNorm statistics per view")
    add("--sync-bn", action=on_off, default=True, help="BatchNorm over the global batch on GPUs")
    add_addon_flags(p)
    common.add_run_flags(p)
    return p.parse_args(argv)


# --- the method ---------------------------------------------------------------------
def mlp(d_in, hidden, d_out):
    """BYOL's projector and predictor (Sec. 3.3): linear, BN, ReLU, linear (no bias before BN)."""
    return nn.Sequential(
        nn.Linear(d_in, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, d_out),
    )


def frozen_copy(net):
    """A copy of net that gradients never train, for the target. Its BatchNorm keeps no running
    averages, only batch statistics as the online network in training: running averages would be
    unused state, updated by each process from its own batch, so the target would differ."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return net.requires_grad_(False)


class BYOL(nn.Module):
    """Online: backbone -> h -> projector -> z -> predictor -> p. Target: a copy of the
    backbone and projector, moved only by `ema_update`. Downstream tasks use the online h."""

    def __init__(self, args, small_images):
        super().__init__()
        self.backbone = common.build_backbone(
            args.backbone, small_images, zero_init_residual=args.zero_init_residual
        )
        d = self.backbone.dim
        self.projector = mlp(d, args.proj_hidden, args.proj_dim)
        self.predictor = mlp(args.proj_dim, args.pred_hidden, args.proj_dim)
        # the target starts from the online weights (solo-learn; the official code draws its own
        # and finds no difference)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
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
        # BN statistics per view (and for the positives), as the official code and solo-learn;
        # --no-per-view-bn: one pass, so BN statistics mix the views
        if self.per_view_bn:
            f, h = (torch.cat(t) for t in zip(*(self.backbone(x) for x in parts)))
        else:
            f, h = self.backbone(torch.cat(parts))
        # f, h: (V*b [+ b*P], D, h, w), (V*b [+ b*P], D)
        z = self.each_view(self.projector, h[: 2 * b], b)  # (2b, d)
        out = {"h": h[: 2 * b], "z": z, "p": self.each_view(self.predictor, z, b)}
        with torch.no_grad():  # the target is the regression target: no gradient flows into it
            target = lambda x: self.target_projector(self.target_backbone(x)[1])  # noqa: E731
            out["z_target"] = self.each_view(target, torch.cat(crops), b)  # (2b, d)
        if self.xattn is not None and positives is not None:
            out["f"] = torch.cat([f[:b], f[2 * b :]])  # anchors (the first view), their positives
            out["beta"], out["logits"] = self.xattn(out["f"])
        return out


def regression_loss(p1, p2, z1, z2):
    """BYOL's loss, Eq. (2) of Grill et al. 2020, symmetrized as in Sec. 3.1:
        L = || p/||p|| - z'/||z'|| ||^2 = 2 - 2 <p, z'> / (||p|| ||z'||)
    and L_BYOL = L(p1, z2) + L(p2, z1). p1, p2: (b, d) online predictions of views 1 and 2;
    z1, z2: (b, d) target projections, always detached. Returns the mean over this process's
    b images; images are independent, so DDP's averaged gradient is the whole batch's."""
    p = F.normalize(torch.cat([p1, p2]).float(), dim=1)  # (2b, d)
    z = F.normalize(torch.cat([z2, z1]).float().detach(), dim=1)  # (2b, d): the other view's target
    per_view = 2 - 2 * (p * z).sum(1)  # (2b,)
    return per_view.view(2, -1).sum(0).mean()


def tau_at(step, total, base, final=1.0):
    """Target decay at global step k of K (Sec. 3.2):
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, written for any final value as solo-learn."""
    return final - (final - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


@torch.no_grad()
def ema_update(target, online, tau):
    """xi <- tau xi + (1 - tau) theta (Eq. 1), over parameters only: the target keeps no
    buffers (`frozen_copy`). Online parameters are the same on every process after DDP's step,
    so the target stays the same on every process too."""
    pairs = list(zip(target.parameters(), online.parameters()))
    targets = [t for t, _ in pairs]
    # one multi-tensor kernel per operation, not two per parameter (same arithmetic)
    torch._foreach_mul_(targets, tau)
    torch._foreach_add_(targets, [o.detach() for _, o in pairs], alpha=1 - tau)


def train_views(args, size):
    """The two asymmetric views (Table 6) with the flags' crop minimum, blur and solarization."""
    return common.byol_views(
        size,
        crop_min=args.crop_min_scale,
        blur_p=tuple(args.blur_prob),
        solarize_p=tuple(args.solarize_prob),
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
def check_args(args, ckpt):
    """BYOL's own input checks, before any work (ckpt: the checkpoint to continue, or None)."""
    if not args.loss_scale > 0:
        raise common.UserError(f"--loss-scale must be positive, got {args.loss_scale}.")


def main(args):
    run = common.Run(args, METHOD, check=check_args)  # flags checked, device, seeds, folder, data
    run.loader(train_views(args, run.size), positive=common.positive_view(run.size))
    model = BYOL(args, small_images=run.size <= 64).to(run.device)
    if args.sync_bn and run.distributed and run.cuda:  # the recipes normalize over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.bf16:
        model = model.to(memory_format=torch.channels_last)
    groups = xattn_groups(common.param_groups(model), model, args.xattn_lr_scale)
    optimizer = common.LARS(
        groups, lr=0.0, weight_decay=args.weight_decay, eta=args.lars_eta, mode=args.lars_mode
    )
    saved = run.resume()
    if saved:
        model.load_state_dict(saved["model"])  # online, predictor and target
        optimizer.load_state_dict(saved["optimizer"])
        expected = run.start_epoch * run.epoch_steps + run.resume_at.get("step", 0)
        if saved["momentum_step"] != expected:  # the target's tau schedule would jump
            raise common.UserError(
                f"--resume: the checkpoint is at momentum step "
                f"{saved['momentum_step']}, not {expected}; resume with the "
                "same --steps-per-epoch."
            )
    pseudo = common.PseudoLabels(saved, run.device)  # --xattn's k-means labels
    # DDP averages the online network's gradients; the target needs no sync, as every process
    # moves it by the same EMA of the same online weights
    ddp = run.ddp(model)

    def state():  # what a checkpoint holds of this run, besides the harness's position
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "momentum_step": run.steps_done,
            **pseudo.state(),
        }

    def embed(m, x):  # the memory bank holds the online projections z, not p (Seyfi et al. 2.1)
        return m.projector(m.backbone(x)[1])

    for epoch in run.epochs(state, model.backbone):
        if args.xattn:
            pseudo.new_epoch(run, model, embed)
        model.train()
        for step, it, crops, idx, positives in run.steps():
            run.schedule(optimizer, it)
            tau = tau_at(it, run.total, args.tau_base, args.tau_final)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                out = ddp(crops, positives if args.xattn else None)
                b = crops[0].shape[0]
                p, zt = out["p"], out["z_target"]
                loss = args.loss_scale * regression_loss(p[:b], p[b:], zt[:b], zt[b:])
                loss, terms, qstats = addon_losses(args, out, loss, pseudo, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update(model.target_backbone, model.backbone, tau)  # after the step: the new theta
            ema_update(model.target_projector, model.projector, tau)

            collapse = F.normalize(out["z"].detach().float(), dim=1).std(0).mean()  # solo-learn's
            terms.update(loss=loss, collapse_std=collapse, **qstats)
            if (code := run.step_done(loss, terms, b)) is not None:
                return code
        if (code := run.end_epoch(model.backbone, tau=tau)) is not None:
            return code
    return run.finish()


if __name__ == "__main__":
    common.main_of(main, parse_args)
