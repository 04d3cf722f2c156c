"""Corrupted data end to end: the on-the-fly view (``CorruptedDataset`` / ``build_dataset``), the
JPEG tree writer (``write_corrupted_folder`` / ``divfast corrupt --out``), the gallery
(``divfast corrupt --gallery``) and ``divfast eval --dataset <corruption><severity>``.

The corruption functions themselves are tested in test_corruptions.py; here ``corrupt`` is the
oracle: a view or a written file must equal (or, through JPEG, come close to) ``corrupt`` applied to
the clean image with the image's key (its index, or its path relative to the ImageFolder root).
Everything is tiny (5-6 images of 40x50 px cropped to 32, or the 540 embedded 32 px digits).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli_helpers import assert_user_error, invoke
from torch.utils.data import DataLoader, TensorDataset

from divfast.corruptions import corrupt, corruption_aliases, list_corruptions
from divfast.data import CorruptedDataset, build_dataset, digits_dataset
from divfast.data.digits import DigitsDataset, digits_uint8
from divfast.data.export import MANIFEST, folder_image, scan_image_folder, write_corrupted_folder
from divfast.errors import DivfastError

# --- helpers (same conventions as test_cli.py) ---------------------------------------------------


@pytest.fixture
def runner():
    return CliRunner()





def assert_ok(result):
    assert result.exit_code == 0, (result.output, repr(result.exception))
    assert "Traceback" not in result.output


# Relative path -> PIL format: PNG, JPEG (lower and upper case suffix) and BMP inputs.
FILES = {"cat/0.png": "PNG", "cat/1.jpg": "JPEG", "cat/2.bmp": "BMP",
         "dog/0.png": "PNG", "dog/1.JPEG": "JPEG"}
# What the writer names each one: JPEGs keep their name, the others get .jpg.
OUTPUTS = {"cat/0.png": "cat/0.jpg", "cat/1.jpg": "cat/1.jpg", "cat/2.bmp": "cat/2.jpg",
           "dog/0.png": "dog/0.jpg", "dog/1.JPEG": "dog/1.JPEG"}


def _smooth_random(seed: int, size=(40, 50)):
    """Random but smooth 40x50 (W x H) RGB content: coarse noise upsampled, so JPEG q85 stays close
    to the pixels and a corruption stands out."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 4, generator=gen)
    px = torch.nn.functional.interpolate(coarse, size=(size[1], size[0]), mode="bilinear",
                                         align_corners=False)[0]
    px = (px * 200 + 28).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(px)


