"""Attention received per token, computed without materialising the attention matrix.

DINS scores a patch by the attention it receives in one vision-encoder layer: the column sum
over queries of the head-averaged ``softmax(q k^T * scale)``. The reference implementation
builds the whole (H, N, N) matrix in bf16 (16 x 4096 x 4096 per MedGemma slice); here the sum is
accumulated over blocks of queries in float32, so peak extra memory is one block.
"""

from __future__ import annotations

import torch

# Heads of one query chunk are processed together up to this many bytes of logits per block:
# fewer, larger kernels (on a busy CPU every small op pays a thread-pool barrier).
_CPU_BLOCK_BYTES = 64 * 1024 * 1024
_DEVICE_BLOCK_BYTES = 256 * 1024 * 1024


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError(f"q and k must be torch tensors, got {type(q).__name__}, "
                        f"{type(k).__name__}")
    if q.ndim not in (3, 4) or k.ndim != q.ndim:
        raise ValueError(
            f"q and k must both be (B, H, N, d) or (H, N, d); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim"
        )
    if not q.is_floating_point() or not k.is_floating_point():
        raise ValueError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")


def _softmax_rows_(block: torch.Tensor) -> None:
    """Row softmax of ``block`` in place (float32, max-subtracted, so it cannot overflow)."""
    if block.device.type == "cpu":
        # The CPU kernel reads a row before writing it, so aliasing input and output is safe.
        torch.softmax(block, dim=-1, out=block)
    else:
        block.sub_(block.amax(dim=-1, keepdim=True)).exp_()
        block.div_(block.sum(dim=-1, keepdim=True))


@torch.no_grad()
def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Attention each key token receives, summed over queries and averaged over heads.

    ``out[b, j] = mean_h sum_i softmax_j(q[b, h, i] . k[b, h, j] * scale)``, computed in float32
    over blocks of ``chunk_size`` queries; the (B, H, N, N) matrix is never allocated. As many
    (batch, head) rows as fit in 64 MiB (CPU) / 256 MiB (other devices) share a block.

    Args:
        q: (B, H, Nq, d) or (H, Nq, d) queries (after rotary embedding where the model has it).
        k: (B, H, Nk, d) or (H, Nk, d) keys.
        scale: logit scale; default ``d ** -0.5``.
        chunk_size: queries per block (>= 1); peak extra memory is about
            ``rows_per_block * chunk_size * Nk * 4`` bytes (plus a float32 copy of the keys for
            lower-precision input). At MedGemma's shape (16 x 4096 x 4096) the default uses
            64 MiB, 1/16 of the full matrix.

    Returns:
        float32 tensor (B, Nk), or (Nk,) for 3-D input, on q's device. Each row sums to Nq.

    Raises:
        ValueError / TypeError: on mismatched shapes, devices or non-float input.
    """
    _check_qk(q, k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    unbatched = q.ndim == 3
    if unbatched:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    scale = dim**-0.5 if scale is None else float(scale)
    rows = batch * heads
    out = torch.zeros(rows, 1, n_k, dtype=torch.float32, device=q.device)  # (B*H, 1, Nk)
    if n_q > 0 and n_k > 0:
        _accumulate(q.reshape(rows, n_q, dim), k.reshape(rows, n_k, dim), scale, chunk_size, out)
    received = out.view(batch, heads, n_k).mean(dim=1)  # (B, Nk)
    return received.squeeze(0) if unbatched else received


def _accumulate(
    q_rows: torch.Tensor, k_rows: torch.Tensor, scale: float, chunk_size: int, out: torch.Tensor
) -> None:
    """Add each (batch*head) row's column sums of softmax(q k^T * scale) into ``out``.

    q_rows: (R, Nq, d); k_rows: (R, Nk, d); out: (R, 1, Nk) float32.
    """
    rows, n_q, _ = q_rows.shape
    n_k = k_rows.shape[1]
    chunk = min(chunk_size, n_q)
    budget = _CPU_BLOCK_BYTES if q_rows.device.type == "cpu" else _DEVICE_BLOCK_BYTES
    group = max(1, min(rows, budget // (chunk * n_k * 4)))
    buf = torch.empty(group * chunk * n_k, dtype=torch.float32, device=q_rows.device)
    ones = torch.ones(group, 1, chunk, dtype=torch.float32, device=q_rows.device)

    for g0 in range(0, rows, group):
        g1 = min(g0 + group, rows)
        k_t = k_rows[g0:g1].to(torch.float32).transpose(1, 2)  # (G, d, Nk): a view for float32
        for s0 in range(0, n_q, chunk):
            s1 = min(s0 + chunk, n_q)
            block = buf[: (g1 - g0) * (s1 - s0) * n_k].view(g1 - g0, s1 - s0, n_k)  # (G, c, Nk)
            q_chunk = q_rows[g0:g1, s0:s1].to(torch.float32) * scale  # (G, c, d), small
            torch.bmm(q_chunk, k_t, out=block)
            _softmax_rows_(block)
            # Column sums as a (1 x c) @ (c x Nk) product accumulated in place: one kernel.
            out[g0:g1].baddbmm_(ones[: g1 - g0, :, : s1 - s0], block)
