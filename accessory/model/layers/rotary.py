"""Rotary position embeddings, indexed by explicit per-row positions.

Two pairings exist among the original's architectures:

* ``interleaved`` (Meta's llama): the rotated pairs are ``(x[2i], x[2i+1])``;
* ``half`` (internlm, falcon; HF's ``rotate_half``): the pairs are ``(x[i], x[i + hd/2])``.

Tables are kept in float32 and the rotation is computed in float32, as the original does.
"""

from typing import Dict, Optional

import torch


def rope_angles(head_dim: int, n_positions: int, theta: float = 10000.0,
                scaling: Optional[float] = None) -> torch.Tensor:
    """Angles (n_positions, head_dim // 2) in radians; ``scaling`` multiplies the positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    t = torch.arange(n_positions, device="cpu").float()
    if scaling is not None:
        t = t * scaling
    return torch.outer(t, inv_freq)


class RotaryEmbedding:
    """Holds the rotation tables (on CPU, copied once per device) and rotates q/k at given positions.

    Not an ``nn.Module`` on purpose: the tables are derived from the config, never saved in a
    checkpoint, and must stay float32 whatever dtype the model is cast to. The rows for one
    ``positions`` tensor are gathered once and shared by every layer of a forward pass.
    """

    def __init__(self, head_dim: int, n_positions: int, theta: float = 10000.0,
                 scaling: Optional[float] = None, style: str = "interleaved"):
        if style not in ("interleaved", "half"):
            raise ValueError(f"unknown rotary style {style!r}: expected 'interleaved' or 'half'")
        angles = rope_angles(head_dim, n_positions, theta, scaling)
        self.cos = angles.cos()
        self.sin = angles.sin()
        # e^{i*angle}, as the original's torch.polar table
        self.polar = torch.polar(torch.ones_like(angles), angles)
        self.style = style
        self.n_positions = n_positions
        self._per_device: Dict[torch.device, tuple] = {}
        self._last = (None, None)  # (positions, gathered rows)

    def _tables(self, device: torch.device):
        if device not in self._per_device:
            self._per_device[device] = (self.cos.to(device), self.sin.to(device), self.polar.to(device))
        return self._per_device[device]

    def _rows(self, positions: torch.Tensor, device: torch.device):
        last_positions, rows = self._last
        if last_positions is positions and rows[0].device == device:
            return rows
        # (no bounds check while a CUDA graph is captured: it would read the device; the engine
        # checks every position against the cache, which is never longer than this table)
        if positions.numel() and not _capturing() and int(positions.max()) >= self.n_positions:
            raise ValueError(
                f"position {int(positions.max())} is beyond the rotary table ({self.n_positions} positions); "
                f"raise max_seq_len")
        cos_table, sin_table, polar_table = self._tables(device)
        if self.style == "interleaved":
            rows = (polar_table[positions].unsqueeze(2),)  # (batch, seq, 1, head_dim/2) complex
        else:
            rows = (cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2))
        self._last = (positions, rows)
        return rows

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (batch, seq, heads, head_dim) at ``positions`` (batch, seq), long."""
        rows = self._rows(positions, x.device)
        if self.style == "interleaved":
            pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * rows[0]).flatten(-2).type_as(x)
        cos, sin = rows
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).type_as(x)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
