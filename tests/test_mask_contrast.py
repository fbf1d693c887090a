"""benchmarks/mask_contrast.py: the correlation mask's contrast in both forms (issue 34, 2)."""

import json
import os
import sys

import numpy as np
import torch

from conftest import REPO, run

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import mask_contrast  # noqa: E402


def test_measure_tells_related_from_unrelated_and_mutes_a_faint_position():
    """Two classes whose feature maps live on disjoint channels: the related positive shares the
    anchor's channels, the unrelated one not, so the mask separates them perfectly (AUROC 1) in
    both forms; a faint position is muted by Eq. 3 alone."""
    g = torch.Generator().manual_seed(0)
    n, d = 40, 16
    labels = np.arange(n) % 2
    f = torch.zeros(n, d, 3, 3)
    for i in range(n):
        half = slice(0, d // 2) if labels[i] == 0 else slice(d // 2, d)
        f[i, half] = torch.rand(d // 2, 3, 3, generator=g) + 0.1
    out = mask_contrast.measure(f, labels, batch=10)
    for form in ("eq3", "cosine"):
        assert out[form]["auroc"] == 1.0 and out[form]["mean_unrelated"] == 0.0
    assert out["eq3"]["faint_position"] < 0.01 < 0.5 < out["cosine"]["faint_position"]
    assert mask_contrast.auroc(np.array([1.0, 2.0]), np.array([1.0, 0.0])) == 0.875


def test_the_command_on_a_random_backbone(tmp_path):
    out = tmp_path / "c.json"
    p = run(
        ["benchmarks/mask_contrast.py", "--random", "resnet18-eighth", "--dataset", "digits"]
        + ["--image-size", "16", "--images", "60", "--batch-size", "20", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["images"] == 60 and result["feature_map"] == [64, 2, 2], p.stdout
    assert 0 <= result["eq3"]["auroc"] <= 1 and result["cosine"]["faint_position"] > 0.5
