"""PreparedDataset and the albumentations pipelines."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
import torch

from cmdbnet.data import PreparedDataset, eval_transform, read_manifest, train_transform
from cmdbnet.errors import CmdbError
from cmdbnet.settings import IMAGENET_MEAN, IMAGENET_STD

MEAN, STD = list(IMAGENET_MEAN), list(IMAGENET_STD)


def test_items_are_normalised_tensors_with_matching_labels(prepared_potsdam):
    ds = PreparedDataset(prepared_potsdam, "train")
    assert len(ds) == 16 and ds.classes[1] == "building" and ds.ignore_index == 255
    assert ds.stems == sorted(ds.stems) and ds.manifest["crop"] == 128
    item = ds[3]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert item["label"].shape == (128, 128) and item["label"].dtype == torch.int64
    with rasterio.open(prepared_potsdam / "train" / "images" / f"{item['name']}.tif") as src:
        raw = src.read().astype(np.float32)
    expected = (raw - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    np.testing.assert_allclose(item["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
    with rasterio.open(prepared_potsdam / "train" / "labels" / f"{item['name']}.tif") as src:
        np.testing.assert_array_equal(item["label"].numpy(), src.read(1))


def test_eval_transform_equals_the_default(prepared_potsdam):
    a = PreparedDataset(prepared_potsdam, "val")[0]
    b = PreparedDataset(prepared_potsdam, "val", eval_transform(MEAN, STD))[0]
    assert torch.equal(a["image"], b["image"]) and a["name"] == b["name"]


def test_strength_zero_is_deterministic_and_only_normalises(prepared_potsdam):
    plain = PreparedDataset(prepared_potsdam, "val")
    ds = PreparedDataset(prepared_potsdam, "val", train_transform(128, 0.0, MEAN, STD))
    for i in range(len(ds)):
        assert torch.equal(ds[i]["image"], plain[i]["image"]) and torch.equal(ds[i]["label"], plain[i]["label"])


def test_augmentation_keeps_labels_valid_and_pads_with_ignore(prepared_potsdam):
    ds = PreparedDataset(prepared_potsdam, "train", train_transform(160, 2.0, MEAN, STD))
    torch.manual_seed(0)
    labels = torch.stack([ds[i % len(ds)]["label"] for i in range(24)])
    assert labels.shape == (24, 160, 160)
    assert set(labels.unique().tolist()) <= set(range(6)) | {255}  # nearest: no blended class ids
    assert (labels == 255).any()  # a 128 crop padded to 160


def test_augmentation_is_reproducible_from_the_torch_seed(prepared_potsdam):
    def batches(seed: int, workers: int) -> list[torch.Tensor]:
        ds = PreparedDataset(prepared_potsdam, "train", train_transform(96, 1.0, MEAN, STD))
        ds.stems = [ds.stems[0]] * 8  # one crop, so batches differ only by their augmentation
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers,
                                             generator=torch.Generator().manual_seed(seed))
        return [b["image"] for b in loader]

    a, b, c = batches(1, 0), batches(1, 0), batches(2, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    w1, w2 = batches(1, 2), batches(1, 2)
    assert all(torch.equal(x, y) for x, y in zip(w1, w2))
    assert not torch.equal(w1[0], w1[1])  # batch 0 from worker 0, batch 1 from worker 1: own streams


def test_four_band_crops_need_four_band_statistics(synth_potsdam_raw, tmp_path):
    from cmdbnet.data import prepare

    prepare("potsdam", synth_potsdam_raw.root, tmp_path / "p", crop=128, bands="rgbir", progress=False)
    with pytest.raises(CmdbError, match="4-band crops"):
        PreparedDataset(tmp_path / "p", "train")
    ds = PreparedDataset(tmp_path / "p", "train", train_transform(128, 1.0, MEAN + [100.0], STD + [50.0]))
    assert ds[0]["image"].shape == (4, 128, 128)


def test_missing_or_empty_split_and_bad_folders(prepared_potsdam, tmp_path):
    with pytest.raises(CmdbError, match="split 'validation' has no crops.*train \\(16\\), val \\(4\\), test \\(4\\)"):
        PreparedDataset(prepared_potsdam, "validation")
    with pytest.raises(CmdbError, match="not a prepared folder.*run cmdb prepare"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CmdbError, match="not valid JSON"):
        PreparedDataset(tmp_path, "train")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CmdbError, match="not a cmdbnet manifest"):
        read_manifest(tmp_path)


def test_a_deleted_crop_is_a_clear_error(prepared_potsdam, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared_potsdam, copy)
    ds = PreparedDataset(copy, "test")
    (copy / "test" / "images" / f"{ds.stems[0]}.tif").unlink()
    with pytest.raises(CmdbError, match="cannot read crop.*re-run cmdb prepare"):
        ds[0]
