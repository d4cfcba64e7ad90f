"""Small collectives on top of ``torch.distributed``: objects, whole state dicts, gathers.

Every function here is a collective: every rank of the group must call it, in
the same order, or the job waits until the process group's timeout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device(device: torch.device | None) -> torch.device:
    if device is not None:
        return device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T, src: int = 0, device: torch.device | None = None) -> T:
    """``obj`` from rank ``src`` on every rank (pickled; for small, trusted, in-job values)."""
    box: list[Any] = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device(device))
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; small, trusted values)."""
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather(tensor: Tensor, device: torch.device | None = None) -> Tensor:
    """Every rank's ``tensor`` stacked along a new first dimension (rank order), on every rank.

    The tensors must have the same shape and dtype on every rank. The result is on
    the communication device (the CPU for gloo).
    """
    where = _comm_device(device)
    local = tensor.detach().to(where).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts)


def broadcast_tensors_(tensors: Iterable[Tensor], src: int = 0,
                       device: torch.device | None = None) -> None:
    """Overwrite each tensor in place with rank ``src``'s (same shapes and dtypes everywhere)."""
    where = _comm_device(device)
    for tensor in tensors:
        if tensor.device == where:
            dist.broadcast(tensor.data, src=src)
        else:
            staged = tensor.detach().to(where)
            dist.broadcast(staged, src=src)
            with torch.no_grad():
                tensor.copy_(staged)


@dataclass(frozen=True)
class _TensorSlot:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str


def _same_mapping(like: dict[Any, Any], items: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    """An OrderedDict for an OrderedDict (module state dicts), else a plain dict."""
    return OrderedDict(items) if isinstance(like, OrderedDict) else dict(items)


def _split(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors.append(value.detach())
        return _TensorSlot(len(tensors) - 1, tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, dict):
        return _same_mapping(value, ((k, _split(v, tensors)) for k, v in value.items()))
    if isinstance(value, list):
        return [_split(v, tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(_split(v, tensors) for v in value)
    return value


def _join(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, _TensorSlot):
        return tensors[value.index]
    if isinstance(value, dict):
        return _same_mapping(value, ((k, _join(v, tensors)) for k, v in value.items()))
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(_join(v, tensors) for v in value)
    return value


def broadcast_state(state: Any, src: int = 0, device: torch.device | None = None) -> Any:
    """A nested state (dicts, lists, tuples, tensors, numbers) from rank ``src`` on every rank.

    The structure travels as one small pickled object; every tensor travels as a
    tensor broadcast (no pickling of tensor data). Received tensors are put on
    the device they were on at ``src`` when this rank has it, else the CPU; the
    caller's ``load_state_dict`` moves them where they belong.
    """
    tensors: list[Tensor] = []
    skeleton = _split(state, tensors) if rank() == src else None
    skeleton = broadcast_object(skeleton, src=src, device=device)
    where = _comm_device(device)
    slots: list[_TensorSlot] = []

    def collect(value: Any) -> None:
        if isinstance(value, _TensorSlot):
            slots.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list | tuple):
            for v in value:
                collect(v)

    collect(skeleton)
    slots.sort(key=lambda s: s.index)
    received: list[Tensor] = []
    for slot in slots:
        if rank() == src:
            buffer = tensors[slot.index].to(where).contiguous()
        else:
            buffer = torch.empty(slot.shape, dtype=slot.dtype, device=where)
        dist.broadcast(buffer, src=src)
        target = torch.device(slot.device)
        if target.type == "cuda" and not torch.cuda.is_available():
            target = torch.device("cpu")
        received.append(tensors[slot.index] if rank() == src else buffer.to(target))
    return _join(skeleton, received)
