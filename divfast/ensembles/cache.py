"""The logits cache: one pass per member and dataset, however many ensembles are studied.

An entry holds one member's logits ``(N, C)`` on one dataset, keyed by the SHA-256 of the member's
checkpoint bytes and by a description of the images (:func:`dataset_description`): the canonical
dataset spec, the data root (an absolute path, or ``"embedded"`` for the default digits), the split,
the image size, the corruption seed and the number of samples. A pool of K members costs K passes
per dataset; a rerun costs none. Entries are content addressed: a re-saved member with other weights
is a miss, the same bytes under another path (or only touched) a hit. Layout::

    root/<member_sha256[:16]>/<dataset_sha256[:16]>.safetensors
        logits (N, C) float32 or float16, target (N,) int64, JSON under the "divfast" metadata key:
        {"format": "divfast-logits", "format_version": 1, "member_sha256", "dataset_sha256",
         "dataset", "dtype", "member_file", "architecture", "num_classes", "content_sha256",
         "created"}

The sweep's attribution diversity needs the pool's Saliency Gram ``(K, K)``, a statistic of the
members' maps taken together: it is cached per pool, keyed by the members' hashes (in a canonical
order, so a reordered pool is a hit), the dataset description and the attribution settings::

    root/grams/<key_sha256[:16]>.safetensors
        gram (K, K) float64, n_samples () int64, JSON {"format": "divfast-gram", ...}

Writes are atomic (a crashed run leaves no readable partial entry). Reads use safetensors only
(never pickle) and check everything: the full hashes, the dataset description, the format, the
shapes and a SHA-256 of the tensor bytes. A file failing any check is a miss, and the next
:func:`member_logits` overwrites it.

What the key does not see: the images' content under a data root (edit an ImageFolder in place and
clear the cache), and the device, batch size and library versions, which change logits only by float
rounding. Fields are recorded as given, even where the base data ignores them (the embedded digits
ignore ``image_size``): an extra miss costs one pass, a wrong hit would be silent.

Storage: float32 by default. float16 halves the disk use, but the logits are then rounded to float16
(about 3 significant digits): argmax and accuracy agree with float32 only up to that rounding, and
ties can appear between classes whose float32 logits differ.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from divfast.corruptions import check_seed, format_dataset_spec, parse_dataset_spec
from divfast.errors import DivfastError
from divfast.io import atomic_path

FORMAT = "divfast-logits"
FORMAT_VERSION = 1
GRAM_FORMAT = "divfast-gram"
DTYPES = {torch.float32: "float32", torch.float16: "float16"}
_FIELDS = ("spec", "data", "split", "image_size", "seed", "num_samples")
_DIGESTS: dict[tuple, str] = {}  # stat signature of a file -> its SHA-256, for this process
_MAX_DIGESTS = 65536


def dataset_description(spec: str, num_samples: int, data: str | None = None, split: str = "test",
                        image_size: int | None = None, seed: int = 0) -> dict:
    """The dataset half of a cache key: everything that fixes the images, in canonical form.

    The arguments are those of :func:`divfast.data.build_dataset`, plus ``num_samples`` (the first
    ``num_samples`` samples of that dataset, in order).

    Args:
        spec: ``"clean"`` or ``<corruption><severity>``; stored canonical (``"lines-1.60"`` ->
            ``"lines1.6"``).
        num_samples: the number of samples (>= 1).
        data: the ImageFolder root (stored as an absolute path with symlinks resolved), or None for
            the embedded digits (stored as ``"embedded"``).
        split: ``"train"`` or ``"test"``.
        image_size: the image size given to ``build_dataset`` (an int >= 1) or None.
        seed: the corruption seed.

    Returns:
        A JSON-ready dict with keys ``spec, data, split, image_size, seed, num_samples``.

    Example:
        >>> desc = dataset_description("lines-1.60", 540)
        >>> desc["spec"], desc["data"], desc["num_samples"]
        ('lines1.6', 'embedded', 540)
    """
    root = "embedded" if data is None else os.path.realpath(os.path.expanduser(os.fspath(data)))
    return _check_description({"spec": spec, "data": root, "split": split,
                               "image_size": image_size, "seed": seed, "num_samples": num_samples})


def _check_description(desc) -> dict:
    """A canonical copy of a description; a DivfastError naming ``dataset_desc`` when malformed."""
    if not isinstance(desc, dict) or set(desc) != set(_FIELDS):
        got = sorted(desc) if isinstance(desc, dict) else type(desc).__name__
        raise DivfastError(f"dataset_desc: expected a dict with keys {', '.join(_FIELDS)} (see "
                           f"divfast.ensembles.cache.dataset_description), got {got}")
    spec = format_dataset_spec(*parse_dataset_spec(desc["spec"]))
    data = desc["data"]
    if not isinstance(data, str) or not (data == "embedded" or os.path.isabs(data)):
        raise DivfastError(f"dataset_desc: data must be 'embedded' or an absolute path, got "
                           f"{data!r}")
    if desc["split"] not in ("train", "test"):
        raise DivfastError(f"dataset_desc: split must be 'train' or 'test', got {desc['split']!r}")
    size = desc["image_size"]
    if size is not None and (not _is_int(size) or size < 1):
        raise DivfastError(f"dataset_desc: image_size must be None or an int >= 1, got {size!r}")
    n = desc["num_samples"]
    if not _is_int(n) or n < 1:
        raise DivfastError(f"dataset_desc: num_samples must be an int >= 1, got {n!r}")
    return {"spec": spec, "data": data, "split": desc["split"],
            "image_size": None if size is None else int(size), "seed": check_seed(desc["seed"]),
            "num_samples": int(n)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _description_hash(desc: dict) -> str:
    text = json.dumps(desc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_dtype(dtype) -> str:
    if dtype not in DTYPES:
        raise DivfastError(f"dtype: expected torch.float32 or torch.float16, got {dtype!r}")
    return DTYPES[dtype]


def _check_member_file(path) -> str:
    path = os.fspath(path)
    if path.startswith("timm:"):
        raise DivfastError(f"member_path (--members): {path!r} has no checkpoint file to hash; "
                           "the logits cache needs one (save it with divfast.data.save_member)")
    if not os.path.exists(path):
        raise DivfastError(f"member_path (--members): {path!r} does not exist")
    if not os.path.isfile(path):
        raise DivfastError(f"member_path (--members): {path!r} is not a file")
    return path


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, streamed; remembered per (path, inode, size, mtime, ctime).

    A pool of checkpoints is hashed once per process; a touched file (new mtime, same bytes) is
    hashed again and gives the same digest. The stat signature is the assumption make and rsync
    rely on: an in-place rewrite keeping size, inode and both times would go unseen.
    """
    path = os.path.abspath(path)
    before = os.stat(path)
    key = (path, before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns,
           before.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise DivfastError(f"member_path (--members): cannot read {path!r} "
                               f"({exc.strerror})") from exc
        after = os.stat(path)
        if (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size,
                                                                before.st_mtime_ns):
            if len(_DIGESTS) >= _MAX_DIGESTS:
                _DIGESTS.clear()
            _DIGESTS[key] = digest  # not remembered when the file changed while it was read
    return digest


def _tensor_digest(logits: torch.Tensor, target: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (logits, target):
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class LogitsCache:
    """A directory of cached member logits, content addressed (see the module docstring).

    Args:
        root: the cache directory; created if missing. It must be a writable directory.

    Raises:
        DivfastError: ``root`` is not a directory, cannot be created, or is not writable.

    Example:
        >>> import tempfile
        >>> cache = LogitsCache(tempfile.mkdtemp())
        >>> os.listdir(cache.root)
        []
    """

    def __init__(self, root: str | os.PathLike):
        root = os.path.abspath(os.fspath(root))
        if os.path.exists(root) and not os.path.isdir(root):
            raise DivfastError(f"root (logits cache): {root!r} exists and is not a directory")
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise DivfastError(f"root (logits cache): cannot create directory {root!r} "
                               f"({exc.strerror})") from exc
        if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
            raise DivfastError(f"root (logits cache): directory {root!r} is not readable and "
                               "writable")
        self.root = root

    def __repr__(self) -> str:
        return f"LogitsCache({self.root!r})"

    def member_hash(self, member_path: str | os.PathLike) -> str:
        """The SHA-256 (hex) of the checkpoint's bytes; a DivfastError naming ``member_path`` when
        it is missing or not a file."""
        return file_sha256(_check_member_file(member_path))

    def entry_path(self, member_path: str | os.PathLike, dataset_desc: dict) -> str:
        """Where the entry of ``member_path`` on ``dataset_desc`` lives (it may not exist)."""
        desc = _check_description(dataset_desc)
        return self._path(self.member_hash(member_path), _description_hash(desc))

    def _path(self, member_sha: str, dataset_sha: str) -> str:
        return os.path.join(self.root, member_sha[:16], f"{dataset_sha[:16]}.safetensors")

    def get(self, member_path: str | os.PathLike, dataset_desc: dict,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached ``(logits (N, C) in dtype, target (N,) int64)``, or None on a miss.

        A float32 entry serves both dtypes; a float16 entry serves only float16 (returning it as
        float32 would pass its rounding off as float32 logits). A file that fails any check
        (corrupt, truncated, another format, hashes or shapes that disagree) is a miss.
        """
        _check_dtype(dtype)
        desc = _check_description(dataset_desc)
        member_sha, dataset_sha = self.member_hash(member_path), _description_hash(desc)
        entry = _read_entry(self._path(member_sha, dataset_sha), member_sha, dataset_sha, desc)
        if entry is None:
            return None
        logits, target = entry
        if logits.dtype == torch.float16 and dtype == torch.float32:
            return None
        return logits.to(dtype), target

    def put(self, member_path: str | os.PathLike, dataset_desc: dict, logits: torch.Tensor,
            target: torch.Tensor) -> str:
        """Stores ``logits (N, C)`` (float32 or float16, stored in their dtype) and ``target (N,)``
        atomically; returns the entry's path.

        Raises:
            DivfastError: a missing member file or one without divfast metadata, a malformed
                ``dataset_desc``, logits of another dtype or shape than the description and the
                checkpoint's class count say, non-finite logits, or a failed write.
        """

        from divfast.data.members import read_member_info

        desc = _check_description(dataset_desc)
        member_sha, dataset_sha = self.member_hash(member_path), _description_hash(desc)
        info = read_member_info(os.fspath(member_path))
        if not isinstance(logits, torch.Tensor) or logits.dtype not in DTYPES:
            raise DivfastError(f"logits: expected a float32 or float16 tensor, got "
                               f"{getattr(logits, 'dtype', type(logits).__name__)}")
        n, c = desc["num_samples"], info.num_classes
        if tuple(logits.shape) != (n, c):
            raise DivfastError(f"logits: expected shape ({n}, {c}) (num_samples, the member's "
                               f"classes), got {tuple(logits.shape)}")
        if (not isinstance(target, torch.Tensor) or target.dtype.is_floating_point
                or target.dtype.is_complex or tuple(target.shape) != (n,)):
            raise DivfastError(f"target: expected an integer tensor of shape ({n},), got "
                               f"{getattr(target, 'dtype', type(target).__name__)} "
                               f"{tuple(getattr(target, 'shape', ()))}")
        if not bool(torch.isfinite(logits).all()):
            raise DivfastError("logits: NaN or infinite values cannot be cached")
        logits = logits.detach().cpu().contiguous()  # (N, C)
        target = target.detach().to("cpu", torch.int64).contiguous()  # (N,)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "member_sha256": member_sha,
               "dataset_sha256": dataset_sha, "dataset": desc, "dtype": DTYPES[logits.dtype],
               "member_file": os.path.basename(os.fspath(member_path)),
               "architecture": info.architecture, "num_classes": c,
               "content_sha256": _tensor_digest(logits, target),
               "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        return _write_entry(self._path(member_sha, dataset_sha),
                            {"logits": logits, "target": target}, doc)

    def _gram_key(self, member_paths: Sequence[str | os.PathLike], dataset_desc: dict,
                  attribution: dict) -> tuple[str, list[int], list[str], dict]:
        """(key, canonical order, member hashes in that order, description)."""
        desc = _check_description(dataset_desc)
        if not isinstance(attribution, dict):
            raise DivfastError(f"attribution: expected a dict of settings, got "
                               f"{type(attribution).__name__}")
        shas = [self.member_hash(p) for p in member_paths]
        # equal bytes give equal rows and columns, so their relative order does not matter
        order = sorted(range(len(shas)), key=lambda i: (shas[i], i))
        canonical = [shas[i] for i in order]
        doc = {"members": canonical, "dataset": desc, "attribution": attribution}
        key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        return key, order, canonical, desc

    def get_gram(self, member_paths: Sequence[str | os.PathLike], dataset_desc: dict,
                 attribution: dict) -> tuple[torch.Tensor, int] | None:
        """The cached pool Gram ``(K, K)`` float64 (rows and columns in ``member_paths``'s order)
        and its sample count, or None on a miss (a file failing any check is a miss).

        ``attribution`` describes how the maps were made (method, target, abs, normalize, ...);
        any difference is a miss.
        """
        key, order, canonical, desc = self._gram_key(member_paths, dataset_desc, attribution)
        path = os.path.join(self.root, "grams", f"{key[:16]}.safetensors")
        entry = _read_gram(path, key, canonical, desc, attribution)
        if entry is None:
            return None
        gram, n = entry
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return gram[inverse][:, inverse].contiguous(), n

    def put_gram(self, member_paths: Sequence[str | os.PathLike], dataset_desc: dict,
                 attribution: dict, gram: torch.Tensor, n_samples: int) -> str:
        """Stores the pool Gram (``member_paths``'s order) atomically; returns the entry's path.

        Raises:
            DivfastError: a Gram that is not a finite float64 (K, K) tensor for K members, a bad
                sample count, or a failed write.
        """
        k = len(member_paths)
        if (not isinstance(gram, torch.Tensor) or gram.dtype != torch.float64
                or tuple(gram.shape) != (k, k) or not bool(torch.isfinite(gram).all())):
            raise DivfastError(f"gram: expected a finite float64 tensor of shape ({k}, {k}), got "
                               f"{getattr(gram, 'dtype', type(gram).__name__)} "
                               f"{tuple(getattr(gram, 'shape', ()))}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
            raise DivfastError(f"n_samples: expected an int >= 0, got {n_samples!r}")
        key, order, canonical, desc = self._gram_key(member_paths, dataset_desc, attribution)
        perm = torch.tensor(order)
        gram = gram.detach().cpu()[perm][:, perm].contiguous()
        count = torch.tensor(n_samples, dtype=torch.int64)
        doc = {"format": GRAM_FORMAT, "format_version": FORMAT_VERSION, "key_sha256": key,
               "members_sha256": canonical, "dataset": desc, "attribution": attribution,
               "content_sha256": _tensor_digest(gram, count),
               "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        return _write_entry(os.path.join(self.root, "grams", f"{key[:16]}.safetensors"),
                            {"gram": gram, "n_samples": count}, doc)


def _write_entry(path: str, tensors: dict[str, torch.Tensor], doc: dict) -> str:
    """Writes a safetensors entry with ``doc`` under the "divfast" metadata key, atomically."""
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"divfast": json.dumps(doc, sort_keys=True)})
    except OSError as exc:
        raise DivfastError(f"root (logits cache): cannot write {path!r} "
                           f"({exc.strerror or exc})") from exc
    return path


def _checked_entry(path: str, names: set[str],
                   valid: Callable[[dict, dict[str, torch.Tensor]], bool]
                   ) -> dict[str, torch.Tensor] | None:
    """An entry's tensors when the file holds exactly ``names`` and ``valid(doc, tensors)``
    accepts its JSON document; None otherwise. Never raises on a bad file: any unreadable or
    malformed entry is a miss, rewritten later."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            doc = json.loads((f.metadata() or {})["divfast"])
            if set(f.keys()) != names:
                return None
            tensors = {name: f.get_tensor(name) for name in names}
        ok = isinstance(doc, dict) and valid(doc, tensors)
    except Exception:  # noqa: BLE001  see the docstring
        return None
    return tensors if ok else None


def _read_gram(path: str, key: str, canonical: list[str], desc: dict,
               attribution: dict) -> tuple[torch.Tensor, int] | None:
    """A pool Gram entry when every check passes, else None (never raises on a bad file)."""
    k = len(canonical)

    def valid(doc, t):
        gram, count = t["gram"], t["n_samples"]
        return (doc.get("format") == GRAM_FORMAT and doc.get("format_version") == FORMAT_VERSION
                and doc.get("key_sha256") == key and doc.get("members_sha256") == canonical
                and doc.get("dataset") == desc and doc.get("attribution") == attribution
                and gram.dtype == torch.float64 and tuple(gram.shape) == (k, k)
                and count.dtype == torch.int64 and count.dim() == 0
                and doc.get("content_sha256") == _tensor_digest(gram, count)
                and bool(torch.isfinite(gram).all()))

    tensors = _checked_entry(path, {"gram", "n_samples"}, valid)
    return None if tensors is None else (tensors["gram"], int(tensors["n_samples"]))


def _read_entry(path: str, member_sha: str, dataset_sha: str,
                desc: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The entry's tensors when every check passes, else None (never raises on a bad file)."""
    n = desc["num_samples"]

    def valid(doc, t):
        logits, target = t["logits"], t["target"]
        return (doc.get("format") == FORMAT and doc.get("format_version") == FORMAT_VERSION
                and doc.get("member_sha256") == member_sha
                and doc.get("dataset_sha256") == dataset_sha and doc.get("dataset") == desc
                and doc.get("dtype") == DTYPES.get(logits.dtype)
                and tuple(logits.shape) == (n, doc.get("num_classes"))
                and target.dtype == torch.int64 and tuple(target.shape) == (n,)
                and doc.get("content_sha256") == _tensor_digest(logits, target)
                and bool(torch.isfinite(logits).all()))

    tensors = _checked_entry(path, {"logits", "target"}, valid)
    return None if tensors is None else (tensors["logits"], tensors["target"])


def member_logits(member_path: str | os.PathLike, dataset: Dataset, dataset_desc: dict,
                  cache: LogitsCache | None = None, batch_size: int = 128,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  progress: bool = False,
                  num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One member's logits on a dataset, from ``cache`` when it holds them, else from one pass.

    On a miss the member is loaded (:func:`divfast.data.load_member`, eval mode) and run over
    ``dataset`` in order under ``torch.no_grad()``; its logits, checked finite, are stored in
    ``cache`` (nothing is stored when ``cache`` is None) and returned. A hit and a miss return the
    same tensors: float16 logits are rounded before they are stored.

    Args:
        member_path: a member checkpoint file (``timm:NAME`` only with ``cache=None``).
        dataset: yields ``(image (3, H, W) in [0, 1], label)``; its length must be
            ``dataset_desc["num_samples"]``.
        dataset_desc: what ``dataset`` is (:func:`dataset_description`); the caller vouches for it.
        cache: a :class:`LogitsCache`, or None.
        batch_size: images per batch (>= 1).
        device: where the member runs.
        dtype: ``torch.float32`` (default) or ``torch.float16`` (half the disk; argmax exact only
            up to float16 rounding, ties can appear).
        progress: a progress bar on stderr during a pass.
        num_workers: data-loader processes (>= 0).

    Returns:
        ``(logits (N, C) in dtype, target (N,) int64)``, on the CPU.

    Raises:
        DivfastError: a missing member file, a bad ``dtype``, ``batch_size`` or ``dataset_desc``, a
            dataset whose length or labels disagree with the description or the member, NaN or
            infinite logits (naming the member file; float16 overflow included), a member file
            changed during the pass.

    Example:
        >>> import tempfile
        >>> from torch.utils.data import Subset
        >>> from divfast.data import digits_dataset, save_member
        >>> from divfast.data.members import create_member
        >>> folder = tempfile.mkdtemp()
        >>> path = os.path.join(folder, "m.safetensors")
        >>> save_member(create_member("resnet10t", 10, (3, 32, 32)), path)
        >>> data, desc = Subset(digits_dataset("test"), range(8)), dataset_description("clean", 8)
        >>> cache = LogitsCache(os.path.join(folder, "cache"))
        >>> logits, target = member_logits(path, data, desc, cache=cache)  # one pass, stored
        >>> logits.shape, target.shape
        (torch.Size([8, 10]), torch.Size([8]))
        >>> torch.equal(member_logits(path, data, desc, cache=cache)[0], logits)  # no pass
        True
    """
    logits, target = pool_logits([member_path], dataset, dataset_desc, cache=cache,
                                 batch_size=batch_size, device=device, dtype=dtype,
                                 progress=progress, num_workers=num_workers)
    return logits[0], target


def pool_logits(member_paths: Sequence[str | os.PathLike], dataset: Dataset, dataset_desc: dict,
                cache: LogitsCache | None = None, batch_size: int = 128,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                progress: bool = False, num_workers: int = 0,
                loaded: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's logits on a dataset: :func:`member_logits` for a pool, with ONE pass over
    the data feeding every member the cache does not hold (so a corrupted dataset is corrupted
    once, not once per member).

    ``loaded``, when given, keeps the members this call loads (keyed by path) and supplies those
    an earlier call loaded, so a pool is loaded once for all its datasets.

    Returns:
        ``(logits (K, N, C) in dtype, target (N,) int64)``, on the CPU, members in order.

    Raises:
        DivfastError: as :func:`member_logits`, naming the member at fault; members that disagree
            in their number of classes.
    """
    from tqdm import tqdm

    from divfast.data.members import load_member

    _check_dtype(dtype)
    if not _is_int(batch_size) or batch_size < 1:
        raise DivfastError(f"batch_size (--batch-size): expected an int >= 1, got {batch_size!r}")
    if not _is_int(num_workers) or num_workers < 0:
        raise DivfastError(f"num_workers (--workers): expected an int >= 0, got {num_workers!r}")
    if cache is not None and not isinstance(cache, LogitsCache):
        raise DivfastError(f"cache: expected a LogitsCache or None, got {type(cache).__name__}")
    paths = [os.fspath(p) for p in member_paths]
    for path in paths:
        if cache is not None or not path.startswith("timm:"):
            _check_member_file(path)
    desc = _check_description(dataset_desc)
    if len(dataset) != desc["num_samples"]:
        raise DivfastError(f"dataset_desc: num_samples is {desc['num_samples']} but the dataset "
                           f"has {len(dataset)} samples")
    results: list = [None] * len(paths)
    shas: dict[int, str] = {}
    if cache is not None:
        for i, path in enumerate(paths):
            shas[i] = cache.member_hash(path)
            results[i] = cache.get(path, desc, dtype)
    missing = [i for i in range(len(paths)) if results[i] is None]
    if missing:
        if loaded is None:
            loaded = {}
        for i in missing:
            if paths[i] not in loaded:
                loaded[paths[i]] = load_member(paths[i], device).eval()
        members = {i: loaded[paths[i]] for i in missing}
        classes = {members[i].info.num_classes for i in missing}
        if len(classes) > 1:
            raise DivfastError(f"member_paths (--members): the members predict different numbers "
                               f"of classes ({sorted(classes)})")
        num_classes = classes.pop()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        chunks: dict[int, list] = {i: [] for i in missing}
        targets, n = [], 0
        name = os.path.basename(paths[missing[0]]) if len(missing) == 1 else f"{len(missing)} members"
        with torch.no_grad():
            for x, y in tqdm(loader, desc=f"logits {name} {desc['spec']}", file=sys.stderr,
                             disable=not progress, leave=False, dynamic_ncols=True):
                x = x.to(device)
                y = torch.as_tensor(y).to("cpu", torch.int64)  # (B,)
                for i in missing:
                    logits = members[i](x).float().cpu()  # (B, C)
                    if not bool(torch.isfinite(logits).all()):
                        raise DivfastError(f"--members: {paths[i]!r} produced NaN or infinite "
                                           f"logits on {desc['spec']!r} (samples {n}..{n + len(y) - 1}); "
                                           "its weights may be corrupt")
                    chunks[i].append(logits)
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                    raise DivfastError(f"--dataset: {desc['spec']!r} has labels outside "
                                       f"{paths[missing[0]]!r}'s {num_classes} classes "
                                       f"[0, {num_classes})")
                targets.append(y)
                n += len(y)
        if n != desc["num_samples"]:
            raise DivfastError(f"dataset_desc: num_samples is {desc['num_samples']} but the "
                               f"dataset yielded {n} samples")
        target = torch.cat(targets)  # (N,)
        for i in missing:
            logits = torch.cat(chunks[i]).to(dtype)  # (N, C)
            if not bool(torch.isfinite(logits).all()):  # only float16 can overflow (|x| > 65504)
                raise DivfastError(f"dtype: {paths[i]!r} has logits beyond float16's range on "
                                   f"{desc['spec']!r}; use torch.float32")
            results[i] = (logits, target)
        if cache is not None:
            for i in missing:
                if cache.member_hash(paths[i]) != shas[i]:
                    raise DivfastError(f"member_path (--members): {paths[i]!r} changed while it "
                                       "was evaluated; nothing was cached, run again")
            for i in missing:
                cache.put(paths[i], desc, *results[i])
    target = results[0][1]
    for i, (logits, t) in enumerate(results):
        if not torch.equal(t, target):
            raise DivfastError(f"dataset_desc: the cached labels of {paths[i]!r} disagree with "
                               f"those of {paths[0]!r} for {desc['spec']!r}; clear the cache")
    return torch.stack([logits for logits, _ in results]), target
