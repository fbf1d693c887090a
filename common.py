"""What every CleanSSL script shares: data and augmentations, ResNet backbones, the
k-means memory bank with kNN, and Grad-CAM.

Sections, in order:
  1. errors and small distributed helpers
  1b. long runs on clusters: stop signals, the checkpoint clock (`RunControl`), resume checks
  2. data sets (`make_dataset`); unreadable files (`load_image`, `check_images`)
  3. augmentations: a view is a `View` (crop size, crop scale, colour, blur,
     solarization); method scripts ask for `simclr_views`, `byol_views`,
     `multicrop_views`; `cpu_transform` turns a View into a torchvision pipeline
  3b. the tensor path: a data set decoded once to uint8 on the device, and the same
     Views applied to whole batches there (`augment`); `resolve_data_path` picks it
  4. `TrainLoader`: yields every view of a batch (and the positives of the
     cross-attention add-on) as normalized tensors on the device, from DataLoader
     workers (data_path="cpu") or from the tensor path (data_path="tensor")
  5. backbones (`build_backbone`): (B, 3, H, W) -> feature map (B, D, h, w), pooled (B, D)
  6. `extract_features` and `MemoryBank` (k-means pseudo-labels, kNN classifier)
  7. `grad_cam`
This file imports nothing of ours.
"""

import argparse
import errno
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image


# ---------------------------------------------------------------- 1. errors, distributed
class UserError(Exception):
    """Bad input that deserves one clear sentence and exit code 2, not a traceback."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def all_gather(x):
    """Concatenate equal-shaped tensors from every process along dim 0, no gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


PRECISIONS = ("auto", "fp32", "bf16")


