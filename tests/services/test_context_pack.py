"""Context packs: one .npz file per context, round trips, and one clear error per bad file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from napari_ctxseg.core.errors import InputError
from napari_ctxseg.services.context_pack import load_context_pack, save_context_pack
from napari_ctxseg.services.segment import segment
from tests.conftest import blobs


def test_round_trip_with_region_score_and_info(tmp_path: Path) -> None:
    image, labels = blobs()
    region = np.zeros(labels.shape, bool)
    region[:60] = True
    path = save_context_pack(
        tmp_path / "ctx.npz", image, labels, region, self_score=0.75, info={"channels": None, "layer": "a"}
    )
    pack = load_context_pack(path)
    np.testing.assert_array_equal(pack.image, image)
    np.testing.assert_array_equal(pack.labels, labels)
    assert pack.labels.dtype == labels.dtype and pack.region is not None
    np.testing.assert_array_equal(pack.region, region)
    assert pack.self_score == 0.75 and pack.info == {"channels": None, "layer": "a"}
    assert [p.name for p in tmp_path.iterdir()] == ["ctx.npz"]  # no temporary file left


def test_pack_without_region_or_score(tmp_path: Path) -> None:
    image, labels = blobs()
    pack = load_context_pack(save_context_pack(tmp_path / "ctx.npz", image, labels))
    assert pack.region is None and pack.self_score is None and pack.info == {}


def test_a_pack_segments_like_its_arrays(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image, labels = blobs()
    pack = load_context_pack(save_context_pack(tmp_path / "ctx.npz", image, labels))
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", diameter=None)
    a = segment(image, **pack.as_request(), **kw)
    b = segment(image, context_image=image, context_labels=labels, **kw)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.metadata["context"] == b.metadata["context"]


def test_bad_contexts_are_refused_before_writing(tmp_path: Path) -> None:
    image, labels = blobs()
    with pytest.raises(InputError, match="no annotated object"):
        save_context_pack(tmp_path / "ctx.npz", image, np.zeros_like(labels))
    with pytest.raises(InputError, match=r"\.npz"):
        save_context_pack(tmp_path / "ctx.tif", image, labels)
    assert not list(tmp_path.iterdir())


def test_a_file_that_is_not_a_pack_is_never_replaced(tmp_path: Path) -> None:
    image, labels = blobs()
    other = tmp_path / "data.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(InputError, match="not a context pack"):
        save_context_pack(other, image, labels)
    assert set(np.load(other).files) == {"x"}
    save_context_pack(tmp_path / "ctx.npz", image, labels)
    with pytest.raises(InputError, match="exists"):
        save_context_pack(tmp_path / "ctx.npz", image, labels, overwrite=False)


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "other_npz", "newer", "pickled"])
def test_bad_pack_files_give_one_clear_error(tmp_path: Path, kind: str) -> None:
    image, labels = blobs()
    path = tmp_path / "ctx.npz"
    if kind != "missing":
        save_context_pack(path, image, labels)
    if kind == "garbage":
        path.write_bytes(b"not a zip at all")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "other_npz":
        np.savez(path, image=image, labels=labels, meta=np.array("{}"))
    elif kind == "newer":
        meta = json.dumps({"format": "ctxseg-context", "version": 99, "self_score": None, "info": {}})
        np.savez(path, image=image, labels=labels, meta=np.array(meta))
    elif kind == "pickled":
        np.savez(path, image=image, labels=labels, meta=np.array([{"a": 1}], dtype=object))
    match = {
        "missing": "not found",
        "garbage": "not a readable context pack",
        "truncated": "not a readable context pack",
        "other_npz": "not a context pack",
        "newer": "version 99",
        "pickled": "not a readable context pack",
    }[kind]
    with pytest.raises(InputError, match=match):
        load_context_pack(path)


def test_pack_is_a_plain_npz(tmp_path: Path) -> None:
    image, labels = blobs()
    path = save_context_pack(tmp_path / "ctx.npz", image, labels)
    assert zipfile.is_zipfile(path)
    with np.load(path, allow_pickle=False) as data:
        assert json.loads(str(data["meta"]))["format"] == "ctxseg-context"
