"""``llama_type = "llama_ens10"``: llama_ens5 with a 672 image cut into a 3 x 3 grid of 224 views
(raster order) after the bicubic 224 global view: ten views, N = 10 * 291 = 2910."""

from . import llama_ens5
from .llama_ens import ModelArgs

__all__ = ["ModelArgs", "Transformer"]


class Transformer(llama_ens5.Transformer):
    per_side = 3
