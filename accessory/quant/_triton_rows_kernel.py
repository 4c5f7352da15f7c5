"""The Triton kernel of quant/triton_rows.py (imported only when that module first needs it, so
that importing the package never pays for importing Triton)."""

import triton
import triton.language as tl


@triton.jit
def packed_rows_kernel(x_ptr, q_ptr, s_ptr, o_ptr, levels_ptr, y_ptr, M, N, K, G, stride_x, stride_y,
                       KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    if BLOCK_M > 1:  # (one row sums into `part` below instead)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if KIND == 0:  # int8: (N, K) codes; the row's scale multiplies the sums
        rk = tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:  # (one row: products summed in place, reduced across the step once at the end)
            part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_ok = k < K
            w = tl.load(q_ptr + rn[:, None].to(tl.int64) * K + k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            if BLOCK_M == 1:
                x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                part += w * x[None, :]
            else:
                x = tl.load(x_ptr + rm[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc = tl.sum(part, axis=1) * scale
        else:
            acc = acc * scale[None, :]
    else:  # int4 / nf4: byte i of a step holds inputs (i // 16) * 32 + i % 16 and 16 after it
        ri = tl.arange(0, BLOCK_K // 2)
        block_start = (ri // 16) * 32
        within = ri % 16
        groups = K // G
        if BLOCK_M == 1:
            part = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_lo = k0 + block_start + within
            k_ok = k_lo < K
            wmask = n_ok[:, None] & k_ok[None, :]
            codes = tl.load(q_ptr + rn[:, None].to(tl.int64) * (K // 2) + (k0 // 2 + ri)[None, :],
                            mask=wmask, other=0)
            lo = codes & 0x0F
            hi = codes >> 4
            group = (k0 + block_start) // G
            where = rn[:, None].to(tl.int64) * groups + group[None, :]
            scale = tl.load(s_ptr + where, mask=wmask, other=0.0).to(tl.float32)
            if KIND == 1:
                offset = tl.load(o_ptr + where, mask=wmask, other=0.0).to(tl.float32)
                w_lo = lo.to(tl.float32) * scale + offset
                w_hi = hi.to(tl.float32) * scale + offset
            else:
                w_lo = tl.load(levels_ptr + lo.to(tl.int32)) * scale
                w_hi = tl.load(levels_ptr + hi.to(tl.int32)) * scale
            if BLOCK_M == 1:
                x_lo = tl.load(x_ptr + k_lo, mask=k_ok, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptr + k_lo + 16, mask=k_ok, other=0.0).to(tl.float32)
                part += w_lo * x_lo[None, :] + w_hi * x_hi[None, :]
            else:
                xmask = m_ok[:, None] & k_ok[None, :]
                x_lo = tl.load(x_ptr + rm[:, None] * stride_x + k_lo[None, :], mask=xmask, other=0.0)
                x_hi = tl.load(x_ptr + rm[:, None] * stride_x + (k_lo + 16)[None, :], mask=xmask, other=0.0)
                acc += tl.dot(x_lo.to(tl.float32), tl.trans(w_lo), input_precision=PRECISION)
                acc += tl.dot(x_hi.to(tl.float32), tl.trans(w_hi), input_precision=PRECISION)
        if BLOCK_M == 1:
            acc = tl.sum(part, axis=1)
    if BLOCK_M == 1:
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
