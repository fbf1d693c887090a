"""SimCLR: two augmented views of each image are pulled together and pushed away from
every other image of the batch, gathered from all processes (NT-Xent).

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020. Defaults: solo-learn's CIFAR recipe,
scripts/pretrain/cifar/simclr.yaml with augmentations/symmetric.yaml; the ImageNet
command is the official one (google-research/simclr README, ResNet-50, 100 epochs).
RECIPES.md compares both, flag for flag.

    python simclr.py --dataset digits --epochs 1                  # offline demo
    python simclr.py --dataset cifar10 --data-dir data            # 1000 epochs, 1 GPU
    torchrun --nproc_per_node=8 simclr.py --dataset folder --data-dir /imagenet \
        --backbone resnet50 --epochs 100 --batch-size 4096 --lr 0.3 --weight-decay 1e-4 \
        --lars-mode official --lars-eta 0.001 --temperature 0.1 --proj-dim 128 \
        --projector official --no-per-view-bn --zero-init-residual
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "simclr"
BOOL = argparse.BooleanOptionalAction  # --flag / --no-flag
HEADS = ["solo-learn", "official", "lightly"]  # --projector: whose 2-layer head


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument  # defaults: solo-learn's CIFAR recipe; RECIPES.md gives every source
    add("--epochs", type=int, default=1000, help="training epochs")
    add("--batch-size", type=int, default=256, help="global batch, split over the processes")
    add("--lr", type=float, default=0.4, help="LARS learning rate per 256 images")
    add("--weight-decay", type=float, default=1e-4, help="weight decay, not on biases and norms")
    add("--lars-mode", default="clip", choices=["clip", "official"], help="see common.LARS")
    add("--lars-eta", type=float, default=0.02, help="LARS trust coefficient")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay")
    add("--temperature", type=float, default=0.2, help="NT-Xent temperature tau (Eq. 1)")
    add("--proj-hidden", type=int, default=2048, help="projector hidden width")
    add("--proj-dim", type=int, default=256, help="projector output width")
    add(
        "--projector", default="solo-learn", choices=HEADS, help="the head's form (SimCLR.__init__)"
    )
    add("--crop-min-scale", type=float, default=0.08, help="smallest crop area")
    add("--jitter-strength", type=float, default=1.0, help="colour distortion strength s")
    add("--blur-prob", type=float, default=0.5, help="Gaussian blur probability per view")
    add("--zero-init-residual", action=BOOL, default=False, help="each block starts as identity")
    add("--per-view-bn", action=BOOL, default=True, help="BatchNorm statistics per view")
    add("--sync-bn", action=BOOL, default=True, help="BatchNorm over all processes (Sec. 3)")
    add_addon_flags(p)
    common.add_run_flags(p)
    return p.parse_args(argv)


# --- the method ---------------------------------------------------------------------
class SimCLR(nn.Module):
    """Backbone -> h -> projector g -> z. The loss sees z; downstream tasks use h."""

    def __init__(self, args, small_images):
        super().__init__()
        zero_init = args.zero_init_residual
        self.backbone = common.build_backbone(
            args.backbone, small_images, zero_init_residual=zero_init
        )
        d, hidden, out = self.backbone.dim, args.proj_hidden, args.proj_dim
        # the projection head g (Sec. 2.1), an MLP with one hidden layer, in the form --projector
        # names: solo-learn's CIFAR recipe, Linear -> ReLU -> Linear with biases and no BN;
        # official (google-research/simclr, model_util.py), bias-free Linears with BN after each,
        # z's BN without a learned shift (center=False); lightly's, z's BN with one
        if args.projector == "solo-learn":
            layers = [nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)]
        else:
            z_bn = nn.BatchNorm1d(out)
            if args.projector == "official":  # scale, no shift: the bias stays 0, untrained
                z_bn.bias.requires_grad_(False)
            layers = [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden)]
            layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out, bias=False), z_bn]
        self.projector = nn.Sequential(*layers)
        self.xattn = (
            CrossAttentionHead(d, args.xattn_clusters, args.xattn_temp) if args.xattn else None
        )
        self.per_view_bn = args.per_view_bn

    def each_view(self, fn, x, b):
        """fn on x (V*b, ...): a view of b rows at a time with --per-view-bn, else all at once."""
        return torch.cat([fn(v) for v in x.split(b)]) if self.per_view_bn else fn(x)

    def forward(self, crops, positives=None):
        b = crops[0].shape[0]
        parts = crops + ([positives] if positives is not None else [])
        if self.per_view_bn:  # a pass per view (and one for the positives): BN statistics per view
            f, h = (torch.cat(t) for t in zip(*(self.backbone(x) for x in parts)))
        else:  # one pass: BN normalizes both views together, SimCLR's BN over the whole batch
            f, h = self.backbone(torch.cat(parts))
        # f, h: (V*b [+ b*P], D, h, w), (V*b [+ b*P], D)
        out = {"h": h[: 2 * b], "z": self.each_view(self.projector, h[: 2 * b], b)}
        if self.xattn is not None and positives is not None:
            out["f"] = torch.cat([f[:b], f[2 * b :]])  # anchors (the first view), then positives
            out["beta"], out["logits"] = self.xattn(out["f"])
        return out


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own rows,
    so negatives from other processes train this process's encoder too."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on these rows: sum, not average
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b : (dist.get_rank() + 1) * b]


def nt_xent_loss(z1, z2, temperature=0.2):
    """NT-Xent, Eq. (1) of Chen et al. 2020, averaged over all 2N anchors of the global batch:
        l(i, j) = -log exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)
    z1, z2: (b, d) projections of the two views on this process. Under DDP the 2N
    candidates come from every process (gathered with gradient); each process returns
    the mean over its own 2b anchors, so the DDP-averaged gradient is that of one
    process holding the whole batch."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2b, d)
    world, r = common.world_size(), common.rank()
    if world > 1:
        z_all = torch.cat(
            [GatherWithGrad.apply(z[:b]), GatherWithGrad.apply(z[b:])]
        )  # (2Wb, d): views 1 then 2
    else:
        z_all = z
    n = world * b  # global images per view
    i = torch.arange(b, device=z.device)
    self_col = torch.cat([r * b + i, n + r * b + i])  # (2b,) where each anchor sits in z_all
    pos_col = torch.cat([n + r * b + i, r * b + i])  # its other view
    with torch.autocast(
        z.device.type, enabled=False
    ):  # a product under bf16 autocast is bf16 whatever its inputs
        logits = z @ z_all.T / temperature  # (2b, 2Wb) cosine similarities / t, float32
    logits.scatter_(1, self_col[:, None], float("-inf"))  # k != i; a scalar, no host tensor to copy
    return F.cross_entropy(logits, pos_col)


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
    views = common.simclr_views(run.size, args.crop_min_scale, args.jitter_strength, args.blur_prob)
    run.loader(views, positive=views[0])
    model = SimCLR(args, small_images=run.size <= 64).to(run.device)
    if args.sync_bn and run.distributed and run.cuda:  # Sec. 3: BN over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.bf16:
        model = model.to(memory_format=torch.channels_last)
    groups = xattn_groups(common.param_groups(model), model, args.xattn_lr_scale)
    optimizer = common.LARS(
        groups, lr=0.0, weight_decay=args.weight_decay, eta=args.lars_eta, mode=args.lars_mode
    )
    saved = run.resume()
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    pseudo = common.PseudoLabels(saved, run.device)  # --xattn's k-means labels
    ddp = run.ddp(model)  # the negatives of other processes are gathered in nt_xent_loss

    def state():  # what a checkpoint holds of this run, besides the harness's position
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **pseudo.state()}

    def embed(m, x):  # the memory bank holds the projections z (Seyfi et al., Sec. 2.1)
        return m.projector(m.backbone(x)[1])

    for epoch in run.epochs(state, model.backbone):
        if args.xattn:
            pseudo.new_epoch(run, model, embed)
        model.train()
        for step, it, crops, idx, positives in run.steps():
            run.schedule(optimizer, it)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                out = ddp(crops, positives if args.xattn else None)
                b = crops[0].shape[0]
                loss = nt_xent_loss(out["z"][:b], out["z"][b:], args.temperature)
                loss, terms, qstats = addon_losses(args, out, loss, pseudo, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            collapse = F.normalize(out["z"].detach().float(), dim=1).std(0).mean()  # solo-learn's
            terms.update(loss=loss, collapse_std=collapse, **qstats)
            if (code := run.step_done(loss, terms, b)) is not None:
                return code
        if (code := run.end_epoch(model.backbone)) is not None:
            return code
    return run.finish()


if __name__ == "__main__":
    common.main_of(main, parse_args)
