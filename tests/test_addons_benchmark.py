"""benchmarks/addons.py's plumbing on digits: a Q-Score run of a few steps, trained, probed and
interpreted, its summary, the table, the resumed queue that skips what is done; the training
command of every config; the verdict rule; bad input. Nothing from ../shared, no lightly."""

import json
import os
import sys

import pytest

from conftest import REPO, run, run_here

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import addons  # noqa: E402
import learning  # noqa: E402

SCRIPT = os.path.join("benchmarks", "addons.py")
TINY = [
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--images",
    "32",
    "--batch-size",
    "16",
    "--warmup-images",
    "0",
    "--points",
    "1",
    "--epochs-per-point",
    "1",
    "--knn-limit",
    "256",
    "--workers",
    "0",
    "--linear-epochs",
    "1",
    "--max-images",
    "16",
    "--seeds",
    "0",
    "--extra",
    "--backbone resnet18-eighth",
]


def test_a_qscore_run_is_measured_tabulated_and_not_run_twice(tmp_path):
    out = tmp_path / "out"
    p = run_here(
        [
            SCRIPT,
            "simclr",
            *TINY,
            "--configs",
            "qscore",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(out),
        ],
    )
    qs = json.loads((out / "simclr_qscore_s0" / "summary.json").read_text())
    assert (
        qs["addon_flags"] == ["--qscore-lambda", "0.1"]
        and "'--extra=--qscore-lambda 0.1'" in qs["commands"][0]
    )
    for key, _, _ in addons.MEASURES:
        assert isinstance(qs[key], float), (key, qs[key])
    assert 0 <= qs["knn_top1"] <= 1 and 0 <= qs["linear_top1"] <= 1 and 0 <= qs["qscore_auroc"] <= 1
    assert qs["commands"][1].startswith("eval_linear.py ") and qs["commands"][2].startswith(
        "interpret.py "
    )
    with open(
        os.path.join(REPO, qs["run_dir"], "metrics.jsonl")
    ) as fh:  # the regularizer was on in training
        assert any(k.startswith("qscore") for k in json.loads(fh.readline()))
    assert any(line.startswith("| qscore | 1 | ") for line in p.stdout.splitlines())
    # the random network's row: learning.py's kNN and eval_linear.py's same probe of it
    assert isinstance(qs["random_linear_top1"], float)
    row = f"| random init (seed 0) | - | {qs['random_knn']:.3f} | {qs['random_linear_top1']:.3f} |"
    assert any(line.startswith(row) for line in p.stdout.splitlines()), p.stdout
    agg = json.loads((out / "simclr.json").read_text())["aggregate"]
    assert agg["qscore"]["knn_top1"]["values"] == [qs["knn_top1"]]

    again = run_here(
        [
            SCRIPT,
            "simclr",
            *TINY,
            "--configs",
            "qscore",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    assert "qscore seed 0: done before" in again.stdout and "training, probe" not in again.stdout


def test_each_config_trains_with_the_study_flags_then_its_own(tmp_path):
    a = addons.parse_args(["byol", "--extra", "--lars-mode official", "--seeds", "1"])
    cmds = {c: addons.train_command(a, c, 1, str(tmp_path)) for c in addons.CONFIGS}
    extras = {
        c: learning.parse_args(cmd[2:]).extra for c, cmd in cmds.items()
    }  # as learning.py reads them
    assert extras == {
        "baseline": ["--lars-mode official"],
        "qscore": ["--lars-mode official", "--qscore-lambda 0.1"],
        "xattn": ["--lars-mode official", "--xattn --xattn-cluster-every 5"],
    }  # "--extra --xattn": an error
    for c in cmds.values():
        assert c[2:6] == ["byol", "--impl", "cleanssl", "--seed"] and c[6] == "1"


def v(*xs):
    return {"values": list(xs)}


@pytest.mark.parametrize(
    "base, other, higher, says",
    [
        (v(0.30, 0.32), v(0.35, 0.36), True, "helped"),
        (v(0.30, 0.32), v(0.35, 0.36), False, "hurt"),
        (v(0.30, 0.32), v(0.25, 0.28), True, "hurt"),
        (v(0.30, 0.32), v(0.31, 0.36), True, "within seed noise"),
        (v(0.30, 0.32), v(0.35, 0.36), None, "higher"),
        (v(0.30), v(0.35, 0.36), True, "one seed: no verdict"),
    ],
)
def test_verdict_is_helped_or_hurt_only_when_the_seed_ranges_part(base, other, higher, says):
    assert addons.verdict(base, other, higher) == says


@pytest.mark.parametrize(
    "argv, says",
    [
        (["nosuch"], "unknown method 'nosuch'"),
        (["simclr", "--configs", "baseline,fancy"], "unknown config 'fancy'"),
        (["simclr", "--extra=--xattn"], "--extra may not set an add-on flag"),
        (["simclr", "--dataset", "folder", "--data-dir", "{tmp}/missing"], "does not exist"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, argv, says):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--dataset" not in argv:
        argv += ["--dataset", "digits", "--data-dir", str(tmp_path)]
    p = run([SCRIPT, *argv, "--out", str(tmp_path / "out")], check=False)
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and says in lines[0], (p.returncode, lines)
