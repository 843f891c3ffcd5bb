"""Submissions: built in sample_submission's order, validated, and written atomically."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.errors import UserError
from ..core.files import write_csv


def submission_from_probs(test_probs: pd.DataFrame, sample: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Argmax artist per test id, in sample_submission's order."""
    probs = test_probs.set_index("id").reindex(sample["id"])
    if probs[classes].isna().any().any():
        missing = probs.index[probs[classes].isna().any(axis=1)][0]
        raise UserError(f"no test probabilities for id '{missing}'; rerun inference")
    return pd.DataFrame({"id": sample["id"].to_numpy(), "artist": probs[classes].idxmax(axis=1).to_numpy()})


def validate_submission(submission: pd.DataFrame, sample: pd.DataFrame, classes: list[str]) -> None:
    """Refuse anything the leaderboard would reject or misread: header, ids and order, labels, gaps."""
    if list(submission.columns) != ["id", "artist"]:
        raise UserError(f"submission header is {list(submission.columns)}, expected ['id', 'artist']")
    if len(submission) != len(sample):
        raise UserError(f"submission has {len(submission)} rows, sample_submission.csv has {len(sample)}")
    mismatch = (submission["id"].astype(str).to_numpy() != sample["id"].astype(str).to_numpy()).nonzero()[0]
    if len(mismatch):
        row = mismatch[0]
        raise UserError(f"submission row {row + 1}: id '{submission['id'].iloc[row]}' where sample_submission.csv "
                        f"has '{sample['id'].iloc[row]}'; ids must follow sample_submission's order")
    missing = submission["artist"].isna() | (submission["artist"].astype(str).str.strip() == "")
    if missing.any():
        raise UserError(f"submission row {int(missing.to_numpy().nonzero()[0][0]) + 1}: missing artist")
    unknown = ~submission["artist"].isin(classes)
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise UserError(f"submission row {row + 1}: artist '{submission['artist'].iloc[row]}' is not one of the "
                        f"{len(classes)} training artists")


def write_submission(submission: pd.DataFrame, path: Path, sample: pd.DataFrame, classes: list[str]) -> None:
    validate_submission(submission, sample, classes)
    write_csv(submission, path)
