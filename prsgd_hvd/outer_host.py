"""theta0 and the outer optimizer's state in host memory (``outer_device="cpu"``), staged per chunk.

An outer optimizer costs two more copies of the model (theta0 and, for DiLoCo's SGD, its
momentum buffer; Adam: three). On a GPU job those copies need not sit in device memory between
rounds: torchft's DiLoCo keeps its backup of the parameters on a ``backup_device``. Here,
with ``outer_device``, theta0 and every per-element state tensor of the outer optimizer live on
that device (page-locked when CUDA is available, so the copies are DMA transfers), and the
outer optimizer is built over those host tensors -- it is torch's own optimizer, over host
tensors, between rounds; its ``state_dict()`` holds host tensors.

NOTE: [staging the outer step]
At an outer round each bucket's parameters are taken in chunks of consecutive tensors of at
most ``STAGE_BYTES`` of theta0 (one tensor larger than that is a chunk of its own). For each
chunk, :meth:`HostPlacement.staged` copies theta0 and the chunk's state tensors to the round's
device, puts the copies in the outer optimizer's place (its param groups and ``state``, so the
fused kernel and the optimizer's own ``step()`` read and create state exactly as they do
without the option), lets the outer step run there, and copies theta0' and the state back into
the host tensors. So the device holds at most one chunk's extra copies, and the arithmetic is
the same kernel or the same ``step()`` on the same values as with the option off: the results
are bit for bit those of the option off. The option always takes this path, also when the host
and the round's device are the same (CPU jobs), so a CPU run exercises the code a GPU job runs.

Which state tensors travel follows torch's own ``Optimizer.load_state_dict`` policy: every
tensor goes with its parameter, except ``state["step"]``, which torch keeps on the CPU unless
the group is ``fused`` or ``capturable``; such a step stays where it is.

With the option the outer optimizer's ``step()`` runs once per chunk, each time over the
chunk's tensors only (the others have no ``.grad``, so torch's optimizers skip them). Every
per-parameter rule -- all of ``torch.optim``, and ``prsgd_hvd.outer.SlowMo`` -- computes what
one ``step()`` over all tensors computes; an optimizer that couples parameters (a global norm)
or counts its ``step()`` calls would not, and step hooks run once per chunk.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch

# Bytes of theta0 staged at once (torchft buckets its DiLoCo allreduce by 32 MiB too).
STAGE_BYTES = 32 << 20


def resolve_outer_device(outer_device: Any, outer: Any) -> Any:
    """``outer_device=`` checked: None (theta0 beside the parameters) or a CPU/CUDA device."""
    if outer_device is None:
        return None
    if outer is None:
        raise ValueError(
            f"DistributedLocalSGD: 'outer_device' ({outer_device!r}) places theta0 and the outer "
            f"optimizer's state, but there is no outer optimizer: pass outer= too, e.g. "
            f"outer=prsgd_hvd.outer.diloco(), outer_device='cpu'; or drop outer_device")
    if not isinstance(outer_device, (str, torch.device)):
        raise TypeError(f"DistributedLocalSGD: 'outer_device' must be a device name or a "
                        f"torch.device, e.g. 'cpu', got {type(outer_device).__name__}")
    try:
        device = torch.device(outer_device)
    except RuntimeError as err:
        raise ValueError(f"DistributedLocalSGD: 'outer_device' {outer_device!r} is not a "
                         f"device ({err}); use 'cpu' to keep theta0 and the outer state in "
                         f"host memory") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"DistributedLocalSGD: 'outer_device' must be 'cpu' (host memory) or "
                         f"a CUDA device, got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"DistributedLocalSGD: 'outer_device' {device} but CUDA is not "
                             f"available here; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"DistributedLocalSGD: 'outer_device' {device}: there are "
                             f"{torch.cuda.device_count()} CUDA devices")
    return device


def _travels(key: Any, value: Any, group: Dict[str, Any]) -> bool:
    """Whether a state entry goes with its parameter (torch's load_state_dict policy)."""
    if not torch.is_tensor(value):
        return False
    return key != "step" or bool(group.get("fused") or group.get("capturable"))


class HostPlacement:
    """Where theta0 and the outer state live (``device``), and the staging of a chunk."""

    def __init__(self, device: torch.device):
        self.device = device
        # Page-locked host memory makes the copies DMA transfers (and non_blocking uploads safe).
        self.pin = device.type == "cpu" and torch.cuda.is_available()
        self.chunks = 0               # chunks staged in the last outer round
        self.staged_bytes_max = 0     # most bytes (theta0 + state) on the round's device at once
        self._round_chunks = 0
        self._hosts: Dict[int, Dict[str, Any]] = {}  # id(device copy) -> its host state tensors

    def empty_like(self, t: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype or t.dtype, device=self.device,
                           pin_memory=self.pin)

    # ---- which tensors a chunk holds -----------------------------------------------------------
    @staticmethod
    def split(tensors: Sequence[torch.Tensor], limit: int = None) -> List[Tuple[int, int]]:
        """[first, last) ranges of consecutive tensors, each of at most ``limit`` bytes of
        theta0 (fp32 for 16-bit parameters: 4 bytes per element at most) unless one tensor
        alone is more."""
        limit = STAGE_BYTES if limit is None else limit
        out: List[Tuple[int, int]] = []
        first, size = 0, 0
        for i, t in enumerate(tensors):
            n = t.numel() * max(t.element_size(), 4)
            if i > first and size + n > limit:
                out.append((first, i))
                first, size = i, 0
            size += n
        if first < len(tensors):
            out.append((first, len(tensors)))
        return out

    def begin_round(self) -> None:
        self._round_chunks = 0

    def end_round(self) -> None:
        self.chunks = self._round_chunks

    # ---- staging -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged(self, outer, indices: Sequence[int], device: torch.device) -> Iterator[None]:
        """theta0 of ``indices`` (positions in ``outer.theta``) and their state on ``device``
        while the block runs, in the outer optimizer's place; copied back after it (NOTE:
        [staging the outer step])."""
        opt = outer.opt
        swapped: List[Tuple[int, torch.Tensor, torch.Tensor]] = []  # (index, host, device copy)
        staged_bytes = 0
        try:
            with torch.no_grad():
                for i in indices:
                    host = outer.theta[i]
                    gi, k = outer.slot[id(host)]
                    group = opt.param_groups[gi]
                    dev = self._upload(host, device)
                    staged_bytes += dev.numel() * dev.element_size()
                    state, hosts = {}, {}
                    for key, value in opt.state.get(host, {}).items():
                        if _travels(key, value, group):
                            state[key] = self._upload(value, device)
                            hosts[key] = value
                            staged_bytes += value.numel() * value.element_size()
                        else:  # a CPU step counter stays where torch keeps it
                            state[key] = value
                    # Copied; only now the optimizer is changed (a failed copy changes nothing).
                    opt.state.pop(host, None)
                    if state:
                        opt.state[dev] = state
                    self._hosts[id(dev)] = hosts
                    group["params"][k] = dev
                    outer.theta[i] = dev
                    swapped.append((i, host, dev))
            self.staged_bytes_max = max(self.staged_bytes_max, staged_bytes)
            self._round_chunks += 1
            yield
        finally:
            with torch.no_grad():
                for i, host, dev in swapped:
                    self._unstage(outer, i, host, dev)

    def _upload(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A copy of ``t`` on ``device``, always a new tensor (also when ``t`` is there)."""
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
        out.copy_(t, non_blocking=self.pin)
        return out

    def _unstage(self, outer, i: int, host: torch.Tensor, dev: torch.Tensor) -> None:
        """theta0' and the state back into host tensors, the host tensors back in place."""
        opt = outer.opt
        gi, k = outer.slot[id(host)]
        group = opt.param_groups[gi]
        dev.grad = None
        host.copy_(dev)
        hosts = self._hosts.pop(id(dev), {})
        state = opt.state.pop(dev, None)
        if state:
            kept = {}
            for key, value in state.items():
                if _travels(key, value, group):
                    h = hosts.get(key)
                    if h is None or h.shape != value.shape or h.dtype != value.dtype:
                        h = self.empty_like(value)  # created by this step (the first one)
                    h.copy_(value)
                    kept[key] = h
                else:  # a CPU step counter: it never left
                    kept[key] = value
            opt.state[host] = kept
        group["params"][k] = host
        outer.theta[i] = host

    # ---- after a checkpoint load -----------------------------------------------------------------
    def pin_state(self, opt: torch.optim.Optimizer) -> None:
        """After a checkpoint load (torch casts state to the parameters' device, not pinned):
        page-lock the travelling state tensors again."""
        if not self.pin:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p)
                if not state:
                    continue
                for key, value in list(state.items()):
                    if _travels(key, value, group) and value.device == self.device \
                            and not value.is_pinned():
                        state[key] = value.pin_memory()
