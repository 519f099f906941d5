"""Counting memory without a GPU: a dispatch mode that tracks every live tensor's bytes, AdamW's states
as CUDA's foreach AdamW allocates them, the SD-shaped models on fake tensors, and the kernel's count
of a process's resident memory. Shared by the fine-tune rows (:mod:`benchmarks.memory`) and the
other stages' rows (:mod:`benchmarks.memory_stages`)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.memory_shapes import build_components

GIB = 1024 ** 3
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to 512 bytes


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages and records the peak.

    Every op's output storage is counted once when first seen and released by a weakref
    finalizer when its last tensor dies; tensors made before the mode started are added with
    :meth:`track_module` / :meth:`track`.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0  # since the last reset (``peak = live``)
        self.max_peak = 0  # since the start
        self._sizes: dict = {}

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl: shared by every view of it
        if key in self._sizes:
            return
        size = -(-storage.nbytes() // BLOCK) * BLOCK
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        self.max_peak = max(self.max_peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key) -> None:
        self.live -= self._sizes.pop(key, 0)

    def track_module(self, module: torch.nn.Module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.track(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self.track(t)
        return out


class ModelledAdamW:
    """The allocations of ``torch.optim.AdamW(foreach=True)`` (or bitsandbytes' ``AdamW8bit``), no maths.

    Fake tensors have no values, so AdamW's bias correction (``step.item()``) cannot run on them;
    this makes the same tensors: the states when first stepped, the temporary during each step.
    """

    def __init__(self, params, bits: int = 32, fused: bool = False):
        self.params, self.bits, self.fused, self.state = list(params), bits, fused, None

    def step(self) -> None:
        if self.state is None:
            self.state = []
            for p in self.params:
                if self.bits == 8 and p.numel() >= 4096:  # bnb keeps small tensors' states in 32 bit
                    blocks = -(-p.numel() // 256)  # block-wise quantisation: one fp32 scale per 256
                    self.state += [torch.empty_like(p, dtype=torch.uint8), torch.empty(blocks)] * 2
                else:
                    self.state += [torch.empty_like(p, dtype=torch.float32) for _ in range(2)]
        if self.bits == 32 and not self.fused:
            tmp = torch._foreach_sqrt(self.state[1::2])  # the sqrt(v) list foreach AdamW allocates
            del tmp

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def build_model(model: str, scale: int, device: str, finetune: str, checkpointing: bool, precision: str):
    """``InpaintingDiffusion`` of an SD shape with the fine-tune's memory options applied."""
    from lightning_modules.diffusion import InpaintingDiffusion
    from lightning_modules.diffusion_memory import enable_gradient_checkpointing, hold_frozen_in_half, set_attention

    comps = build_components(model, scale, device)
    m = InpaintingDiffusion(**comps, finetune=finetune, cond_dropout=0.1)
    set_attention(m.unet, "sdpa")
    if precision != "fp32":
        hold_frozen_in_half(m, precision)
    if checkpointing:
        enable_gradient_checkpointing(m)
    return m


def materialize_fake(module: torch.nn.Module) -> None:
    """Replace every meta parameter/buffer by an empty CPU tensor (fake under the active FakeTensorMode)."""
    done: dict = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in done:  # tied weights stay tied
                    new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    done[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) \
                        if isinstance(t, torch.nn.Parameter) else new
                store[name] = done[id(t)]


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
