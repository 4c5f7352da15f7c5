"""Images in the input sequence: where a multimodal llama_type's image vectors go, and at which
RoPE positions.

A llama_type takes images when its ``Transformer`` (a :class:`~.decoder.CausalDecoder`) sets

* ``image_layout``: ``"tagged"`` or ``"prefix"`` (``None``, the default, means it takes no images;
  a type built with ``with_visual=False`` leaves it ``None``);
* ``encode_images(images) -> (batch, N, dim)``: ``images`` is ``(batch, 3, H, W)`` already in the
  model's dtype and device; the result is EVERY vector inserted into the sequence for that image,
  start/end tags included (:func:`tag_views` wraps views in tags), in any float dtype (it is cast
  to the token embeddings' dtype);
* ``image_words``: the number N it inserts (what ``MetaModel.get_image_words()`` reports);
* optionally ``image_size``: the side in pixels it expects (``MetaModel`` refuses other sizes and
  the demos resize to it; 224 when absent).

Layouts (ORIGINAL-mm.md "Where image tokens go, and positions"), for text tokens t0 t1 ... t(T-1)
and inserted vectors V1 ... VN:

* ``tagged`` (qformerv2, the ens family): ``[t0, V1..VN, t1, ..., t(T-1)]``, the image after the
  first token (BOS when the prompt has one);
* ``prefix`` (CLIP-prefix llama / mixtral types): ``[V1..VN, t0, t1, ..., t(T-1)]``;
* ``adapter`` (llama_adapter): the image takes NO sequence positions (``image_words`` 0).
  ``encode_images`` returns (batch, Q, dim) vectors that the model adds to its own learned prefix
  for that batch row; they travel beside the text as ``MultimodalInputs.prefix`` and reach the
  model as ``forward_tokens(..., image_prefix=...)`` with the call that starts the sequence
  (a cache keeps what the model derives from them for the decode steps that follow).

In the first two the sequence takes positions 0 .. N+T-1 in order, so text token i >= 1 sits at
position i + N, and the KV cache holds the image positions: image + prompt + generated tokens
must fit ``max_seq_len``, counted with the ACTUAL N. Text-aligned outputs are the hidden rows
N .. N+T-1: row i predicts token i+1 (for ``tagged``, row 0 is the last inserted vector's).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

LAYOUTS = ("tagged", "prefix", "adapter")

ImageEmbeds = Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]


def insert_index(layout: str) -> int:
    """How many text tokens come before the image vectors in ``layout``."""
    if layout == "tagged":
        return 1
    if layout == "prefix":
        return 0
    raise ValueError(f"unknown image_layout {layout!r}; a multimodal llama_type sets one of {LAYOUTS}")


def tag_views(views: Sequence[torch.Tensor], start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``[start, view0, end, start, view1, end, ...]`` along the sequence: ``views`` are
    (batch, n_i, dim) each, ``start`` / ``end`` are (1, 1, dim) (the original's ``start_img`` /
    ``end_img`` parameters). Returns (batch, sum(n_i + 2), dim)."""
    if not views:
        raise ValueError("tag_views needs at least one view")
    bsz = views[0].shape[0]
    start = start.to(views[0].dtype).expand(bsz, 1, -1)
    end = end.to(views[0].dtype).expand(bsz, 1, -1)
    parts: List[torch.Tensor] = []
    for view in views:
        parts += [start, view, end]
    return torch.cat(parts, dim=1)


@dataclass
class MultimodalInputs:
    """A right-padded batch of input embeddings with images inserted.

    ``embeds`` (batch, L, dim) and ``positions`` (batch, L) go to ``forward_tokens(None, positions,
    ..., input_embeds=embeds)``; ``offsets[r]`` is the number of vectors inserted into row r (its
    text token i >= 1 is at position i + offsets[r]); ``lengths[r] = offsets[r] + text length``.
    """
    embeds: torch.Tensor
    positions: torch.Tensor
    offsets: List[int]
    lengths: List[int]
    #: ``adapter`` layout only: (batch, Q, dim) per-row image vectors (zeros for rows without an
    #: image), passed as ``forward_tokens(..., image_prefix=prefix)``; None otherwise.
    prefix: Optional[torch.Tensor] = None

    def text_rows(self, h: torch.Tensor, text_lengths: Sequence[int]) -> List[torch.Tensor]:
        """The text-aligned rows of ``h`` (batch, L, ...) per row: ``h[r, offset : offset + T_r]``
        (row i predicts text token i+1)."""
        return [h[r, off: off + n] for r, (off, n) in enumerate(zip(self.offsets, text_lengths))]


