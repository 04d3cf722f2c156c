"""Shape functions (fake kernels) of divfast's ops, for torch.compile and meta tensors."""

import torch


@torch.library.register_fake("divfast::pair_counts")
def _pair_counts_fake(predictions, target, num_classes=-1):
    torch._check(predictions.dim() in (2, 3), lambda: "predictions must be (M, B, C) or (M, B)")
    m, b = predictions.shape[0], predictions.shape[1]
    return (
        predictions.new_empty((m, m, 2, 2), dtype=torch.long),
        predictions.new_empty((m, m), dtype=torch.long),
        predictions.new_empty((m + 1,), dtype=torch.long),
        predictions.new_empty((m, b), dtype=torch.bool),
    )
