"""No training step waits for the host (DESIGN.md, Distributed; issue 39), proven on the CPU.

A CUDA step that reads a device value on the host (.item(), float(), bool(), a boolean mask's
nonzero) or copies host data to the device (torch.tensor, torch.as_tensor, a Python list or
scalar used as an index or assigned into a tensor) stalls the host until the GPU has drained its
queue. On the CPU nothing stalls, but the same calls reach PyTorch's dispatcher, so a trace of
one whole training step of every method script, at the aten level (TorchDispatchMode) and at
the Python level (TorchFunctionMode, for .cpu(), .numpy(), .tolist()), finds them. Mutation
tests show that the tracer sees each kind of call inside a step. The three syncs the trace first
found (SwAV's list index, DINO's boolean mask, SimCLR's scalar assignment) are gone; their
replacements compute bit for bit what the old expressions did.
"""

import importlib
import itertools
import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# aten ops that make the host wait for a CUDA device, and why.
SYNC_OPS = {
    "aten._local_scalar_dense": "a device value read on the host (.item(), float(), int(), bool())",
    "aten.is_nonzero": "a tensor's truth value read on the host",
    "aten.equal": "torch.equal returns a Python bool",
    "aten.nonzero": "nonzero: its output size depends on the data",
    "aten.masked_select": "masked_select: its output size depends on the data",
    "aten.unique_dim": "unique: its output size depends on the data",
    "aten._unique": "unique: its output size depends on the data",
    "aten._unique2": "unique: its output size depends on the data",
    "aten.unique_consecutive": "unique: its output size depends on the data",
    "aten.bincount": "bincount: its output size depends on the data",
    "aten.lift_fresh": "a tensor made from host data (torch.tensor, torch.as_tensor, "
    "torch.from_numpy, a Python scalar assigned into a tensor): on CUDA a "
    "host->device copy",
    "aten.lift_fresh_copy": "a tensor made from host data: on CUDA a host->device copy",
}
# Indexing with a boolean (or uint8) mask runs nonzero inside the kernel on CUDA, forward and
# backward: on the CPU the mask reaches these ops undecomposed, so their index dtypes tell.
INDEX_OPS = {
    "aten.index",
    "aten.index_put",
    "aten.index_put_",
    "aten._index_put_impl_",
    "aten._unsafe_index",
    "aten._unsafe_index_put",
}
# Python-level calls with no aten op of their own on the CPU.
HOST_CALLS = {
    torch.Tensor.cpu: ".cpu(): a device->host copy",
    torch.Tensor.numpy: ".numpy(): the data on the host",
    torch.Tensor.tolist: ".tolist(): the data on the host",
    torch.Tensor.item: ".item(): a device value read on the host",
    torch.Tensor.__array__: "numpy.asarray(tensor): the data on the host",
    torch.Tensor.pin_memory: ".pin_memory(): host memory",
    torch.tensor: "torch.tensor: host data (with device=, a host->device copy)",
    torch.as_tensor: "torch.as_tensor: host data (with device=, a host->device copy)",
    torch.asarray: "torch.asarray: host data (with device=, a host->device copy)",
}

# The allow-list: calls made inside these functions (of the scripts or common.py) sync on purpose.
# Names as the scripts spell them, and as the run harness moving into common.py does (_progress).
ALLOWED = {
    # RunControl's note (stop signal, checkpoint due, next interval) is a CPU tensor, exchanged in
    # a gloo group beside NCCL: host bookkeeping that never touches the device.
    "poll",
    # The progress line, rank 0's loss.item(), every --log-every steps and --log-seconds seconds;
    # an epoch's first comes after at most 10 s, so on a slow machine it can fall in any step.
    "progress",
    "_progress",
}
# Not allow-listed: the finite check (an all-reduce and bad.item()) runs every --log-every steps
# and at an epoch's last step; the runs below set --log-every far away and end before the
# epoch's last step. test_log_steps_sync_on_purpose shows that the tracer sees both.
FINITE_CHECK = ("check_finite", "_non_finite")
QUIET = ["--log-every", "1000", "--log-seconds", "1e9"]


