"""Bad input: every case of docs/bad-input.md either stops with one line naming the file and
what to do, or follows the policy the table states. The last test keeps the table and the tests in step."""
from __future__ import annotations

import importlib
import re
import struct
import unicodedata
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

from src.data.device_input import InputStage
from src.core.config import resolve_config
from src.core.schema import ModelConfig
from src.data.competition import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV, load_competition_data
from src.data.images import read_image
from src.core.errors import UserError
from src.core.files import save_torch
from src.model.checkpoints import load_checkpoint
from src.model.networks import build_model
from src.training.loop import Training, train_one_epoch
from src.training.objective import Objective

from .conftest import TINY_RUN, load_error, rewrite, run_cli

REPO = Path(__file__).resolve().parent.parent
# Colour patches: red, green, blue, mid grey, a skin tone.
PATCHES = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (224, 172, 105)]


def patches_rgb() -> np.ndarray:
    return np.repeat(np.asarray(PATCHES, np.uint8)[None, :, None, :], 16, axis=0).repeat(16, axis=2).reshape(16, -1, 3)


def replace_first_train_image(root: Path, image_path: Path | str, new_name: str) -> str:
    """Point train row 0 (line 2) at `new_name` under train/, holding the bytes of `image_path`."""
    rel = f"./train/{new_name}"
    (root / rel).write_bytes(Path(image_path).read_bytes())

    def point(df):
        df.loc[0, "img_path"] = rel
        return df
    rewrite(root / "train.csv", point)
    return rel


# --- image formats --------------------------------------------------------------------------------------------

def test_cmyk_jpeg_decodes_to_the_right_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(patches_rgb()).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    decoded = read_image(str(path))
    assert decoded.shape == (16, 16 * len(PATCHES), 3)
    centres = decoded[8, 8::16].astype(int)
    assert np.abs(centres - np.asarray(PATCHES)).max() <= 6, centres


def test_png_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = (30, 20, 10)  # BGR order for cv2.imwrite: the stored colour is RGB (10, 20, 30)
    rgba[:, :4, 3] = 0            # left half fully transparent, right half opaque
    rgba[:, 4:, 3] = 255
    path = tmp_path / "alpha.png"
    cv2.imwrite(str(path), rgba)
    decoded = read_image(str(path))
    assert decoded.shape == (6, 8, 3) and (decoded == (10, 20, 30)).all()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_greyscale_becomes_three_equal_channels(tmp_path, suffix):
    grey = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (8, 1))
    path = tmp_path / f"grey{suffix}"
    cv2.imwrite(str(path), grey)
    assert Image.open(path).mode == "L"
    decoded = read_image(str(path)).astype(int)
    assert decoded.shape == (8, 32, 3)
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()
    assert np.abs(decoded[..., 0] - grey).max() <= (0 if suffix == ".png" else 8)


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    deep = (np.arange(3 * 4 * 3).reshape(3, 4, 3) * 1800).astype(np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), deep)
    decoded = read_image(str(path))
    assert decoded.dtype == np.uint8
    assert (decoded == (deep[..., ::-1] >> 8)).all()


def noise_jpeg() -> tuple[np.ndarray, bytes]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    return noise, cv2.imencode(".jpg", noise)[1].tobytes()


