"""Layer features for representation diversity (CKA, issue #5): choose layers by name, and turn each
layer's output into the batch's Gram matrix inside a forward hook.

Layer names are those of ``named_modules()`` relative to the classifier (``member.model`` for a
:class:`~divfast.data.members.Member`): ``"layer1"``, ``"layer1.0.conv1"``. Patterns are
case-sensitive fnmatch globs, and ``*`` crosses dots: ``"layer*"`` selects ``layer1`` and every
module inside it, ``"layer?"`` only the four stages of a ResNet.

Memory: a hook keeps no activation. It forms the ``(n, n)`` Gram matrix of the batch's features and
lets the activation go, so a capture holds G Gram matrices (G = members x layers) and nothing that
grows with a layer's width or with the data set. Features are centred and multiplied in column
blocks, so even the transient working copy stays small.

Centring: the features are centred over the batch (``x - x.mean(0)``) before the Gram is formed.
For the linear kernel this changes the Gram only by terms ``a 1^T + 1 b^T + c 11^T``, which the
unbiased HSIC's U-centring removes exactly, so every HSIC (and CKA) is unchanged; what it avoids is
float32 rounding when large common offsets (post-ReLU features) dominate ``x x^T``. RBF distances
do not change under a translation.

Wide float32 products on the CPU (d >= 4096, or >= 2048 up to 64 samples; batches of up to 256)
come instead from the ``divfast::attribution_stats`` kernel, whose member Gram of n "members" (the
samples) over d "pixels" (the features) is this same centred Gram; it needs no centred copy and
sums in float64 every 64 terms per lane (128 with AVX2 only), so it is both faster (1.5-2.3x at
n = 64 here) and closer to float64.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn as nn

from divfast._ops._load import has_kernel
from divfast.data.members import Member
from divfast.errors import DivfastError
from divfast.functional.representation import rbf_from_linear_gram

KERNELS = ("linear", "rbf")
GRAM_DTYPES = (torch.float32, torch.float64)
MAX_LISTED = 40  # names an error lists before "... (N more)"
# Features are centred and multiplied in column blocks of about this many elements. On a CPU a block
# that stays in cache (8 MiB in float64) makes a wide layer's float64 Gram 3x faster than one pass;
# on a GPU fewer, larger blocks save kernel launches. Either way the working copy stays small.
BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
MAX_KERNEL_SAMPLES = 256  # batches up to this size may form wide Grams in attribution_stats


def _model_of(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, Member) else model


def _listing(names: Sequence[str]) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown}, ... ({len(names) - MAX_LISTED} more)"


def list_layers(model: nn.Module) -> list[str]:
    """Every named submodule of ``model`` (a Member's ``.model``) except the root, in
    ``named_modules()`` order.

    Example:
        >>> list_layers(nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 2))))
        ['0', '1', '1.0', '1.1']
    """
    return [name for name, _ in _model_of(model).named_modules() if name]


def _feature_info_modules(model: nn.Module) -> list[str]:
    """timm's ``feature_info`` module names (a FeatureInfo or a list of dicts), or ``[]``."""
    info = getattr(model, "feature_info", None)
    if hasattr(info, "module_name"):  # timm FeatureInfo (features_only models)
        names = info.module_name()
    elif isinstance(info, (list, tuple)):
        names = [d.get("module") if isinstance(d, dict) else None for d in info]
    else:
        return []
    names = [names] if isinstance(names, str) else list(names)
    if not all(isinstance(n, str) and n for n in names):
        return []
    return list(dict.fromkeys(names))


def default_layers(model: nn.Module) -> list[str]:
    """The layers captured when none are named: timm's ``feature_info`` modules (for resnet18:
    ``act1, layer1, ..., layer4``) when the model has them and every one is a module of it, else
    every top-level child module.

    A ``features_only`` wrapper whose ``feature_info`` names modules of an inner model (timm's
    FeatureGetterNet) falls back to its children.

    Example:
        >>> default_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ['0', '1', '2']
    """
    model = _model_of(model)
    names = _feature_info_modules(model)
    known = set(list_layers(model))
    if names and all(n in known for n in names):
        return names
    return [name for name, _ in model.named_children()]