def image_offsets(image_embeds: Optional[ImageEmbeds], batch: int, layout: Optional[str] = None) -> List[int]:
    """Vectors each row inserts: N_r for a (batch, N, dim) tensor or a list of (N_r, dim) / None
    (0 for every row in the ``adapter`` layout, whose images take no positions)."""
    if image_embeds is None or layout == "adapter":
        return [0] * batch
    if isinstance(image_embeds, torch.Tensor):
        if image_embeds.dim() != 3 or image_embeds.shape[0] != batch:
            raise ValueError(f"image embeddings must be (batch={batch}, N, dim), got {tuple(image_embeds.shape)}")
        return [image_embeds.shape[1]] * batch
    if len(image_embeds) != batch:
        raise ValueError(f"{len(image_embeds)} image embeddings for {batch} rows")
    return [0 if e is None else e.shape[-2] for e in image_embeds]


def insert_images(token_embeds: torch.Tensor, text_lengths: Sequence[int], image_embeds: ImageEmbeds,
                  layout: str) -> MultimodalInputs:
    """Put each row's image vectors into its text embeddings.

    ``token_embeds`` (batch, T, dim): right-padded text embeddings, row r valid up to
    ``text_lengths[r]``. ``image_embeds``: (batch, N, dim), or per row a (N_r, dim) tensor
    (or (1, N_r, dim)) or None (no image in that row). Rows come out right-padded with zeros to
    the longest ``N_r + T_r``; positions are 0 .. L-1 in every row (padding positions lie after
    each row's end, so they are written to the cache but never attended by that row's tokens
    before being overwritten).
    """
    bsz, _, dim = token_embeds.shape
    if layout == "adapter":
        return _adapter_inputs(token_embeds, text_lengths, image_embeds)
    at = insert_index(layout)
    offsets = image_offsets(image_embeds, bsz)
    lengths = [n + t for n, t in zip(offsets, text_lengths)]
    longest = max(lengths) if lengths else 0
    dtype, device = token_embeds.dtype, token_embeds.device
    if isinstance(image_embeds, torch.Tensor) and all(t >= at for t in text_lengths):
        # every row has the same N: one concatenation keeps the right padding at the end
        images = image_embeds.to(device=device, dtype=dtype)
        embeds = torch.cat([token_embeds[:, :at], images, token_embeds[:, at:]], dim=1)[:, :longest]
    else:
        embeds = token_embeds.new_zeros((bsz, longest, dim))
        for r in range(bsz):
            text = token_embeds[r, : text_lengths[r]]
            k = min(at, text_lengths[r])
            parts = [text[:k]]
            if offsets[r]:
                parts.append(image_embeds[r].reshape(offsets[r], dim).to(device=device, dtype=dtype))
            parts.append(text[k:])
            embeds[r, : lengths[r]] = torch.cat(parts, dim=0)
    positions = torch.arange(longest, device=device).expand(bsz, longest)
    return MultimodalInputs(embeds, positions, offsets, lengths)


