"""What a run prints, in all six scripts: progress lines by time as well as by steps, the grouped
end-of-epoch line, TensorBoard events only when the optional package is there, and lines by time
that cannot put the processes of a DDP run out of step."""

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import types

import pytest

from conftest import REPO, TINY, free_port, read_metrics, run

# narrow heads, so that each tiny run spends its time on the loop, not on a 2048-wide MLP
SMALL = {
    "simclr.py": ["--proj-hidden", "64", "--proj-dim", "32"],
    "moco.py": [
        "--proj-hidden",
        "64",
        "--pred-hidden",
        "64",
        "--proj-dim",
        "32",
        "--queue-size",
        "64",
    ],
    "byol.py": ["--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32"],
    "simsiam.py": ["--proj-hidden", "64", "--pred-hidden", "16", "--proj-dim", "32"],
    "swav.py": ["--prototypes", "30", "--proj-hidden", "64", "--proj-dim", "32"],
    "dino.py": ["--prototypes", "128", "--proj-hidden", "64", "--proj-dim", "32"],
}
BY_TIME = [
    "--log-every",
    "1000",
    "--log-seconds",
    "0.001",
]  # steps alone would print only each epoch's last step
PROGRESS = re.compile(
    r"epoch \d+/\d+  step (\d+)/\d+  loss -?\d+\.\d{4}  lr \S+  "
    r"\d+\.\d img/s  \d+(\.\d)? (s|min|h) left$"
)
EPOCH = re.compile(
    r"epoch 1/1  loss -?\d+\.\d{3} \(ssl -?\d+\.\d{3}\)  online-knn [01]\.\d{3} "
    r"\(random init [01]\.\d{3}(, below it)?\)  "
    r"qscore -?\d\.\d{3} \|L\| \d+\.\d under-alpha \d+%  collapse-std \d\.\d{3}  "
    r"\d+\.\d img/s  \d+(\.\d)? (s|min|h)$"
)


@pytest.mark.parametrize("script", list(SMALL))
def test_first_line_by_time_comes_before_the_epoch_line(script, tmp_path):
    p = run(
        [script] + TINY + SMALL[script] + BY_TIME + ["--epochs", "1", "--run-dir", str(tmp_path)]
    )
    lines = p.stdout.splitlines()
    steps = [int(m.group(1)) for m in map(PROGRESS.match, lines) if m]
    assert steps == [1, 2, 3], p.stdout  # steps 1 and 2 by the clock, step 3 as the epoch's last
    first = next(i for i, line in enumerate(lines) if PROGRESS.match(line))
    ends = [i for i, line in enumerate(lines) if EPOCH.match(line)]
    assert len(ends) == 1 and first < ends[0], p.stdout
    assert list(read_metrics(tmp_path)[0])[:2] == ["epoch", "lr"]  # metrics.jsonl keeps its form
    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    if (
        importlib.util.find_spec("tensorboard") is None
    ):  # not a requirement: then not a word about it
        assert "tensorboard" not in (p.stdout + p.stderr).lower() and not events
    else:
        assert events


def test_tensorboard_is_optional():
    assert "tensorboard" not in open(os.path.join(REPO, "requirements.txt")).read()


