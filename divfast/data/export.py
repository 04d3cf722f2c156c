"""Write a corrupted copy of an image dataset as an ImageFolder tree of JPEGs (``divfast corrupt``).

Like the reference's ImageNet-C-bar generator: each image is Resize(256)/CenterCrop(224)'d (scaled
to ``image_size``), corrupted, and saved as JPEG quality 85 under ``out/<class>/<name>``. Unlike it,
every image's parameters come from its relative path and the seed, so a rerun, a resumed run or a
run with another worker count writes the same files. Each file is written under a temporary name and
renamed, so an interrupted run leaves only whole images, and a rerun skips the files already there.
A manifest (``divfast-corrupt.json``) records what the tree holds; a rerun with another spec, seed,
source or size into the same folder is refused instead of mixing two data sets.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS as IMAGE_EXTENSIONS  # what eval's ImageFolder reads

from divfast.corruptions import corrupt, format_dataset_spec, parse_dataset_spec
from divfast.errors import DivfastError
from divfast.io import ensure_dir, write_json_atomic

MANIFEST = "divfast-corrupt.json"


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """``(samples, classes, skipped)`` of an ImageFolder root, exactly as torchvision's ImageFolder
    (which ``divfast eval --data`` reads) sees it: every sub-folder is a class, every file under it
    (recursively) with an image extension is a sample.

    ``samples`` are ``(relative path, class index)``; ``skipped`` lists every other file (relative
    paths): files at the root and files with other extensions.
    """
    if not os.path.isdir(root):
        raise DivfastError(f"--data: {root!r} is not a directory (expected an ImageFolder root)")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir()]
    skipped = [e.name for e in entries if not e.is_dir()]
    samples = []
    for idx, cls in enumerate(classes):
        for folder, dirs, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            dirs.sort()
            for fname in sorted(files):
                rel = os.path.relpath(os.path.join(folder, fname), root).replace(os.sep, "/")
                (samples.append((rel, idx)) if fname.lower().endswith(IMAGE_EXTENSIONS)
                 else skipped.append(rel))
    if not samples:
        raise DivfastError(f"--data: no images under {root!r} (expected class folders of "
                           f"{', '.join(IMAGE_EXTENSIONS)} files)")
    return samples, classes, skipped


def output_name(rel: str) -> str:
    """JPEG files keep their name; other images get a ``.jpg`` suffix in place of theirs."""
    stem, ext = os.path.splitext(rel)
    return rel if ext.lower() in (".jpg", ".jpeg") else stem + ".jpg"


class _FolderCrops(Dataset):
    """Loads ``root/rel`` as RGB, Resize(size * 256 / 224) + CenterCrop(size), uint8 (3, S, S);
    unreadable files come back as ``None`` so the writer can count them instead of crashing."""

    def __init__(self, root: str, items: list[tuple[str, str]], size: int):
        from torchvision import transforms

        self.root, self.items = root, items
        self.tf = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))),
                                      transforms.CenterCrop(size), transforms.PILToTensor()])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        key, dest = self.items[i]
        try:
            with Image.open(os.path.join(self.root, key)) as im:  # noqa: PTH123
                return self.tf(im.convert("RGB")), key, dest
        except (OSError, ValueError, Image.DecompressionBombError):
            return None, key, dest


class _DigitsItems(Dataset):
    def __init__(self, images: torch.Tensor, items: list[tuple[int, str]]):
        self.images, self.items = images, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        key, dest = self.items[i]
        return self.images[key], key, dest


TMP_PREFIX = ".divfast-tmp-"
TMP_SUFFIX = ".part"  # not an image extension: an ImageFolder never loads a half-written file


def _save_jpeg(image: torch.Tensor, path: str, quality: int) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.path.basename(path)}{TMP_SUFFIX}")
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(
        tmp, format="JPEG", quality=quality, optimize=True)
    os.replace(tmp, path)


def _check_unique_outputs(items: list[tuple[str, str]]) -> None:
    """Two inputs (``a.png`` and ``a.jpg``) must not map to one output file."""
    seen: dict[str, str] = {}
    for key, dest in items:
        if dest.lower() in seen:
            raise DivfastError(f"--data: {seen[dest.lower()]!r} and {key!r} would both be written as "
                               f"{dest!r}; rename one of them")
        seen[dest.lower()] = key


def _remove_stale_temporaries(out: str, classes: list[str]) -> None:
    """Half-written files of an interrupted run (never renamed into place) are deleted."""
    for cls in classes:
        folder = os.path.join(out, cls)
        if not os.path.isdir(folder):
            continue
        for dirpath, _, files in os.walk(folder):
            for fname in files:
                if fname.startswith(TMP_PREFIX):
                    os.remove(os.path.join(dirpath, fname))


def _check_manifest(out: str, manifest: dict) -> None:
    import json

    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise DivfastError(f"--out: {path!r} is not a readable divfast manifest ({exc}); "
                           f"choose another --out or delete it") from exc
    fields = ("dataset", "seed", "source", "image_size", "quality")
    if any(old.get(k) != manifest[k] for k in fields):
        was = ", ".join(f"{k}={old.get(k)!r}" for k in fields)
        raise DivfastError(f"--out: {out!r} already holds another corrupted set ({was}); "
                           f"choose another --out or delete it")


def write_corrupted_folder(spec: str, out: str, data: str | None = None, seed: int = 0,
                           image_size: int = 224, batch_size: int = 32, workers: int = 0,
                           quality: int = 85, device: torch.device | str = "cpu",
                           progress: bool = True) -> dict:
    """Writes ``spec`` applied to the ImageFolder at ``data`` (default: the embedded digits' test
    split, 32 px, one folder per digit) to ``out`` as JPEGs; returns a summary dict.

    Files already in ``out`` are skipped (a resumed run). Non-image files in ``data`` are skipped and
    counted, and so are images that cannot be decoded; both are reported, neither stops the run.
    """
    from tqdm import tqdm

    name, severity = parse_dataset_spec(spec)
    if batch_size < 1:
        raise DivfastError(f"--batch-size: expected >= 1, got {batch_size}")
    if workers < 0:
        raise DivfastError(f"--workers: expected >= 0, got {workers}")
    if not 1 <= quality <= 100:
        raise DivfastError(f"--quality: expected 1..100, got {quality}")
    if data is not None and image_size < 8:
        raise DivfastError(f"--image-size: expected >= 8, got {image_size}")
    canonical = format_dataset_spec(name, severity)
    skipped: list[str] = []
    if data is None:
        from divfast.data.digits import DigitsDataset, digits_uint8

        images, labels = digits_uint8("test")
        classes = DigitsDataset.classes
        all_items = [(i, f"{classes[int(labels[i])]}/{i:04d}.jpg") for i in range(len(labels))]
        source, size = "digits:test", images.shape[-1]
    else:
        samples, classes, skipped = scan_image_folder(data)
        src, dst = os.path.realpath(data), os.path.realpath(out)
        if os.path.commonpath([src, dst]) == src:
            raise DivfastError(f"--out: {out!r} lies inside --data {data!r}; the next run would read "
                               f"its own output: choose a folder outside it")
        all_items = [(rel, output_name(rel)) for rel, _ in samples]
        _check_unique_outputs(all_items)
        source, size = os.path.abspath(data), image_size
    manifest = {"schema": "divfast.corrupt/1", "dataset": canonical, "seed": int(seed),
                "source": source, "image_size": int(size), "quality": int(quality),
                "classes": len(classes), "images": len(all_items)}
    ensure_dir(out)
    _check_manifest(out, manifest)
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    _remove_stale_temporaries(out, classes)
    pending = [(key, dest) for key, dest in all_items if not os.path.exists(os.path.join(out, dest))]
    for cls in classes:
        os.makedirs(os.path.join(out, cls), exist_ok=True)
    dataset = _DigitsItems(images, pending) if data is None else _FolderCrops(data, pending, size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)
    unreadable: list[str] = []
    written = 0
    with tqdm(total=len(pending), desc=f"corrupt {canonical}", file=sys.stderr, disable=not progress,
              unit="img") as bar:
        for batch in loader:
            good = [(img, key, dest) for img, key, dest in batch if img is not None]
            unreadable += [str(key) for img, key, _ in batch if img is None]
            if good:
                x = torch.stack([img for img, _, _ in good]).to(device)
                y = x if name == "clean" else corrupt(x, name, severity, seed=seed,
                                                      keys=[key for _, key, _ in good])
                y = y.cpu()
                for image, (_, _, dest) in zip(y, good):
                    _save_jpeg(image, os.path.join(out, dest), quality)
                written += len(good)
            bar.update(len(batch))
    if skipped:
        warnings.warn(f"--data: skipped {len(skipped)} non-image file(s), e.g. {skipped[0]!r}", stacklevel=2)
    if unreadable:
        warnings.warn(f"--data: skipped {len(unreadable)} unreadable image(s), e.g. {unreadable[0]!r}",
                      stacklevel=2)
    return {"dataset": canonical, "seed": int(seed), "out": out, "written": written,
            "already_present": len(all_items) - len(pending), "non_image_skipped": len(skipped),
            "unreadable_skipped": len(unreadable), "unreadable": unreadable, "total": len(all_items)}


def folder_image(data: str, index: int = 0, image_size: int = 224) -> tuple[torch.Tensor, str]:
    """Image ``index`` of the ImageFolder at ``data`` (its order), cropped like the data set:
    ``(uint8 (3, S, S), relative path)``."""
    if image_size < 8:
        raise DivfastError(f"--image-size: expected >= 8, got {image_size}")
    samples, _, _ = scan_image_folder(data)
    if not 0 <= index < len(samples):
        raise DivfastError(f"--index: expected 0..{len(samples) - 1}, got {index}")
    rel = samples[index][0]
    image, _, _ = _FolderCrops(data, [(rel, rel)], image_size)[0]
    if image is None:
        raise DivfastError(f"--index: {rel!r} is not a readable image")
    return image, rel
