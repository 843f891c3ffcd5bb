"""Loading the competition layout: each bad input stops with one line naming the file, line and problem."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from src.data.competition import load_competition_data
from src.data.folds import make_folds, shared_folds
from src.core.errors import UserError

from .conftest import load_error, rewrite, run_cli


def test_loads_the_demo_layout(tiny_root):
    data = load_competition_data(tiny_root)
    assert data.is_demo and data.solution is not None
    assert len(data.classes) == 6 and data.classes == sorted(data.classes)
    assert data.train["label"].between(0, 5).all()
    assert data.test["id"].tolist() == pd.read_csv(tiny_root / "test.csv")["id"].tolist()


def test_missing_column(data_copy):
    rewrite(data_copy / "train.csv", lambda df: df.drop(columns=["artist"]))
    message = load_error(data_copy)
    assert "train.csv" in message and "missing column 'artist'" in message


def test_duplicate_id(data_copy):
    rewrite(data_copy / "train.csv", lambda df: df.assign(id=df["id"].where(df.index != 3, df["id"][1])))
    message = load_error(data_copy)
    assert "train.csv line 5" in message and "duplicate id" in message and "line 3" in message


def test_empty_label(data_copy):
    def blank(df):
        df.loc[7, "artist"] = " "
        return df
    rewrite(data_copy / "train.csv", blank)
    message = load_error(data_copy)
    assert "train.csv line 9" in message and "empty artist" in message


def test_missing_image(data_copy):
    first = pd.read_csv(data_copy / "train.csv")["img_path"][0]
    (data_copy / first).unlink()
    message = load_error(data_copy)
    assert "train.csv line 2" in message and "not found" in message and first in message


def test_unreadable_image(data_copy):
    first = pd.read_csv(data_copy / "test.csv")["img_path"][2]
    (data_copy / first).write_bytes(b"this is not a jpeg")
    message = load_error(data_copy)
    assert "test.csv line 4" in message and "not a readable image" in message


def test_zero_byte_image(data_copy):
    first = pd.read_csv(data_copy / "train.csv")["img_path"][0]
    (data_copy / first).write_bytes(b"")
    assert "zero-byte" in load_error(data_copy)


def test_path_escaping_the_data_root(data_copy):
    outside = data_copy.parent / "outside.jpg"
    outside.write_bytes((data_copy / pd.read_csv(data_copy / "train.csv")["img_path"][0]).read_bytes())

    def escape(df):
        df.loc[0, "img_path"] = "../outside.jpg"
        return df
    rewrite(data_copy / "train.csv", escape)
    message = load_error(data_copy)
    assert "train.csv line 2" in message and "escapes the data root" in message


def test_test_ids_differ_from_sample_submission(data_copy):
    rewrite(data_copy / "sample_submission.csv", lambda df: df.assign(id=df["id"].replace(df["id"][0], "TEST_X")))
    message = load_error(data_copy)
    assert "differ from sample_submission.csv" in message and "TEST_X" in message


def test_byte_order_mark_and_stray_spaces_are_tolerated(data_copy):
    path = data_copy / "train.csv"
    text = path.read_text().replace(",", ", ")
    path.write_bytes("\ufeff".encode() + text.encode())
    data = load_competition_data(data_copy)
    assert list(data.train.columns[:3]) == ["id", "img_path", "artist"]
    assert not data.train["artist"].str.startswith(" ").any()


def test_label_fixes_correct_rows_and_skip_absent_ids(data_copy):
    train = pd.read_csv(data_copy / "train.csv", dtype=str)
    other = sorted(set(train["artist"]) - {train["artist"][0]})[0]
    notes = []
    data = load_competition_data(data_copy, {int(train["id"][0]): other, 99999: other}, log=notes.append)
    assert data.train.loc[0, "artist"] == other
    assert data.train.loc[0, "label"] == data.classes.index(other)
    assert any("99999" in n and "skipped" in n for n in notes)
    with pytest.raises(UserError, match="not an artist"):
        load_competition_data(data_copy, {int(train["id"][0]): "Nobody"})


def test_folds_are_stratified_and_identical_across_runs(tiny_root, tmp_path):
    """The shared folds are scikit-learn's StratifiedKFold(5, shuffle, seed 42) on the labels as distributed,
    written once and read back by every later run."""
    from sklearn.model_selection import StratifiedKFold

    data = load_competition_data(tiny_root)
    first = shared_folds(data, 5, 42, tmp_path / "folds")
    again = shared_folds(data, 5, 42, tmp_path / "folds")
    expected = np.empty(len(data.train), dtype=int)
    splits = StratifiedKFold(5, shuffle=True, random_state=42).split(np.zeros(len(data.train)), data.train["artist"])
    for fold, (_, rows) in enumerate(splits):
        expected[rows] = fold
    assert (first["fold"].to_numpy() == expected).all() and (again["fold"].to_numpy() == expected).all()
    fresh = make_folds(data.train["id"], data.train["artist"], 5, 42)
    per_class = pd.crosstab(first["artist"], first["fold"])
    assert (per_class.max(axis=1) - per_class.min(axis=1) <= 1).all()
    assert len(list((tmp_path / "folds").glob("*.csv"))) == 1 and (fresh == expected).all()
    other_seed = make_folds(data.train["id"], data.train["artist"], 5, 7)
    assert not (other_seed == fresh).all()


@pytest.mark.slow
def test_command_line_gives_one_line_and_nonzero_exit(data_copy, tmp_path, capsys):
    rewrite(data_copy / "train.csv", lambda df: df.drop(columns=["img_path"]))
    code = run_cli("run", "exp00", "--data", data_copy, "--outputs", tmp_path / "o", "--submissions", tmp_path / "s",
                   "--profile", "demo")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [err[0]] and err[0].startswith("error: ") and "missing column 'img_path'" in err[0]
