"""Submissions are validated before they are written, and written atomically."""
from __future__ import annotations

import pandas as pd
import pytest

from src.core.errors import UserError
from src.pipeline.submission import submission_from_probs, validate_submission, write_submission

CLASSES = ["Alfred Sisley", "Albrecht Du rer", "Titian"]
SAMPLE = pd.DataFrame({"id": ["TEST_00000", "TEST_00001", "TEST_00002"], "artist": ["Titian"] * 3})


def good() -> pd.DataFrame:
    return pd.DataFrame({"id": SAMPLE["id"], "artist": ["Titian", "Albrecht Du rer", "Alfred Sisley"]})


def test_argmax_in_sample_order():
    probs = pd.DataFrame({"id": ["TEST_00002", "TEST_00000", "TEST_00001"], "Alfred Sisley": [0.8, 0.1, 0.1],
                          "Albrecht Du rer": [0.1, 0.1, 0.7], "Titian": [0.1, 0.8, 0.2]})
    assert submission_from_probs(probs, SAMPLE, CLASSES).equals(good())


@pytest.mark.parametrize("breakage, message", [
    (lambda s: s.rename(columns={"artist": "label"}), "header"),
    (lambda s: s.iloc[:2], "rows"),
    (lambda s: s.iloc[[1, 0, 2]].reset_index(drop=True), "order"),
    (lambda s: s.assign(artist=["Titian", None, "Titian"]), "missing artist"),
    (lambda s: s.assign(artist=["Titian", "Claude Monet", "Titian"]), "not one of"),
])
def test_malformed_submissions_are_refused(tmp_path, breakage, message):
    with pytest.raises(UserError, match=message):
        write_submission(breakage(good()), tmp_path / "sub.csv", SAMPLE, CLASSES)
    assert not list(tmp_path.iterdir())


def test_valid_submission_is_written(tmp_path):
    validate_submission(good(), SAMPLE, CLASSES)
    write_submission(good(), tmp_path / "sub.csv", SAMPLE, CLASSES)
    assert pd.read_csv(tmp_path / "sub.csv").equals(good())
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]