def test_truncated_jpeg_stops_when_read(tmp_path):
    _, encoded = noise_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(encoded[: len(encoded) // 2])
    Image.open(path).close()  # the header is intact, so the load-time scan passes it
    with pytest.raises(UserError, match="cannot decode the image .corrupt, truncated or unsupported"):
        read_image(str(path))


@pytest.mark.slow
def test_truncated_jpeg_read_by_a_worker_stops_the_run_with_one_line_and_keeps_finished_folds(data_copy, tmp_path,
                                                                                               capsys):
    args = ["run", "exp00", "--data", data_copy, "--outputs", tmp_path / "outputs", "--submissions",
            tmp_path / "submissions", *TINY_RUN, "train.num_workers=2"]
    assert run_cli(*args, "train.folds=[0]") == 0
    fold0 = pd.read_csv(next((tmp_path / "outputs" / "folds").glob("*.csv")), dtype={"id": str}).query("fold == 0")
    image = data_copy / "train" / Path(pd.read_csv(data_copy / "train.csv", dtype=str).set_index("id")
                                       .loc[fold0["id"].iloc[0], "img_path"]).name
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # fold 1 trains on it
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {image}: cannot decode the image (corrupt, truncated or unsupported); replace it or "
                   "remove its row")
    assert (tmp_path / "outputs" / "exp00" / "fold0" / "done.json").is_file()
    assert not (tmp_path / "outputs" / "exp00" / "fold1" / "done.json").exists()


def test_damaged_jpeg_data_decodes_with_libjpegs_warning(tmp_path, capfd):
    _, encoded = noise_jpeg()
    path = tmp_path / "damaged.jpg"
    middle = len(encoded) // 2
    path.write_bytes(encoded[:middle] + bytes(b ^ 0xFF for b in encoded[middle:middle + 100]) + encoded[middle + 100:])
    intact = cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    decoded = read_image(str(path))
    assert decoded.shape == intact.shape and (decoded != intact).any()
    assert "Corrupt JPEG data" in capfd.readouterr().err


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def test_image_over_opencvs_own_limit_stops_with_one_line(tmp_path):
    path = tmp_path / "huge.png"
    png_header_only(path, 40_000, 40_000)  # 1.6e9 pixels > CV_IO_MAX_IMAGE_PIXELS = 2**30
    with pytest.raises(UserError, match="OpenCV refuses to decode the image .failed check: "
                                        "pixels <= CV_IO_MAX_IMAGE_PIXELS"):
        read_image(str(path))


# --- decompression bomb ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    """A real 10000 x 10000 bilevel PNG: 100 million pixels (300 MB once decoded as RGB) in about 12 KB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)
    assert path.stat().st_size < 100_000
    return path


def test_image_over_the_pixel_limit_stops_before_decoding(data_copy, bomb_png, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    rel = replace_first_train_image(data_copy, bomb_png, "0000.png")

    def no_decoding(self):
        raise AssertionError("the pixel data was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    message = load_error(data_copy)
    assert f"train.csv line 2: image '{rel}'" in message
    assert "10000x10000 = 100,000,000 pixels" in message and f"limit of {DEFAULT_MAX_IMAGE_PIXELS:,}" in message
    assert f"{MAX_PIXELS_ENV}=100000000" in message

    monkeypatch.setenv(MAX_PIXELS_ENV, "100000000")  # the limit the message suggests lets it through
    assert load_competition_data(data_copy).train.loc[0, "img_path"] == rel
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    assert f"{MAX_PIXELS_ENV}='lots'" in load_error(data_copy)


@pytest.mark.slow
def test_image_over_the_pixel_limit_from_the_command_line(data_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")  # the tiny demo images are 64..112 px a side
    code = run_cli("run", "exp00", "--data", data_copy, "--outputs", tmp_path / "o", "--submissions",
                   tmp_path / "s", *TINY_RUN)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.fullmatch(r"error: \S+train\.csv line 2: image '\./train/\d+\.jpg' under \S+ is \d+x\d+ = "
                        rf"[\d,]+ pixels, over the limit of 1,000 \(a decompression bomb\?\); .*{MAX_PIXELS_ENV}=\d+",
                        err[0]), err[0]
    assert not (tmp_path / "o" / "exp00" / "fold0").exists()


# --- CSV files --------------------------------------------------------------------------------------------------

def test_extra_columns_are_ignored_and_logged(data_copy):
    rewrite(data_copy / "train.csv", lambda df: df.assign(notes="x", source="y"))
    notes = []
    data = load_competition_data(data_copy, log=notes.append)
    assert list(data.train.columns[:3]) == ["id", "img_path", "artist"] and "notes" not in data.train
    assert any("train.csv: ignoring extra columns 'notes', 'source'" in note for note in notes)


def test_row_with_more_fields_than_the_header(data_copy):
    path = data_copy / "train.csv"
    lines = path.read_text().splitlines()
    lines[1] += ",stray"  # the first data row: pandas would otherwise take column 1 as an index
    path.write_text("\n".join(lines) + "\n")
    message = load_error(data_copy)
    assert "cannot parse as CSV" in message and "Expected 3 fields in line 2, saw 4" in message


def test_duplicate_column(data_copy):
    path = data_copy / "train.csv"
    path.write_text(path.read_text().replace("id,img_path,artist", "id,img_path,artist,artist", 1))
    assert "column 'artist' appears twice" in load_error(data_copy)


def test_csv_not_in_utf8(data_copy):
    rewrite(data_copy / "train.csv", lambda df: df.assign(artist=df["artist"].where(df.index != 4, "Albrecht Dürer")))
    path = data_copy / "train.csv"
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    message = load_error(data_copy)
    assert "train.csv: cannot parse as CSV ('utf-8' codec can't decode" in message and "UTF-8" in message


def test_stray_spaces_in_labels_are_stripped(data_copy):
    original = load_competition_data(data_copy)
    rewrite(data_copy / "train.csv", lambda df: df.assign(artist="  " + df["artist"] + " \t"))
    data = load_competition_data(data_copy)
    assert data.classes == original.classes and (data.train["label"] == original.train["label"]).all()


# --- names with spaces and accents -----------------------------------------------------------------------------

ACCENTED = "Ménard épreuve 01.jpg"


def test_file_and_artist_names_with_spaces_and_accents(data_copy):
    source = data_copy / pd.read_csv(data_copy / "train.csv")["img_path"][0]
    rel = replace_first_train_image(data_copy, source, ACCENTED)
    rewrite(data_copy / "train.csv", lambda df: df.assign(artist=df["artist"].where(df.index != 0, "Albrecht Dürer")))
    data = load_competition_data(data_copy)
    assert data.train.loc[0, "img_path"] == rel and "Albrecht Dürer" in data.classes
    assert (read_image(data.train.loc[0, "path"]) == read_image(str(source))).all()


def test_file_name_in_the_other_unicode_form_on_disk_is_found(data_copy):
    source = data_copy / pd.read_csv(data_copy / "train.csv")["img_path"][0]
    replace_first_train_image(data_copy, source, ACCENTED)  # the CSV names the composed (NFC) form
    decomposed = data_copy / "train" / unicodedata.normalize("NFD", ACCENTED)
    (data_copy / "train" / ACCENTED).rename(decomposed)
    assert not (data_copy / "train" / ACCENTED).exists()
    data = load_competition_data(data_copy)
    assert Path(data.train.loc[0, "path"]).name == decomposed.name
    assert read_image(data.train.loc[0, "path"]).shape[2] == 3


def test_one_artist_in_two_unicode_forms(data_copy):
    composed = "Albrecht Dürer"
    decomposed = unicodedata.normalize("NFD", composed)
    rewrite(data_copy / "train.csv", lambda df: df.assign(artist=df["artist"].mask(df.index == 0, composed)
                                                          .mask(df.index == 3, decomposed)))
    message = load_error(data_copy)
    assert "train.csv line 5" in message and "NFC vs NFD" in message and "line 2" in message


# --- paths ------------------------------------------------------------------------------------------------------

def test_absolute_img_path_outside_the_data_root(data_copy, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((data_copy / pd.read_csv(data_copy / "train.csv")["img_path"][0]).read_bytes())

    def point(df):
        df.loc[2, "img_path"] = str(outside)
        return df
    rewrite(data_copy / "train.csv", point)
    message = load_error(data_copy)
    assert "train.csv line 4" in message and "escapes the data root" in message


def test_symlinked_image_folder_inside_the_root_is_followed(data_copy, tmp_path):
    elsewhere = tmp_path / "other_disk" / "train"
    elsewhere.parent.mkdir()
    (data_copy / "train").rename(elsewhere)
    (data_copy / "train").symlink_to(elsewhere, target_is_directory=True)
    data = load_competition_data(data_copy)
    assert Path(data.train.loc[0, "path"]).is_relative_to(data_copy)
    assert read_image(data.train.loc[0, "path"]).ndim == 3


# --- checkpoints and training -----------------------------------------------------------------------------------

def tiny_model(n_classes: int, backbone: str = "test_efficientnet"):
    return build_model(ModelConfig(backbone=backbone, pretrained=False), n_classes)


def test_checkpoint_from_another_backbone_or_class_count(tmp_path):
    classes = ["A", "B", "C"]
    path = tmp_path / "exp00" / "fold2" / "best.pt"
    save_torch({"model": tiny_model(3).state_dict(), "classes": classes, "backbone": "test_efficientnet"}, path)
    load_checkpoint(tiny_model(3), path, classes, "test_efficientnet")
    with pytest.raises(UserError, match="trained with backbone 'test_efficientnet' and 3 artists, not "
                                        "'test_resnet' and 3"):
        load_checkpoint(tiny_model(3, "test_resnet"), path, classes, "test_resnet")
    with pytest.raises(UserError, match=r"and 3 artists, not 'test_efficientnet' and 4; use the checkpoint of this "
                                        r"experiment and data, or train the fold again: bash run.sh exp00 "
                                        r"train.folds=\[2\] --restart$"):
        load_checkpoint(tiny_model(4), path, [*classes, "D"], "test_efficientnet")


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "exp00" / "fold0" / "last.pt"
    save_torch({"model": tiny_model(3).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"last.pt: not a readable checkpoint \(RuntimeError: .*; train the fold "
                                        r"again: bash run.sh exp00 train.folds=\[0\] --restart$"):
        load_checkpoint(tiny_model(3), path, ["A", "B", "C"], "test_efficientnet")
    torch.save(tiny_model(3), path)  # a pickled module: weights_only=True refuses to run its code
    with pytest.raises(UserError, match=r"not a readable checkpoint \(UnpicklingError: Weights only load failed"):
        load_checkpoint(tiny_model(3), path, ["A", "B", "C"], "test_efficientnet")


@pytest.mark.slow
def test_loss_that_is_not_finite_stops_training():
    """The loop reads its losses once every CHECK_EVERY steps; the message still names the first bad step and the
    learning rate that step used."""
    cfg, _ = resolve_config("exp00", "demo")
    model = tiny_model(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    batches = [(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1])) for _ in range(5)]

    class NanAtStep3(InputStage):
        def __call__(self, images, batch):
            images = super().__call__(images, batch)
            return images.fill_(float("nan")) if batch == 3 else images

    run = Training(cfg, torch.device("cpu"), model, model, model, (0.5,) * 3, (0.5,) * 3, 0, batches, optimizer,
                   scheduler, torch.amp.GradScaler("cpu", enabled=False),
                   Objective(torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(reduction="none"), 3),
                   inputs=NanAtStep3((0.5,) * 3, (0.5,) * 3))
    with pytest.raises(UserError, match=r"^exp00 fold 0 epoch 1: loss became nan at epoch 1 step 3 \(lr 2.50e-02\); "
                                        "lower optimizer.lr or check the data$"):
        train_one_epoch(run, 1, desc="exp00 fold 0 epoch 1")


# --- the table of docs/bad-input.md ------------------------------------------------------------------------------

def readme_table_tests() -> list[list[str]]:
    """The tests named by each row of the table in docs/bad-input.md."""
    text = (REPO / "docs" / "bad-input.md").read_text(encoding="utf-8")
    section = text.split("# Bad input and what you see", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]
    return [re.findall(r"`(tests/\w+\.py::\w+)`", row) for row in rows]


def test_readme_table_names_existing_tests_and_lists_every_test_here():
    rows = readme_table_tests()
    assert len(rows) >= 20 and all(rows), "every row of the table names its test"
    named = {name for row in rows for name in row}
    for name in named:
        path, function = name.split("::")
        assert hasattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function), name
    this_test = "test_readme_table_names_existing_tests_and_lists_every_test_here"
    here = {f"tests/test_bad_input.py::{name}" for name in globals() if name.startswith("test_") and name != this_test}
    assert here <= named, here - named
