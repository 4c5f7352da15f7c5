"""Runtime tensor parallelism driven by an architecture's :class:`~.parallel.SplitPlan`.

gpt-fast style: the architecture is built as a plain model; then, on each of ``size`` ranks,

1. :func:`shard_meta_model` shrinks every split parameter of the meta-device model to this rank's
   slice (the loader then fills exactly those shapes), removes what the rank holds none of (other
   ranks' whole experts) and divides the plan's head counts;
2. :func:`add_collectives` adds one collective per split module, read off the same plan:

   * a module that a :class:`~.parallel.Partition` names in ``reduce_at`` (a mixture of experts:
     whole experts per rank, or a slice of every expert's hidden units) computes a partial sum --
     each rank's experts weighted by the replicated router's top-k weights, zero for tokens routed
     elsewhere -- so its output is all-reduced;

   * a Linear whose weight is cut along its input dim (row-parallel, dim 1) computes a partial
     sum: its output is all-reduced. Everything inside it is linear in those partial inputs
     (LoRA's ``lora_b(lora_a x)`` with ``lora_a`` cut by columns, too), so ONE all-reduce of the
     module's whole output is exact; replicated biases in it are kept on rank 0 only (zeros
     elsewhere), so they are added once;
   * an Embedding cut along dim 1 gives a slice of the hidden vector: its output is all-gathered
     along the last dim;
   * a Linear cut along dim 0 (column-parallel) keeps its output local, except the modules the
     plan lists in ``gather`` (the output head), whose output is all-gathered along the last dim.

No parallel-layer classes: parameter names, checkpoints and the model files stay as they are.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .parallel import SplitPlan

#: Architectures that run with their weights cut across model-parallel ranks.
TENSOR_PARALLEL_TYPES = ("llama", "llama_peft", "llama_adapter", "internlm", "falcon", "mixtral", "mixtral_peft",
                         "mixtral_sparse")
# Multimodal types: the text side is cut as its text type's; encoders and connectors stay whole
# on every rank, which encodes its slice of an image batch (CLIP-prefix llama / mixtral types and
# llama_adapter are listed above; then BLIP-2's and the SPHINX family's).
TENSOR_PARALLEL_TYPES += ("llama_qformerv2", "llama_qformerv2_peft")
TENSOR_PARALLEL_TYPES += ("llama_ens", "llama_ens_peft", "llama_ens5", "llama_ens10", "llama_ens5p2", "llama_ens_light",
                          "llama_ens5_light", "mixtral_sparse_ens", "mixtral_sparse_ens5")

ISSUE = "issue 'Model parallelism over torch.distributed'"


@dataclass
class ModelParallel:
    """This process's place in a model-parallel group."""
    group: object  # a torch.distributed ProcessGroup
    rank: int
    size: int


def model_parallel_of(mp_group) -> Optional[ModelParallel]:
    """The group's rank and size, or None when ``mp_group`` is None or of size 1 (no cutting)."""
    if mp_group is None:
        return None
    import torch.distributed as dist
    if not dist.is_initialized():
        raise RuntimeError("mp_group was given but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (gloo on CPU, nccl on CUDA)")
    size = dist.get_world_size(mp_group)
    if size <= 1:
        return None
    return ModelParallel(mp_group, dist.get_rank(mp_group), size)


def check_supported(llama_type: str, size: int) -> None:
    """Refuse, before anything is built, an architecture that cannot run cut over ``size`` ranks
    (an unknown name is left to the architecture lookup, which lists the known ones)."""
    from ..LLM import known_llama_types
    if llama_type in known_llama_types() and llama_type not in TENSOR_PARALLEL_TYPES:
        raise NotImplementedError(
            f"llama_type {llama_type!r} cannot run at model-parallel size {size} yet ({ISSUE}: only "
            f"{', '.join(TENSOR_PARALLEL_TYPES)} so far). Load it with mp_group=None (or a group of "
            f"size 1) on each process: checkpoints of any shard count are merged automatically")


