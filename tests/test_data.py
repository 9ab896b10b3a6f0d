"""segdeploy.data: synthetic, ADE20K folders, save_to_disk folders, the Hub offline, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdeploy.data import (
    DatasetSpec,
    check_dataset,
    iter_examples,
    label_array,
    load_splits,
    read_id2label,
)
from segdeploy.data.synthetic import ID2LABEL, write_synthetic_folder
from segdeploy.errors import SegdeployError


@pytest.fixture
def ade_dir(tmp_path) -> Path:
    """A small ADE20K-layout folder of synthetic samples: train 6, validation 3, 32 px."""
    return write_synthetic_folder(tmp_path / "ade", n_train=6, n_val=3, seed=0, size=32)


def pixels(ds, i):
    row = ds[i]
    return np.asarray(row["image"]), np.asarray(row["annotation"])


# --- spec ---------------------------------------------------------------------------------


def test_spec_round_trips_through_json():
    spec = DatasetSpec(
        "x", split="train[:5]", eval_split="val", reduce_labels=False, ignore_index=11
    )
    assert DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(SegdeployError, match="unknown dataset fields: colour"):
        DatasetSpec.from_dict({**spec.to_dict(), "colour": 1})


@pytest.mark.parametrize("bad", [256, -1, 3.5])
def test_ignore_index_outside_0_255_is_refused(bad):
    with pytest.raises(SegdeployError) as err:
        DatasetSpec("synthetic", ignore_index=bad)
    assert err.value.where == "--ignore-index" and "0..255" in str(err.value)


def test_test_size_must_be_a_fraction():
    with pytest.raises(SegdeployError, match="--test-size"):
        DatasetSpec("synthetic", test_size=1.5)


# --- synthetic ----------------------------------------------------------------------------


def test_synthetic_defaults_and_disjoint_deterministic_splits():
    spec = DatasetSpec("synthetic:32", split="train[:12]", eval_split="validation[:4]")
    a, b = load_splits(spec), load_splits(spec)
    assert (len(a.train), len(a.eval)) == (12, 4)
    assert a.id2label == ID2LABEL
    assert a.spec.reduce_labels is False and a.spec.eval_split == "validation[:4]"
    assert not set(a.train["name"]) & set(a.eval["name"])
    assert list(a.train["name"]) == list(b.train["name"])
    for i in (0, 11):
        img_a, mask_a = pixels(a.train, i)
        img_b, mask_b = pixels(b.train, i)
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    row = a.train[0]
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
    assert set(np.unique(np.asarray(row["annotation"]))) <= set(ID2LABEL)


def test_synthetic_eval_defaults_to_its_validation_split():
    data = load_splits(DatasetSpec("synthetic:16", split="train[:3]"))
    assert data.spec.eval_split == "validation" and len(data.eval) == 60
    # Validation samples are not train samples, even for the full train split.
    img_val, _ = pixels(data.eval, 0)
    img_train, _ = pixels(data.train, 0)
    assert not np.array_equal(img_val, img_train)


def test_synthetic_slicing_takes_the_same_samples():
    whole = load_splits(DatasetSpec("synthetic:16", split="train[:8]", eval_split="validation[:1]"))
    part = load_splits(DatasetSpec("synthetic:16", split="train[5:8]", eval_split="validation[:1]"))
    assert list(part.train["name"]) == list(whole.train["name"])[5:8]
    np.testing.assert_array_equal(pixels(part.train, 0)[0], pixels(whole.train, 5)[0])


def test_synthetic_bad_size_is_refused():
    with pytest.raises(SegdeployError, match="synthetic:SIZE"):
        load_splits(DatasetSpec("synthetic:huge"))


# --- local ADE20K folders -----------------------------------------------------------------


def test_folder_with_slicing_and_eval_split(ade_dir):
    data = load_splits(DatasetSpec(str(ade_dir), split="train[:4]", eval_split="validation[1:3]"))
    masks = sorted((ade_dir / "annotations" / "train").glob("*.png"))
    assert list(data.train["name"]) == [str(m) for m in masks[:4]]
    val_masks = sorted((ade_dir / "annotations" / "validation").glob("*.png"))
    assert list(data.eval["name"]) == [str(m) for m in val_masks[1:3]]
    assert data.id2label == ID2LABEL  # from id2label.json beside images/
    # Its masks hold 0..4 and id2label names class 0 ("background"): decided not reduced.
    assert data.spec.reduce_labels is False and "0 is class 0 ('background')" in str(
        data.choices["reduce_labels"]
    )
    img, mask = pixels(data.train, 2)
    np.testing.assert_array_equal(
        img,
        np.asarray(Image.open(ade_dir / "images/train" / (masks[2].stem + ".png")).convert("RGB")),
    )
    np.testing.assert_array_equal(mask, np.asarray(Image.open(masks[2])))
    assert check_dataset(data) == 6


def test_folder_test_size_split_is_seeded(ade_dir):
    spec = DatasetSpec(str(ade_dir), split="train", test_size=0.5, reduce_labels=False)
    a, b = load_splits(spec), load_splits(spec)
    assert (len(a.train), len(a.eval)) == (3, 3)
    assert sorted(list(a.train["name"]) + list(a.eval["name"])) == sorted(
        str(p) for p in (ade_dir / "annotations" / "train").glob("*.png")
    )
    assert list(a.eval["name"]) == list(b.eval["name"])
    others = {
        tuple(load_splits(DatasetSpec(str(ade_dir), test_size=0.5, seed=s)).eval["name"])
        for s in range(6)
    }
    assert len(others) > 1  # the seed picks the held-out rows
    assert load_splits(spec, need_train=False).train is None


def test_folder_percent_and_multi_split_expressions(ade_dir):
    data = load_splits(
        DatasetSpec(str(ade_dir), split="train[:50%]+validation[:1]", eval_split="validation[-1:]")
    )
    assert len(data.train) == 4 and len(data.eval) == 1


def test_unknown_split_names_the_available_ones(ade_dir):
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(ade_dir), split="test"))
    assert str(ade_dir) in str(err.value) and "train, validation" in str(err.value)


def test_bad_split_syntax_is_refused(ade_dir):
    with pytest.raises(SegdeployError, match="--split"):
        load_splits(DatasetSpec(str(ade_dir), split="train[a:b]"))


def test_id2label_option_overrides_the_folder_file(ade_dir, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "a", "1": "b", "2": "c", "3": "d"}))
    data = load_splits(
        DatasetSpec(
            str(ade_dir), split="train[:2]", eval_split="validation", id2label_file=str(names)
        )
    )
    assert data.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}


def test_exif_rotated_image_pairs_with_a_mask_of_its_displayed_size(tmp_path):
    root = tmp_path / "exif"
    (root / "images/train").mkdir(parents=True)
    (root / "annotations/train").mkdir(parents=True)
    (root / "id2label.json").write_text('{"0": "a", "1": "b"}')
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 40x20 file displays as 20x40
    Image.new("RGB", (40, 20), "red").save(root / "images/train/a.jpg", exif=exif)
    Image.new("L", (20, 40), 1).save(root / "annotations/train/a.png")
    data = load_splits(DatasetSpec(str(root), eval_split="train", reduce_labels=False))
    row = data.eval[0]
    assert row["image"].size == row["annotation"].size == (20, 40)
    Image.new("L", (40, 20), 1).save(root / "annotations/train/a.png")
    with pytest.raises(SegdeployError, match="20x40"):
        load_splits(DatasetSpec(str(root), eval_split="train", reduce_labels=False))


# --- save_to_disk folders -----------------------------------------------------------------


def test_save_to_disk_dataset_dict(ade_dir, tmp_path):
    import datasets

    source = load_splits(DatasetSpec(str(ade_dir), eval_split="validation", reduce_labels=False))
    saved = tmp_path / "saved"
    # scene_parse_150's columns, plus one that segdeploy must drop.
    dd = datasets.DatasetDict(
        train=source.train.remove_columns("name").add_column("scene_category", [0] * 6),
        validation=source.eval.remove_columns("name"),
    )
    dd.save_to_disk(str(saved))
    (saved / "id2label.json").write_text((ade_dir / "id2label.json").read_text())
    data = load_splits(DatasetSpec(str(saved), split="train[1:5]", eval_split="validation"))
    assert (len(data.train), len(data.eval)) == (4, 3)
    assert data.train.column_names == ["image", "annotation", "name"]
    assert list(data.train["name"])[0] == f"{saved}/train/row 1"
    for i in range(4):
        np.testing.assert_array_equal(pixels(data.train, i)[0], pixels(source.train, i + 1)[0])
        np.testing.assert_array_equal(pixels(data.train, i)[1], pixels(source.train, i + 1)[1])
    assert data.id2label == ID2LABEL


def test_save_to_disk_single_dataset_with_other_column_names(ade_dir, tmp_path):
    source = load_splits(DatasetSpec(str(ade_dir), eval_split="validation"))
    saved = tmp_path / "single"
    source.eval.rename_columns({"image": "pixel_values", "annotation": "label"}).save_to_disk(
        str(saved)
    )
    data = load_splits(
        DatasetSpec(
            str(saved), eval_split="train[:1]", id2label_file=str(ade_dir / "id2label.json")
        )
    )
    assert len(data.train) == 3 and data.eval[0]["image"].mode == "RGB"
    np.testing.assert_array_equal(pixels(data.eval, 0)[1], pixels(source.eval, 0)[1])


# --- the Hub, offline -----------------------------------------------------------------------


ALTERNATIVES = ("ADE20K layout", "save_to_disk", "'synthetic'")


def test_hub_id_offline_mode_fails_at_once_naming_alternatives(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec("segdeploy-tests/no-such-dataset", split="train[:50]"))
    assert time.monotonic() - start < 15
    assert err.value.where == "segdeploy-tests/no-such-dataset"
    assert all(alt in str(err.value) for alt in ALTERNATIVES) and "\n" not in str(err.value)


def test_hub_unreachable_without_offline_mode_fails_at_once(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    # Port 9 on loopback refuses at once: a stand-in for "no network" that never reaches the Hub.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec("scene_parse_150", split="train[:50]"))
    assert time.monotonic() - start < 15
    assert err.value.where == "scene_parse_150" and "unreachable" in str(err.value)
    assert all(alt in str(err.value) for alt in ALTERNATIVES)


# --- bad input: one error line naming the file --------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(tmp_path / "nowhere")))
    assert err.value.where == str(tmp_path / "nowhere") and "not found" in err.value.problem


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(tmp_path / "empty")))
    assert err.value.where == str(tmp_path / "empty") and "empty" in err.value.problem


def test_split_folder_without_images(ade_dir):
    for f in (ade_dir / "images" / "train").iterdir():
        f.unlink()
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(ade_dir)))
    assert err.value.where == str(ade_dir / "images" / "train") and "no images" in err.value.problem


def test_image_without_mask(ade_dir):
    mask = sorted((ade_dir / "annotations" / "train").glob("*.png"))[2]
    mask.unlink()
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(ade_dir), split="train[:1]"))
    assert err.value.where == str(ade_dir / "images" / "train" / mask.name)
    assert "no mask" in err.value.problem


def test_mask_without_image(ade_dir):
    image = sorted((ade_dir / "images" / "validation").glob("*.png"))[0]
    image.unlink()
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(ade_dir), eval_split="validation"))
    assert err.value.where == str(ade_dir / "annotations" / "validation" / image.name)
    assert "no image" in err.value.problem


def test_mask_size_differs_from_its_image(ade_dir):
    mask = sorted((ade_dir / "annotations" / "train").glob("*.png"))[1]
    Image.new("L", (30, 32)).save(mask)
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(ade_dir), eval_split="validation"))
    assert (
        err.value.where == str(mask)
        and "30x32" in err.value.problem
        and "32x32" in err.value.problem
    )


def test_label_values_beyond_num_labels(ade_dir):
    mask = sorted((ade_dir / "annotations" / "validation").glob("*.png"))[1]
    arr = np.asarray(Image.open(mask)).copy()
    arr[0, :3] = [7, 9, 255]  # 7 and 9 are not classes of 0..4; 255 is the ignore index
    Image.fromarray(arr).save(mask)
    data = load_splits(DatasetSpec(str(ade_dir), eval_split="validation", reduce_labels=False))
    with pytest.raises(SegdeployError) as err:
        check_dataset(data)
    assert err.value.where == str(mask)
    assert "7, 9" in err.value.problem and "255" not in err.value.problem.split("ignore")[0]
    with pytest.raises(SegdeployError, match="7, 9"):
        label_array(
            data.eval[1]["annotation"],
            reduce_labels=False,
            ignore_index=255,
            num_labels=5,
            where=data.eval[1]["name"],
        )


def test_unreadable_image_at_load_time(ade_dir):
    image = sorted((ade_dir / "images" / "train").glob("*.png"))[0]
    image.write_bytes(b"not an image at all")
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(ade_dir), eval_split="validation"))
    assert err.value.where == str(image) and "cannot read image" in err.value.problem


def test_truncated_image_found_by_check_dataset(ade_dir):
    image = sorted((ade_dir / "images" / "validation").glob("*.png"))[2]
    image.write_bytes(image.read_bytes()[:200])  # the header survives, the pixels do not
    data = load_splits(DatasetSpec(str(ade_dir), eval_split="validation"))
    with pytest.raises(SegdeployError) as err:
        check_dataset(data)
    assert err.value.where == str(image) and "cannot read image" in err.value.problem


@pytest.mark.parametrize(
    "content, problem",
    [
        ('["road", "car"]', "JSON object"),
        ('{"road": 0}', "not an integer"),
        ('{"0": 1}', "not a class name"),
        ('{"0": "road", "2": "car"}', "without gaps"),
        ("{not json", "not valid JSON"),
        ("{}", "JSON object"),
    ],
)
def test_id2label_file_that_is_not_ids_to_names(ade_dir, tmp_path, content, problem):
    bad = tmp_path / "id2label.json"
    bad.write_text(content)
    with pytest.raises(SegdeployError) as err:
        load_splits(DatasetSpec(str(ade_dir), eval_split="validation", id2label_file=str(bad)))
    assert err.value.where == str(bad) and problem in err.value.problem


def test_folder_without_id2label_asks_for_one(ade_dir):
    (ade_dir / "id2label.json").unlink()
    with pytest.raises(SegdeployError, match="--id2label"):
        load_splits(DatasetSpec(str(ade_dir), eval_split="validation"))


def test_read_id2label_sorts_and_converts_keys(tmp_path):
    f = tmp_path / "names.json"
    f.write_text('{"1": "car", "0": "road"}')
    assert read_id2label(f) == {0: "road", 1: "car"}


# --- label_array --------------------------------------------------------------------------


def test_label_array_reduce_labels_like_transformers():
    raw = np.array([[0, 1, 2], [5, 255, 3]], dtype=np.uint8)
    out = label_array(raw, reduce_labels=True, ignore_index=255, num_labels=5, where="m.png")
    np.testing.assert_array_equal(out, [[255, 0, 1], [4, 255, 2]])
    assert out.dtype == np.int64
    same = label_array(
        raw[:, :3], reduce_labels=False, ignore_index=255, num_labels=6, where="m.png"
    )
    np.testing.assert_array_equal(same, raw[:, :3])
    with pytest.raises(SegdeployError, match="m.png: mask values 6 .*reduce"):
        label_array(
            np.array([[6]]), reduce_labels=True, ignore_index=255, num_labels=5, where="m.png"
        )


def test_label_array_reads_palette_and_grey_rgb_masks_but_not_colour():
    values = np.array([[0, 3], [2, 1]], dtype=np.uint8)
    pal = Image.fromarray(values, mode="P")
    pal.putpalette([255, 255, 255] * 4 + [0, 0, 0] * 252)  # colours unrelated to class ids
    np.testing.assert_array_equal(
        label_array(pal, reduce_labels=False, ignore_index=255, num_labels=4, where="p"), values
    )
    grey = Image.fromarray(np.stack([values] * 3, -1), mode="RGB")
    np.testing.assert_array_equal(
        label_array(grey, reduce_labels=False, ignore_index=255, num_labels=4, where="g"), values
    )
    colour = Image.fromarray(np.dstack([values, values * 2, values]), mode="RGB")
    with pytest.raises(SegdeployError, match="c: mask is a colour"):
        label_array(colour, reduce_labels=False, ignore_index=255, num_labels=9, where="c")


# --- real data ----------------------------------------------------------------------------


@pytest.mark.slow
def test_camvid_train_val(camvid):
    spec = DatasetSpec(
        str(camvid), split="train", eval_split="val", reduce_labels=False, ignore_index=11
    )
    data = load_splits(spec)
    assert (len(data.train), len(data.eval)) == (367, 101)
    assert len(data.id2label) == 11 and data.id2label[0] == "sky"
    assert check_dataset(data) == 468  # every mask within 0..10 or void 11
    seen = set()
    for ds in (data.train, data.eval):
        for i in range(0, len(ds), 25):
            row = ds[i]
            labels = label_array(
                row["annotation"],
                reduce_labels=False,
                ignore_index=11,
                num_labels=11,
                where=row["name"],
            )
            assert labels.shape == row["image"].size[::-1]
            seen |= set(np.unique(labels).tolist())
    assert seen <= set(range(12)) and len(seen) >= 10


def test_iter_examples_gives_checked_labels_for_held_out_rows(ade_dir):
    data = load_splits(DatasetSpec(str(ade_dir), split="train", test_size=0.5, reduce_labels=True))
    rows = list(iter_examples(data, "eval"))
    assert [name for _, _, name in rows] == list(data.eval["name"])
    for image, labels, name in rows:
        raw = np.asarray(Image.open(name))
        assert image.mode == "RGB" and labels.dtype == np.int64
        # reduce_labels: 0 -> 255, v -> v - 1
        np.testing.assert_array_equal(labels, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    synthetic = load_splits(
        DatasetSpec("synthetic:16", split="train[:2]", eval_split="validation[:2]")
    )
    names = [name for *_, name in iter_examples(synthetic, "train")]
    assert names == list(synthetic.train["name"])


def test_need_train_false_reads_only_the_eval_split(ade_dir):
    spec = DatasetSpec(str(ade_dir), split="no_such_split", eval_split="validation")
    data = load_splits(spec, need_train=False)
    assert data.train is None and len(data.eval) == 3
    with pytest.raises(SegdeployError, match="no_such_split"):
        load_splits(spec)


def test_relative_folder_is_recorded_absolute(ade_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(ade_dir.parent)
    data = load_splits(DatasetSpec("./ade", split="train[:2]", eval_split="validation[:1]"))
    assert data.spec.name == str(ade_dir.resolve())
    monkeypatch.chdir(tmp_path.parent)  # rows still decode from anywhere
    assert data.train[1]["image"].size == (32, 32)
    assert load_splits(DatasetSpec.from_dict(data.spec.to_dict())).spec == data.spec
