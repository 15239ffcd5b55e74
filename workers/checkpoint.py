"""Training checkpoints: the format, file names, and saving / restoring one (every rank takes part).

A checkpoint is one directory that every rank writes into (Ray Train merges the ranks' files):

    trainable.safetensors            rank 0: the trainable tensors (adapters, task head), gathered under ZeRO-3
    state.json                       rank 0: step and metrics
    optim-rank00000.safetensors ...  every rank: its optimizer partition (the fp32 master parameters and the
                                     AdamW moments that DeepSpeed's inner torch optimizer holds on that rank)
                                     and its RNG state, with a JSON header (world size, ZeRO stage, precision)

Nothing is pickled: checkpoints may sit on shared storage. Resuming restores all of it, so a resumed run
continues exactly as an uninterrupted one; when the world size changed, the optimizer partitions no longer
fit and the run continues with fresh moments (logged), as it does from a checkpoint without them.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optim-rank{rank:05d}.safetensors"
OPTIMIZER_FORMAT = 1

log = logging.getLogger(__name__)


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """The trainable tensors, gathered from ZeRO-3 partitions on every rank (all ranks must call this)."""
    import deepspeed

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().float().cpu().clone().contiguous() for n, p in params.items()}


def save_checkpoint(directory: str, engine, state: dict) -> None:
    """Write this rank's part of a checkpoint into `directory` (all ranks must call this).

    Rank 0 writes the trainable tensors and the counters; every rank writes its optimizer partition.
    """
    tensors = trainable_state(engine)
    if engine.global_rank == 0:
        save_file(tensors, os.path.join(directory, TRAINABLE_FILE))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f)
    save_optimizer_partition(directory, engine)


def load_checkpoint(directory: str, engine) -> dict:
    """Restore trainable tensors (into every rank's partition), the optimizer, and return the saved counters.

    The returned dict is state.json plus `optimizer_restored` (False: fresh moments, see the log).
    """
    import deepspeed

    saved = load_file(os.path.join(directory, TRAINABLE_FILE))
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for name, param in params.items():
            param.data.copy_(saved[name].to(param.dtype))
    # ZeRO 1-3 and bf16 keep fp32 master copies that the next step would copy back over the parameters:
    # point them at the restored values even when the optimizer partition cannot be loaded below.
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    state["optimizer_restored"] = load_optimizer_partition(directory, engine)
    return state


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer whose parameters are this rank's fp32 (master) tensors and whose state is AdamW's.

    Under ZeRO 1-3 and bf16, DeepSpeed wraps the AdamW it was given and hands it flattened fp32 partitions;
    at ZeRO 0 in fp32 the engine steps the AdamW itself over the model's parameters.
    """
    wrapper = engine.optimizer
    return wrapper.optimizer if hasattr(wrapper, "optimizer") else wrapper


def _layout(engine) -> dict:
    """What an optimizer partition depends on: it only fits an engine with the same layout."""
    return {"world_size": engine.world_size, "zero_stage": engine.zero_optimization_stage(),
            "precision": "bf16" if engine.bfloat16_enabled() else "fp32"}


def partition_params(engine) -> list[torch.Tensor]:
    """This rank's fp32 (master) tensors that the inner optimizer steps, in a fixed order; its state is keyed by them.

    ZeRO-3 hands its flat fp32 partitions to the optimizer one sub-group at a time (its param groups are empty
    between steps), so they are listed from the ZeRO-3 optimizer itself.
    """
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for group in inner_optimizer(engine).param_groups for p in group["params"]]


def save_optimizer_partition(directory: str, engine) -> str:
    """Write this rank's optimizer partition and RNG state as safetensors (layout in its JSON header)."""
    optimizer, params = inner_optimizer(engine), partition_params(engine)
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    scalars = {}  # non-tensor state values (none for torch's AdamW, whose step is a tensor)
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"state.{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()  # dropout masks continue as in an uninterrupted run
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    header = {"format": OPTIMIZER_FORMAT, "rank": engine.global_rank, **_layout(engine), "scalars": scalars}
    path = os.path.join(directory, OPTIMIZER_FILE.format(rank=engine.global_rank))
    save_file(tensors, path, metadata={"loftune": json.dumps(header)})
    return path


def _read_header(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("loftune", "null"))


def _partition_source(directory: str, engine) -> tuple[str | None, dict, str]:
    """The optimizer file this rank can load and its header, or None, {} and the reason why not."""
    layout = _layout(engine)
    own = os.path.join(directory, OPTIMIZER_FILE.format(rank=engine.global_rank))
    header = _read_header(own)
    if header is not None and all(header.get(k) == v for k, v in layout.items()):
        return own, header, ""
    first = os.path.join(directory, OPTIMIZER_FILE.format(rank=0))
    header0 = _read_header(first)
    if header0 is None:
        return None, {}, "the checkpoint has no optimizer state"
    if layout["zero_stage"] == 0 and header0["zero_stage"] == 0 and header0["precision"] == layout["precision"]:
        return first, header0, ""  # ZeRO 0 replicates the optimizer on every rank: any copy fits any world size
    saved = {k: header0.get(k) for k in layout}
    return None, {}, f"it was saved with {saved}, this run is {layout}"


def load_optimizer_partition(directory: str, engine) -> bool:
    """Load this rank's optimizer partition (master parameters, moments) and RNG state; False if it cannot.

    A partition fits only the world size, ZeRO stage and precision it was saved with (ZeRO 0 state is not
    partitioned and fits any world size). Otherwise the optimizer keeps its fresh state, with a warning.
    """
    source, header, why = _partition_source(directory, engine)
    params = partition_params(engine)
    saved = load_file(source) if source else {}
    shapes = [saved[f"param.{i}"].shape for i in range(sum(k.startswith("param.") for k in saved))]
    if source and shapes != [p.shape for p in params]:
        source, why = None, "its partition shapes differ from this run's"
    if source is None:
        log.warning("rank %d: not restoring the optimizer state (%s); continuing with fresh AdamW moments",
                    engine.global_rank, why)
        return False
    optimizer, state = inner_optimizer(engine), _unflatten_state(saved, header["scalars"])
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[f"param.{i}"])
            if i in state:  # torch keeps AdamW's step count on the CPU, the moments beside their parameter
                optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and k != "step" else v
                                      for k, v in state[i].items()}
    if source.endswith(OPTIMIZER_FILE.format(rank=engine.global_rank)):  # this rank's own RNG stream
        torch.set_rng_state(saved["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda" in saved:
            torch.cuda.set_rng_state(saved["rng.cuda"])
    return True


def _unflatten_state(saved: dict[str, torch.Tensor], scalars: dict) -> dict[int, dict]:
    """{'state.3.exp_avg': t, ...} and {'3.foo': 1.0} -> {3: {'exp_avg': t, 'foo': 1.0}}, by parameter position."""
    state: dict[int, dict] = {}
    for name, tensor in saved.items():
        if name.startswith("state."):
            index, key = name[len("state."):].split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
    for name, value in scalars.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return state