def shard_meta_model(model: nn.Module, plan: SplitPlan, rank: int, size: int) -> None:
    """Give every split parameter of the meta-device ``model`` the shape of rank ``rank``'s slice,
    remove the parameters this rank holds none of (and the modules left without any: another
    rank's whole experts), and divide the plan's head counts by ``size`` (ValueError when a cut
    does not divide)."""
    emptied = set()
    # Only modules above a cut parameter have their heads cut: replicated ones (image encoders
    # with their own ``n_heads``) keep every head.
    cut_modules = {".".join(name.split(".")[:i]) for name, _ in model.named_parameters()
                   if plan.rule(name) is not None for i in range(name.count(".") + 1)}
    for module_name, module in model.named_modules():
        for attr in plan.head_counts if module_name in cut_modules else ():
            count = getattr(module, attr, None)
            if isinstance(count, int) and not isinstance(count, bool):
                if count % size:
                    raise ValueError(f"{attr}={count} is not divisible by the model-parallel size {size}: "
                                     f"every rank must hold whole heads; use a group of a size dividing "
                                     f"{attr}")
                setattr(module, attr, count // size)
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            shape = plan.local_shape(name, tuple(param.shape), rank, size)
            if shape is None:
                del module._parameters[attr]
                emptied.add(module_name)
            elif shape != tuple(param.shape):
                module._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=param.dtype, device=param.device),
                                                        requires_grad=False)
    _drop_empty_modules(model, emptied)


def _drop_empty_modules(model: nn.Module, emptied) -> None:
    """Remove, from their parents, the outermost modules that lost parameters and hold none now."""
    dropped: List[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(prefix + ".") for prefix in dropped):
            continue
        lost = any(e == name or e.startswith(name + ".") for e in emptied)
        if lost and next(module.parameters(), None) is None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            del parent._modules[child]
            dropped.append(name)


class AllReduce:
    """Forward hook: sum the module's output over the group (in place)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, module, inputs, output):
        import torch.distributed as dist
        output = output.contiguous()
        dist.all_reduce(output, group=self.group)
        return output


class AllGatherLastDim:
    """Forward hook: concatenate the ranks' outputs along the last dim, in rank order."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def __call__(self, module, inputs, output):
        import torch.distributed as dist
        output = output.contiguous()
        pieces = [torch.empty_like(output) for _ in range(self.size)]
        dist.all_gather(pieces, output, group=self.group)
        return torch.cat(pieces, dim=-1)


def add_collectives(model: nn.Module, plan: SplitPlan, parallel: ModelParallel) -> List[str]:
    """Hook the collectives the plan's cuts need onto ``model`` (loaded with its slices); returns
    a line per hooked module, e.g. ``'layers.0.attention.wo: all-reduce'``."""
    reduced: List[str] = []  # subtrees whose whole output is already all-reduced
    done: List[str] = []
    if getattr(model, "image_layout", None) is not None:
        # encoders and connectors are replicated: each rank encodes its slice of an image batch
        # and the slices are all-gathered (layers/multimodal.encode_split_by_batch)
        model.image_batch_split = parallel
        done.append("encode_images: image batch split across ranks, all-gather")
    # Partitions that make a whole module's output a partial sum (mixture-of-experts layers).
    sums = []
    for name, _ in model.named_parameters():
        target = plan.reduce_at(name)
        if target is not None and target not in sums:
            sums.append(target)
    for target in sums:
        model.get_submodule(target).register_forward_hook(AllReduce(parallel.group))
        reduced.append(target)
        done.append(f"{target}: all-reduce (partial sums of its cut parameters)")
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or any(name == prefix or name.startswith(prefix + ".") for prefix in reduced):
            continue
        dim = plan.runtime_dim(f"{name}.weight" if name else "weight")
        if dim is None:
            continue
        if isinstance(module, nn.Embedding) and dim == 1:
            module.register_forward_hook(AllGatherLastDim(parallel.group, parallel.size))
            done.append(f"{name}: all-gather (embedding dim)")
        elif isinstance(module, nn.Linear) and dim == 1:
            module.register_forward_hook(AllReduce(parallel.group))
            reduced.append(name)
            _keep_biases_on_first_rank(module, name, plan, parallel.rank)
            done.append(f"{name}: all-reduce")
        elif isinstance(module, nn.Linear) and dim == 0:
            if plan.gathers_output(name):
                module.register_forward_hook(AllGatherLastDim(parallel.group, parallel.size))
                done.append(f"{name}: all-gather (output features)")
        else:
            raise NotImplementedError(f"{name} ({type(module).__name__}) has its weight cut along dim {dim}, "
                                      f"which runtime tensor parallelism does not handle yet ({ISSUE})")
    return done


def _keep_biases_on_first_rank(module: nn.Module, name: str, plan: SplitPlan, rank: int) -> None:
    """Zero the replicated biases inside an all-reduced module on ranks other than 0, so that the
    sum adds each once (the original adds a row layer's bias after its all-reduce)."""
    if rank == 0:
        return
    for sub_name, sub in module.named_modules():
        bias = sub._parameters.get("bias")
        full_name = ".".join(part for part in (name, sub_name, "bias") if part)
        if bias is not None and plan.runtime_dim(full_name) is None:
            sub._parameters["bias"] = nn.Parameter(torch.zeros_like(bias), requires_grad=False)