def _resolve(model: nn.Module, patterns: Sequence[str] | None, owner: str) -> list[str]:
    """resolve_layers with the model described as ``owner`` in errors."""
    if patterns is None:
        layers = default_layers(model)
        if not layers:
            raise DivfastError(f"layers (--layers): {owner} has no submodules to capture")
        return layers
    if isinstance(patterns, str):
        raise DivfastError(f"layers (--layers): expected a list of names or patterns, got the "
                           f"string {patterns!r} (write [{patterns!r}])")
    patterns = list(patterns)
    names = list_layers(model)
    if not patterns:
        raise DivfastError(f"layers (--layers): expected at least one name or pattern; the "
                           f"modules of {owner} are: {_listing(names)}")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise DivfastError(f"layers (--layers): expected names or patterns (str), got "
                               f"{type(pattern).__name__} {pattern!r}")
        if not any(fnmatchcase(name, pattern) for name in names):
            raise DivfastError(f"layers (--layers): {pattern!r} matches no module of {owner}; "
                               f"available: {_listing(names)}")
    return [name for name in names if any(fnmatchcase(name, p) for p in patterns)]


def resolve_layers(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """The layers of ``model`` (a Member's ``.model``) that ``patterns`` select, in model order,
    each once.

    Args:
        model: a Member or an ``nn.Module``.
        patterns: exact names or fnmatch globs (``"layer*"``, ``"*"``) over :func:`list_layers`;
            None gives :func:`default_layers`.

    Raises:
        DivfastError: a pattern matches nothing (the message lists the available names), or
            ``patterns`` is empty or a bare string.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 2)))
        >>> resolve_layers(net, ["1.*", "0"])
        ['0', '1.0', '1.1']
    """
    model = _model_of(model)
    return _resolve(model, patterns, type(model).__name__)


def _check_options(kernel: str, bandwidth: float, dtype: torch.dtype) -> None:
    if kernel not in KERNELS:
        raise DivfastError(f"kernel: expected 'linear' or 'rbf', got {kernel!r}")
    if not (isinstance(bandwidth, (int, float)) and bandwidth > 0 and math.isfinite(bandwidth)):
        raise DivfastError(f"bandwidth: expected a positive fraction of the median distance, got "
                           f"{bandwidth!r}")
    if dtype not in GRAM_DTYPES:
        raise DivfastError(f"gram_dtype: expected torch.float32 or torch.float64, got {dtype}")


def _use_member_gram_kernel(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``x`` (n, d) takes the attribution_stats kernel: float32 products of CPU features
    wide enough for it to win (measured: 1.3-3.4x faster than centre-then-GEMM from d = 4096 at
    n = 16-256, and from d = 2048 up to n = 64; below, the GEMM's lower call cost wins). Not above
    256 samples: its per-thread accumulators grow as n^2 (64 n^2 bytes) and from n = 512 it ran
    slower than the GEMM."""
    n, d = x.shape
    return (x.device.type == "cpu" and dtype == torch.float32 and 2 <= n <= MAX_KERNEL_SAMPLES
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (d >= 4096 or (d >= 2048 and n <= 64))
            and has_kernel("attribution_stats", "CPU"))


def _gram(x: torch.Tensor, kernel: str, bandwidth: float, dtype: torch.dtype) -> torch.Tensor:
    """batch_gram without the argument and finiteness checks (which would sync a GPU per layer)."""
    with torch.no_grad():
        x = x.detach()  # (n, d)
        n = x.shape[0]
        if _use_member_gram_kernel(x, dtype):
            # The kernel's member Gram of n "members" (the samples) over d "pixels" (the features)
            # is exactly this Gram: products of the values centred at each feature on the batch
            # mean, formed in float32 register tiles, summed in float64 every 64 terms per lane
            # (128 on the AVX2 path; more accurate than a float32 GEMM over d terms), from one read
            # of x, no centred copy.
            try:
                gram = torch.ops.divfast.attribution_stats(x.reshape(n, 1, -1), False, "none", 0)[1]
            except ValueError:  # NaN / inf features or float32 overflow: the GEMM below shows them
                gram = None
            if gram is not None:
                return rbf_from_linear_gram(gram, bandwidth) if kernel == "rbf" else gram
        gram = torch.zeros(n, n, dtype=dtype, device=x.device)
        width = BLOCK_ELEMENTS.get(x.device.type, BLOCK_ELEMENTS["cuda"]) // max(n, 1)
        for block in x.split(max(1, width), dim=1):  # (n, <= width)
            block = block.to(dtype)  # no copy when the dtype matches: the next line makes one
            block = block - block.mean(dim=0)  # a new tensor: the activation itself never changes
            gram.addmm_(block, block.T)  # in place, so autocast leaves it in `dtype`
        gram = gram.to(torch.float64)
        return rbf_from_linear_gram(gram, bandwidth) if kernel == "rbf" else gram


def batch_gram(x: torch.Tensor, kernel: str = "linear", bandwidth: float = 0.5,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``(n, n)`` Gram matrix, float64, of one batch of features ``x`` ``(n, d)``, centred over
    the batch first (the unbiased HSIC does not change; see the module docstring).

    Args:
        x: features of n samples; detached, any floating dtype.
        kernel: ``"linear"`` (``xc xc^T``) or ``"rbf"`` (``exp(-d^2 / (2 s^2))``, ``s`` =
            ``bandwidth`` x the median off-diagonal distance of this batch; all ones when s = 0),
            the rule of :func:`divfast.functional.representation.gram_matrices`.
        bandwidth: the RBF width as a fraction of the median distance.
        dtype: the dtype of the product, ``torch.float64`` or ``torch.float32`` (faster; the
            centring keeps it accurate). The result is float64 either way.

    Raises:
        DivfastError: a bad option, ``x`` not 2-D, or a non-finite value in ``x`` or the Gram.

    Example:
        >>> x = torch.randn(8, 5, dtype=torch.float64) + 100.0
        >>> k = batch_gram(x)
        >>> k.shape, k.dtype, torch.allclose(k.sum(dim=0), torch.zeros(8, dtype=torch.float64))
        (torch.Size([8, 8]), torch.float64, True)
    """
    _check_options(kernel, bandwidth, dtype)
    if x.dim() != 2:
        raise DivfastError(f"x: expected features (n, d), got shape {tuple(x.shape)}")
    gram = _gram(x, kernel, bandwidth, dtype)
    if not bool(torch.isfinite(gram).all()):
        raise DivfastError("x: non-finite values (NaN or inf) in the features or their Gram matrix")
    return gram


def _output_tensor(output: object, name: str) -> torch.Tensor:
    """The tensor a hooked module returned, or the first tensor of the tuple or list it returned
    (e.g. an LSTM's ``(output, (h, c))``); it needs a batch dimension."""
    if isinstance(output, (tuple, list)):
        first = next((o for o in output if isinstance(o, torch.Tensor)), None)
        if first is None:
            raise DivfastError(f"layers (--layers): {name} returned a {type(output).__name__} with "
                               "no tensor in it; choose another layer")
        output = first
    if not isinstance(output, torch.Tensor):
        raise DivfastError(f"layers (--layers): {name} returned a {type(output).__name__}, not "
                           "a tensor (or a tuple or list, whose first tensor is used); choose "
                           "another layer")
    if output.dim() == 0:
        raise DivfastError(f"layers (--layers): {name} returned a scalar; its output needs a batch "
                           "dimension first")
    return output


def _member_labels(members: Sequence[nn.Module]) -> list[str]:
    names = [getattr(m, "name", None) for m in members]
    if all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names):
        return names
    return [str(i) for i in range(len(members))]


def _patterns_per_member(layers, count: int) -> list:
    """One pattern list (or None) per member: ``layers`` is one list for all, or one per member."""
    if layers is None or isinstance(layers, str):
        return [layers] * count  # a bare string is refused, with a hint, by _resolve
    layers = list(layers)
    if all(isinstance(p, str) for p in layers):
        return [layers] * count
    if any(isinstance(p, str) for p in layers):
        raise DivfastError("layers (--layers): expected one list of patterns for every member, or "
                           "one list (or None) per member, not a mix of patterns and lists")
    if len(layers) != count:
        raise DivfastError(f"layers (--layers): {len(layers)} per-member lists for {count} "
                           "members; pass one list per member, or one list of patterns for all")
    return layers


class GramCapture:
    """Forward hooks that turn the outputs of chosen layers of every member into the batch's Gram
    matrices: summing :func:`~divfast.functional.representation.hsic_matrix_from_grams` of each
    batch's Grams gives the minibatch CKA of every (member, layer) pair.

    ``with capture:`` registers the hooks and removes them on exit (also on an exception). The
    hooks record only inside ``with capture.recording():``, so other forwards of the same members
    (attribution passes, say) cost nothing and change nothing. Each hook forms the Gram of its
    layer's output (:func:`batch_gram`) at once, before any later in-place op can change that
    output, and keeps no activation. A tensor output is flattened per sample; a tuple or list
    output gives its first tensor. :meth:`pop` returns the Grams of the last recorded forward of
    every member.

    Args:
        members: Members or plain modules; layer names are relative to a Member's ``.model``.
        layers: one list of names or globs for every member, one list (or None) per member, or
            None for :func:`default_layers`; see :func:`resolve_layers`.
        kernel: ``"linear"`` or ``"rbf"``; ``bandwidth``: the RBF width as a fraction of the
            median distance (per batch).
        gram_dtype: the dtype of the Gram products: ``torch.float32`` (default: the products run
            at float32 GEMM speed, about twice float64's, and the centring keeps them accurate:
            CKA within about 3e-8 of float64 products on resnet18's 93 modules, see
            benchmarks/RESULTS.md) or ``torch.float64``. The Grams are returned in float64
            either way, and the HSIC sums are float64.
        missing: what :meth:`pop` does with a layer that did not run: ``"error"`` (default) or
            ``"drop"``: layers that did not run in the FIRST recorded forward are dropped for good
            (with a warning naming them; :attr:`names` and :attr:`layers` shrink), e.g. modules a
            ``"*"`` glob matches but the forward never calls (ViT's ``attn_drop`` with fused
            attention, disabled drop paths); a layer missing later is still an error.

    Example:
        >>> from divfast.functional.representation import cka_from_hsic, hsic_matrix_from_grams
        >>> members = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
        >>> with GramCapture(members, layers=["1", "2"]) as capture:
        ...     with capture.recording():
        ...         logits = [member(torch.randn(16, 6)) for member in members]
        ...     grams = capture.pop()
        >>> capture.names, grams.shape, grams.dtype
        (['0/1', '0/2', '1/1', '1/2'], torch.Size([4, 16, 16]), torch.float64)
        >>> cka = cka_from_hsic(hsic_matrix_from_grams(grams))  # (4, 4)
    """

    def __init__(self, members: Sequence[nn.Module],
                 layers: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
                 kernel: str = "linear", bandwidth: float = 0.5,
                 gram_dtype: torch.dtype = torch.float32, missing: str = "error"):
        _check_options(kernel, bandwidth, gram_dtype)
        if missing not in ("error", "drop"):
            raise DivfastError(f"missing: expected 'error' or 'drop', got {missing!r}")
        self.missing = missing
        self._dropped: set[tuple[int, int]] = set()  # (member, slot) of layers dropped at the first pop
        self._popped = False
        self.members = list(members)
        if not self.members:
            raise DivfastError("members: expected at least one member")
        self.kernel, self.bandwidth, self.gram_dtype = kernel, bandwidth, gram_dtype
        self._labels = _member_labels(self.members)
        patterns = _patterns_per_member(layers, len(self.members))
        self._layers = []
        for label, member, member_patterns in zip(self._labels, self.members, patterns):
            model = _model_of(member)
            owner = f"member {label} ({type(model).__name__})"
            self._layers.append(_resolve(model, member_patterns, owner))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._recording = False
        self._clear()

    @property
    def names(self) -> list[str]:
        """``"<member>/<layer>"`` for every Gram, member-major: the member's name when every member
        has a distinct one, else its index."""
        return [f"{label}/{layer}" for label, layers in zip(self._labels, self.layers)
                for layer in layers]

    @property
    def layers(self) -> list[list[str]]:
        """The resolved layer names of each member (less any dropped at the first pop)."""
        return [[layer for slot, layer in enumerate(layers) if (member, slot) not in self._dropped]
                for member, layers in enumerate(self._layers)]

    @property
    def num_grams(self) -> int:
        return sum(len(layers) for layers in self.layers)

    def _clear(self) -> None:
        self._grams: list[list[torch.Tensor | None]] = [[None] * len(ls) for ls in self._layers]
        self._ran = [False] * len(self._layers)
        self._seen: dict[int, tuple] = {}  # id(output) -> (weakref, version, Gram), this forward

    def _start_hook(self, member: int) -> Callable:
        def hook(module, args):
            if self._recording:  # a new forward of this member replaces its last one
                self._grams[member] = [None] * len(self._layers[member])
                self._ran[member] = True
                self._seen = {}
        return hook

    def _layer_hook(self, member: int, slot: int) -> Callable:
        name = f"{self._labels[member]}/{self._layers[member][slot]}"

        def hook(module, args, output):
            if not self._recording:
                return None
            grams = self._grams[member]
            if grams[slot] is not None:
                raise DivfastError(f"layers (--layers): {name} ran twice in one forward; the CKA "
                                   "of a module called more than once is ambiguous, so choose a "
                                   "layer that runs once (its parent, say)")
            grams[slot] = self._gram_of(_output_tensor(output, name))  # (n, n) float64
            self._ran[member] = True
            return None  # the output goes on unchanged
        return hook

    def _gram_of(self, output: torch.Tensor) -> torch.Tensor:
        """The Gram of ``output`` flattened per sample; reused when an earlier hook of this forward
        saw the very same tensor, unchanged (a block returns its last activation's output, an
        Identity its input: about a third of resnet18's modules). The weak reference keeps no
        activation alive; inference tensors have no version counter, so they are never reused."""
        key = id(output)
        tracked = not output.is_inference()
        seen = self._seen.get(key)
        if tracked and seen is not None and seen[0]() is output and seen[1] == output._version:
            return seen[2]
        n = output.shape[0]
        gram = _gram(output.reshape(n, math.prod(output.shape[1:])), self.kernel, self.bandwidth,
                     self.gram_dtype)  # (n, n) float64
        if tracked:
            self._seen[key] = (weakref.ref(output), output._version, gram)
        return gram

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> GramCapture:
        if self._handles:
            raise RuntimeError("GramCapture: already entered")
        self._clear()
        try:
            for m, (member, layers) in enumerate(zip(self.members, self._layers)):
                model = _model_of(member)
                self._handles.append(model.register_forward_pre_hook(self._start_hook(m)))
                for slot, layer in enumerate(layers):
                    module = model.get_submodule(layer)
                    self._handles.append(module.register_forward_hook(self._layer_hook(m, slot)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._recording = False
        self._remove()

    @contextlib.contextmanager
    def recording(self) -> Iterator[GramCapture]:
        """Within this block the hooks record the members' forwards; outside it they do nothing."""
        if not self._handles:
            raise RuntimeError("GramCapture.recording: enter the capture first "
                               "(`with GramCapture(...) as capture:`)")
        previous, self._recording = self._recording, True
        try:
            yield self
        finally:
            self._recording = previous

    def pop(self) -> torch.Tensor:
        """The Grams ``(G, n, n)`` float64 of the last recorded forward of every member, in
        :attr:`names` order; clears them.

        Raises:
            DivfastError: a layer did not run (not on the forward path), outputs disagree on the
                batch size, or a Gram is not finite (NaN or inf in the layer's output).
            RuntimeError: a member had no recorded forward since the last pop.
        """
        try:
            idle = [label for label, ran in zip(self._labels, self._ran) if not ran]
            if idle:
                raise RuntimeError(f"GramCapture.pop: no recorded forward of member(s) "
                                   f"{', '.join(idle)} since the last pop; run every member inside "
                                   "`with capture.recording():`")
            if self.missing == "drop" and not self._popped:  # layers off the forward path go
                idle_layers = [(member, slot) for member, grams in enumerate(self._grams)
                               for slot, g in enumerate(grams) if g is None]
                if idle_layers and len(idle_layers) < sum(len(ls) for ls in self._layers):
                    warnings.warn("GramCapture: dropped layer(s) that did not run in the first "
                                  "recorded forward: " + _listing(
                                      [f"{self._labels[m]}/{self._layers[m][k]}"
                                       for m, k in idle_layers]), RuntimeWarning, stacklevel=2)
                    self._dropped.update(idle_layers)
            self._popped = True
            names = self.names
            flat = [g for member, grams in enumerate(self._grams) for slot, g in enumerate(grams)
                    if (member, slot) not in self._dropped]
            missing = [name for name, g in zip(names, flat) if g is None]
            if missing:
                raise DivfastError(f"layers (--layers): {_listing(missing)} did not run in the "
                                   "last recorded forward (not on the forward path?); choose "
                                   "layers that the forward calls")
            n = flat[0].shape[0]
            for name, g in zip(names, flat):
                if g.shape[0] != n:
                    raise DivfastError(f"layers (--layers): the output of {name} has "
                                       f"{g.shape[0]} samples, that of {names[0]} has {n}; every "
                                       "captured output needs the batch as its first dimension")
            grams = torch.stack([g.to(flat[0].device) for g in flat])  # (G, n, n)
            finite = torch.isfinite(grams).flatten(1).all(dim=1)  # (G,)
            if not bool(finite.all()):
                bad = [names[i] for i in (~finite).nonzero().flatten().tolist()]
                raise DivfastError(f"layers (--layers): non-finite values (NaN or inf) in the "
                                   f"output of {_listing(bad)} or its Gram matrix")
            return grams
        finally:
            self._clear()
