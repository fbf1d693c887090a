"""benchmarks/learning.py's plumbing on digits: a few steps of the CleanSSL half, its JSON, PNG and
table row, the lightly half skipped with its reason, and bad input. No network, nothing from
../shared. Where lightly imports (see `lightly_python`), the lightly half of every method lightly
has runs for 3 steps as well, and parity.py for SimCLR, SwAV and BYOL."""

import importlib.util
import json
import os
import sys

import pytest

from conftest import REPO, run

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import learning  # noqa: E402

SCRIPT = os.path.join("benchmarks", "learning.py")
# 4 steps of 16 digits at 16 px = 2 script epochs of 2 steps, a kNN after each; a small bank.
SMALL = [
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--images",
    "64",
    "--batch-size",
    "16",
    "--points",
    "2",
    "--epochs-per-point",
    "1",
    "--workers",
    "0",
    "--knn-limit",
    "256",
    "--log-every",
    "1",
    "--extra",
    "--backbone resnet18-eighth",
]


def one_sentence(p):
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), lines
    return lines[0]


def test_cleanssl_half_on_digits_writes_json_png_and_row(tmp_path):
    out = tmp_path / "out"
    no_lightly = str(
        tmp_path / "no-python"
    )  # an interpreter that is not there: the lightly half is skipped
    p = run(
        [
            SCRIPT,
            "simclr",
            *SMALL,
            "--data-dir",
            str(tmp_path),
            "--out",
            str(out),
            "--lightly-python",
            no_lightly,
        ],
        timeout=400,
    )
    assert (
        f"lightly half skipped: lightly does not import: no {no_lightly}; "
        "the CleanSSL half runs alone." in p.stdout
    )
    assert (
        "[cleanssl] " in p.stdout and "online-knn" in p.stdout
    )  # the script's own progress lines come through

    r = json.loads((out / "simclr_cleanssl.json").read_text())
    assert (
        r["budget"]["steps"] == 4
        and r["budget"]["epochs"] == 2
        and r["budget"]["steps_per_epoch"] == 2
    )
    assert [x for x, _ in r["curve"]] == [32, 64]  # images seen at each kNN point
    assert all(0.0 <= y <= 1.0 for _, y in r["curve"]) and r["final_knn"] == r["curve"][-1][1]
    # the script's kNN and learning.py's (which evaluates lightly and random) are one protocol
    assert abs(r["final_knn_recheck"] - r["final_knn"]) <= 2 / 360
    assert 0.0 <= r["random_knn"] <= 1.0
    assert (
        r["knobs"]["resolved"]["steps_per_epoch"] == 2
        and "warmup_epochs" in r["knobs"]["scaled_to_budget"]
    )
    assert "--steps-per-epoch 2" in r["half_command"] and r["command"].startswith(
        "python benchmarks/learning.py simclr"
    )
    assert r["views"] and r["git"]["commit"] is not None and r["torch"]
    assert not (out / "simclr_lightly.json").exists()
    assert (out / "simclr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the curve's random line names the backbone the run used
    assert learning.random_label({"cleanssl": r}) == (
        r["random_knn"],
        f"random {r['knobs']['resolved']['backbone']} ({r['random_knn']:.3f})",
    )
    quarter = {"random_knn": 0.2884, "knobs": {"resolved": {"backbone": "resnet18-quarter"}}}
    assert learning.random_label({"lightly": {}, "cleanssl": quarter}) == (
        0.2884,
        "random resnet18-quarter (0.288)",
    )
    assert learning.random_label({"lightly": {"curve": []}}) is None
    assert list(out.glob("*.tmp")) == []  # every write went through a rename

    row = next(line for line in p.stdout.splitlines() if line.startswith("| simclr |"))
    assert (
        f"| {r['final_knn']:.3f} | - | {r['random_knn']:.3f} |" in row
        and "64 images, batch 16" in row
    )

    t = run([SCRIPT, "--table", "--out", str(out)])
    assert t.stdout.splitlines()[0].startswith(
        "| method | budget | CleanSSL kNN | lightly kNN | random kNN |"
    )
    assert row in t.stdout


@pytest.mark.parametrize(
    "argv, says",
    [
        (["nosuchmethod"], "unknown method 'nosuchmethod'"),
        (["simclr", "--dataset", "folder", "--data-dir", "{tmp}/missing"], "does not exist"),
        (
            [
                "simclr",
                "--dataset",
                "digits",
                "--impl",
                "lightly",
                "--lightly-python",
                "{tmp}/no-python",
            ],
            "the lightly half cannot run",
        ),
        (["mocov3", "--dataset", "digits", "--impl", "lightly"], "lightly has none"),
        (
            ["simclr", "--dataset", "digits", "--impl", "cleanssl", "--extra", "--epochs 3"],
            "--extra may not set --epochs",
        ),
        (
            ["simclr", "--dataset", "digits", "--impl", "cleanssl", "--extra", "--no-such-flag 1"],
            "simclr.py does not take these flags",
        ),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, argv, says):
    p = run(
        [SCRIPT, *[a.format(tmp=tmp_path) for a in argv], "--out", str(tmp_path / "out")],
        check=False,
    )
    assert says in one_sentence(p)


@pytest.fixture(scope="module")
def lightly_python():
    """An interpreter that imports lightly: this one, else $LIGHTLY_PYTHON, else ../lightly-venv
    beside the checkout (benchmarks/learning.py's find_lightly checks each); the tests that need
    it skip, saying how to get one, when none does."""
    env = os.environ.get("LIGHTLY_PYTHON", "")
    tried = [sys.executable] if importlib.util.find_spec("lightly") else []
    reasons = [] if tried else [f"not in {sys.executable}"]
    for py in tried + ([env] if env else []) + [learning.LIGHTLY_PYTHON]:
        found, why = learning.find_lightly(py)
        if found:
            return found
        reasons.append(why.removeprefix("lightly does not import: "))
    pytest.skip(
        f"lightly does not import ({'; '.join(reasons)}): pip install lightly into this "
        "environment, or set LIGHTLY_PYTHON to a Python that has it, or make "
        f"{os.path.dirname(os.path.dirname(learning.LIGHTLY_PYTHON))} as "
        "benchmarks/learning.py's docstring says"
    )


@pytest.mark.parametrize("method", ["simclr", "mocov2", "byol", "simsiam", "swav", "dino"])
def test_lightly_half_runs(tmp_path, method, lightly_python):
    own = {"mocov2": " --queue-size 32", "swav": " --queue-size 32 --prototypes 50"}.get(method, "")
    extra = ["--extra", "--backbone resnet18-eighth" + own]  # both halves build the narrow backbone
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--image-size",
        "32",
        "--images",
        "48",
        "--batch-size",
        "16",
        "--points",
        "1",
        "--epochs-per-point",
        "1",
        "--workers",
        "0",
        "--knn-limit",
        "256",
    ]
    run(
        [
            SCRIPT,
            method,
            *argv,
            "--impl",
            "lightly",
            "--lightly-python",
            lightly_python,
            "--out",
            str(out),
            *extra,
        ],
        timeout=600,
    )
    r = json.loads((out / f"{method}_lightly.json").read_text())
    assert (
        [x for x, _ in r["curve"]] == [48]
        and r["lightly"]
        and r["lightly_classes"]
        and r["differences"]
    )


PARITY = os.path.join("benchmarks", "parity.py")


def test_parity_without_lightly_is_one_sentence(tmp_path):
    if importlib.util.find_spec("lightly"):
        pytest.skip("this interpreter has lightly; the sentence is for one without it")
    p = run([PARITY, "--dataset", "digits", "--steps", "1"], check=False)
    assert "parity.py needs lightly" in one_sentence(p)


def test_parity_loss_rung_is_identical_and_the_others_differ(tmp_path, lightly_python):
    import subprocess

    out = tmp_path / "parity.json"
    subprocess.run(
        [
            lightly_python,
            PARITY,
            "--dataset",
            "digits",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--extra=--no-per-view-bn",
        ],
        check=True,
        timeout=600,
    )
    r = json.loads(out.read_text())["rungs"]
    assert [x["rung"][0] for x in r] == ["0", "1", "2", "3", "4"]
    assert (
        abs(r[1]["loss_step1"] - r[0]["loss_step1"]) < 1e-5
        and r[1]["grad_vs_previous_step1"] < 1e-4
    )  # NT-Xent = NTXentLoss
    assert (
        r[2]["grad_vs_previous_step1"] > 1e-3
    )  # per-view BN changes the gradient of the joint batch
    assert (
        r[3]["grad_vs_previous_step1"] < 1e-6 and r[3]["weights_vs_previous_step1"] > 1e-4
    )  # same grads, other step


def test_swav_parity_loss_rung_is_identical_and_the_others_differ(tmp_path, lightly_python):
    import subprocess

    out = tmp_path / "parity_swav.json"
    subprocess.run(
        [
            lightly_python,
            PARITY,
            "swav",
            "--dataset",
            "digits",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    r = result["rungs"]
    assert result["method"] == "swav" and [x["rung"][0] for x in r] == ["0", "1", "2", "3", "4"]
    # assign_codes + swav_loss = lightly's SwaVLoss (Sinkhorn and swapped prediction), over both
    # steps
    assert (
        abs(r[1]["loss_step1"] - r[0]["loss_step1"]) < 1e-5
        and r[1]["grad_vs_previous_step1"] < 1e-4
    )
    assert abs(r[1]["losses"][1] - r[0]["losses"][1]) < 1e-4
    assert (
        r[2]["grad_vs_previous_step1"] > 1e-3
    )  # BN per crop changes the gradient of the joint batch
    assert (
        r[3]["grad_vs_previous_step1"] < 1e-6 and r[3]["weights_vs_previous_step1"] > 1e-4
    )  # clip LARS vs lightly's
    assert abs(r[4]["loss_step1"] - r[3]["loss_step1"]) > 1e-3  # lightly's prototypes have a bias


def test_byol_parity_loss_and_heads_are_identical_and_the_loss_scale_is_not(
    tmp_path, lightly_python
):
    import subprocess

    out = tmp_path / "parity_byol.json"
    subprocess.run(
        [
            lightly_python,
            PARITY,
            "byol",
            "--dataset",
            "digits",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--extra=--lars-mode official",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    r = result["rungs"]
    assert result["method"] == "byol" and [x["rung"][0] for x in r] == ["0", "1", "2", "3", "4"]
    # regression_loss = 4 + 4 x lightly's loss, over both steps (so ema_update and the step
    # agree too)
    assert (
        abs(r[1]["loss_step1"] - r[0]["loss_step1"]) < 1e-5
        and r[1]["grad_vs_previous_step1"] < 1e-4
    )
    assert abs(r[1]["losses"][1] - r[0]["losses"][1]) < 1e-4
    assert (
        abs(r[2]["grad_vs_previous_step1"] - 0.75) < 5e-3
    )  # a quarter of BYOL's gradient, to float noise
    # official LARS is scale-free but for weight decay: the LARS weights move the same, the
    # plain-SGD biases do not
    assert r[2]["weights_vs_previous_step1"] > 1e-4
    assert r[3]["grad_vs_previous_step1"] < 1e-6
    # byol.py's layers are lightly's heads, and its target update after the step is lightly's
    # before the forward
    assert (
        r[4]["grad_vs_previous_step1"] < 1e-4 and abs(r[4]["losses"][1] - r[3]["losses"][1]) < 1e-4
    )
