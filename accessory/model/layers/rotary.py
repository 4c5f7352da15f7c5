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
    """Holds cos/sin tables (on CPU, copied once per device) and rotates q/k at given positions.

    Not an ``nn.Module`` on purpose: the tables are derived from the config, never saved in a
    checkpoint, and must stay float32 whatever dtype the model is cast to.
    """

    def __init__(self, head_dim: int, n_positions: int, theta: float = 10000.0,
                 scaling: Optional[float] = None, style: str = "interleaved"):
        if style not in ("interleaved", "half"):
            raise ValueError(f"unknown rotary style {style!r}: expected 'interleaved' or 'half'")
        angles = rope_angles(head_dim, n_positions, theta, scaling)
        self.cos = angles.cos()
        self.sin = angles.sin()
        self.style = style
        self.n_positions = n_positions
        self._per_device: Dict[torch.device, tuple] = {}

    def _tables(self, device: torch.device):
        if device not in self._per_device:
            self._per_device[device] = (self.cos.to(device), self.sin.to(device))
        return self._per_device[device]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (batch, seq, heads, head_dim) at ``positions`` (batch, seq), long."""
        if positions.numel() and int(positions.max()) >= self.n_positions:
            raise ValueError(
                f"position {int(positions.max())} is beyond the rotary table ({self.n_positions} positions); "
                f"raise max_seq_len")
        cos_table, sin_table = self._tables(x.device)
        cos = cos_table[positions].unsqueeze(2)  # (batch, seq, 1, head_dim/2)
        sin = sin_table[positions].unsqueeze(2)
        xf = x.float()
        if self.style == "interleaved":
            pairs = xf.reshape(*xf.shape[:-1], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        else:
            a, b = xf.chunk(2, dim=-1)
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return out.type_as(x)
