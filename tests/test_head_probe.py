"""benchmarks/head_probe.py: the numbers that tell a DINO or SwAV run at the uniform point from one
that is not, on a constructed head, and the script on real (tiny) checkpoints of both methods."""

import importlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from conftest import REPO, run, run_here

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import head_probe  # noqa: E402

SCRIPT = os.path.join("benchmarks", "head_probe.py")
TINY_RUN = [
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--steps-per-epoch",
    "2",
    "--workers",
    "0",
    "--warmup-epochs",
    "0",
    "--knn-every",
    "0",
    "--proj-hidden",
    "32",
    "--proj-dim",
    "16",
    "--prototypes",
    "24",
    "--log-every",
    "1",
    "--backbone",
    "resnet18-eighth",
]


def test_stats_tell_the_degenerate_head_from_a_healthy_one():
    g = torch.Generator().manual_seed(0)
    d, k, n = 16, 64, 200
    w = torch.randn(k, d, generator=g)
    w[:, -1] = 0.001 * torch.randn(
        k, generator=g
    )  # the K directions have all but left out the last axis
    w = F.normalize(w, dim=1)
    null = torch.zeros(d)
    null[-1] = 1.0
    stuck = F.normalize(
        null + 0.01 * torch.randn(n, d, generator=g), dim=1
    )  # every z along the left-out axis
    spread = F.normalize(torch.randn(n, d, generator=g), dim=1)

    a, b = head_probe.head_stats(stuck, w), head_probe.head_stats(spread, w)
    assert a["smallest_singular_values"][-1] < 0.05 < a["smallest_singular_values"][0]
    assert a["abs_cos_z_null"] > 0.99 and b["abs_cos_z_null"] < 0.5
    assert (
        a["score_std_over_k"] < 0.05 < b["score_std_over_k"]
    )  # equal scores over k: a uniform softmax
    assert a["mean_pairwise_cos_z"] > 0.99 and abs(b["mean_pairwise_cos_z"]) < 0.1
    assert a["abs_cos_random_direction"] == 1 / math.sqrt(d)


def _tiny_checkpoint(method, tmp_path):
    mod = importlib.import_module(method)
    run_dir = tmp_path / method
    assert mod.main(mod.parse_args(TINY_RUN + ["--run-dir", str(run_dir)])) == 0
    return run_dir / "checkpoint.pt"


def test_probe_reads_dino_and_swav_checkpoints(tmp_path):
    for method in ("dino", "swav"):
        ckpt = _tiny_checkpoint(method, tmp_path)
        out = tmp_path / "new folder" / f"{method}.json"  # --out's folder is made
        run_here(
            [SCRIPT, str(ckpt), "--images", "16", "--batch-size", "8", "--out", str(out)],
        )
        r = json.loads(out.read_text())
        assert (
            r["method"] == method
            and r["epoch"] == 1
            and r["images"] == 16
            and r["prototypes"] == 24
        )
        nets = ["student", "teacher"] if method == "dino" else ["student"]
        assert [x for x in ("student", "teacher") if x in r] == nets
        for net in nets:
            s = r[net]
            assert len(s["smallest_singular_values"]) == 3 and 0 <= s["abs_cos_z_null"] <= 1
            assert s["score_std_over_k"] > 0 and -1 <= s["mean_pairwise_cos_z"] <= 1
        if method == "dino":
            assert 0 < r["target_entropy"] <= math.log(24) + 1e-5
            # --init: the run's start, whose teacher is the student's copy
            run_here(
                [
                    SCRIPT,
                    str(ckpt),
                    "--init",
                    "--images",
                    "16",
                    "--batch-size",
                    "8",
                    "--out",
                    str(out),
                ],
            )
            i = json.loads(out.read_text())
            assert i["epoch"] == 0 and i["student"] == i["teacher"] and i["student"] != r["student"]
        else:
            assert "target_entropy" not in r


def test_bad_input_is_one_sentence(tmp_path):
    p = run([SCRIPT, str(tmp_path / "missing.pt")], check=False)
    assert (
        p.returncode == 2
        and p.stderr.strip() == f"error: no checkpoint at '{tmp_path / 'missing.pt'}'."
    )
    other = tmp_path / "simclr.pt"
    torch.save({"method": "simclr", "args": {}}, other)
    p = run_here([SCRIPT, str(other)], check=False)
    assert (
        p.returncode == 2
        and "reads dino.py and swav.py ones" in p.stderr
        and len(p.stderr.strip().splitlines()) == 1
    )