class SyncTracer:
    """Both modes, switched on and off by start() and stop() (both idempotent, so that a step
    that raises leaves nothing behind); `found` lists each call that would sync on CUDA, with
    where it was made."""

    def __init__(self):
        self.found, self.modes, self.ops = [], [], set()  # ops: every aten op seen, by name

    def start(self):
        if not self.modes:
            self.modes = [_Functions(self), _Dispatch(self)]
            for m in self.modes:
                m.__enter__()

    def stop(self):
        while self.modes:
            self.modes.pop().__exit__(None, None, None)

    def flag(self, why):
        frames = [
            f
            for f in traceback.extract_stack()
            if f.filename.startswith(REPO)
            and not (f.filename == __file__ and f.name in TRACER_FRAMES)
        ]
        if any(f.name in ALLOWED and "/tests/" not in f.filename for f in frames):
            return
        where = " < ".join(
            f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-4:])
        )
        self.found.append(f"{why}, at {where}")


TRACER_FRAMES = {"flag", "__torch_dispatch__", "__torch_function__"}


class _Dispatch(TorchDispatchMode):
    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.tracer.ops.add(name)
        if name in SYNC_OPS:
            self.tracer.flag(f"{func}: {SYNC_OPS[name]}")
        elif name in INDEX_OPS and any(
            torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()
        ):
            self.tracer.flag(f"{func} with a boolean mask: nonzero, a host sync")
        elif (
            name == "aten.repeat_interleave"
            and func._overloadname == "Tensor"
            and (kwargs or {}).get("output_size") is None
        ):
            self.tracer.flag(f"{func} without output_size: its size is read on the host")
        return func(*args, **(kwargs or {}))


class _Functions(TorchFunctionMode):
    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_CALLS:
            self.tracer.flag(HOST_CALLS[func])
        elif func is torch.Tensor.to and "cpu" in (*args[1:], kwargs.get("device")):
            self.tracer.flag(".to('cpu'): a device->host copy")
        return func(*args, **kwargs)


