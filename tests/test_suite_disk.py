"""The suite's own disk use: weight files of a finished test are gone before the next test
starts (conftest), so the whole run fits on a CI machine with a few GB free."""

import torch

MADE = {}


def test_a_test_writes_weights(tmp_path):
    MADE["file"] = tmp_path / "run" / "checkpoint.pt"
    MADE["log"] = tmp_path / "run" / "metrics.jsonl"
    MADE["file"].parent.mkdir()
    torch.save({"w": torch.zeros(1000)}, MADE["file"])
    MADE["log"].write_text("{}\n")
    assert MADE["file"].exists()


def test_the_next_test_finds_them_deleted_and_the_logs_kept():
    assert MADE, "runs after test_a_test_writes_weights (file order)"
    assert not MADE["file"].exists(), "weights of a finished test still on disk"
    assert MADE["log"].exists(), "logs are kept for reading a failure"
