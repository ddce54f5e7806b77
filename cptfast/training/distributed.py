"""Running on more than one process with torch.distributed (never a launcher of our own):
`torchrun --nproc_per_node=N -m cptfast train CONFIG.toml` sets the environment this reads.

- `Context.start()`: one process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1, with
  a timeout, so that a rank whose peer died fails with a message instead of hanging.
- `wrap(model)`: DDP, or FSDP2 (`fully_shard` on every decoder layer, then the root) with a
  mixed-precision policy matching the precision mode and optional CPU offload; with FSDP2 only
  rank 0 reads the weights, the others build the model on the meta device and receive their
  shards from it.
- small reductions for metrics, and the rank-0-only rule for files and the progress bar.
- `Context.guard(what)`: a collective that fails because a peer died, stopped or timed out
  becomes one `PeerFailedError` line naming this rank and the collective, not a gloo or NCCL
  traceback (the reductions here are guarded; the loop guards the rest).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cptfast.errors import ConfigError, CptfastError, PeerFailedError

# What gloo and NCCL say when a peer is gone (their errors are plain RuntimeErrors).
_PEER_MESSAGES = ("gloo", "NCCL", "nccl", "Timed out", "timed out", "Connection reset",
                  "Connection closed", "Broken pipe")


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group (so we destroy it)
    timeout_s: int = 600
    peer_failed: bool = False  # then the group is left alone: destroying it could hang

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device_choice: str, timeout_s: int) -> tuple[Context, torch.device]:
        """Join the process group torchrun describes (or run alone); returns the context and
        this rank's device."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_choice == "cuda" or (device_choice == "auto"
                                               and torch.cuda.is_available())
        if device_choice == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device = \"cuda\" but no CUDA device is available")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        owns_group = world_size > 1 and not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world_size, local_rank, owns_group, timeout_s), device

    def stop(self) -> None:
        if self.owns_group and dist.is_initialized() and not self.peer_failed:
            dist.destroy_process_group()

    @contextlib.contextmanager
    def guard(self, what: str):
        """Run collectives (``what``: which, for the message); a peer that died, stopped or
        timed out raises PeerFailedError naming this rank and ``what``."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            yield
        except (RuntimeError, CheckpointException) as error:
            message = str(error)
            if (not self.distributed or isinstance(error, CptfastError) or not (
                    isinstance(error, dist.DistError) or any(
                        text in message for text in _PEER_MESSAGES))):
                raise
            self.peer_failed = True
            detail = message.strip().splitlines()[0][:300] if message.strip() else ""
            raise PeerFailedError(
                f"rank {self.rank} of {self.world_size}: {what} failed: another rank died, "
                f"stopped or did not answer within train.timeout_s = {self.timeout_s} s; its "
                f"own output says why ({detail})") from error

    def barrier(self, what: str = "a barrier") -> None:
        if self.distributed:
            with self.guard(what):
                dist.barrier()

    def sum(self, value: float | int, device: torch.device, what: str = "an all-reduce") -> float:
        """The sum over ranks of a number (one all-reduce)."""
        return self._reduce(value, device, dist.ReduceOp.SUM, what)

    def max(self, value: float | int, device: torch.device, what: str = "an all-reduce") -> float:
        """The largest of the ranks' numbers (one all-reduce)."""
        return self._reduce(value, device, dist.ReduceOp.MAX, what)

    def _reduce(self, value, device, op, what: str):
        if not self.distributed:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=device)
        with self.guard(what):
            dist.all_reduce(total, op=op)
            return total.item()

    def gather(self, item, what: str = "an all-gather") -> list:
        """Every rank's ``item`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [item]
        items = [None] * self.world_size
        with self.guard(what):
            dist.all_gather_object(items, item)
        return items


def wrap(model, parallel: str, precision: str, context: Context, device: torch.device, *,
         cpu_offload: bool = False):
    """The model ready for data-parallel training on ``context`` (unchanged when alone).

    For ``fsdp2`` the model comes with its weights on rank 0 only (in CPU memory) and on the
    meta device elsewhere: each decoder layer and the root are sharded, every rank allocates
    just its shards on ``device``, and rank 0's weights are scattered into them (its buffers,
    e.g. rotary frequencies, broadcast whole). Only rank 0 ever holds the full weights, and
    only in CPU memory, so a model larger than one device still starts."""
    if not context.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [context.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    full_weights = model.state_dict() if context.main else {}
    buffers = dict(model.named_buffers(remove_duplicate=False)) if context.main else {}

    options = {}
    if precision == "bf16-mixed":  # fp32 master weights, bf16 compute, fp32 gradient reduce
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    model.to_empty(device="cpu" if cpu_offload else device)
    set_model_state_dict(model, full_weights, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cpu_offload))
    for prefix, module in model.named_modules():  # buffers are not sharded: whole everywhere
        for name, buffer in module._buffers.items():
            if buffer is not None:
                placed = (buffers[prefix + "." + name if prefix else name].to(device)
                          if context.main else torch.empty_like(buffer, device=device))
                dist.broadcast(placed, src=0)
                module._buffers[name] = placed
    return model


def decoder_layers(model) -> list:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: no decoder layers found to shard with "
                          "train.parallel = \"fsdp2\"")
    return list(layers)


def unwrap(model):
    """The transformers model inside a DDP wrapper (FSDP2 shards in place: no wrapper)."""
    return getattr(model, "module", model)