def _adapter_inputs(token_embeds: torch.Tensor, text_lengths: Sequence[int],
                    image_embeds: ImageEmbeds) -> MultimodalInputs:
    """The text as it is, each row's image vectors stacked into ``prefix`` (zeros where a row has none)."""
    bsz, _, dim = token_embeds.shape
    dtype, device = token_embeds.dtype, token_embeds.device
    if isinstance(image_embeds, torch.Tensor):
        image_offsets(image_embeds, bsz)  # shape check
        prefix = image_embeds.to(device=device, dtype=dtype)
    else:
        if len(image_embeds) != bsz:
            raise ValueError(f"{len(image_embeds)} image embeddings for {bsz} rows")
        given = [e for e in image_embeds if e is not None]
        if not given:
            raise ValueError("no row has an image; pass image_embeds=None")
        shape = given[0].shape[-2:]
        prefix = torch.stack([token_embeds.new_zeros(shape) if e is None else e.reshape(shape).to(device, dtype)
                              for e in image_embeds])
    longest = max(text_lengths) if len(text_lengths) else 0
    positions = torch.arange(longest, device=device).expand(bsz, longest)
    return MultimodalInputs(token_embeds[:, :longest], positions, [0] * bsz, list(text_lengths), prefix)


def encode_for(model, images: torch.Tensor) -> torch.Tensor:
    """``model.encode_images`` on ``images`` moved to the model's device and cast to its dtype.

    On a model cut across model-parallel ranks (``model.image_batch_split``, set by
    :func:`~.tensor_parallel.add_collectives`) each rank encodes only its slice of the batch
    (:func:`encode_split_by_batch`); every rank gets the whole result."""
    weight = model._reference_weight()
    images = images.to(device=weight.device, dtype=weight.dtype)
    parallel = getattr(model, "image_batch_split", None)
    if parallel is None:
        return model.encode_images(images)
    return encode_split_by_batch(model.encode_images, images, parallel.group, parallel.rank, parallel.size)


def encode_split_by_batch(encode, images: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    """``encode(images)`` computed with the batch split across the ``size`` ranks of ``group``, as
    the original's ens types do: the batch is padded to a multiple of ``size`` by repeating
    ``images[0]``, rank ``r`` encodes rows ``[r*b, (r+1)*b)`` of it (b = padded batch / size), the
    ranks' results are all-gathered in rank order and trimmed to the batch. Every rank of the
    group must call it with the same batch (as every scoring / generation call is).

    ``encode`` must treat batch rows independently (every ``encode_images`` does: encoders,
    projections and tags act per image), so the result equals encoding the whole batch on one
    process. The original gathers the raw encoder features and projects them on every rank; here
    the projected vectors are gathered (the same numbers, and fewer of them). The gather carries
    no gradient: this is an inference path."""
    import torch.distributed as dist
    count = images.shape[0]
    pad = -count % size
    if pad:
        images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])], dim=0)
    local = images.shape[0] // size
    mine = encode(images[rank * local:(rank + 1) * local]).contiguous()
    pieces = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(pieces, mine, group=group)
    return torch.cat(pieces, dim=0)[:count]


def forward_with_images(model, examples: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The original's training forward ``model(examples, images)``: text-aligned logits
    (batch, seq, vocab) of the full sequence with each row's image inserted, no cache."""
    bsz, seqlen = examples.shape
    inputs = insert_images(model.embed_tokens(examples), [seqlen] * bsz, encode_for(model, images),
                           model.image_layout)
    logits = model.forward_tokens(None, input_embeds=inputs.embeds, image_prefix=inputs.prefix)
    return logits[:, inputs.offsets[0]:]


def prefill_with_images(model, tokens: torch.Tensor, start_pos: int, images: torch.Tensor, cache) -> torch.Tensor:
    """The original's ``forward_inference(tokens, 0, images)``: last-position logits, the image
    positions written to ``cache``; remembers the inserted count for the calls that follow."""
    if start_pos != 0:
        raise ValueError(f"an image can only be given with the first forward_inference call (start_pos=0), "
                         f"got start_pos={start_pos}")
    bsz, seqlen = tokens.shape
    inputs = insert_images(model.embed_tokens(tokens), [seqlen] * bsz, encode_for(model, images),
                           model.image_layout)
    model._cache_image_words = inputs.offsets[0]
    last = torch.full((bsz,), inputs.embeds.shape[1] - 1, device=tokens.device)
    return model.forward_tokens(None, inputs.positions, cache, output_index=last, input_embeds=inputs.embeds,
                                image_prefix=inputs.prefix)