# --- one training step of a script, traced ----------------------------------------------------
# Every method script and variant; heads narrowed, SwAV's queue in use from the traced step on.
CONFIGS = {
    "simclr": ["simclr", "--proj-hidden", "64", "--proj-dim", "32"],
    "moco-v2": [
        "moco",
        "--moco-version",
        "2",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
        "--queue-size",
        "64",
    ],
    "moco-v3": [
        "moco",
        "--moco-version",
        "3",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
        "--pred-hidden",
        "64",
    ],
    "byol": ["byol", "--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"],
    "simsiam": ["simsiam", "--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "16"],
    "swav": [
        "swav",
        "--local-crops",
        "2",
        "--prototypes",
        "32",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
        "--queue-size",
        "4",
        "--queue-start",
        "0",
    ],
    "dino": [
        "dino",
        "--local-crops",
        "2",
        "--prototypes",
        "32",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
    ],
}
STEP = [
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--batch-size",
    "4",
    "--epochs",
    "1",
    "--steps-per-epoch",
    "4",
    "--warmup-epochs",
    "0",
    "--workers",
    "0",
    "--knn-every",
    "0",
    "--backbone",
    "resnet18-eighth",
] + QUIET
# Each script twice: without add-ons, in float32, on the cpu data path; and in the CUDA
# configuration (bf16 autocast, channels_last) with both add-ons on the tensor data path, whose
# next batch (views and positives, augmented on the device) is part of the traced step.
VARIANTS = {
    "plain-fp32-cpu": ["--precision", "fp32", "--data-path", "cpu"],
    "addons-bf16-tensor": [
        "--precision",
        "bf16",
        "--data-path",
        "tensor",
        "--qscore-lambda",
        "0.1",
        "--xattn",
        "--xattn-clusters",
        "4",
    ],
}
# The second step: the first makes what a run makes once (device constants, optimizer state).
TRACED = 1


_SMALL = {}


def small_digits(name, data_dir, train=True, download=True):
    """64 digits, made once: the k-means bank's pass over the data set and making it are the
    slowest parts of a run, not the step."""
    if train not in _SMALL:
        ds = common.DigitsDataset(train)
        ds.data, ds.targets = ds.data[:64], ds.targets[:64]
        _SMALL[train] = ds
    return _SMALL[train]


class _Traced(Exception):
    """Raised where step TRACED + 1 would begin: the run ends there."""


def trace_step(monkeypatch, tmp_path, argv):
    """Run a script's main() with `argv` up to the end of step TRACED; return the tracer's
    findings over that step: from the moment the loop receives its batch to the moment the next
    batch is ready. On the tensor path that includes making the next batch (augmentation on the
    device, part of each step's device work); on the cpu path it does not (DataLoader workers,
    and a pinned non-blocking copy to the device on purpose)."""
    mod = importlib.import_module(argv[0])
    tracer, real_iter = SyncTracer(), common.TrainLoader.__iter__

    def stepping(self):
        batches = real_iter(self)
        for s in itertools.count():
            if s == TRACED + 1 and self.data_path == "tensor":
                tracer.start()
            batch = next(batches, None)
            tracer.stop()
            if s == TRACED + 1:
                raise _Traced
            if s == TRACED:
                tracer.start()
            yield batch  # the loop body runs here: a whole step
            tracer.stop()

    monkeypatch.setattr(common.TrainLoader, "__iter__", stepping)
    monkeypatch.setattr(common, "make_dataset", small_digits)
    args = mod.parse_args(STEP + argv[1:] + ["--run-dir", str(tmp_path)])  # argv's flags win
    try:
        with pytest.raises(_Traced):
            mod.main(args)
    finally:
        tracer.stop()
    # the traced interval held a whole step: the backward pass and the optimizer's update
    assert {"aten.convolution_backward", "aten.add_"} <= tracer.ops, sorted(tracer.ops)
    return tracer.found


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_a_training_step_never_waits_for_the_host(monkeypatch, tmp_path, config, variant):
    """One whole step (forward, loss, add-ons, backward, optimizer, momentum / center / queue
    updates, bookkeeping, and on the tensor path the next batch's augmentation) of every method
    script: no call that would sync on CUDA."""
    found = trace_step(monkeypatch, tmp_path, CONFIGS[config] + VARIANTS[variant])
    assert not found, "\n".join(found)


# Each mutation adds one kind of sync to a step (through the backbone's forward); the tracer
# must name it.
MUTATIONS = {
    "item": (lambda f: f.sum().item(), "_local_scalar_dense"),
    "as_tensor": (lambda f: torch.as_tensor([0.5], device=f.device), "torch.as_tensor"),
    "bool_mask": (lambda f: f[f > 0].sum(), "boolean mask"),  # DINO's ce[pairs], as it was
    "bool_mask_put": (
        lambda f: f.detach().clone().index_put_((f.detach() > 0,), torch.zeros(())),
        "boolean mask",
    ),
    "nonzero": (lambda f: (f > 0).nonzero(), "nonzero"),
    "list_index": (lambda f: f[[0, 1]], "lift_fresh"),  # SwAV's logp[others], as it was
    "scalar_assign": (lambda f: f.detach().clone().__setitem__(0, 0.0), "lift_fresh"),  # SimCLR's
    "cpu": (lambda f: f.detach().cpu(), ".cpu()"),
    "to_cpu": (lambda f: f.detach().to("cpu"), ".to('cpu')"),
    "tolist": (lambda f: f.detach()[0, 0, 0].tolist(), ".tolist()"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_tracer_sees_a_sync_added_to_a_step(monkeypatch, tmp_path, mutation):
    fn, expected = MUTATIONS[mutation]
    real_forward = common.Backbone.forward

    def mutated(self, x):
        f, h = real_forward(self, x)
        fn(f)
        return f, h

    monkeypatch.setattr(common.Backbone, "forward", mutated)
    found = trace_step(monkeypatch, tmp_path, CONFIGS["simclr"] + ["--data-path", "tensor"])
    assert any(expected in line for line in found), "\n".join(found) or "the tracer missed it"
    assert all("mutated" in line for line in found), "\n".join(found)  # and found nothing else


def test_the_tracer_sees_a_sync_added_to_the_augmentation(monkeypatch, tmp_path):
    """On the tensor path the next batch's augmentation is part of the traced step."""
    real_apply = common.apply_view

    def mutated(images, p, view, stats):
        p["sigma"].max().item()
        return real_apply(images, p, view, stats)

    monkeypatch.setattr(common, "apply_view", mutated)
    found = trace_step(monkeypatch, tmp_path, CONFIGS["simclr"] + ["--data-path", "tensor"])
    assert any("_local_scalar_dense" in line for line in found), found
    assert all("mutated" in line for line in found), found


def test_log_steps_sync_on_purpose(monkeypatch, tmp_path):
    """With --log-every 1 the traced step is a log step: without the progress line's allow-list
    entry the tracer finds the finite check's and the progress line's reads, and nothing else."""
    monkeypatch.setattr(sys.modules[__name__], "ALLOWED", ALLOWED - {"progress", "_progress"})
    argv = CONFIGS["simclr"] + ["--data-path", "tensor", "--log-every", "1"]
    found = trace_step(monkeypatch, tmp_path, argv)
    finite = [line for line in found if any(f" {name}" in line for name in FINITE_CHECK)]
    progress = [line for line in found if "progress" in line and line not in finite]
    assert finite and progress and len(finite) + len(progress) == len(found), found


def test_augmentation_never_waits_for_the_host():
    """Every operation of the tensor path (DINO's 2 + 8 crops: jitter with hue, grey, blur,
    solarize) and the evaluation transform: after the first batch (which makes the device
    constants, once per device), no call that would sync on CUDA."""
    views = common.multicrop_views(32, 8, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    g, tracer = torch.Generator().manual_seed(0), SyncTracer()
    for batch in range(3):
        if batch == 1:
            tracer.start()
        try:
            for v in views:
                common.augment(x, v, common.STATS["cifar10"], g)
            common.eval_tensor(x, 32, common.STATS["cifar10"], 32)
        finally:
            tracer.stop()
    assert not tracer.found, "\n".join(tracer.found)
    tracer.start()
    try:
        torch.as_tensor([1.0], device=x.device)  # the check that used to miss this one
    finally:
        tracer.stop()
    assert tracer.found and "torch.as_tensor" in tracer.found[0]


# --- the three syncs removed: the new forms against the old expressions, bit for bit ----------
def _old_swav_loss(scores, codes, temperature):
    """swav_loss as it was: logp[others] with a Python list (a host->device copy)."""
    logp = F.log_softmax(scores.float() / temperature, dim=2)
    loss = 0.0
    for i in range(codes.shape[0]):
        others = [v for v in range(scores.shape[0]) if v != i]
        loss = loss - (codes[i] * logp[others]).sum(dim=2).mean()
    return loss / codes.shape[0]


def _old_dino_loss(student, teacher, center, student_temp, teacher_temp):
    """dino_loss as it was: ce[pairs] with a boolean mask (nonzero)."""
    b = teacher.shape[0] // 2
    v = student.shape[0] // b
    p_t = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=1).view(2, b, -1)
    log_p_s = F.log_softmax(student.float() / student_temp, dim=1).view(v, b, -1)
    ce = -torch.einsum("tbk,vbk->tvb", p_t, log_p_s)
    pairs = ~torch.eye(2, v, dtype=torch.bool, device=ce.device)
    return ce[pairs].mean()


def _old_nt_xent_loss(z1, z2, temperature):
    """nt_xent_loss as it was (one process): the diagonal set by a scalar assignment."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    i = torch.arange(b)
    self_col, pos_col = torch.cat([i, b + i]), torch.cat([b + i, i])
    logits = z @ z.T / temperature
    logits[torch.arange(2 * b), self_col] = float("-inf")
    return F.cross_entropy(logits, pos_col)


def _value_and_grads(fn, inputs):
    """[value, gradient of each input (None: not used, as DINO's teacher)]."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, allow_unused=True))


def _bitwise(new, old):
    return all((a is None and b is None) or torch.equal(a, b) for a, b in zip(new, old))


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("views", [2, 3, 8])
def test_swav_loss_equals_the_list_index(views):
    import swav

    codes = swav.sinkhorn(_randn(2 * 6, 16, seed=1)).view(2, 6, 16)
    new = _value_and_grads(lambda s: swav.swav_loss(s, codes, 0.1), [_randn(views, 6, 16, seed=0)])
    old = _value_and_grads(lambda s: _old_swav_loss(s, codes, 0.1), [_randn(views, 6, 16, seed=0)])
    assert _bitwise(new, old)


@pytest.mark.parametrize("views", [2, 3, 10])
def test_dino_loss_equals_the_boolean_mask(views):
    import dino

    inputs = [_randn(views * 6, 16, seed=0), _randn(2 * 6, 16, seed=1)]
    center = _randn(1, 16, seed=2)
    new = _value_and_grads(lambda s, t: dino.dino_loss(s, t, center, 0.1, 0.04), inputs)
    old = _value_and_grads(lambda s, t: _old_dino_loss(s, t, center, 0.1, 0.04), inputs)
    assert new[2] is None and _bitwise(new, old)  # the teacher gets no gradient


def test_nt_xent_loss_equals_the_scalar_assignment():
    import simclr

    inputs = [_randn(6, 16, seed=0), _randn(6, 16, seed=1)]
    new = _value_and_grads(lambda a, b: simclr.nt_xent_loss(a, b, 0.2), inputs)
    old = _value_and_grads(lambda a, b: _old_nt_xent_loss(a, b, 0.2), inputs)
    assert _bitwise(new, old)