def make_folder(root: Path, files=FILES) -> Path:
    for i, (rel, fmt) in enumerate(sorted(files.items())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _smooth_random(i).save(path, format=fmt)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A read-only 2-class ImageFolder (make a copy before adding files to it)."""
    return make_folder(tmp_path_factory.mktemp("folder") / "data")


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_rgb(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "JPEG", path
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference on the 0-255 scale."""
    return (a.float() - b.float()).abs().mean().item()


def jpeg_bytes(image: torch.Tensor, quality: int = 85) -> bytes:
    """``image`` (3, H, W) uint8 as PIL writes it at ``quality`` with optimised Huffman tables."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(
        buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def temp_files(root: Path) -> list[str]:
    return [p.as_posix() for p in root.rglob(".divfast-tmp-*")]


def corrupt_cmd(data, out, *extra, dataset="plasma4.0"):
    args = ["corrupt", "--dataset", dataset, "--out", out, "--no-progress"]
    if data is not None:
        args += ["--data", data, "--image-size", "32"]
    return args + list(extra)


# --- 1. CorruptedDataset -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_u8():
    """The first 64 test digits as a uint8 dataset, and as the float dataset the library builds."""
    x, y = digits_uint8("test")
    return TensorDataset(x[:64], y[:64])


@pytest.mark.parametrize("name, severity", [("lines", 1.6), ("plasma", 4.0), ("waterdrop", 7.0)])
@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_item_is_corrupt_of_base_item_keyed_by_index(digits_u8, name, severity, dtype):
    base = digits_u8 if dtype == "uint8" else digits_dataset("test")
    ds = CorruptedDataset(base, name, severity, seed=3)
    assert len(ds) == len(base)
    for i in (0, 1, 17, 63):
        image, label = ds[i]
        want = corrupt(base[i][0][None], name, severity, seed=3, keys=[i])[0]
        assert image.dtype == base[i][0].dtype and image.shape == base[i][0].shape
        assert torch.equal(image, want), (name, i)
        assert int(label) == int(base[i][1])
    assert not torch.equal(ds[5][0], base[5][0])  # it is corrupted at all


@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_getitems_equals_items(digits_u8, dtype):
    base = digits_u8 if dtype == "uint8" else digits_dataset("test")
    ds = CorruptedDataset(base, "checkerboard", 5.0, seed=1)
    indices = [5, 0, 17, 3, 3, 40]  # unordered, with a duplicate
    batch = ds.__getitems__(indices)
    assert len(batch) == len(indices)
    for i, (image, label) in zip(indices, batch):
        one, one_label = ds[i]
        if dtype == "uint8":
            assert image.numpy().tobytes() == one.numpy().tobytes()
        else:
            assert torch.equal(image, one)
        assert int(label) == int(one_label)


def _mixed_items(extra: bool):
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 16, 20), generator=gen, dtype=torch.uint8),
              torch.rand(3, 16, 20, generator=gen),
              torch.randint(0, 256, (3, 24, 12), generator=gen, dtype=torch.uint8),
              torch.randint(0, 256, (3, 16, 20), generator=gen, dtype=torch.uint8)]
    return [(x, i, f"meta{i}") if extra else (x, i) for i, x in enumerate(images)]


def test_getitems_mixed_shapes_and_dtypes():
    """Items of several sizes and dtypes in one batch (an un-cropped ImageFolder, a list)."""
    items = _mixed_items(extra=False)
    ds = CorruptedDataset(items, "plasma", 6.0, seed=0)
    batch = ds.__getitems__([3, 2, 1, 0])
    for i, got in zip([3, 2, 1, 0], batch):
        assert got[1] == items[i][1] and len(got) == 2
        assert got[0].dtype == items[i][0].dtype and got[0].shape == items[i][0].shape
        assert torch.equal(got[0], ds[i][0])
        assert torch.equal(got[0], corrupt(items[i][0][None], "plasma", 6.0, seed=0, keys=[i])[0])


def test_getitems_passes_extra_fields_through():
    items = _mixed_items(extra=True)
    ds = CorruptedDataset(items, "plasma", 6.0, seed=0)
    for i, got in zip([3, 2, 1, 0], ds.__getitems__([3, 2, 1, 0])):
        assert got[1:] == items[i][1:]


def test_dataloader_is_independent_of_workers_and_batch_size(digits_u8):
    ds = CorruptedDataset(digits_u8, "lines", 1.6, seed=0)

    def load(batch_size, workers):
        xs, ys = zip(*DataLoader(ds, batch_size=batch_size, num_workers=workers))
        return torch.cat(xs), torch.cat(ys)

    x0, y0 = load(64, 0)
    assert x0.dtype == torch.uint8 and x0.shape == (64, 3, 32, 32)
    assert torch.equal(y0, digits_u8.tensors[1])
    per_item = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(x0, per_item)
    for batch_size, workers in [(7, 0), (16, 2), (5, 2), (1, 0)]:
        x, y = load(batch_size, workers)
        assert torch.equal(x, x0), (batch_size, workers)
        assert torch.equal(y, y0)


def test_labels_classes_spec_and_seed():
    base = digits_dataset("test")
    ds = build_dataset("lines1.6", seed=0)
    assert isinstance(ds, CorruptedDataset)
    assert ds.spec == "lines1.6" and ds.name == "lines" and ds.severity == 1.6 and ds.seed == 0
    assert ds.classes == DigitsDataset.classes == base.classes
    assert len(ds) == len(base) == 540
    some = range(0, 540, 37)
    assert [int(ds[i][1]) for i in some] == [int(base[i][1]) for i in some]
    assert "lines1.6" in repr(ds)
    # aliases resolve to the canonical name
    assert CorruptedDataset(base, "plasma_noise", 4, seed=0).spec == "plasma4.0"

    same = build_dataset("lines1.6", seed=0)
    other = build_dataset("lines1.6", seed=1)
    idx = list(range(0, 540, 27))
    a = torch.stack([x for x, _ in ds.__getitems__(idx)])
    assert torch.equal(a, torch.stack([x for x, _ in same.__getitems__(idx)]))
    b = torch.stack([x for x, _ in other.__getitems__(idx)])
    differ = [not torch.equal(u, v) for u, v in zip(a, b)]
    assert sum(differ) >= len(idx) // 2, differ  # another seed: other lines on most images


def test_clean_returns_the_base_dataset(folder):
    clean = build_dataset("clean")
    assert type(clean) is DigitsDataset
    assert torch.equal(clean.tensors[0], digits_dataset("test").tensors[0])
    from torchvision.datasets import ImageFolder

    clean_folder = build_dataset("clean", data=str(folder), image_size=32)
    assert type(clean_folder) is ImageFolder
    assert clean_folder.classes == ["cat", "dog"]
    assert build_dataset("lines0", seed=0).spec == "lines0.0"  # severity 0 is still a view


def test_image_folder_is_keyed_by_relative_path(folder, tmp_path, monkeypatch):
    full = build_dataset("plasma4.0", data=str(folder), image_size=32, seed=2)
    base = build_dataset("clean", data=str(folder), image_size=32)
    assert full.keys == sorted(FILES)  # ImageFolder order: class, then file name
    assert full.classes == ["cat", "dog"]
    by_rel = {}
    for i, rel in enumerate(full.keys):
        image, label = full[i]
        want = corrupt(base[i][0][None], "plasma", 4.0, seed=2, keys=[rel])[0]
        assert torch.equal(image, want), rel
        assert label == base[i][1] == (0 if rel.startswith("cat/") else 1)
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        by_rel[rel] = image

    # A subset of the files, plus a new one that sorts first, in another root: every index moves,
    # the corruption of each relative path stays.
    sub = tmp_path / "subset"
    for rel in ("cat/2.bmp", "dog/1.JPEG"):
        (sub / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / rel, sub / rel)
    _smooth_random(99).save(sub / "cat" / "00.png")
    view = build_dataset("plasma4.0", data=str(sub), image_size=32, seed=2)
    assert view.keys == ["cat/00.png", "cat/2.bmp", "dog/1.JPEG"]
    for i, rel in enumerate(view.keys[1:], start=1):
        assert torch.equal(view[i][0], by_rel[rel]), rel
        # and keying by index would have given something else: the test can tell the two apart
        assert not torch.equal(
            corrupt(base[full.keys.index(rel)][0][None], "plasma", 4.0, seed=2, keys=[i])[0],
            by_rel[rel])

    # the same root spelt as a relative path, with a trailing slash, or as a Path: same keys
    monkeypatch.chdir(folder.parent)
    for spelling in ("data", "data/", "./data//", Path("data")):
        again = build_dataset("plasma4.0", data=spelling, image_size=32, seed=2)
        assert again.keys == full.keys, spelling
        assert torch.equal(again[3][0], by_rel[full.keys[3]])


# --- 2. write_corrupted_folder / divfast corrupt --out -------------------------------------------


def test_corrupt_writes_a_jpeg_tree(runner, folder, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    result = invoke(runner, corrupt_cmd(folder, out))
    assert_ok(result)
    assert result.stdout.strip() == (f"wrote 5 images of plasma4.0 to {out} (0 already there, "
                                     f"0 non-image and 0 unreadable files skipped)")
    assert result.stderr == ""  # --no-progress, no warnings
    assert sorted(tree(out)) == sorted([*OUTPUTS.values(), MANIFEST])
    assert temp_files(out) == []

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dataset"] == "plasma4.0" and manifest["seed"] == 0
    assert manifest["source"] == os.path.abspath(folder)
    assert manifest["image_size"] == 32 and manifest["quality"] == 85
    assert manifest["images"] == 5 and manifest["classes"] == 2

    view = build_dataset("plasma4.0", data=str(folder), image_size=32, seed=0)
    samples, _, _ = scan_image_folder(str(folder))
    for index, (rel, _) in enumerate(samples):
        path = out / OUTPUTS[rel]
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
        got = read_rgb(path)
        clean, key = folder_image(str(folder), index, 32)
        assert key == rel and clean.dtype == torch.uint8 and clean.shape == (3, 32, 32)
        want = corrupt(clean[None], "plasma", 4.0, seed=0, keys=[rel])[0]
        # exactly PIL's JPEG q85 of the in-memory result (same encoder, same settings) ...
        assert path.read_bytes() == jpeg_bytes(want), rel
        # ... which decodes close to it (q85 with 4:2:0 chroma on 32 px noise: ~4-8 levels) ...
        assert mad(got, want) < 10.0, rel
        # ... and is visibly corrupted: much farther from the clean crop than from the corruption
        assert mad(got, clean) > 12.0 and mad(got, want) < 0.6 * mad(got, clean), rel
        # eval's in-memory float view of the same folder holds the same corrupted image
        seen = view[view.keys.index(rel)][0] * 255
        assert (seen - want.float()).abs().max().item() <= 1.0, rel

    # the tree is an ImageFolder: eval --data OUT reads it
    written = build_dataset("clean", data=str(out), image_size=32)
    assert written.classes == ["cat", "dog"] and len(written) == 5


def test_rerun_skips_and_resume_writes_only_missing(runner, folder, tmp_path):
    out = tmp_path / "out"
    assert_ok(invoke(runner, corrupt_cmd(folder, out)))
    first = tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.jp*g")}

    result = invoke(runner, corrupt_cmd(folder, out))
    assert_ok(result)
    assert result.stdout.startswith(f"wrote 0 images of plasma4.0 to {out} (5 already there")
    assert tree(out) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jp*g")} == mtimes

    (out / "cat" / "2.jpg").unlink()
    result = invoke(runner, corrupt_cmd(folder, out))
    assert_ok(result)
    assert result.stdout.startswith(f"wrote 1 images of plasma4.0 to {out} (4 already there")
    assert tree(out) == first  # the same bytes again
    assert temp_files(out) == []

    # the library reports the same
    summary = write_corrupted_folder("plasma4", str(out), data=str(folder), image_size=32,
                                     progress=False)
    assert summary["written"] == 0 and summary["already_present"] == 5 and summary["total"] == 5
    assert summary["dataset"] == "plasma4.0"


def test_stale_temp_file_of_a_killed_run_is_replaced(runner, folder, tmp_path):
    """A run killed mid-write leaves ``.divfast-tmp-<name>.part`` and no ``<name>``: the rerun deletes
    every stale temporary (also orphans whose output exists) and rewrites the missing image."""
    out = tmp_path / "out"
    assert_ok(invoke(runner, corrupt_cmd(folder, out)))
    first = tree(out)
    (out / "cat" / "0.jpg").unlink()
    stale = out / "cat" / ".divfast-tmp-0.jpg.part"
    stale.write_bytes(first["cat/0.jpg"][:50])  # a truncated JPEG
    orphan = out / "cat" / ".divfast-tmp-2.jpg.part"  # its output exists: never rewritten
    orphan.write_bytes(b"partial")
    result = invoke(runner, corrupt_cmd(folder, out))
    assert_ok(result)
    assert result.stdout.startswith(f"wrote 1 images of plasma4.0 to {out} (4 already there")
    assert not stale.exists() and not orphan.exists()
    assert temp_files(out) == []
    assert tree(out) == first


@pytest.mark.parametrize("change", [["--seed", "1"], ["--quality", "90"], ["--image-size", "40"],
                                    ["--dataset", "lines1.6"], ["--dataset", "plasma5"]],
                         ids=" ".join)
def test_another_set_into_the_same_out_is_refused(runner, folder, tmp_path, change):
    out = tmp_path / "out"
    assert_ok(invoke(runner, corrupt_cmd(folder, out)))
    first = tree(out)
    args = corrupt_cmd(folder, out)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = invoke(runner, args)
    assert_user_error(result, "--out")
    assert tree(out) == first  # nothing touched, manifest included


def test_another_source_into_the_same_out_is_refused(runner, folder, tmp_path):
    out = tmp_path / "out"
    assert_ok(invoke(runner, corrupt_cmd(folder, out)))
    other = copy_folder(folder, tmp_path / "other")
    assert_user_error(invoke(runner, corrupt_cmd(other, out)), "--out")
    assert_user_error(invoke(runner, corrupt_cmd(None, out)), "--out")  # the digits


def test_non_image_and_unreadable_files_are_skipped_and_counted(runner, folder, tmp_path):
    data = copy_folder(folder, tmp_path / "data")
    (data / "README.txt").write_text("a file at the root")
    (data / "cat" / "notes.txt").write_text("not an image")
    (data / "cat" / ".DS_Store").write_bytes(b"\0\1\2")
    _smooth_random(7).save(data / "dog" / ".hidden.png")  # a sample, as torchvision's ImageFolder has it
    (data / "dog" / "bad.jpg").write_bytes(b"this is not a JPEG" * 10)
    (data / "dog" / "empty.png").write_bytes(b"")

    samples, classes, skipped = scan_image_folder(str(data))
    assert classes == ["cat", "dog"]
    assert [rel for rel, _ in samples] == sorted([*FILES, "dog/.hidden.png", "dog/bad.jpg",
                                                  "dog/empty.png"])
    assert sorted(skipped) == sorted(["README.txt", "cat/notes.txt", "cat/.DS_Store"])

    out = tmp_path / "out"
    result = invoke(runner, corrupt_cmd(data, out))
    assert_ok(result)
    assert result.stdout.strip() == (f"wrote 6 images of plasma4.0 to {out} (0 already there, "
                                     f"3 non-image and 2 unreadable files skipped)")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, result.stderr
    assert "skipped 3 non-image file(s)" in warnings[0]
    assert "skipped 2 unreadable image(s)" in warnings[1] and "dog/bad.jpg" in warnings[1]
    assert sorted(p for p in tree(out) if p != MANIFEST) == sorted([*OUTPUTS.values(), "dog/.hidden.jpg"])

    # a rerun tries the unreadable ones again, and still writes nothing else
    with pytest.warns(UserWarning) as caught:
        summary = write_corrupted_folder("plasma4.0", str(out), data=str(data), image_size=32,
                                         progress=False)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert any("skipped 3 non-image" in m for m in messages)
    assert any("skipped 2 unreadable" in m for m in messages)
    assert summary["written"] == 0 and summary["already_present"] == 6
    assert summary["non_image_skipped"] == 3 and summary["unreadable_skipped"] == 2
    assert sorted(summary["unreadable"]) == ["dog/bad.jpg", "dog/empty.png"]
    assert summary["total"] == 8


def test_default_data_is_the_embedded_digits(runner, tmp_path):
    out = tmp_path / "out"
    result = invoke(runner, ["corrupt", "--dataset", "lines1.6", "--out", out, "--no-progress"])
    assert_ok(result)
    assert result.stdout.startswith(f"wrote 540 images of lines1.6 to {out} (0 already there")
    images, labels = digits_uint8("test")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert files == sorted(f"{int(labels[i])}/{i:04d}.jpg" for i in range(540))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"] == "digits:test" and manifest["images"] == 540
    assert manifest["image_size"] == 32 and manifest["classes"] == 10

    view = build_dataset("lines1.6", seed=0)
    for i in (0, 123, 539):
        got = read_rgb(out / f"{int(labels[i])}/{i:04d}.jpg")
        assert got.shape == (3, 32, 32)
        want = corrupt(images[i][None], "lines", 1.6, seed=0, keys=[i])[0]
        assert (out / f"{int(labels[i])}/{i:04d}.jpg").read_bytes() == jpeg_bytes(want)
        assert mad(got, want) < 10.0
        # what eval --dataset lines1.6 sees is the same corrupted image
        assert (view[i][0] * 255 - want.float()).abs().max().item() <= 1.0


def test_workers_and_batch_size_do_not_change_the_bytes(runner, folder, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert_ok(invoke(runner, corrupt_cmd(folder, a, "--workers", "0")))
    assert_ok(invoke(runner, corrupt_cmd(folder, b, "--workers", "2", "--batch-size", "2")))
    assert_ok(invoke(runner, corrupt_cmd(folder, c, "--batch-size", "1")))
    assert tree(a) == tree(b) == tree(c)

    d, e = tmp_path / "d", tmp_path / "e"
    assert_ok(invoke(runner, corrupt_cmd(None, d, "--workers", "0", dataset="waterdrop7")))
    assert_ok(invoke(runner, corrupt_cmd(None, e, "--workers", "2", "--batch-size", "50",
                                         dataset="waterdrop7")))
    assert tree(d) == tree(e)


def test_inputs_that_map_to_one_output_name_are_not_lost(runner, tmp_path):
    data = tmp_path / "data"
    make_folder(data, {"cat/a.png": "PNG", "cat/a.jpg": "JPEG", "dog/b.bmp": "BMP"})
    out = tmp_path / "out"
    result = invoke(runner, corrupt_cmd(data, out))
    if result.exit_code != 0:  # refusing the clash, naming --data, would do too
        assert_user_error(result, "--data")
        return
    n_files = len([p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST])
    assert result.stdout.startswith("wrote 3 images")
    assert n_files == 3, sorted(tree(out))


@pytest.mark.parametrize("where", ["inside", "same"])
def test_out_inside_data_is_refused(runner, folder, tmp_path, where):
    data = copy_folder(folder, tmp_path / "data")
    out = data / "corrupted" if where == "inside" else data
    assert_user_error(invoke(runner, corrupt_cmd(data, out)), "--out")


def test_damaged_manifest_is_a_user_error(runner, folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text("{not json")
    assert_user_error(invoke(runner, corrupt_cmd(folder, out)), "--out")


# --- 3. gallery and --list -----------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_gallery_of_the_default_photo(runner, tmp_path):
    path = tmp_path / "g.png"
    result = invoke(runner, ["corrupt", "--gallery", path])
    assert_ok(result)
    assert result.stdout.strip() == f"wrote {path}"
    width, height = _png_size(path)
    n = len(list_corruptions())
    # 1.6 in per cell at 100 dpi: clean + 5 default severities across, one row per corruption
    assert abs(width - 160 * 6) <= 2 and abs(height - 160 * n) <= 2
    assert path.stat().st_size > 100_000  # a real picture, not an empty canvas
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary file left


def test_gallery_of_a_folder_image(runner, folder, tmp_path):
    path = tmp_path / "sub" / "g.png"
    result = invoke(runner, ["corrupt", "--gallery", path, "--data", folder, "--index", "1",
                             "--severities", "1,5", "--image-size", "32"])
    assert_ok(result)
    width, height = _png_size(path)
    assert abs(width - 160 * 3) <= 2 and abs(height - 160 * len(list_corruptions())) <= 2


def test_gallery_draws_the_chosen_image(runner, folder, tmp_path, monkeypatch):
    import divfast.report.gallery as gallery

    calls = []
    monkeypatch.setattr(gallery, "draw_gallery", lambda image, path, sevs, seed, key:
                        calls.append((image, path, sevs, seed, key)))
    result = invoke(runner, ["corrupt", "--gallery", tmp_path / "g.png", "--data", folder,
                             "--index", "1", "--severities", " 1, 5 ,", "--image-size", "32",
                             "--seed", "4"])
    assert_ok(result)
    (image, path, sevs, seed, key), = calls
    want, rel = folder_image(str(folder), 1, 32)
    assert key == rel == "cat/1.jpg" and torch.equal(image, want)
    assert sevs == [1.0, 5.0] and seed == 4 and path == str(tmp_path / "g.png")


@pytest.mark.parametrize("args, flag", [
    (["--severities", "a,b"], "--severities"),
    (["--severities", "11"], "--severities"),
    (["--severities", "-1"], "--severities"),
    (["--severities", "nan"], "--severities"),
    (["--severities", ","], "--severities"),
    (["--index", "5", "--data", "{data}"], "--index"),
    (["--index", "-1", "--data", "{data}"], "--index"),
    (["--index", "x"], "--index"),
    (["--data", "{missing}"], "--data"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_gallery_input(runner, folder, tmp_path, args, flag):
    paths = {"data": str(folder), "missing": str(tmp_path / "missing")}
    gallery = tmp_path / "g.png"
    extra = [a.format(**paths) for a in args]
    if "--data" in extra:
        extra += ["--image-size", "32"]
    assert_user_error(invoke(runner, ["corrupt", "--gallery", gallery, *extra]), flag)
    assert not gallery.exists()


@pytest.mark.parametrize("name", ["g.txt", "g", "g.png.bak"])
def test_bad_gallery_extension(runner, folder, tmp_path, name):
    gallery = tmp_path / name
    result = invoke(runner, ["corrupt", "--gallery", gallery, "--data", folder,
                             "--image-size", "32", "--severities", "1"])
    assert_user_error(result, "--gallery")
    assert list(tmp_path.iterdir()) == []


def test_gallery_small_image_size_names_the_option(runner, folder, tmp_path):
    result = invoke(runner, ["corrupt", "--gallery", tmp_path / "g.png", "--data", folder,
                             "--image-size", "4", "--severities", "1"])
    assert_user_error(result, "--image-size")


@pytest.mark.parametrize("bad", [["--dataset", "nope"], ["--dataset", "plasma4.0", "--quality", "0"]],
                         ids=["dataset", "quality"])
def test_gallery_with_bad_out_options_writes_nothing(runner, folder, tmp_path, bad):
    gallery = tmp_path / "g.png"
    result = invoke(runner, ["corrupt", "--gallery", gallery, "--data", folder, "--image-size",
                             "32", "--severities", "1", "--out", tmp_path / "out", *bad])
    assert_user_error(result, bad[-2])
    assert not gallery.exists()


def test_list(runner):
    result = invoke(runner, ["corrupt", "--list"])
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list_corruptions()
    aliases = {a: n for a, n in corruption_aliases().items() if a != n}
    assert aliases, "expected some aliases (plasma_noise, ...)"
    for alias, name in aliases.items():
        line = next(line for line in lines if line.split()[0] == name)
        assert alias in line, (alias, line)
    assert {"plasma_noise", "checkerboard_cutout", "water_drop"} <= set(aliases)


@pytest.mark.parametrize("args, flag", [
    ([], "--gallery"),
    ([], "--out"),
    (["--dataset", "plasma4"], "--out"),
    (["--out", "{out}"], "--dataset"),
    (["--out", "{out}", "--data", "{data}"], "--dataset"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_corrupt_needs_out_with_dataset_or_gallery(runner, folder, tmp_path, args, flag):
    paths = {"out": str(tmp_path / "out"), "data": str(folder)}
    assert_user_error(invoke(runner, ["corrupt", *[a.format(**paths) for a in args]]), flag)
    assert not (tmp_path / "out").exists()


# --- 4. eval --dataset ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    """One 10-class member with random weights (instant)."""
    from divfast.data import save_member
    from divfast.data.members import create_member

    path = tmp_path_factory.mktemp("members") / "a.safetensors"
    torch.manual_seed(0)
    save_member(create_member("resnet10t", 10), str(path))
    return str(path)


def _eval(runner, member, *args):
    result = invoke(runner, ["eval", "--members", member, "--json", "--no-progress",
                             "--device", "cpu", "--batch-size", "540", *args])
    assert_ok(result)
    return result.stdout, json.loads(result.stdout)


def test_eval_on_a_corrupted_dataset(runner, member):
    text, report = _eval(runner, member, "--dataset", "lines1.6")
    assert report["schema"] == "divfast.eval/1"
    assert report["dataset"] == "lines1.6" and report["n_samples"] == 540
    assert report["num_classes"] == 10 and report["corruption_seed"] == 0
    assert report["member_files"] == [member]
    assert 0.0 <= report["members"][0]["top1"] <= 1.0

    again, _ = _eval(runner, member, "--dataset", "lines1.6")
    assert again == text  # deterministic, byte for byte

    _, clean = _eval(runner, member)
    assert clean["dataset"] == "clean" and "corruption_seed" not in clean
    strip = {k: v for k, v in report.items() if k not in ("dataset", "corruption_seed")}
    assert json.dumps(strip, sort_keys=True) != json.dumps(clean, sort_keys=True)

    _, alias = _eval(runner, member, "--dataset", "plasma_noise4")
    assert alias["dataset"] == "plasma4.0" and alias["n_samples"] == 540


@pytest.mark.parametrize("spec", ["lines11", "foo1", "lines", "lines-1.6.2", "1.6", "lines1e3"])
def test_eval_bad_dataset(runner, member, spec):
    result = invoke(runner, ["eval", "--members", member, "--dataset", spec, "--no-progress"])
    assert_user_error(result, "--dataset")


def test_eval_seed_reaches_the_corrupted_data(runner, member, monkeypatch):
    """`eval --seed` picks the corruption: the dataset eval builds differs between seeds 0 and 1
    (checked on the data, not the accuracy of a random member)."""
    import divfast.ensembles

    seen = {}

    def fake_evaluate(members, dataset, spec, **kwargs):
        idx = list(range(0, 540, 9))
        seen[dataset.seed] = torch.stack([x for x, _ in dataset.__getitems__(idx)])
        return {"schema": "divfast.eval/1", "dataset": spec, "n_samples": len(dataset)}

    monkeypatch.setattr(divfast.ensembles, "evaluate", fake_evaluate)
    for seed in (0, 1):
        _, report = _eval(runner, member, "--dataset", "lines1.6", "--seed", str(seed))
        assert report["corruption_seed"] == seed and report["dataset"] == "lines1.6"
    assert set(seen) == {0, 1}
    assert not torch.equal(seen[0], seen[1])
    # and what eval saw is build_dataset's view with that seed
    for seed in (0, 1):
        ds = build_dataset("lines1.6", seed=seed)
        assert torch.equal(seen[seed], torch.stack([ds[i][0] for i in range(0, 540, 9)]))


# --- 5. bad input for corrupt --------------------------------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["--quality", "0"], "--quality"),
    (["--quality", "101"], "--quality"),
    (["--batch-size", "0"], "--batch-size"),
    (["--workers", "-1"], "--workers"),
    (["--image-size", "4"], "--image-size"),
    (["--dataset", "nope"], "--dataset"),
    (["--dataset", "lines11"], "--dataset"),
    (["--device", "foo"], "--device"),
    (["--seed", "x"], "--seed"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_corrupt_input(runner, folder, tmp_path, args, flag):
    out = tmp_path / "out"
    cmd = corrupt_cmd(folder, out)
    for a, value in zip(args[::2], args[1::2]):
        if a in cmd:
            cmd[cmd.index(a) + 1] = value
        else:
            cmd += [a, value]
    assert_user_error(invoke(runner, cmd), flag)
    assert not out.exists()  # refused before writing anything


@pytest.mark.parametrize("what", ["file", "empty", "missing", "only-text"])
def test_bad_corrupt_data(runner, tmp_path, what):
    data = tmp_path / "data"
    if what == "file":
        data.write_text("not a folder")
    elif what == "empty":
        data.mkdir()
    elif what == "only-text":
        (data / "cat").mkdir(parents=True)
        (data / "cat" / "a.txt").write_text("x")
    assert_user_error(invoke(runner, corrupt_cmd(data, tmp_path / "out")), "--data")
    with pytest.raises(DivfastError, match="--data"):
        scan_image_folder(str(data))


def test_corrupt_dataset_clean(runner, folder, tmp_path):
    out = tmp_path / "out"
    result = invoke(runner, corrupt_cmd(folder, out, dataset="clean"))
    if result.exit_code == 0:  # a clean JPEG copy would be fine too
        assert len([p for p in out.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")]) == 5
    else:
        assert_user_error(result, "--dataset")
        assert not out.exists()


def test_bad_corrupt_data_creates_no_out(runner, tmp_path):
    out = tmp_path / "out"
    assert_user_error(invoke(runner, corrupt_cmd(tmp_path / "missing", out)), "--data")
    assert not out.exists()


def test_out_is_a_file(runner, folder, tmp_path):
    out = tmp_path / "taken"
    out.write_text("x")
    assert_user_error(invoke(runner, corrupt_cmd(folder, out)), "--out")
    assert out.read_text() == "x"