def use_bf16(precision, device):
    """--precision: bf16 autocast (and channels_last) or plain float32; auto is bf16 on CUDA and
    float32 elsewhere, and `bf16` runs the CUDA configuration on CPU. The losses stay float32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


# ---------------------------------------------------------------- 1b. long runs on clusters
# Exit codes besides 0 (done), 1 (the loss went non-finite) and 2 (bad input, UserError), from
# sysexits.h so that a job script can tell "continue me" from "I failed". Both are non-zero, so
# torchrun --max-restarts restarts the workers, which then resume from the run folder's checkpoint.

# EX_IOERR: the run folder could not be written (a full disk, a quota); its last checkpoint is whole
EXIT_WRITE = 74
# EX_TEMPFAIL: stopped by SIGTERM or SIGUSR1 after writing a checkpoint; the same command continues
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGREE_SECONDS = (
    1.0  # the processes of a run compare their stop flags and process 0's clock about this often
)
# Flags that say how a run is carried out, not what it computes: a resumed run may change them.
RESUME_FREE = (
    "run_dir",
    "resume",
    "device",
    "workers",
    "data_path",
    "compile",
    "precision",
    "knn_every",
    "knn_limit",
    "log_every",
    "log_seconds",
    "checkpoint_every_min",
    "check_data",
)
_caught = {
    "armed": False,
    "signal": 0,
}  # catch_stop_signals called; the last stop signal caught, 0: none


def catch_stop_signals():
    """From the training loop on (RunControl), SIGTERM (a scheduler's preemption, torchrun's
    shutdown of its workers) and SIGUSR1 (SLURM's --signal=USR1@90 warning before the time limit)
    set a flag instead of killing the process: the loop finishes its step, writes a checkpoint and
    exits with EXIT_STOPPED. Before the loop (set-up, a process group's rendezvous) they kill as
    usual: there is nothing to save. A script's __main__ calls it, so that importing a script
    (tests, benchmarks) leaves signals alone."""
    _caught["armed"] = True


def _caught_stop(signum, frame):
    # A second signal changes nothing: SLURM signals every process of a step, and torchrun
    # forwards its own signal to its workers too, so one stop often arrives twice.
    _caught["signal"] = signum


def _test_signal():
    """RunControl's test hook CLEANSSL_TEST_SIGNAL here: (signal, epoch, step) or None."""
    spec = os.environ.get("CLEANSSL_TEST_SIGNAL")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        return None
    name, _, where = spec.partition("@")
    epoch, step, *who = where.split(":")
    if who and who != [f"rank{rank()}"]:
        return None
    return signal.Signals[name], int(epoch), int(step)


def _ignore_stop_signals(worker_id):
    """DataLoader workers ignore the stop signals, which a scheduler sends to every process of a
    job: the main process decides when to stop, and its workers end with it."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def fail_write(e):
    """A full disk or quota (OSError ENOSPC or EDQUOT) while writing: one sentence and EXIT_WRITE.
    Any other OSError is raised again: it is not this kind of trouble."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise e
    where = f"'{e.filename}'" if e.filename else "the run folder"
    print(
        f"error: {e.strerror} while writing {where}; the last checkpoint there is whole (files are "
        "written to a temporary name, then renamed); free some space and run the same command "
        "with --resume on the run folder.",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(EXIT_WRITE)


class RunControl:
    """Asked after every training step whether to stop and whether to write a mid-epoch checkpoint,
    it gives the same answer on every process at the same step, so that no process waits in a
    collective that the others never join: stop when any process caught a stop signal
    (catch_stop_signals); checkpoint every `every_min` minutes (0: never mid-epoch) by process 0's
    clock. The processes compare notes every `interval` steps, in one all_reduce of 3 numbers on the
    CPU (a gloo group, beside NCCL, so the GPU is never made to wait), and process 0 picks the next
    interval so that they meet about every AGREE_SECONDS. One process looks after every step.
    Made, it catches the stop signals if the script's __main__ asked for it (catch_stop_signals).

    For tests only: CLEANSSL_TEST_SIGNAL=NAME@EPOCH:STEP[:rankR] (SIGTERM@1:2, SIGKILL@1:2:rank1)
    makes the process (of rank R, else every process) send itself the real signal NAME after step
    STEP of epoch EPOCH (both from 1, counted by poll() from this process's start: a run from
    scratch), so that a test stops or kills a run at a chosen step whatever the machine's speed.
    Under torchrun only the first attempt does (TORCHELASTIC_RESTART_COUNT unset or 0)."""

    def __init__(self, every_min):
        if _caught["armed"]:
            for s in STOP_SIGNALS:
                signal.signal(s, _caught_stop)
        self.every = every_min * 60
        self.last_save = self.last_meet = time.time()
        self.interval = self.countdown = 1
        self.group = dist.new_group(backend="gloo") if world_size() > 1 else None
        self.stopped_by = None  # the name of the agreed stop signal, once agreed
        self.at, self.test_signal = (1, 0), _test_signal()  # (epoch, step) polled last; test hook
        if (
            rank() == 0
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        ):
            print(
                "note: torchrun shares its rendezvous store with the workers, and restarted "
                "workers can find their predecessors' addresses there (pytorch/pytorch#135712): "
                "for --max-restarts use --rdzv-backend c10d and "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README: Long runs and clusters).",
                flush=True,
            )

    def saved(self):
        """A checkpoint was written: the clock of --checkpoint-every-min starts again."""
        self.last_save = time.time()

    def poll(self, force=False):
        """(name of a stop signal or None, checkpoint due) on every process after each step;
        force: meet now, at a point every process passes (an epoch's end)."""
        self.at = (self.at[0] + 1, 0) if force else (self.at[0], self.at[1] + 1)
        if self.test_signal and self.test_signal[1:] == self.at:
            os.kill(os.getpid(), self.test_signal[0])  # the real thing: a handler, or a kill -9
        self.countdown -= 1
        if self.countdown > 0 and not force:
            return self.stopped_by, False
        now = time.time()
        note = torch.zeros(
            3, dtype=torch.float64
        )  # stop signal (any process), checkpoint due, next interval (process 0)
        note[0] = _caught["signal"]
        if rank() == 0:
            note[1] = float(self.every > 0 and now - self.last_save >= self.every)
            per_step = (now - self.last_meet) / self.interval
            pace = min(
                1000, max(1, int(AGREE_SECONDS / max(per_step, 1e-6)))
            )  # steps in AGREE_SECONDS
            note[2] = 1 if self.group is None else self.interval if force else pace
        if self.group is not None:
            dist.all_reduce(note, op=dist.ReduceOp.MAX, group=self.group)
        self.last_meet, self.interval = now, int(note[2])
        self.countdown = self.interval
        if note[0] and self.stopped_by is None:
            self.stopped_by = signal.Signals(int(note[0])).name
        return self.stopped_by, bool(note[1])

    def position(self, step, seen, seconds, sums, bad_images):
        """What a mid-epoch checkpoint holds to finish its epoch as an unbroken run would, on every
        process: the steps done, the images seen, the seconds spent, the running metric sums as
        their mean over processes (a resume on W processes starts each from it, and the epoch's mean
        over W comes out the same) and the unreadable images of all processes."""
        sums = {
            k: v.detach().cpu().clone() for k, v in sums.items()
        }  # their own dtype: a resume adds on bit for bit
        bad = torch.tensor([float(bad_images)], dtype=torch.float64)
        if self.group is not None:
            for v in sums.values():
                dist.all_reduce(v, group=self.group)
                v.div_(world_size())
            dist.all_reduce(bad, group=self.group)
        return {
            "step": step,
            "seen": seen,
            "seconds": seconds,
            "bad_images": int(bad.item()),
            "sums": sums,
        }

    def total(self, n):
        """The sum of an integer count over all processes."""
        t = torch.tensor([float(n)], dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return int(t.item())

    def stop(self, where, run_dir=None):
        """Every process, after process 0 has written the checkpoint in `run_dir`: one line, then
        the end of the process group; returns EXIT_STOPPED. run_dir None: the program keeps no
        checkpoint."""
        if self.group is not None:
            dist.barrier(
                group=self.group
            )  # process 0 is past its save: no process exits before the file is whole
        who = f"process {rank()}: " if world_size() > 1 else ""
        then = (
            f"checkpoint in {run_dir}; resume with the same command "
            f"and --run-dir {run_dir} (or --resume {run_dir})"
            if run_dir
            else "nothing was written; run the same command again"
        )
        print(
            f"{who}stopped by {self.stopped_by} {where}; {then}; exit code {EXIT_STOPPED}.",
            flush=True,
        )
        if world_size() > 1:
            dist.destroy_process_group()
        return EXIT_STOPPED


def checkpoint_to_resume(resume, run_dir):
    """The checkpoint a run continues, or None: --resume's (a run folder or a .pt file), else
    --run-dir's checkpoint.pt if any (auto-resume: a restarted command continues its run)."""
    if resume:
        return resume if resume.endswith(".pt") else os.path.join(resume, "checkpoint.pt")
    path = os.path.join(run_dir, "checkpoint.pt") if run_dir else ""
    return path if os.path.isfile(path) else None


def check_resume(saved, args, path):
    """UserError when a flag that changes what the run computes differs from the checkpoint's: every
    flag but RESUME_FREE (--data-dir only for --dataset folder, where it is the data set itself
    and not a download folder). A checkpoint that lacks a flag of this version (one added since
    it was written, such as --projector or --xattn-mask) is refused too: what the run computed
    under that flag's default then is unknown, and resuming would switch to today's silently."""
    now = vars(args)
    missing = [k for k in now if k not in saved and k not in RESUME_FREE]
    if missing:
        raise UserError(
            f"the checkpoint '{path}' was written before "
            f"{', '.join('--' + k.replace('_', '-') for k in missing)} existed, so this version "
            "cannot continue it as it ran: continue it with the CleanSSL version that wrote it, "
            "or start another --run-dir."
        )
    differ = [
        k
        for k in saved
        if k in now
        and k not in RESUME_FREE
        and saved[k] != now[k]
        and not (k == "data_dir" and now.get("dataset") != "folder")
    ]
    if differ:
        flags = lambda a: " ".join(f"--{k.replace('_', '-')} {a[k]}" for k in differ)
        raise UserError(
            f"the checkpoint '{path}' was run with {flags(saved)}, not {flags(now)}; a resumed run "
            "keeps every flag that changes what it computes (pass the checkpoint's, or start "
            "another --run-dir)."
        )


def keep_lines(path, keep):
    """Rewrite a JSON-lines file (if there is one) with only the lines for which keep(line's
    object) holds; a line cut short by a kill is dropped."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = fh.readlines()

    def kept(line):
        try:
            return keep(json.loads(line))
        except ValueError:
            return False

    left = [line for line in lines if kept(line)]
    if len(left) < len(lines):
        with open(path, "w") as fh:
            fh.writelines(left)


def resume_note(ckpt, run_dir, world, batch_size):
    """Process 0, on resume: drop the metrics.jsonl lines of epochs after the checkpoint's, and the
    steps.jsonl lines after its position (a kill between a line and its checkpoint would repeat
    them), and say in one line where the
    run continues and, when the number of processes changed, that the global batch did not."""
    done = (ckpt["epoch"], (ckpt.get("at") or {}).get("step", 0))  # (epochs, steps) done
    keep_lines(os.path.join(run_dir, "metrics.jsonl"), lambda m: m["epoch"] <= done[0])
    keep_lines(os.path.join(run_dir, "steps.jsonl"), lambda m: (m["epoch"] - 1, m["step"]) <= done)
    at, epochs = ckpt.get("at") or {}, ckpt["args"].get("epochs", math.inf)
    if not at and ckpt["epoch"] >= epochs:  # e.g. torchrun restarting a worker after the last one
        # Finished only when backbone.pt is the final checkpoint's backbone: a kill or a full
        # disk between the two writes of the last epoch's end left it old or missing.
        model, path, was = ckpt.get("model") or {}, os.path.join(run_dir, "backbone.pt"), "missing"
        want = {k[len("backbone.") :]: v for k, v in model.items() if k.startswith("backbone.")}
        if want and os.path.isfile(path):
            try:
                have = torch.load(path, map_location="cpu", weights_only=True)
                same = list(have) == list(want) and all(torch.equal(have[k], want[k]) for k in have)
            except Exception:  # cut short, not a state_dict: rewritten below
                same = False
            want, was = (None if same else want), "not its final checkpoint's"
        if want:
            save_atomic(want, path)
            print(
                f"{run_dir} has finished its {epochs} epochs, but its backbone.pt was {was}: "
                "rewrote it from the final checkpoint.pt; nothing else to do.",
                flush=True,
            )
        else:
            print(f"{run_dir} has finished its {epochs} epochs: nothing to do.", flush=True)
        return
    where = (
        f"epoch {ckpt['epoch'] + 1} step {at['step']}"
        if at
        else f"the start of epoch {ckpt['epoch'] + 1}"
    )
    before = ckpt.get("world", world)
    change = (
        f"; it ran on {before} process(es), this run has {world}: allowed, as the global batch "
        f"({batch_size}) and the schedule stay the same"
        if before != world
        else ""
    )
    print(f"resuming {run_dir} at {where}{change}", flush=True)


# ---------------------------------------------------------------- 2. data sets
DATASETS = ("cifar10", "cifar100", "stl10", "folder", "digits")
# Per-channel mean and std of the training images; ImageNet's for folders.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "digits": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# Native image size, used as the default crop size.
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "folder": 224, "digits": 32}


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), upscaled to 32 px
    RGB. A fixed permutation (seed 0) puts 1437 images in train and 360 in test."""

    def __init__(self, train):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        order = np.random.RandomState(0).permutation(len(x))
        keep = order[:1437] if train else order[1437:]
        self.data = (
            x[torch.as_tensor(keep)].permute(0, 2, 3, 1).contiguous().numpy()
        )  # (N, 32, 32, 3)
        self.targets = [int(t) for t in d.target[keep]]
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.data[i]), self.targets[i]


def check_dataset(name, data_dir):
    """Raise UserError for a data set that cannot be loaded, before any work."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}.")
    if name == "folder":
        if not os.path.isdir(os.path.join(data_dir, "train")):
            raise UserError(
                "--dataset folder needs an ImageFolder tree, "
                f"but '{data_dir}/train' does not exist."
            )
        if not any(os.path.isdir(os.path.join(data_dir, s)) for s in ("val", "test")):
            raise UserError(
                f"--dataset folder needs '{data_dir}/val' or '{data_dir}/test' beside train/."
            )


def make_dataset(name, data_dir, train=True, download=True):
    """The raw data set: items are (PIL image, label); `.targets` and `.classes` as in torchvision.
    Raises UserError with one clear sentence when the data cannot be had."""
    check_dataset(name, data_dir)
    try:
        if name == "digits":
            return DigitsDataset(train)
        if name == "folder":
            split = (
                "train"
                if train
                else ("val" if os.path.isdir(os.path.join(data_dir, "val")) else "test")
            )
            return torchvision.datasets.ImageFolder(os.path.join(data_dir, split))
        if name == "stl10":
            # Pre-training uses train+unlabeled (the SSL convention); the probe uses train.
            ds = torchvision.datasets.STL10(
                data_dir, split="train" if not train else "train+unlabeled", download=download
            )
            ds.targets = [int(t) for t in ds.labels]
            return ds
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(data_dir, train=train, download=download)
    except (RuntimeError, OSError) as e:  # no network, a corrupt archive, a missing file
        raise UserError(
            f"could not load dataset '{name}' from '{data_dir}' ({str(e).splitlines()[0]})."
        ) from e


BAD_IMAGE_TRIES = 64  # load_image gives up after this many unreadable items in a row


def load_image(dataset, i):
    """Item i of `dataset` as (RGB PIL image, label, index read, replaced). An image that cannot be
    read (a truncated file, a file that is not an image, a file gone from a network disk) is
    replaced by the next readable item (i + 1, i + 2, ..., around the end): the same substitute in
    every epoch and on every process, so a run replays exactly, and counted by the caller instead of
    crashing a run hours in. --check-data names such files before training."""
    n = len(dataset)
    for k in range(min(n, BAD_IMAGE_TRIES)):
        j = (i + k) % n
        try:
            img, y = dataset[j]
            return img.convert("RGB"), y, j, k > 0
        except (OSError, SyntaxError, ValueError):  # what PIL raises for a file it cannot decode
            continue
    raise UserError(
        f"{min(n, BAD_IMAGE_TRIES)} images in a row from item {i} of the data set cannot be read; "
        "list the bad files with --check-data."
    )


class _Probe(torch.utils.data.Dataset):
    """Path i -> '' when the file decodes, else why not (one line)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                img.draft(
                    "RGB", (1, 1)
                )  # a JPEG decodes at 1/8 scale: every byte is still read and checked
                img.load()
            return ""
        except (OSError, SyntaxError, ValueError) as e:
            return (str(e).splitlines() or [type(e).__name__])[0]


def check_images(datasets, workers=2, shown=5):
    """--check-data: open and decode every file of the image-folder data sets among `datasets`,
    before training, each process a share. Raises UserError naming the first `shown` unreadable
    files and their count; else process 0 says how many files it checked. Data sets held as arrays
    (digits, CIFAR, STL-10) have no files to check."""
    paths = sorted({p for ds in datasets for p, _ in getattr(_base(ds)[0], "samples", [])})
    if not paths:
        if rank() == 0:
            print(
                "check-data: this data set is held as arrays, not image files; nothing to check.",
                flush=True,
            )
        return 0
    share = _Probe(paths[rank() :: world_size()])
    loader = torch.utils.data.DataLoader(
        share,
        batch_size=64,
        num_workers=workers,
        collate_fn=list,
        worker_init_fn=_ignore_stop_signals,
    )
    why = [w for batch in loader for w in batch]
    bad = [(p, w) for p, w in zip(share.paths, why) if w]
    if world_size() > 1:
        every = [None] * world_size()
        dist.all_gather_object(every, bad)
        bad = sorted(b for part in every for b in part)
    if bad:
        more = f", and {len(bad) - shown} more" if len(bad) > shown else ""
        raise UserError(
            f"--check-data: {len(bad)} of {len(paths)} images cannot be read: "
            + "; ".join(f"'{p}' ({w})" for p, w in bad[:shown])
            + more
            + " (remove or replace them; without --check-data a run replaces each by the next "
            "readable image and counts them as bad_images in metrics.jsonl)."
        )
    if rank() == 0:
        print(f"check-data: all {len(paths)} image files decode.", flush=True)
    return len(paths)


def eval_dataset(name, data_dir, download=True, train_set=None):
    """The split that kNN and linear evaluation train on: STL-10's labelled train split, else train.
    Pass the `train_set` already loaded: where it is that split it comes back itself, so that the
    training data and the kNN bank share one decoded copy (the decode cache is per object)."""
    if train_set is not None and name != "stl10":
        return train_set
    if name == "stl10":
        ds = torchvision.datasets.STL10(data_dir, split="train", download=download)
        ds.targets = [int(t) for t in ds.labels]
        return ds
    return make_dataset(name, data_dir, train=True, download=download)


KNN_LIMIT_FOLDER = (
    50000  # --knn-limit's default for image folders (ImageNet: ~4% of the train split)
)


def knn_bank(name, data_dir, train_set, limit=None):
    """The online kNN's bank: eval_dataset (the training split itself where it is that split),
    limited to a fixed subset of `limit` images (seed 0); 0: all; None: all, but
    KNN_LIMIT_FOLDER for an image folder, where a bank of the whole split (ImageNet: 1.28M
    images) costs an epoch-end pass over it and gigabytes of features."""
    bank = eval_dataset(name, data_dir, train_set=train_set)
    limit = (KNN_LIMIT_FOLDER if name == "folder" else 0) if limit is None else limit
    if limit and limit < len(bank):
        bank = torch.utils.data.Subset(
            bank, np.random.RandomState(0).permutation(len(bank))[:limit].tolist()
        )
    return bank


# ---------------------------------------------------------------- 3. augmentations
@dataclass(frozen=True)
class View:
    """One augmented view, as the papers specify it. Both the CPU pipeline
    (`cpu_transform`) and the batched tensor pipeline draw from these distributions."""

    size: int  # output side in pixels
    scale: tuple = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0  # Gaussian blur, sigma in [0.1, 2], kernel blur_kernel(size)
    solarize_p: float = 0.0  # solarize at threshold 128 (of 255)


def blur_kernel(side):
    """Odd Gaussian-blur kernel for a crop of `side` pixels, used by both data paths: 10% of
    the side (SimCLR, App. A), but at least 13 taps, so that sigma up to 2 stays a Gaussian
    (+-3 sigma) on small crops, as the PIL blur (radius = sigma) of solo-learn's CIFAR recipes
    is; never wider than the crop, which reflect padding needs."""
    return min(max(int(0.1 * side) // 2 * 2 + 1, 13), (side - 1) // 2 * 2 + 1)


def jitter_of(strength):
    """SimCLR's colour distortion of strength s (Chen et al. 2020, App. A):
    brightness, contrast, saturation 0.8 s, hue 0.2 s. s = 0.5 is MoCo v2's 0.4/0.4/0.4/0.1."""
    return (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)


def simclr_views(size, crop_min=0.08, strength=1.0, blur_p=0.5):
    """Two views of one distribution (SimCLR, Chen et al. 2020, App. A; MoCo v2; SimSiam):
    crop (crop_min, 1), flip, colour jitter of `strength` with p 0.8, grey p 0.2, blur p.
    The defaults are SimCLR's ImageNet ones, which solo-learn's CIFAR `symmetric.yaml` keeps."""
    v = View(size, scale=(crop_min, 1.0), jitter=jitter_of(strength), blur_p=blur_p)
    return [v, v]


def byol_views(size, crop_min=0.08, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)):
    """BYOL (Grill et al. 2020, Table 6), also MoCo v3: asymmetric views, jitter
    0.4/0.4/0.2/0.1 with p 0.8, grey p 0.2, blur p and solarization p per view.
    solo-learn's CIFAR `asymmetric.yaml` keeps all of it but the blur: (0, 0)."""
    v = View(size, scale=(crop_min, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
    return [
        replace(v, blur_p=blur_p[0], solarize_p=solarize_p[0]),
        replace(v, blur_p=blur_p[1], solarize_p=solarize_p[1]),
    ]


def multicrop_views(
    size,
    local_crops,
    global_scale=(0.14, 1.0),
    local_scale=(0.05, 0.14),
    local_size=None,
    jitter=jitter_of(1.0),
    blur_p=(0.5, 0.5, 0.5),
    solarize_p=(0.0, 0.0, 0.0),
):
    """Multi-crop (SwAV, Caron et al. 2020, Sec. 3.2): two global crops of `size` and
    `local_crops` small crops. 224 -> 96 px as in the papers; smaller images get local crops
    of half their side (16 px for CIFAR, 48 px for STL-10). blur_p and solarize_p: for the
    first global crop, the second, and every local crop. The defaults are SwAV's; DINO
    passes its own (global scale (0.4, 1), jitter 0.4/0.4/0.2/0.1, blur 1.0/0.1/0.5,
    solarization 0/0.2/0)."""
    local_size = local_size or (96 if size >= 224 else size // 2)
    g = View(size, scale=tuple(global_scale), jitter=tuple(jitter))
    local = View(
        local_size,
        scale=tuple(local_scale),
        jitter=tuple(jitter),
        blur_p=blur_p[2],
        solarize_p=solarize_p[2],
    )
    return [
        replace(g, blur_p=blur_p[0], solarize_p=solarize_p[0]),
        replace(g, blur_p=blur_p[1], solarize_p=solarize_p[1]),
    ] + [local] * local_crops


def positive_view(size, blur_p=0.5):
    """The single crop of each positive image of the cross-attention add-on (Seyfi et al.,
    App. 1.2): SimCLR's view."""
    return simclr_views(size, blur_p=blur_p)[0]


def cpu_transform(view, stats):
    """A View as a torchvision pipeline on PIL images -> normalized float tensor (3, s, s)."""
    b, c, s, h = view.jitter
    steps = [
        T.RandomResizedCrop(
            view.size, scale=view.scale, ratio=view.ratio, interpolation=T.InterpolationMode.BICUBIC
        ),
        T.RandomHorizontalFlip(view.flip_p),
        T.RandomApply([T.ColorJitter(b, c, s, h)], p=view.jitter_p),
        T.RandomGrayscale(view.gray_p),
    ]
    if view.blur_p > 0:
        k = blur_kernel(view.size)
        steps.append(T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=view.blur_p))
    if view.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=view.solarize_p))
    steps += [T.ToTensor(), T.Normalize(*stats)]
    return T.Compose(steps)


def eval_transform(size, stats, native):
    """Evaluation: resize (256/224 of the crop side for large images) and center crop."""
    steps = (
        []
        if size == native and size <= 64
        else [T.Resize(int(round(size * 256 / 224)) if size > 64 else size), T.CenterCrop(size)]
    )
    return T.Compose(steps + [T.ToTensor(), T.Normalize(*stats)])


# ---------------------------------------------------------------- 3b. the tensor path
# A data set that fits in memory is decoded once into a uint8 tensor (N, 3, H, W) kept on
# the device, and every View is applied to whole batches there, with per-sample random
# parameters drawn from a torch.Generator from the same distributions as `cpu_transform`.
# Nothing in it reads a device value on the host, so the GPU never waits for Python.
# Differences from the PIL pipeline, all below one grey level or a pixel: intermediate
# results stay float instead of being rounded to uint8; the crop is resampled with
# grid_sample's bicubic kernel (a=-0.75; PIL's is a=-0.5) and no antialiasing, which
# matters only when a crop is shrunk (images larger than the crop side).
DATA_PATHS = ("auto", "cpu", "tensor")
TENSOR_MAX_BYTES = 8 * 2**30  # auto: larger data sets (ImageNet) keep DataLoader workers
_DECODED = weakref.WeakKeyDictionary()  # dataset -> {"cpu" or device: uint8 tensor}


def cache_dir():
    """Decoded image folders are cached as .npy here, never in the repository."""
    return os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cleanssl"
    )


def _base(dataset):
    """(underlying data set, indices or None) through torch Subsets."""
    if isinstance(dataset, torch.utils.data.Subset):
        base, idx = _base(dataset.dataset)
        sub = np.asarray(dataset.indices)
        return base, sub if idx is None else idx[sub]
    return dataset, None


def _decodable(ds):
    data = getattr(ds, "data", None)
    return (isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 4) or isinstance(
        ds, torchvision.datasets.ImageFolder
    )


def estimate_bytes(dataset):
    """Size of `dataset` decoded to uint8, or None when it cannot be decoded here (a wrapper
    that transforms its images, or a folder whose images differ in size)."""
    base, idx = _base(dataset)
    n = len(dataset)
    if not _decodable(base):
        return None
    if getattr(base, "data", None) is not None:
        return n * int(np.prod(base.data.shape[1:]))
    sizes = set()
    for p, _ in base.samples[:: max(1, len(base.samples) // 64)]:  # 64 headers, not the pixels
        try:
            with Image.open(p) as img:
                sizes.add(img.size)
        except (
            OSError,
            SyntaxError,
            ValueError,
        ):  # an unreadable file: decoding names it, --check-data lists them
            continue
    if len(sizes) != 1:
        return None
    ((w, h),) = sizes
    return n * 3 * w * h


def resolve_data_path(choice, dataset, device):
    """'cpu' or 'tensor'. auto: the tensor path on CUDA when the decoded data set takes at most
    min(8 GiB, a quarter of the GPU's memory), else the CPU pipeline with DataLoader workers."""
    if choice not in DATA_PATHS:
        raise UserError(f"unknown data path '{choice}': choose one of {', '.join(DATA_PATHS)}.")
    if choice == "cpu":
        return choice
    need = estimate_bytes(dataset)
    if choice == "tensor" and need is None:
        raise UserError(
            "--data-path tensor needs a data set of equal-sized images (CIFAR, STL-10, digits, "
            "a folder of one image size); use --data-path cpu."
        )
    if choice != "auto":
        return choice
    if device.type != "cuda" or need is None:
        return "cpu"
    return (
        "tensor"
        if need <= min(TENSOR_MAX_BYTES, torch.cuda.get_device_properties(device).total_memory // 4)
        else "cpu"
    )


def _decode_folder(ds):
    """Decode an ImageFolder with PIL once; cached as .npy in cache_dir(), keyed by the
    folder, its file names, sizes and modification times."""
    h = hashlib.sha1(os.path.abspath(ds.root).encode())
    for p, _ in ds.samples:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    path = os.path.join(
        cache_dir(), f"{os.path.basename(os.path.normpath(ds.root))}_{h.hexdigest()[:16]}.npy"
    )
    if os.path.isfile(path):
        return torch.from_numpy(np.load(path))
    first = None
    for i, (p, _) in enumerate(ds.samples):
        try:
            with Image.open(p) as img:
                a = np.asarray(img.convert("RGB"))
        except (
            OSError,
            SyntaxError,
            ValueError,
        ) as e:  # before training, so one sentence rather than a substitute
            raise UserError(
                f"'{p}' cannot be read ({str(e).splitlines()[0]}); the tensor path decodes every "
                "image first: remove it, or use --data-path cpu, which replaces unreadable images "
                "and counts them (--check-data lists them all)."
            ) from e
        if first is None:
            first = np.empty((len(ds.samples),) + a.shape, np.uint8)  # (N, H, W, 3)
        if a.shape != first.shape[1:]:
            raise UserError(
                f"--data-path tensor needs images of one size, but '{p}' is "
                f"{a.shape[1]}x{a.shape[0]} and the first is {first.shape[2]}x{first.shape[1]}; "
                "use --data-path cpu."
            )
        first[i] = a
    x = np.ascontiguousarray(first.transpose(0, 3, 1, 2))  # (N, 3, H, W)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, x)
    os.replace(tmp, path)  # processes decoding side by side each write whole files
    return torch.from_numpy(x)


def decode_uint8(dataset, device=torch.device("cpu")):
    """Every image of `dataset` as one uint8 tensor (N, 3, H, W) on `device`, decoded once per
    data set and device: CIFAR, STL-10 and digits from their `.data` arrays, folders with PIL.
    For a GPU only the GPU's copy is kept: the host copy it is made from is dropped (a host copy
    asked for before stays cached), so that an 8 GiB data set does not also hold 8 GiB of host
    RAM in every process for the whole run."""
    cache = _DECODED.setdefault(dataset, {})
    key = str(device)
    if key in cache:
        return cache[key]
    base, idx = _base(dataset)
    if device.type != "cpu":
        x = cache.get("cpu")
        if x is None:  # decode on the host, keeping none of the host copies made on the way (a
            # Subset's base's too)
            fresh = [d for d in (dataset, base) if "cpu" not in _DECODED.get(d, {})]
            x = decode_uint8(dataset)
            for d in fresh:
                _DECODED[d].pop("cpu", None)
        x = x.to(device)
    elif base is not dataset:
        x = decode_uint8(base)[torch.as_tensor(idx)]
    elif not _decodable(base):
        raise UserError(
            "--data-path tensor needs CIFAR, STL-10, digits or an image folder; "
            "use --data-path cpu."
        )
    elif getattr(base, "data", None) is not None:
        x = torch.as_tensor(base.data)
        x = (
            x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)
        )  # STL-10 is stored (N, 3, H, W), the rest (N, H, W, 3)
    else:
        x = _decode_folder(base)
    cache[key] = x.contiguous()
    return cache[key]


def targets_of(dataset):
    """Labels (N,) long of a data set or a Subset, without decoding images."""
    base, idx = _base(dataset)
    y = getattr(base, "targets", None)
    y = torch.as_tensor(y if y is not None else [base[i][1] for i in range(len(base))])
    return y if idx is None else y[torch.as_tensor(idx)]


@functools.lru_cache(maxsize=None)
def device_constant(values, device):
    """A small float32 tensor of `values` (a tuple) on `device`, made once per device: built per
    batch, torch.tensor(..., device=cuda) is a blocking host-to-device copy that keeps the host
    from running ahead of the GPU."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _gray(x):  # (B, 3, H, W) -> (B, 1, H, W), the ITU-R 601 luma that torchvision and PIL use
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _shift_hue(x, shift):
    """Rotate the hue of (B, 3, H, W) images in [0, 1] by shift (B,) turns, through HSV."""
    v, cmax = x.max(1)  # (B, H, W): value, and which channel is largest
    chroma = v - x.min(1).values
    r, g, b = x.unbind(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(
        cmax == 0, (g - b) / safe, torch.where(cmax == 1, 2 + (b - r) / safe, 4 + (r - g) / safe)
    )
    h = torch.where(chroma > 0, h / 6, torch.zeros_like(h))
    h = torch.remainder(h + shift[:, None, None], 1.0) * 6  # in sextants [0, 6)
    # back to RGB: each channel is v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6
    n = device_constant((5.0, 3.0, 1.0), x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def sample_params(view, n, height, width, generator, device):
    """Random parameters of `view` for n images of height x width, one per sample, drawn from
    the distributions of cpu_transform(view) (torchvision's RandomResizedCrop with its 10 tries
    and fallback, RandomHorizontalFlip, RandomApply(ColorJitter) with a random order of its
    four operations, RandomGrayscale, RandomApply(GaussianBlur), RandomSolarize).
    Returns a dict of device tensors; nothing is read back to the host."""

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    # crop: 10 tries of (area, log-uniform aspect); the first that fits, else a centred fallback
    area = (
        height * width * (view.scale[0] + (view.scale[1] - view.scale[0]) * rand(n, 10))
    )  # (n, 10)
    lo, hi = math.log(view.ratio[0]), math.log(view.ratio[1])
    aspect = torch.exp(lo + (hi - lo) * rand(n, 10))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # argmax returns the first maximum
    in_ratio = width / height
    fw, fh = (
        (width, round(width / min(view.ratio)))
        if in_ratio < min(view.ratio)
        else (round(height * max(view.ratio)), height)
        if in_ratio > max(view.ratio)
        else (width, height)
    )
    ok = fits.any(1)
    w = torch.where(ok, w.gather(1, first)[:, 0], torch.full_like(w[:, 0], fw))
    h = torch.where(ok, h.gather(1, first)[:, 0], torch.full_like(h[:, 0], fh))
    top = torch.where(
        ok, torch.floor(rand(n) * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor")
    )
    left = torch.where(
        ok, torch.floor(rand(n) * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor")
    )

    def factor(strength):  # ColorJitter: uniform in [max(0, 1 - s), 1 + s]
        a = max(0.0, 1 - strength)
        return a + (1 + strength - a) * rand(n)

    bs, cs, ss, hs = view.jitter
    jitter = rand(n) < view.jitter_p
    return {
        "top": top,
        "left": left,
        "h": h,
        "w": w,  # (n,) crop box in pixels
        "flip": rand(n) < view.flip_p,
        "jitter": jitter,
        "order": rand(n, 4).argsort(1),  # (n, 4) a uniformly random permutation of the 4 operations
        "brightness": torch.where(jitter, factor(bs), 1.0),
        "contrast": torch.where(jitter, factor(cs), 1.0),
        "saturation": torch.where(jitter, factor(ss), 1.0),
        "hue": torch.where(jitter, (2 * rand(n) - 1) * hs, 0.0),
        "gray": rand(n) < view.gray_p,
        "blur": rand(n) < view.blur_p,
        "sigma": 0.1 + 1.9 * rand(n),  # GaussianBlur sigma in [0.1, 2]
        "solarize": rand(n) < view.solarize_p,
    }


def apply_view(images, p, view, stats):
    """Apply the parameters `p` of `sample_params` to uint8 images (B, 3, H, W) on any device.
    Returns normalized float32 crops (B, 3, s, s), as cpu_transform would."""
    b, _, height, width = images.shape
    s = view.size
    # crop + resize + flip in one resampling: output pixel u reads the source at
    # left + (u + 0.5) w / s - 0.5, mirrored about the box centre when flipped
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = p["w"] / width * torch.where(p["flip"], -1.0, 1.0)
    theta[:, 0, 2] = (2 * p["left"] + p["w"]) / width - 1
    theta[:, 1, 1] = p["h"] / height
    theta[:, 1, 2] = (2 * p["top"] + p["h"]) / height - 1
    grid = F.affine_grid(theta, (b, 3, s, s), align_corners=False)
    x = F.grid_sample(
        images.float() / 255, grid, mode="bicubic", padding_mode="border", align_corners=False
    ).clamp(0, 1)

    # colour jitter: at each of the 4 slots every operation runs, with the identity factor for
    # the samples whose permutation puts another operation there (no per-sample Python branch)
    for slot in range(4):
        op = p["order"][:, slot]
        f = torch.where(op == 0, p["brightness"], 1.0).view(b, 1, 1, 1)
        x = (x * f).clamp(0, 1)
        f = torch.where(op == 1, p["contrast"], 1.0).view(b, 1, 1, 1)
        x = (f * x + (1 - f) * _gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
        f = torch.where(op == 2, p["saturation"], 1.0).view(b, 1, 1, 1)
        x = (f * x + (1 - f) * _gray(x)).clamp(0, 1)
        if view.jitter[3] > 0:
            x = torch.where(((op == 3) & p["jitter"]).view(b, 1, 1, 1), _shift_hue(x, p["hue"]), x)
    if view.gray_p > 0:
        x = torch.where(p["gray"].view(b, 1, 1, 1), _gray(x).expand(-1, 3, -1, -1), x)
    if (
        view.blur_p > 0
    ):  # separable Gaussian, reflect padding, per-sample sigma: grouped convolutions
        k = blur_kernel(s)  # the kernel of cpu_transform
        t = torch.linspace(-(k // 2), k // 2, k, device=x.device)
        kern = torch.exp(-0.5 * (t / p["sigma"][:, None]) ** 2)
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B*3, k)
        y = F.pad(x.reshape(1, b * 3, s, s), [k // 2] * 4, mode="reflect")
        y = F.conv2d(
            F.conv2d(y, kern.view(-1, 1, 1, k), groups=b * 3), kern.view(-1, 1, k, 1), groups=b * 3
        )
        x = torch.where(p["blur"].view(b, 1, 1, 1), y.view(b, 3, s, s), x)
    if view.solarize_p > 0:  # PIL: pixels >= 128 become 255 - pixel
        x = torch.where(p["solarize"].view(b, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
    mean, std = (device_constant(tuple(v), x.device).view(1, 3, 1, 1) for v in stats)
    return (x - mean) / std


def augment(images, view, stats, generator):
    """One View applied to a uint8 batch (B, 3, H, W) on its device, fresh parameters per sample."""
    p = sample_params(
        view, images.shape[0], images.shape[2], images.shape[3], generator, images.device
    )
    return apply_view(images, p, view, stats)


def eval_tensor(images, size, stats, native):
    """eval_transform on a uint8 batch (B, 3, H, W): resize the shorter side (bilinear,
    antialiased, as PIL) when it differs, centre crop, normalize."""
    x = images.float() / 255
    if not (size == native and size <= 64):
        side = int(round(size * 256 / 224)) if size > 64 else size
        h, w = x.shape[-2:]
        if min(h, w) != side:
            x = F.interpolate(
                x,
                size=(side, int(side * w / h)) if h <= w else (int(side * h / w), side),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp(0, 1)
        h, w = x.shape[-2:]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    mean, std = (device_constant(tuple(v), x.device).view(1, 3, 1, 1) for v in stats)
    return (x - mean) / std


# ---------------------------------------------------------------- 4. training loader
class _Views(torch.utils.data.Dataset):
    """Key (i, 0, seed) -> every view of image i; key (i, 1, seed) -> the positive crop of image i.
    The transforms draw from torch's generator seeded with `seed`, so an image's crops depend on
    the key alone, not on which worker (or process) made them. Items are (crops, index read, kind,
    1 if the image was unreadable and replaced (load_image) else 0)."""

    def __init__(self, base, views, positive, stats):
        self.base = base
        self.tf = [cpu_transform(v, stats) for v in views]
        self.pos_tf = cpu_transform(positive or views[0], stats)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, kind, seed = key
        img, _, j, replaced = load_image(self.base, i)
        with torch.random.fork_rng(
            devices=[]
        ):  # with workers=0 this is the training process: leave its generator be
            torch.manual_seed(seed)
            crops = [self.pos_tf(img)] if kind == 1 else [t(img) for t in self.tf]
        return crops, j, kind, int(replaced)


def _collate(items):
    anchors = [x for x in items if x[2] == 0]
    pos = [x for x in items if x[2] == 1]
    crops = [torch.stack([a[0][v] for a in anchors]) for v in range(len(anchors[0][0]))]
    idx = torch.tensor([a[1] for a in anchors])
    positives = torch.stack([p[0][0] for p in pos]) if pos else None
    return crops, idx, positives, sum(x[3] for x in items)


class TrainLoader:
    """Batches for one process of a (possibly distributed) run.

    `batch_size` is the global batch. Every epoch draws one permutation of the data set
    from (seed, epoch); global step s takes its slice s and process r takes the r-th
    part of it. So every process sees the same number of batches, and 2 processes see
    together exactly the batch one process would see alone.
    Yields (crops, idx, positives): crops is a list with one (b, 3, s, s) tensor per
    view, idx the (b,) data-set indices, positives (b * P, 3, s, s) or None.
    With `set_clusters(labels, P)`, each image brings P images of its cluster (one
    positive crop each), drawn at random from (seed, epoch) for the global batch.
    `set_epoch(epoch, start_step)` starts the epoch at step start_step (a mid-epoch
    checkpoint's): its batches and crops are those an unbroken epoch has there, because
    the randomness is a function of (seed, epoch, step): on the CPU path each image's
    crops are seeded from (seed, epoch, step, its place in the global batch), so they are
    also the same on any number of processes or workers; on the tensor path each step's
    from (seed, epoch, step, rank).
    An image that cannot be read is replaced by the next readable one (`load_image`);
    `bad_images` counts them on this process, from set_epoch's `bad_images`.
    data_path: "cpu" (PIL + torchvision in `workers` processes), "tensor" (the data set
    decoded once onto `device`, augmented there in batches; same batches, same
    distributions, other random draws) or "auto" (see `resolve_data_path`).
    compile: torch.compile the tensor path's augmentation.
    """

    def __init__(
        self,
        dataset,
        views,
        batch_size,
        stats,
        device,
        seed=0,
        workers=2,
        positive=None,
        data_path="cpu",
        compile=False,
    ):
        self.n, self.world, self.rank = len(dataset), world_size(), rank()
        if batch_size % self.world:
            raise UserError(
                f"--batch-size {batch_size} is not divisible by the {self.world} processes."
            )
        if batch_size > self.n:
            raise UserError(
                f"--batch-size {batch_size} is larger than the {self.n} training images."
            )
        self.batch_size, self.local = batch_size, batch_size // self.world
        self.device, self.seed, self.workers = device, seed, workers
        self.epoch, self.start_step, self.bad_images = 0, 0, 0
        self.data_path = resolve_data_path(data_path, dataset, device)
        if self.data_path == "tensor":
            self.images = decode_uint8(dataset, device)  # (N, 3, H, W) uint8, decoded once
            self.views, self.positive, self.stats = list(views), positive or views[0], stats
            self.apply = torch.compile(apply_view, dynamic=False) if compile else apply_view
        else:
            self.data = _Views(dataset, views, positive, stats)
        self.labels, self.members, self.positives = None, None, 0

    def __len__(self):
        return (
            self.n // self.batch_size
        )  # drop the last incomplete batch: equal steps on every process

    def set_epoch(self, epoch, start_step=0, bad_images=0):
        """Iterate `epoch` from step `start_step`; count unreadable images from `bad_images`."""
        if start_step > len(self):
            raise UserError(
                f"the checkpoint stopped at step {start_step} of an epoch, but an epoch of this "
                f"data set has {len(self)} steps: the data set changed since."
            )
        self.epoch, self.start_step, self.bad_images = epoch, start_step, bad_images

    def set_clusters(self, labels, positives):
        """labels: (N,) pseudo-label of each training image; positives: P per anchor."""
        labels = np.asarray(labels)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))
        self.labels, self.positives = labels, positives
        self.members = (order, bounds)  # members of cluster c: order[bounds[c]:bounds[c+1]]

    def _batches(self):
        """Every step's keys (image, kind, seed) for this process, from step 0: each step's draws
        are the same wherever iteration starts."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).numpy()
        rng = np.random.default_rng(self.seed * 100003 + self.epoch)
        mine = slice(
            self.rank * self.local, (self.rank + 1) * self.local
        )  # this process's part of a global batch
        for s in range(len(self)):
            idx = perm[s * self.batch_size : (s + 1) * self.batch_size][mine]
            # one seed per crop of the global batch (anchors, then their positives),
            # from (seed, epoch, step)
            seeds = np.random.default_rng([self.seed, self.epoch, s]).integers(
                2**63, size=(1 + self.positives, self.batch_size)
            )
            keys = [(int(i), 0, int(z)) for i, z in zip(idx, seeds[0, mine])]
            if self.positives:
                order, bounds = self.members
                c = self.labels[idx]
                lo, hi = bounds[c], bounds[c + 1]  # (b,) every cluster has its anchor, so hi > lo
                u = rng.random((self.batch_size, self.positives))[
                    mine
                ]  # drawn for the global batch, then this part
                pick = lo[:, None] + (u * (hi - lo)[:, None]).astype(np.int64)
                keys += [
                    (int(j), 1, int(z))
                    for j, z in zip(order[pick].reshape(-1), seeds[1:, mine].T.reshape(-1))
                ]
            yield keys  # (b,) anchors, then (b * P,) positives anchor-major

    def _step_seed(self, s):
        return int(
            np.random.SeedSequence([self.seed, self.epoch, s, self.rank]).generate_state(1)[0]
        )

    def __iter__(self):
        if self.data_path == "tensor":
            yield from self._tensor_batches()
            return
        # The crops seed themselves (_Views); this generator only keeps the DataLoader from drawing
        # the workers' seeds from the global one.
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 104729 + self.rank)
        loader = torch.utils.data.DataLoader(
            self.data,
            batch_sampler=list(self._batches())[self.start_step :],
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            generator=g,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        for crops, idx, positives, bad in loader:
            self.bad_images += bad
            crops = [c.to(self.device, non_blocking=True) for c in crops]
            if positives is not None:
                positives = positives.to(self.device, non_blocking=True)
            yield crops, idx.to(self.device, non_blocking=True), positives

    def _tensor_batches(self):
        keys = list(self._batches())[self.start_step :]
        if not keys:
            return
        # The epoch's indices cross to the device in one copy: a host->device copy per step
        # from pageable memory would wait for the GPU to drain its queue.
        anchors = torch.tensor([[k for k, kind, _ in b if kind == 0] for b in keys])  # (S, b)
        pos = (
            torch.tensor([[k for k, kind, _ in b if kind == 1] for b in keys])
            if self.positives
            else None
        )  # (S, b*P)
        if self.device.type == "cuda":
            anchors, pos = anchors.pin_memory(), pos.pin_memory() if pos is not None else None
        anchors = anchors.to(self.device, non_blocking=True)
        pos = pos.to(self.device, non_blocking=True) if pos is not None else None
        g = torch.Generator(device=self.device)
        h, w = self.images.shape[2:]
        for s in range(len(keys)):
            g.manual_seed(
                self._step_seed(self.start_step + s)
            )  # each step's draws, wherever the epoch starts
            idx = anchors[s]
            x = self.images[idx]  # (b, 3, H, W) uint8
            crops = [
                self.apply(x, sample_params(v, len(idx), h, w, g, self.device), v, self.stats)
                for v in self.views
            ]
            positives = None
            if pos is not None:
                xp = self.images[pos[s]]
                positives = self.apply(
                    xp,
                    sample_params(self.positive, len(xp), h, w, g, self.device),
                    self.positive,
                    self.stats,
                )
            yield crops, idx, positives


# ---------------------------------------------------------------- 5. backbones
# name -> (torchvision architecture, width divisor). The narrow ResNet-18s keep the architecture
# and divide every stage's channels: a CPU smoke run or a classroom (eighth: 8/16/32/64), a scale
# model of an experiment (quarter: 16/32/64/128, about 13x the images/s of the full one on a CPU).
BACKBONES = {
    "resnet18": ("resnet18", 1),
    "resnet34": ("resnet34", 1),
    "resnet50": ("resnet50", 1),
    "resnet18-half": ("resnet18", 2),
    "resnet18-quarter": ("resnet18", 4),
    "resnet18-eighth": ("resnet18", 8),
}


def _narrow(net, div, zero_init_residual):
    """Rebuild a torchvision ResNet's stem and stages with 1/div of their channels, initialized as
    torchvision initializes them (Kaiming conv weights, unit BN scales, zero last BN if asked)."""
    block = type(net.layer1[0])
    w = 64 // div
    net.inplanes = w
    net.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(w)
    depth = [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)]
    net.layer1 = net._make_layer(block, w, depth[0])
    net.layer2 = net._make_layer(block, 2 * w, depth[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * w, depth[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * w, depth[3], stride=2)
    net.fc = nn.Linear(8 * w * block.expansion, net.fc.out_features)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in net.modules() if zero_init_residual else ():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return net


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier: (B, 3, H, W) -> (f (B, D, h, w), h (B, D)).
    For images of 64 px and less, the 7x7 stride-2 stem and the max-pool would shrink a
    32 px image to 1x1 by layer4; the CIFAR stem is a 3x3 stride-1 convolution, no pool.
    `name` is a key of BACKBONES; a narrow ResNet-18 has the same layers with fewer channels."""

    def __init__(self, name="resnet18", small_images=True, zero_init_residual=False):
        super().__init__()
        if name not in BACKBONES:
            raise UserError(f"unknown backbone '{name}': choose one of {', '.join(BACKBONES)}.")
        arch, div = BACKBONES[name]
        # zero_init_residual: the last BN of each residual branch starts at 0, so every block
        # starts as the identity (Goyal et al. 2017; MoCo v3's and BYOL's ImageNet recipes)
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if div > 1:
            net = _narrow(net, div, zero_init_residual)
        if small_images:
            net.conv1 = nn.Conv2d(3, 64 // div, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.name, self.small_images = name, small_images
        self.dim = net.fc.in_features  # 512 for R18/34, 2048 for R50, 512 / div for a narrow R18
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def forward(self, x):
        f = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))  # (B, D, h, w)
        return f, f.mean(dim=(2, 3))  # h: global average pooling, (B, D)


def build_backbone(name="resnet18", small_images=True, weights=None, zero_init_residual=False):
    """A Backbone; `weights` is the path of a `backbone.pt` written by a method script."""
    net = Backbone(name, small_images, zero_init_residual)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # OSError, RuntimeError (zip), EOFError, UnpicklingError (HTML)...
            why = "0 bytes" if os.path.isfile(weights) and not os.path.getsize(weights) else None
            why = why or (e.strerror if isinstance(e, OSError) else None) or type(e).__name__
            raise UserError(
                f"could not read backbone weights '{weights}' ({why}): it is cut short or not "
                "a backbone.pt; train the run again or pass another file."
            ) from e
        if not isinstance(state, dict):
            raise UserError(f"'{weights}' holds no backbone weights (a {type(state).__name__}).")
        try:
            net.load_state_dict(state)
        except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
            raise UserError(
                f"'{weights}' does not hold {name} weights (small_images={small_images})."
            ) from e
    return net


def multicrop_pass(backbone, crops, extra=None):
    """Multi-crop through the backbone as the official DINO (MultiCropWrapper) and SwAV do: one
    pass per run of consecutive crops of one size, so fewer, larger passes, and BN statistics over
    all crops of that size together. crops: V tensors (b, 3, H_v, W_v), the global crops first;
    extra (n, 3, H_1, W_1), e.g. the add-on's positives, rides along with the first run.
    Returns h (V*b, D) in crop order (extra left out) and, when extra is given, the feature maps
    of the first crop followed by extra's, (b + n, D, h, w); else None."""
    b, sizes = crops[0].shape[0], [c.shape[-2:] for c in crops]
    cuts = [0] + [i for i in range(1, len(crops)) if sizes[i] != sizes[i - 1]] + [len(crops)]
    hs, f_extra = [], None
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        f, h = backbone(
            torch.cat(crops[lo:hi] + ([extra] if lo == 0 and extra is not None else []))
        )
        hs.append(h[: (hi - lo) * b])  # the extra rows need no head
        if lo == 0 and extra is not None:
            f_extra = torch.cat([f[:b], f[hi * b :]])
    return torch.cat(hs), f_extra


# ---------------------------------------------------------------- 6. features, memory bank, kNN
@torch.no_grad()
def extract_features(
    model,
    dataset,
    size,
    stats,
    native,
    device,
    batch_size=256,
    workers=2,
    embed=None,
    data_path="cpu",
    precision="auto",
    gather=True,
    faults=None,
    progress="",
    every=30.0,
):
    """Embeddings of every image of `dataset`, with the evaluation transform and `model` in
    eval mode (BatchNorm running statistics, not batch statistics). `embed(model, x)`
    gives (B, d) features; the default takes the pooled h of a Backbone. Each process
    computes a strided share; the result (N, d) float32 and labels (N,) are the same
    on every process. data_path "tensor" (or "auto", see `resolve_data_path`) reads the
    decoded uint8 tensor on the device instead of PIL images in DataLoader workers; the
    default stays "cpu" because callers may pass wrappers that transform their images.
    precision: see `use_bf16`; the features are float32 either way. gather=False: only this
    process's share (contiguous, in rank order, without padding), e.g. a kNN bank that no
    process holds whole (`knn_top1(..., sharded=True)`). An unreadable image is replaced by the
    next readable one (`load_image`); `faults`, a list, gets their number over all processes.
    progress: a label; then process 0 prints a line with it every `every` seconds (images done
    over all processes, speed, time left), for passes that take minutes (a 1.28M-image bank)."""
    embed = embed or (lambda m, x: m(x)[1])
    was_training = model.training
    model.eval()
    world, r, n = world_size(), rank(), len(dataset)
    per = math.ceil(n / world)
    mine = [min(i, n - 1) for i in range(r * per, (r + 1) * per)]  # pad the last share with repeats
    if resolve_data_path(data_path, dataset, device) == "tensor":
        base, sub = _base(
            dataset
        )  # a Subset reads its rows of its base's decoded tensor, never a copy of its own
        images, y_all = decode_uint8(base, device), targets_of(base).to(device)
        rows = torch.as_tensor(np.asarray(mine) if sub is None else sub[mine]).to(device)
        loader = (
            (eval_tensor(images[i], size, stats, native), y_all[i], 0)
            for i in rows.split(batch_size)
        )
    else:
        data = _EvalSet(dataset, mine, eval_transform(size, stats, native))
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, num_workers=workers, worker_init_fn=_ignore_stop_signals
        )
    feats, labels, replaced, done = [], [], 0, 0
    start = shown = time.time()
    for x, y, bad in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device)):
            z = embed(model, x.to(device, non_blocking=True))
        feats.append(z.float())
        labels.append(y.to(device))
        replaced += int(bad.sum()) if torch.is_tensor(bad) else bad
        done += len(y)
        if (
            progress and r == 0 and time.time() - shown >= every
        ):  # by time, rank 0 alone: no collective
            shown = time.time()
            rate = done / max(
                shown - start, 1e-9
            )  # this process's images/s; every process has a share as large
            print(
                f"{progress}: {min(n, done * world)}/{n} images  {rate * world:.0f} img/s  "
                f"{duration((len(mine) - done) / rate)} left",
                flush=True,
            )
    model.train(was_training)
    if faults is not None:
        count = torch.tensor(float(replaced), device=device)
        if world_size() > 1:
            dist.all_reduce(count)
        faults.append(int(count.item()))
    z, y = torch.cat(feats), torch.cat(labels)
    if not gather:
        keep = max(0, min(per, n - r * per))  # the last shares hold padding (or nothing) only
        return z[:keep], y[:keep]
    z, y = all_gather(z), all_gather(y)
    return z[:n], y[:n]  # shares are contiguous and in rank order: only the padding is dropped


def duration(s):
    """Seconds for a person: 42 s, 3.5 min, 2.1 h."""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


class _EvalSet(torch.utils.data.Dataset):
    def __init__(self, base, indices, tf):
        self.base, self.indices, self.tf = base, indices, tf

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        img, y, _, replaced = load_image(self.base, self.indices[j])
        return self.tf(img), y, int(replaced)


class MemoryBank:
    """One L2-normalized embedding per training image, filled from every process.
    The spatial cross-attention add-on clusters it with k-means at each epoch's start
    to give every image a pseudo-label (Seyfi et al., Sec. 2.1)."""

    def __init__(self, size, dim, device):
        self.z = torch.zeros(size, dim, device=device)
        self.filled = torch.zeros(size, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, idx, z):
        """idx (b,), z (b, d) of this process; every process passes the same b."""
        idx, z = all_gather(idx), all_gather(F.normalize(z.float(), dim=1))
        self.z[idx] = z
        self.filled[idx] = True

    def state_dict(self):
        return {"z": self.z, "filled": self.filled}

    def load_state_dict(self, state):
        self.z.copy_(state["z"])
        self.filled.copy_(state["filled"])

    @torch.no_grad()
    def kmeans(self, k, iters=20, seed=0, chunk=65536, init=None):
        """Spherical k-means (cosine similarity, as the embeddings are normalized) with
        k-means++ seeding, or from the centroids `init` (k, d) (a warm start: the previous
        clustering's, so that clusters keep their ids), and a fixed number of Lloyd iterations.
        An empty cluster is re-seeded with the point farthest from its centroid. Deterministic
        for a seed; process 0's result is broadcast so that every process agrees.
        Returns labels (N,) long and centroids (k, d)."""
        x = self.z
        n = x.shape[0]
        if k > n:
            raise UserError(f"cannot make {k} clusters of {n} embeddings; lower --xattn-clusters.")
        if init is not None and tuple(init.shape) != (k, x.shape[1]):
            raise UserError(
                f"k-means: the saved centroids are {tuple(init.shape)}, not ({k}, {x.shape[1]}); "
                "--xattn-clusters differs from the run's."
            )
        g = torch.Generator(device=x.device).manual_seed(seed)

        def best(c):  # nearest centroid by cosine, chunked for large banks
            sims, labels = [], []
            for s in range(0, n, chunk):
                v, i = (x[s : s + chunk] @ c.T).max(dim=1)
                sims.append(v)
                labels.append(i)
            return torch.cat(sims), torch.cat(labels)

        if init is not None:
            c = F.normalize(init.to(x.device, torch.float32), dim=1)
        else:  # k-means++: each next centre drawn with probability proportional to squared distance
            centers = [x[torch.randint(n, (1,), generator=g, device=x.device)].squeeze(0)]
            d2 = (2 - 2 * (x @ centers[0])).clamp_min(0)
            for _ in range(1, k):
                p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
                centers.append(x[torch.multinomial(p, 1, generator=g)].squeeze(0))
                d2 = torch.minimum(d2, (2 - 2 * (x @ centers[-1])).clamp_min(0))
            c = torch.stack(centers)
        for _ in range(iters):
            sim, labels = best(c)
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):  # re-seed from the points worst served by their centroid
                far = sim.argsort()[: len(empty)]
                sums[empty], counts[empty] = x[far], 1
            c = F.normalize(sums / counts.clamp_min(1)[:, None], dim=1)
        labels = best(c)[1]
        if world_size() > 1:
            dist.broadcast(labels, 0)
            dist.broadcast(c, 0)
        return labels, c

    @staticmethod
    @torch.no_grad()
    def knn_predict(query, bank, bank_labels, num_classes, k=200, t=0.1, sharded=False):
        """Weighted kNN (Wu et al. 2018, Sec. 3.4): cosine similarity to the k nearest
        bank samples, votes weighted by exp(sim / t). query (B, D), bank (N, D),
        bank_labels (N,). Returns class scores (B, C); argmax is the prediction.
        sharded: `bank` is this process's share of the bank and `query` the same on every
        process; each process's k nearest (B, k) are gathered and the best k kept, so no
        process holds the whole bank (ImageNet's is ~10 GB for a ResNet-50)."""
        query, bank = F.normalize(query.float(), dim=1), F.normalize(bank.float(), dim=1)
        with torch.autocast(query.device.type, enabled=False):
            sim = query @ bank.T  # (B, N)
        if sharded and world_size() > 1:
            if (
                sim.shape[1] < k
            ):  # a share smaller than k (or empty): the missing neighbours vote with weight 0
                sim = torch.cat([sim, sim.new_full((len(sim), k - sim.shape[1]), float("-inf"))], 1)
            labels = torch.cat([bank_labels, bank_labels.new_zeros(max(0, k - len(bank_labels)))])
            sim, nn_idx = sim.topk(k, dim=1)  # (B, k) of this share
            sim, lab = (
                all_gather(a).unflatten(0, (world_size(), -1)).transpose(0, 1).flatten(1)
                for a in (sim, labels[nn_idx])
            )  # (B, W k)
            sim, best = sim.topk(k, dim=1)
            lab = lab.gather(1, best)
        else:
            sim, nn_idx = sim.topk(min(k, bank.shape[0]), dim=1)  # (B, k)
            lab = bank_labels[nn_idx]
        votes = F.one_hot(lab, num_classes).float()  # (B, k, C)
        return (votes * (sim / t).exp()[..., None]).sum(dim=1)


def knn_top1(
    train_h, train_y, test_h, test_y, num_classes, k=200, t=0.1, chunk=1024, sharded=False
):
    """kNN top-1 accuracy (a float in [0, 1]) of test features against a train bank.
    sharded: train_h, train_y are this process's share (extract_features(..., gather=False))."""
    correct = 0
    for s in range(0, len(test_h), chunk):
        scores = MemoryBank.knn_predict(
            test_h[s : s + chunk], train_h, train_y, num_classes, k, t, sharded
        )
        correct += (scores.argmax(1) == test_y[s : s + chunk]).sum().item()
    return correct / len(test_h)


@torch.no_grad()
def average_buffers(module):
    """Average the float buffers (BN running statistics) over all processes in one all-reduce, not
    one per buffer; under SyncBatchNorm they are equal everywhere already and nothing is sent."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    flat = torch._utils._flatten_dense_tensors(bufs)  # (sum of sizes,), as DDP packs its buckets
    dist.all_reduce(flat)
    flat.div_(world_size())
    torch._foreach_copy_(bufs, torch._utils._unflatten_dense_tensors(flat, bufs))


def reference_cache_path(name):
    """A file of the random-init references' cache: $CLEANSSL_CACHE, default ~/.cache/cleanssl."""
    folder = os.environ.get("CLEANSSL_CACHE") or os.path.expanduser("~/.cache/cleanssl")
    return os.path.join(folder, name)


def read_reference_cache(name):
    """{protocol: measurement} of one cache file, the same on every process (process 0 reads it
    and sends it: every process must agree on whether to measure); {} when there is none yet."""
    cache = {}
    if rank() == 0:
        try:
            with open(reference_cache_path(name)) as fh:
                cache = json.load(fh)
        except (OSError, ValueError):  # none yet, or cut short: measured again
            cache = {}
    if world_size() > 1:
        shared = [cache]
        dist.broadcast_object_list(shared, 0)
        cache = shared[0]
    return cache


def write_reference_cache(name, entries):
    """Process 0 merges `entries` with what other jobs wrote meanwhile and swaps the file in whole;
    a cache that cannot be written costs one measurement next time."""
    if rank() != 0:
        return
    path = reference_cache_path(name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as fh:
                merged = json.load(fh)
        except (OSError, ValueError):
            merged = {}
        merged.update(entries)
        with open(f"{path}.{os.getpid()}", "w") as fh:
            json.dump(merged, fh, indent=1, sort_keys=True)
        os.replace(f"{path}.{os.getpid()}", path)
    except OSError:
        pass


def random_init_knn(args, device=torch.device("cpu"), ks=(200,), test_limit=0, workers=0):
    """The reference a trained backbone has to beat: kNN top-1 of the same architecture at its
    random initialization, measured with a run's protocol. `args`: anything with the run flags
    dataset, data_dir, backbone, image_size and knn_limit (a method script's args, or args.json
    as a Namespace). The backbone is build_backbone(backbone, size <= 64) drawn under seed 0
    (torchvision's default init; the caller's random state is left as it was), in eval mode as
    every kNN here; the bank is knn_bank(..., knn_limit) of the training split, the queries the
    test split (its fixed seed-0 subset of `test_limit` images when that is set, as eval_linear's
    --test-limit); weighted votes at t = 0.1 for each k of `ks` (200: the online monitor; 20 and
    200: eval_linear.py). Measured once per (data set, data folder, backbone, image side, bank
    limit, test limit, k) and kept in random_init_knn.json under $CLEANSSL_CACHE (default
    ~/.cache/cleanssl). Every process must call it (the features are gathered); process 0
    decides whether the cache holds it and writes it. Returns {"knn_top1_k<k>": top-1 in [0, 1]
    for each k, "n_bank": images in the bank, "n_test": test images}."""
    size = args.image_size or IMAGE_SIZE[args.dataset]
    limit = args.knn_limit
    if limit is None:  # knn_bank's default
        limit = KNN_LIMIT_FOLDER if args.dataset == "folder" else 0
    where = "" if args.dataset == "digits" else os.path.abspath(args.data_dir)  # digits: built in
    protocol = f"{args.dataset}|{where}|{args.backbone}|{size}px|bank {limit}|test {test_limit}"
    keys = {k: f"{protocol}|k {k}" for k in ks}
    cache = read_reference_cache("random_init_knn.json")
    if any(key not in cache for key in keys.values()):
        train = make_dataset(args.dataset, args.data_dir, train=True, download=False)
        bank = knn_bank(args.dataset, args.data_dir, train, limit)
        test = make_dataset(args.dataset, args.data_dir, train=False, download=False)
        classes = len(test.classes)
        if test_limit and test_limit < len(test):  # eval_linear's fixed_subset
            keep = np.random.RandomState(0).permutation(len(test))[:test_limit]
            test = torch.utils.data.Subset(test, np.sort(keep).tolist())
        native, stats = IMAGE_SIZE[args.dataset], STATS[args.dataset]
        # the weights and the DataLoaders' seeds come from seed 0, not from the caller's stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_backbone(args.backbone, size <= 64).to(device)
            bank_h, bank_y = extract_features(
                net, bank, size, stats, native, device, workers=workers, precision="fp32"
            )
            test_h, test_y = extract_features(
                net, test, size, stats, native, device, workers=workers, precision="fp32"
            )
        for k, key in keys.items():
            top1 = knn_top1(bank_h, bank_y, test_h, test_y, classes, k=k)
            cache[key] = {"top1": top1, "n_bank": len(bank), "n_test": len(test)}
        write_reference_cache("random_init_knn.json", {key: cache[key] for key in keys.values()})
    first = cache[keys[ks[0]]]
    return {
        **{f"knn_top1_k{k}": cache[key]["top1"] for k, key in keys.items()},
        "n_bank": first["n_bank"],
        "n_test": first["n_test"],
    }


class PseudoLabels:
    """The k-means pseudo-labels of the spatial cross-attention add-on (Seyfi et al., Sec. 2.1):
    at the start of every `every`-th epoch the whole training set is embedded (`embed(model, x)`,
    the method's z) and clustered into `clusters` groups; each image's cluster is its label, and
    the loader draws its positives from it. k-means starts from the previous clustering's
    centroids: Lloyd iterations from them reach the old assignment again where the embeddings
    have not moved, so a cluster keeps its id (and the classifier of L_cls its meaning) from one
    clustering to the next; re-seeded k-means would number the clusters anew. `state()` is the
    checkpoint's part; an epoch resumed part-way keeps its labels."""

    def __init__(self, saved, device):
        labels = saved.get("pseudo_labels")
        self.centroids = saved.get("centroids")  # (K_c, d) or None: k-means++ seeding
        self.labels = labels.to(device) if labels is not None else None  # (N,)

    def state(self):
        return {"centroids": self.centroids, "pseudo_labels": self.labels}

    def new_epoch(self, run, model, embed):
        """At an epoch's start: cluster every --xattn-cluster-every epochs, then hand the labels
        to the run's loader, which draws --xattn-positives positives per image from them."""
        a = run.args
        if self.labels is None or (
            run.epoch % a.xattn_cluster_every == 0 and not run.at.get("step")
        ):
            self.labels, self.centroids = cluster(
                model,
                embed,
                run.train_set,
                run.size,
                run.stats,
                run.native,
                run.device,
                a.xattn_clusters,
                a.seed * 1000 + run.epoch,
                self.centroids,
                workers=a.workers,
                data_path=a.data_path,
                precision=a.precision,
            )
        run.train_loader.set_clusters(self.labels.cpu().numpy(), a.xattn_positives)


def cluster(
    model, embed, dataset, size, stats, native, device, clusters, seed, centroids=None, **extract
):
    """Embed every image of `dataset` and cluster the normalized embeddings with k-means from
    `centroids` (None: k-means++ seeding). Returns each image's label (N,) on `device` and the
    centroids (K, d), identical on every process."""
    # Seyfi et al. embed theta(T(I)), a training view through the network as it trains; here the
    # eval transform in eval mode (BN running statistics): one image, one embedding everywhere
    z, _ = extract_features(
        model,
        dataset,
        size,
        stats,
        native,
        device,
        embed=embed,
        progress="xattn memory bank",
        **extract,
    )
    bank = MemoryBank(len(dataset), z.shape[1], device)
    bank.z.copy_(F.normalize(z, dim=1))
    return bank.kmeans(clusters, seed=seed, init=centroids)


def at_least_one(text):
    """argparse type: a whole number >= 1 (else argparse's one-line error, exit 2)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return int(text)


# ---------------------------------------------------------------- 7. Grad-CAM
def grad_cam(model, images, target, out_size=None):
    """Grad-CAM (Selvaraju et al. 2017) on the last feature map of a Backbone.

    model: a Backbone (or any module returning (f, h)); images (B, 3, H, W);
    target: what the heatmap explains, one scalar per image:
      - an int j: feature j of h;
      - a list/tensor of feature indices: their sum; a (B, D) bool/float mask: the
        per-image sum of the selected features (e.g. each image's highly activating set);
      - a callable h -> (B,) scores, e.g. `lambda h: classifier(h)[range(B), labels]`.
    Returns heatmaps (B, H, W) in [0, 1] (per-image max normalization), at `out_size`
    (default: the image size)."""
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        f, h = model(
            images
        )  # h raw: Q-Score picks L_i on L2-normalized h, but the targets below are raw h's features
        f.retain_grad()
        if callable(target):
            score = target(h)
        elif isinstance(target, int):
            score = h[:, target]
        else:
            target = torch.as_tensor(target, device=h.device)
            if target.dim() == 2:
                score = (h * target.to(h.dtype)).sum(1)
            else:
                score = h[:, target].sum(1)
        grads = torch.autograd.grad(score.sum(), f)[0]  # (B, D, h, w)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k: global-average-pooled gradients
    cam = F.relu((weights * f).sum(1, keepdim=True)).detach()  # (B, 1, h, w)
    cam = F.interpolate(
        cam, size=out_size or images.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    cam = cam / cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    model.train(was_training)
    return cam


# ---------------------------------------------------------------- 8. optimizer and schedule
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
    A zero ||w|| or ||g|| leaves the trust at 1. Momentum accumulates the scaled d.
    A group's `lr_scale` (Run.schedule: its lr is the schedule's times lr_scale) acts after the
    trust ratio in both forms: the clip compares eta ||w|| / (...) with the unscaled lr, so such a
    group always steps lr_scale times what an unscaled group with the same norms would."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, mode="official"):
        if mode not in ("official", "clip"):
            raise ValueError(f"LARS mode '{mode}': choose official or clip")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True, mode=mode
        )
        super().__init__(params, defaults)

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
                        lr = g["lr"] / g.get("lr_scale", 1.0)  # the schedule's lr
                        if lr > 0:
                            trust = (trust / lr).clamp(max=1.0)
                    else:
                        g_norm = d.norm()
                        trust = g["eta"] * w_norm / g_norm
                    # on the device: no host sync
                    d = d * torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0)
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def param_groups(model, exclude_bias_norm=True):
    """Biases and norm weights (1-d tensors) get no weight decay and no LARS adaptation;
    exclude_bias_norm=False treats them like every other weight."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_bias_norm:
        return [{"params": params}]
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False},
    ]


def lr_at(step, total, warmup, base):
    """Per-step schedule: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------- 9. the run harness
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks (its commands) and shows every flag's default."""


def backbone_name(name):
    """--backbone's type: a key of BACKBONES, else one sentence (UserError, which argparse lets
    through to main_of: exit 2 without the usage text)."""
    if name not in BACKBONES:
        raise UserError(f"--backbone {name}: unknown; choose one of {', '.join(BACKBONES)}.")
    return name


def add_run_flags(p):
    """The flags every method script shares, after its own: data, backbone, device, run folder,
    resume, checkpoints, logging. (The recipe's numbers, epochs, batch and lr, are the method's.)"""
    p.add_argument(
        "--dataset", default="digits", choices=DATASETS, help="data set; digits needs no download"
    )
    p.add_argument(
        "--data-dir",
        default="data",
        help="where torchvision data sets are downloaded, or the ImageFolder root",
    )
    p.add_argument(
        "--backbone",
        default="resnet18",
        type=backbone_name,  # not choices: an unknown name is one sentence, not 30 lines of usage
        metavar="{" + ",".join(BACKBONES) + "}",
        help="ResNet; resnet18-half/-quarter/-eighth have 1/2, 1/4, 1/8 of the channels",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="(global) crop side in pixels; 0: the data set's native size",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of weights, data order and augmentations"
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
        help="data-loader processes per training process (default: 4, or fewer cores)",
    )
    p.add_argument(
        "--data-path",
        default="auto",
        choices=DATA_PATHS,
        help="tensor: decode once, augment batches on the device; cpu: PIL in --workers "
        "processes; auto: tensor on CUDA when the data set fits in memory, else cpu",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="bf16: bf16 autocast and channels_last (the losses stay float32); fp32: "
        "neither; auto: bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model and the tensor data path's augmentations",
    )
    p.add_argument(
        "--run-dir",
        default="",
        help="output folder (default runs/<method>_<dataset>_s<seed>_<time>); one that "
        "holds a checkpoint.pt is continued",
    )
    p.add_argument(
        "--resume",
        default="",
        help="run folder (or checkpoint.pt) of a stopped run to continue, with its flags",
    )
    p.add_argument(
        "--checkpoint-every-min",
        type=float,
        default=30,
        help="also checkpoint every M minutes inside an epoch; 0: at epoch ends only",
    )
    p.add_argument(
        "--check-data",
        action="store_true",
        help="decode every file of a --dataset folder first; exit 2 naming bad ones",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=0,
        help="cap on steps per epoch, for tests and benchmarks; 0: all",
    )
    p.add_argument(
        "--knn-every",
        type=int,
        default=1,
        help="online kNN evaluation every N epochs (and after the last); 0: never",
    )
    p.add_argument(
        "--knn-limit",
        type=int,
        default=None,
        help="kNN bank: this many training images; 0: all; default: all, 50000 for folders",
    )
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    p.add_argument(
        "--log-seconds",
        type=float,
        default=30,
        help="progress line also every S seconds (an epoch's first after 10 s)",
    )


# (flag, the smallest value it takes, what that means): the numbers every method script shares
RUN_NUMBERS = (
    ("batch_size", 1, "a positive number of images"),
    ("epochs", 1, "at least 1"),
    ("steps_per_epoch", 0, "0 (all) or more"),
    ("image_size", 0, "0 (the data set's own) or a positive side in pixels"),
    ("workers", 0, "0 (load in the training process) or more"),
    ("warmup_epochs", 0, "0 or more"),
    ("checkpoint_every_min", 0, "0 (at epoch ends only) or more minutes"),
    ("knn_every", 0, "0 (never) or more epochs"),
    ("knn_limit", 0, "0 (all) or more images"),
    ("log_every", 1, "at least 1"),
    ("log_seconds", 0, "0 or more seconds"),
)


def check_numbers(args):
    """UserError for the first shared number out of its range (RUN_NUMBERS; --lr positive)."""
    for flag, low, meaning in RUN_NUMBERS:
        v = getattr(args, flag, None)
        if v is not None and not (math.isfinite(v) and v >= low):
            raise UserError(f"--{flag.replace('_', '-')} {v}: it must be {meaning}.")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr {lr}: it must be a positive number.")


def check_writable(folder):
    """UserError unless `folder` is, or can be made, a folder this process writes in: it or its
    nearest existing parent is tried with a temporary file (root ignores permission bits)."""
    import tempfile

    top = os.path.abspath(folder)
    while not os.path.exists(top):
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        raise UserError(f"--run-dir '{folder}': '{top}' is a file, not a folder.")
    try:
        tempfile.TemporaryFile(dir=top).close()
    except OSError as e:
        raise UserError(
            f"--run-dir '{folder}': '{top}' cannot be written ({e.strerror}); pick another folder."
        ) from e


def load_checkpoint(path):
    """torch.load of a checkpoint, or one sentence when the file is cut short or not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # RuntimeError (zip), EOFError, UnpicklingError, ...
        ckpt, reason = None, f"{type(e).__name__}"
    else:
        reason = "not a checkpoint of these scripts"
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict)):
        size = os.path.getsize(path)
        raise UserError(
            f"the checkpoint '{path}' cannot be read ({'0 bytes' if not size else reason}), "
            "so it is cut short or another file: delete it to start that run again, or pass "
            "--resume another checkpoint."
        )
    return ckpt


def check_run(args, method, check=None):
    """Bad input gets one sentence (UserError, exit 2) before any work. Also loads the checkpoint
    that the run continues (--resume's, or --run-dir's) and checks it: this method, this backbone,
    `check(args, checkpoint)` (the method's own checks, the checkpoint None for a new run), the same
    flags. Returns (checkpoint or None, its run folder or None)."""
    check_numbers(args)
    check_dataset(args.dataset, args.data_dir)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise UserError(
            f"--batch-size {args.batch_size} is not divisible by the {world} processes."
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no GPU is visible.")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.compile and args.sync_bn and world > 1 and cuda:  # SyncBatchNorm: CUDA and DDP only
        raise UserError(
            "--compile with SyncBatchNorm under DDP hits an open PyTorch bug "
            "(pytorch/pytorch#107372): pass --no-sync-bn or leave out --compile."
        )
    path = checkpoint_to_resume(args.resume, args.run_dir)
    ckpt = None
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--resume: no checkpoint at '{path}'.")
        ckpt = load_checkpoint(path)
        # auto-resume (no --resume): the checkpoint that --run-dir holds
        which = f"--resume: '{path}'" if args.resume else f"the checkpoint in --run-dir, '{path}',"
        if ckpt.get("method") != method:
            raise UserError(f"{which} is a {ckpt.get('method')} checkpoint, not {method}.")
        if ckpt["args"].get("backbone") != args.backbone:
            raise UserError(
                f"{which} holds a {ckpt['args'].get('backbone')}, not --backbone {args.backbone}."
            )
    check_writable(os.path.dirname(path) if path else args.run_dir or "runs")
    if ckpt is not None and ckpt["args"].get("xattn") and "centroids" not in ckpt:
        raise UserError(
            f"{which} holds no k-means centroids (it was written before they were saved), so a "
            "resumed --xattn run would renumber its clusters under the trained classifier: "
            "continue it with the CleanSSL version that wrote it, or start another --run-dir."
        )
    if check is not None:
        check(args, ckpt)
    if ckpt is None:
        return None, None
    check_resume(ckpt["args"], args, path)  # the same run, or one sentence
    return ckpt, os.path.dirname(path)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill or a full disk leaves the old file whole.
    A full disk or quota is OSError ENOSPC or EDQUOT (main_of: exit EXIT_WRITE), also when torch's
    serializer reports it as a RuntimeError ("unexpected pos ...")."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename: a node's crash leaves no empty file
        os.replace(tmp, path)
    except BaseException as e:
        full = None
        if isinstance(e, RuntimeError):  # the write's OSError, or a folder with no space left
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                full = cause.errno
            else:
                fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
                full = errno.ENOSPC if fs.f_bavail * fs.f_frsize < 2**20 else None
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise OSError(full, os.strerror(full), path) from e
        if isinstance(e, OSError):
            e.filename = path
        raise


def tensorboard_tag(key):
    """A metric's TensorBoard tag, grouped by kind: loss/, knn/, qscore/, speed/, schedule/ (lr and
    the methods' momenta and temperatures), monitor/ (collapse, bad images)."""
    if key.startswith("loss"):
        return f"loss/{key}"
    for kind in ("knn", "qscore"):
        if key.startswith(kind):
            return f"{kind}/{key}"
    if key in ("images_per_s", "seconds", "peak_mem_gb"):
        return f"speed/{key}"
    if key in ("collapse_std", "bad_images"):
        return f"monitor/{key}"
    return f"schedule/{key}"


def tensorboard_writer(run_dir, flags=None):
    """TensorBoard events in the run folder (`tensorboard --logdir runs`) when the optional
    tensorboard package is installed, else a function that does nothing. Returns write(scalars,
    x): each name under tensorboard_tag(name) at x (the epoch for an epoch's metrics, the
    iteration for the per-step loss). `flags` (the run's args) go to the HPARAMS tab, beside the
    final kNN."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError:
        return lambda scalars, x: None
    writer = SummaryWriter(run_dir)
    if flags:
        plain = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flags.items()
        }
        for summary in hparams(plain, {"knn/knn_top1": 0.0}):  # the metric's name, not a value
            writer.file_writer.add_summary(summary)

    def write(scalars, x):
        for k, v in scalars.items():
            writer.add_scalar(tensorboard_tag(k), v, x)
        writer.flush()

    return write


def epoch_line(m, epochs):
    """For a person, rounded: loss terms | online kNN | Q-Score | collapse monitor | speed."""
    terms = " ".join(
        f"{k[5:].replace('qscore', 'qscore-reg')} {v:.3f}"
        for k, v in m.items()
        if k.startswith("loss_")
    )
    knn = f"  online-knn {m['knn_top1']:.3f}" if "knn_top1" in m else ""
    if "knn_random_init" in m:  # the same architecture at its random init, the same protocol
        below = ", below it" if m["knn_top1"] < m["knn_random_init"] else ""
        knn += f" (random init {m['knn_random_init']:.3f}{below})"
    mem = f"  {m['peak_mem_gb']:.1f} GB" if m["peak_mem_gb"] else ""
    return (
        f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.3f} ({terms}){knn}  "
        f"qscore {m['qscore']:.3f} |L| {m['qscore_active']:.1f} "
        f"under-alpha {m['qscore_under_alpha']:.0%}  collapse-std {m['collapse_std']:.3f}  "
        f"{m['images_per_s']:.1f} img/s{mem}  {duration(m['seconds'])}"
    )


class Run:
    """The plumbing of one training run, so that a method script shows its method. In order:

        run = common.Run(args, METHOD)          # flags checked, device, processes, seeds,
                                                # folder, data
        loader = run.loader(views, positive)    # the TrainLoader; run.epoch_steps, the schedule
        ...the model, its optimizer...
        saved = run.resume()                    # the checkpoint's contents ({} for a new run)
        for epoch in run.epochs(state, model.backbone):  # state(): the method's part of a
                                                # checkpoint; backbone: the kNN's
            for step, it, crops, idx, positives in run.steps():
                lr = run.schedule(optimizer, it)
                ...forward, loss, backward, step...
                if (code := run.step_done(loss, terms, batch)) is not None:
                    return code                 # non-finite loss (1) or a stop signal (75)
            if (code := run.end_epoch(backbone, **extra)) is not None:
                return code
        return run.finish()

    What it keeps: the running metric sums on the device (the host reads them at log steps only),
    the finite check, progress lines, mid-epoch checkpoints and the stop decision of RunControl, and
    at each epoch's end the all-reduce of the sums, the online kNN, metrics.jsonl, checkpoint.pt,
    backbone.pt, TensorBoard and the epoch line. Only process 0 writes files and prints."""

    def __init__(self, args, method, check=None):
        self.ckpt, resume_dir = check_run(args, method, check)
        self.args, self.method = args, method
        self.knn_init = self.random_init = None  # kNN before the first step; the reference's
        self.distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
        self.cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        )
        self.bf16 = use_bf16(args.precision, self.device)  # bf16 autocast + channels_last: CUDA's
        if self.distributed:
            dist.init_process_group("nccl" if self.cuda else "gloo")
        self.rank, self.world = rank(), world_size()
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = True  # convolutions
            # Under bf16 autocast the only float32 matrix products are the ones the scripts ask
            # for (losses, float32 heads): TF32 would cost them ~1% after a division by 0.05.
            torch.set_float32_matmul_precision("highest")
        self.dir = (
            resume_dir
            or args.run_dir
            or os.path.join("runs", f"{method}_{args.dataset}_s{args.seed}_{int(time.time())}")
        )
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            for name in ("checkpoint.pt.tmp", "backbone.pt.tmp"):  # a crash's, still holding disk
                if os.path.isfile(os.path.join(self.dir, name)):
                    os.remove(os.path.join(self.dir, name))
            with open(os.path.join(self.dir, "args.json"), "w") as fh:
                json.dump(vars(args), fh, indent=2)
            self._tensorboard = tensorboard_writer(self.dir, vars(args))
        if args.sync_bn and self.distributed and not self.cuda and self.rank == 0:
            print(
                "note: SyncBatchNorm needs CUDA; on CPU each process normalizes its own share of "
                "the batch.",
                flush=True,
            )
        # data: the training split, and the online kNN's bank (a fixed subset of it) and test split
        self.native = IMAGE_SIZE[args.dataset]
        self.size = args.image_size or self.native
        self.stats = STATS[args.dataset]
        self.train_set = make_dataset(args.dataset, args.data_dir, train=True)
        self.knn_train = knn_bank(args.dataset, args.data_dir, self.train_set, args.knn_limit)
        self.knn_test = make_dataset(args.dataset, args.data_dir, train=False)
        if args.check_data:  # every file decoded now: a bad one is named before any work
            check_images([self.train_set, self.knn_test], args.workers)
        self.lr = 0.0

    def loader(self, views, positive):
        """The TrainLoader of the method's views (and the cross-attention positives' view); sets
        the steps per epoch and the learning-rate schedule (warm-up, cosine) from it."""
        a = self.args
        self.train_loader = TrainLoader(
            self.train_set,
            views,
            a.batch_size,
            self.stats,
            self.device,
            seed=a.seed,
            workers=a.workers,
            positive=positive,
            data_path=a.data_path,
            compile=a.compile,
        )
        n = len(self.train_loader)
        self.epoch_steps = min(n, a.steps_per_epoch) if a.steps_per_epoch else n
        self.base_lr = a.lr * a.batch_size / 256  # --lr is per 256 images
        self.total, self.warmup = (
            a.epochs * self.epoch_steps,
            int(a.warmup_epochs * self.epoch_steps),
        )
        return self.train_loader

    def ddp(self, model):
        """The model wrapped for DDP (gradients averaged over processes in backward) when there
        are several processes, and compiled with --compile: by torch's default backend, inductor,
        unless $CLEANSSL_COMPILE_BACKEND names another. The test suite sets aot_eager, which traces
        the same graphs (dynamo, AOT autograd, DDP's graph splits) without inductor's code
        generation, about 34 s for a ResNet-18's forward and backward on 2 CPU cores."""
        if self.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.cuda else None
            )
        if not self.args.compile:
            return model
        return torch.compile(model, backend=os.environ.get("CLEANSSL_COMPILE_BACKEND", "inductor"))

    def resume(self):
        """Checkpoint contents for a resumed run ({} for a new one); sets where it continues."""
        self.start_epoch, self.resume_at = 0, {}
        if self.ckpt is None:
            return {}
        self.start_epoch, self.resume_at = self.ckpt["epoch"], self.ckpt.get("at") or {}
        self.knn_init = self.ckpt.get("knn_init")
        return self.ckpt

    def epochs(self, state, backbone=None, title=None, details=""):
        """The run's header, then each epoch to train, with its data order and randomness seeded
        (a resumed epoch replays them). state(): the method's part of a checkpoint (model,
        optimizer, momentum copies, queues...), called on every process at each checkpoint.
        backbone: the network the online kNN measures; a new run measures it once before its
        first step (epoch 1's "knn_top1_init"), beside the random-init reference."""
        a = self.args
        if self.rank == 0:
            print(
                f"{title or self.method}: {a.dataset} {len(self.train_set)} images at "
                f"{self.size}px, {a.backbone}, {self.world} process(es) on {self.device.type}, "
                f"{details}batch {a.batch_size}, {self.epoch_steps} steps/epoch -> {self.dir}",
                flush=True,
            )
            if self.ckpt is not None:
                resume_note(self.ckpt, self.dir, self.world, a.batch_size)
        self.state = state
        if backbone is not None and a.knn_every and self.ckpt is None:
            self.knn_init = self._knn(backbone, f"epoch 0/{a.epochs}")  # eval mode, then as it was
            reference = self._random_init()  # on every process: its features are gathered
            if self.rank == 0:
                print(
                    f"epoch 0/{a.epochs}  online-knn {self.knn_init:.3f} before the first step "
                    f"(random init of {a.backbone} under seed 0: {reference:.3f})",
                    flush=True,
                )
        self.control = RunControl(a.checkpoint_every_min)  # stop signals, checkpoint clock
        for epoch in range(self.start_epoch, a.epochs):
            torch.manual_seed(a.seed * 1000 + epoch)  # a resumed epoch replays the same randomness
            self.epoch = epoch
            self.at = self.resume_at if epoch == self.start_epoch else {}  # a mid-epoch position
            self.train_loader.set_epoch(
                epoch,
                start_step=self.at.get("step", 0),
                bad_images=self.at.get("bad_images", 0) if self.rank == 0 else 0,
            )
            yield epoch

    def steps(self):
        """(step, iteration, crops, indices, positives) of each step of the epoch, from where a
        mid-epoch checkpoint stopped; each step's own randomness is seeded by its iteration."""
        a, at = self.args, self.at
        self.sums = {k: v.to(self.device) for k, v in at.get("sums", {}).items()}
        self.bad = torch.zeros((), device=self.device)  # first non-finite step + 1, or 0
        self.t0, self.seen = time.time() - at.get("seconds", 0.0), at.get("seen", 0)
        self.next_line = self.t0 + min(10.0, a.log_seconds)  # a first progress line soon
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        for step, (crops, idx, positives) in enumerate(self.train_loader, start=at.get("step", 0)):
            if step >= self.epoch_steps:
                break
            it = self.epoch * self.epoch_steps + step
            torch.manual_seed(a.seed * 1000003 + it)  # what a step draws replays from any step
            if self.bf16:  # the positives too: a torch.cat of mixed memory formats is a copy
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
                if positives is not None:
                    positives = positives.contiguous(memory_format=torch.channels_last)
            self.step = step
            yield step, it, crops, idx, positives

    def schedule(self, optimizer, it):
        """Each group's lr at iteration `it`: warm-up then cosine, times the group's lr_scale;
        a group marked fix_lr keeps the base lr."""
        self.lr = lr_at(it, self.total, self.warmup, self.base_lr)
        for g in optimizer.param_groups:
            g["lr"] = (self.base_lr if g.get("fix_lr") else self.lr) * g.get("lr_scale", 1.0)
        return self.lr

    def step_done(self, loss, terms, batch):
        """After the optimizer step: add `terms` (name -> tensor) to the epoch's sums, note a
        non-finite loss, print progress, and checkpoint or stop when RunControl says so. Returns
        an exit code to end the run with, or None to go on."""
        a, step = self.args, self.step
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.bad = torch.where(
            (self.bad == 0) & ~torch.isfinite(loss.detach()),
            torch.full_like(self.bad, step + 1.0),
            self.bad,
        )
        self.seen += batch * self.world
        log = (
            step + 1
        ) % a.log_every == 0 or step + 1 == self.epoch_steps  # the same on every process
        if log and self._non_finite():  # an all-reduce, so never on a time-based line
            return 1
        if self.rank == 0 and (log or time.time() >= self.next_line):  # rank 0 alone: no collective
            self._progress(loss)
        stop, due = self.control.poll()  # the same answer on every process, at the same step
        if (
            stop or due
        ) and step + 1 < self.epoch_steps:  # an epoch's last step: its end checkpoint follows
            if self._non_finite():  # never a checkpoint of a broken run
                return 1
            self.checkpoint(
                self.epoch,
                self.control.position(
                    step + 1,
                    self.seen,
                    time.time() - self.t0,
                    self.sums,
                    self.train_loader.bad_images,
                ),
            )
            if stop:
                return self.control.stop(
                    f"at epoch {self.epoch + 1} step {step + 1}/{self.epoch_steps}", self.dir
                )
        return None

    def end_epoch(self, backbone, **extra):
        """The epoch's metrics (`extra` first: the method's schedules), the online kNN of
        `backbone`, metrics.jsonl, checkpoint.pt, backbone.pt and the epoch line. Returns an exit
        code to end the run with, or None to go on."""
        a, epoch = self.args, self.epoch
        seconds = time.time() - self.t0
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0  # before the kNN
        if self._non_finite():
            return 1
        metrics = {"epoch": epoch + 1, "lr": self.lr, **extra}
        for k, v in self.sums.items():
            if self.distributed:
                dist.all_reduce(v)
                v = v / self.world
            metrics[k] = v.item() / self.epoch_steps
        if self.knn_init is not None and epoch == 0:  # the kNN before the first step
            metrics["knn_top1_init"] = self.knn_init
        if a.knn_every and ((epoch + 1) % a.knn_every == 0 or epoch + 1 == a.epochs):
            metrics["knn_top1"] = self._knn(backbone, f"epoch {epoch + 1}/{a.epochs}")
            metrics["knn_random_init"] = self._random_init()
        metrics.update(
            images_per_s=self.seen / seconds,
            seconds=seconds,
            peak_mem_gb=peak_gb,
            bad_images=self.control.total(self.train_loader.bad_images),
        )
        if self.rank == 0:
            with open(os.path.join(self.dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
        self.checkpoint(epoch + 1)
        if self.rank == 0:
            save_atomic(backbone.state_dict(), os.path.join(self.dir, "backbone.pt"))
            self._tensorboard({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1)
            print(epoch_line(metrics, a.epochs), flush=True)
        if self.distributed:
            dist.barrier()
        if epoch + 1 < a.epochs and self.control.poll(force=True)[0]:  # a signal in the kNN pass
            return self.control.stop(f"at the end of epoch {epoch + 1}", self.dir)
        return None

    def _knn(self, backbone, when):
        """Online kNN top-1 of `backbone` (eval mode; the bank and the test split), with a line
        first: the pass takes a while on a large bank."""
        if self.rank == 0:
            print(
                f"{when}: online kNN of {len(self.knn_test)} test images against a bank of "
                f"{len(self.knn_train)} ...",
                flush=True,
            )
        # The BN running statistics each process updated from its own share in the last
        # step: process 0's, which backbone.pt holds and DDP's next forward broadcasts anyway
        for b in backbone.buffers() if self.distributed else ():
            dist.broadcast(b, 0)
        a = self.args
        features = functools.partial(
            extract_features,
            backbone,
            size=self.size,
            stats=self.stats,
            native=self.native,
            device=self.device,
            workers=a.workers,
            data_path=a.data_path,
            precision=a.precision,
        )
        htr, ytr = features(self.knn_train, gather=False)  # this process's share of the bank
        hte, yte = features(self.knn_test)
        return knn_top1(htr, ytr, hte, yte, len(self.knn_test.classes), sharded=True)

    def _random_init(self):
        """The reference: this architecture's kNN at its random init (random_init_knn, measured
        once per protocol and cached)."""
        if self.random_init is None:
            self.random_init = random_init_knn(self.args, self.device, workers=self.args.workers)
        return self.random_init["knn_top1_k200"]

    def finish(self):
        """The end of a run that trained every epoch: where its outputs are, what to run next;
        exit code 0."""
        if self.rank == 0:
            print(
                f"done: {self.dir} holds backbone.pt (the trained backbone), metrics.jsonl "
                "(each epoch), steps.jsonl (the loss every --log-every steps), args.json and "
                "checkpoint.pt. Next:\n"
                f"  python eval_linear.py {self.dir}    # linear probe and kNN of the backbone\n"
                f"  python interpret.py {self.dir}      # the report page: Q-Score, heatmaps",
                flush=True,
            )
        if self.distributed:
            dist.destroy_process_group()
        return 0

    def checkpoint(self, epoch, at=None):
        """checkpoint.pt: epochs done, the position inside the next one (mid-epoch), the method's
        state. steps_done is set first, for a method whose state counts steps."""
        self.steps_done = epoch * self.epoch_steps + (at or {}).get("step", 0)
        state = self.state()  # on every process: a method may gather its state (SwAV's queue)
        if self.rank == 0:
            save_atomic(
                {
                    "method": self.method,
                    "args": vars(self.args),
                    "world": self.world,
                    "epoch": epoch,
                    "at": at,
                    "knn_init": self.knn_init,
                    **state,
                },
                os.path.join(self.dir, "checkpoint.pt"),
            )
        self.control.saved()

    def _non_finite(self):
        """Stop every process at once when a loss went non-finite; the last checkpoint stays."""
        if self.distributed:
            dist.all_reduce(self.bad, op=dist.ReduceOp.MAX)
        if self.bad.item() == 0:
            return False
        if self.rank == 0:
            print(
                f"error: the loss became non-finite at epoch {self.epoch + 1}, step "
                f"{int(self.bad.item())}; stopping, the last good checkpoint stays in {self.dir}.",
                flush=True,
            )
        return True

    def _progress(self, loss):
        """A progress line from rank 0 (loss.item() waits for the device)."""
        a, step = self.args, self.step
        el = time.time() - self.t0
        left = el / (step + 1) * ((a.epochs - self.epoch) * self.epoch_steps - step - 1)
        value = loss.item()
        print(
            f"epoch {self.epoch + 1}/{a.epochs}  step {step + 1}/{self.epoch_steps}  "
            f"loss {value:.4f}  lr {self.lr:.4g}  {self.seen / el:.1f} img/s  "
            f"{duration(left)} left",
            flush=True,
        )
        it = self.epoch * self.epoch_steps + step + 1  # steps done
        line = {"epoch": self.epoch + 1, "step": step + 1, "it": it, "loss": value, "lr": self.lr}
        with open(os.path.join(self.dir, "steps.jsonl"), "a") as fh:
            fh.write(json.dumps(line) + "\n")
        self._tensorboard({"loss_step": value, "lr_step": self.lr}, it)
        self.next_line = time.time() + a.log_seconds


def main_of(main, parse_args):
    """A method script's `__main__`: stop signals caught from the training loop on (SIGTERM,
    SIGUSR1: checkpoint and EXIT_STOPPED); bad input one sentence and exit 2; a full disk
    EXIT_WRITE."""
    catch_stop_signals()
    try:
        raise SystemExit(main(parse_args()))
    except UserError as e:
        fail(str(e))
    except OSError as e:
        fail_write(e)
