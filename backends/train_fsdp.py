"""train.py under FSDP, for a spec whose `train.distributed` says `{strategy: fsdp}`.

`patch(text, plan)` turns the DistributedDataParallel version of a generated train.py
(backends/train_script.py) into a fully sharded one (PyTorch's FSDP2, `fully_shard`):

- `shard_model(model)`, called before the optimizer is made: each block of a repeated stack
  (the ModuleLists model.py loops over) is one FSDP unit, gathered only while it runs, and the
  rest of the model the root unit; each process keeps 1/world of every parameter, gradient
  and optimizer state;
- the DDP wrapper is dropped (FSDP reduces the gradients itself);
- weights and optimizer state are gathered to full tensors (collectives every process takes
  part in) where train.py saves them, and scattered back where it loads them, so the files
  are those of a single-process run: `lbdlc build --weights` and `--resume` read them as ever.

Run as without it: `torchrun --nproc_per_node=N train.py`; one process trains unsharded.
"""
from __future__ import annotations

import re

from lbdlc.errors import SpecError

from .train_script import DEFINE_BEFORE, OPTIMIZER_MADE, insert
# generated text -> its FSDP version; each must occur exactly once where it applies
REPLACE = [
    (OPTIMIZER_MADE,
     "    if world > 1:  # FSDP: shard before the optimizer sees the parameters\n"
     "        units = shard_model(raw_model)\n"
     "        if rank == 0:\n"
     "            print(f\"FSDP: {units} blocks and the model sharded over {world} processes\", flush=True)\n"
     "    optimizer = make_optimizer(raw_model)\n"),
    ("    if dist.is_initialized() and dist.get_rank() != 0:\n        return\n",
     "    weights, optimizer_state = weights_of(model), optimizer_state_of(model, optimizer)  # collectives: before rank > 0 returns\n"
     "    if dist.is_initialized() and dist.get_rank() != 0:\n        return\n"),
    ("save_file(weights_of(model), str(tmp / \"weights.safetensors\")", "save_file(weights, str(tmp / \"weights.safetensors\")"),
    ("        \"optimizer\": optimizer.state_dict(),\n", "        \"optimizer\": optimizer_state,\n"),
    ("    model.load_state_dict(load_file(str(path / \"weights.safetensors\")))\n",
     "    load_weights(model, load_file(str(path / \"weights.safetensors\")))\n"),
    ("    optimizer.load_state_dict(state[\"optimizer\"])\n", "    load_optimizer_state(model, optimizer, state[\"optimizer\"])\n"),
    ("    if rank == 0:\n        save_file(weights_of(raw_model), str(out / \"weights.safetensors\"))\n",
     "    final_weights = weights_of(raw_model)  # FSDP: a collective\n"
     "    if rank == 0:\n        save_file(final_weights, str(out / \"weights.safetensors\"))\n"),
]
OPTIONAL = [("        raw_model.load_state_dict(best_weights)", "        load_weights(raw_model, best_weights)")]  # early stopping
DDP_LINE = re.compile(r"^    model = DistributedDataParallel\(raw_model.*$", re.M)


def code(plan) -> str:
    line = plan.line("distributed")
    where = f"{plan.spec_file}:{line}" if line else plan.spec_file
    return f'''\
# FSDP ({where}, `distributed: {{strategy: fsdp}}`): parameters, gradients and optimizer
# state sharded over the processes; files hold full tensors, as a single process writes them.
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402

SHARDED = False  # set by shard_model
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # rank 0's full tensors to every shard


def shard_model(model: nn.Module) -> int:
    """One FSDP unit per block of a repeated stack (model.py's ModuleLists), then the root."""
    global SHARDED
    blocks = [block for stack in model.modules() if isinstance(stack, nn.ModuleList) for block in stack]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    SHARDED = True
    return len(blocks)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state_dict, named as in the spec; when sharded, a collective whose result
    only rank 0 receives (the others get an empty dict)."""
    if not SHARDED:
        return {{name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}}
    return {{name: tensor.contiguous() for name, tensor in get_model_state_dict(model, options=GATHER).items()}}


def optimizer_state_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=GATHER) if SHARDED else optimizer.state_dict()


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    if SHARDED:
        set_model_state_dict(model, weights, options=SCATTER)
    else:
        model.load_state_dict(weights)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if SHARDED:
        set_optimizer_state_dict(model, optimizer, state, options=SCATTER)
    else:
        optimizer.load_state_dict(state)
'''


def patch(text: str, plan) -> str:
    distributed = getattr(plan.train, "distributed", None)
    if distributed is None or distributed.strategy != "fsdp":
        return text
    if getattr(plan, "finetune", None) is not None:  # checked with its location by refuse_unsupported
        raise AssertionError("train_fsdp: fsdp with finetune reached code generation")
    for old, new in REPLACE:
        if text.count(old) != 1:  # train_script.py changed under us: a bug, not a user error
            raise AssertionError(f"train_fsdp: the generated train.py has {text.count(old)} copies of {old.strip()!r}")
        text = text.replace(old, new)
    for old, new in OPTIONAL:
        text = text.replace(old, new)
    if len(DDP_LINE.findall(text)) != 1:
        raise AssertionError("train_fsdp: no single DistributedDataParallel line in the generated train.py")
    text = DDP_LINE.sub("    model = raw_model  # FSDP: sharded by shard_model above, no DDP wrapper", text)
    return insert(text, "train_fsdp", [(DEFINE_BEFORE, "before", code(plan) + "\n\n")])


def refuse_unsupported(loaded, plan) -> None:
    """A located error for what FSDP does not do yet: LoRA fine-tuning, whose adapters train.py
    saves from the model's state_dict (sharded under FSDP)."""
    from lbdlc.source import loc_of

    distributed = getattr(plan.train, "distributed", None)
    if distributed is not None and distributed.strategy == "fsdp" and getattr(plan, "finetune", None) is not None:
        raise SpecError("train.distributed: fsdp is not supported with LoRA fine-tuning (`finetune:`) yet",
                        loc_of(loaded.raw, ("train", "distributed")),
                        hint="use `strategy: ddp` (the default): LoRA's optimizer state is small anyway")