def test_logging_lives_once_in_the_harness():
    """Progress lines, the epoch line, TensorBoard and the finite check are common.Run's, written
    once: no script keeps a copy of its own to drift, and every script's loop reports each step to
    the harness (run.step_done) and each epoch (run.end_epoch)."""
    for s in SMALL:
        mod = importlib.import_module(s[:-3])
        for name in ("progress", "epoch_line", "duration", "tensorboard_writer", "check_finite"):
            assert not hasattr(mod, name), f"{s} has a {name} of its own"
        text = inspect.getsource(mod.main)
        assert "run.step_done(" in text and "run.end_epoch(" in text, (
            f"{s}: the loop bypasses the harness"
        )


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter, which needs the tensorboard package."""

    made, scalars, summaries = [], [], []

    def __init__(self, log_dir):
        FakeWriter.made.append(log_dir)
        self.file_writer = types.SimpleNamespace(add_summary=FakeWriter.summaries.append)

    def add_scalar(self, tag, value, step):
        FakeWriter.scalars.append((tag, value, step))

    def flush(self):
        pass


def test_tensorboard_gets_grouped_metrics_the_per_step_loss_and_the_flags(tmp_path, monkeypatch):
    """Each epoch's metrics under tags grouped by kind (loss/, knn/, qscore/, speed/...), the
    loss and lr of every progress line at its iteration (also in steps.jsonl), the flags once."""
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    monkeypatch.setitem(
        sys.modules,
        "torch.utils.tensorboard.summary",
        types.SimpleNamespace(hparams=lambda flags, metrics: [("hparams", flags, metrics)]),
    )
    import common
    import simclr

    flags = ["--epochs", "2", "--steps-per-epoch", "2", "--knn-every", "0", "--log-every", "1"]
    args = simclr.parse_args(TINY + SMALL["simclr.py"] + flags + ["--run-dir", str(tmp_path)])
    assert simclr.main(args) == 0
    assert FakeWriter.made == [str(tmp_path)]
    ((_, hp, metric),) = FakeWriter.summaries
    assert hp["lr"] == args.lr and hp["backbone"] == args.backbone and "knn/knn_top1" in metric
    epochs = [(tag, v, x) for tag, v, x in FakeWriter.scalars if not tag.endswith("_step")]
    assert epochs == [
        (common.tensorboard_tag(k), v, m["epoch"])
        for m in read_metrics(tmp_path)
        for k, v in m.items()
        if k != "epoch"
    ]
    tags = {tag for tag, _, _ in epochs}
    assert {"loss/loss", "loss/loss_ssl", "qscore/qscore", "speed/images_per_s"} <= tags
    assert "schedule/lr" in tags and "monitor/collapse_std" in tags
    with open(tmp_path / "steps.jsonl") as fh:
        steps = [json.loads(line) for line in fh]
    assert [(s["epoch"], s["step"], s["it"]) for s in steps] == [
        (1, 1, 1),
        (1, 2, 2),
        (2, 1, 3),
        (2, 2, 4),
    ]
    per_step = [(tag, v, x) for tag, v, x in FakeWriter.scalars if tag.endswith("_step")]
    assert per_step == [
        t
        for s in steps
        for t in (("loss/loss_step", s["loss"], s["it"]), ("schedule/lr_step", s["lr"], s["it"]))
    ]


def test_a_run_says_its_reference_its_knn_pass_and_what_to_run_next(tmp_path):
    """The kNN before the first step and the random-init reference, a line before each kNN pass,
    and at the end where the outputs are and the next commands."""
    p = run(
        ["simclr.py"] + TINY + SMALL["simclr.py"] + ["--epochs", "1", "--run-dir", str(tmp_path)]
    )
    out = p.stdout
    init = re.search(
        r"epoch 0/1  online-knn ([01]\.\d{3}) before the first step \(random init of "
        r"resnet18-eighth under seed 0: ([01]\.\d{3})\)",
        out,
    )
    assert init, out
    (m,) = read_metrics(tmp_path)
    assert f"{m['knn_top1_init']:.3f}" == init.group(1)
    assert f"{m['knn_random_init']:.3f}" == init.group(2)
    below = m["knn_top1"] < m["knn_random_init"]
    assert ("below it)" in out) == below, out
    assert re.search(r"epoch 1/1: online kNN of \d+ test images against a bank of 256 \.\.\.", out)
    assert out.index("epoch 1/1: online kNN") < out.index("epoch 1/1  loss")
    assert f"python eval_linear.py {tmp_path}" in out and f"python interpret.py {tmp_path}" in out
    assert out.rstrip().splitlines()[-1].strip().startswith("python interpret.py")


# Rank 1's clock runs a thousand times slower than rank 0's: rank 0 is due for a line by time
# after every step and rank 1 never is. Were a line by time to all-reduce, the two processes
# would meet in different collectives and hang (or gloo would fail on mismatched sizes).
SKEWED_CLOCK = """
import os, sys, time, types
import simclr
if os.environ["RANK"] == "1":
    simclr.time = types.SimpleNamespace(time=lambda: time.time() / 1000)
raise SystemExit(simclr.main(simclr.parse_args(sys.argv[1:])))
"""


def test_torchrun_with_lines_by_time_on_one_rank_only(tmp_path):
    p = run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "--no-python",
            sys.executable,
            "-c",
            SKEWED_CLOCK,
            "--device",
            "cpu",
        ]
        + TINY
        + SMALL["simclr.py"]
        + [
            "--log-every",
            "1000",
            "--log-seconds",
            "0.05",
            "--epochs",
            "1",
            "--run-dir",
            str(tmp_path),
        ],
        timeout=300,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert "2 process(es)" in p.stdout
    steps = [int(m.group(1)) for m in map(PROGRESS.match, p.stdout.splitlines()) if m]
    assert steps == [1, 2, 3], p.stdout  # rank 0's lines alone, steps 1 and 2 by its clock
    assert sum(bool(EPOCH.match(line)) for line in p.stdout.splitlines()) == 1
    assert read_metrics(tmp_path)[0]["epoch"] == 1
