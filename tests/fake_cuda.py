"""Fake CUDA on the CPU: tensors that say ``cuda:0`` and hold real CPU data, to run the GPU code path in CI.

``with FakeCuda() as fc:`` makes ``device="cuda"`` work on a machine without a GPU: every tensor created on or
moved to ``cuda`` is a ``FakeCudaTensor`` (``.device`` is ``cuda:0``, ``.is_cuda`` is True) wrapping a CPU tensor
that the operations really run on, so losses and outputs are real numbers. What a real GPU would refuse is
refused here too: an operation mixing a CUDA tensor with a CPU tensor of one or more dimensions raises
``DeviceMixError`` (0-d CPU tensors are allowed, as on CUDA; so are CPU index tensors, counted as copies), and
``.numpy()`` / ``np.asarray`` of a CUDA tensor raise torch's TypeError for them. Autocast on ``cuda`` is
enabled (bf16), so the operations see the dtypes a GPU would run them in.

Counted per run (``fc.counts()``):

``syncs``      the host waits for the device: a value read on the host (``.item()``, ``bool()``, ``float()``,
               ``.tolist()``), a device-to-host copy, an operation whose output size depends on the data
               (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``...)
``h2d_pageable``  host-to-device copies from pageable (unpinned) memory: the host waits for them too
``h2d_pinned``    host-to-device copies from pinned memory (asynchronous with ``non_blocking``)
``launches``   operations that would launch a kernel: every operation with a CUDA output, except views and
               empty allocations (a lower bound: a fused or composite op on a GPU may launch several)

Limits: the backward pass needs a real CUDA context (the autograd engine asks the driver for the device's
stream), so a forward graph can be built but ``backward()`` cannot run; ``skip_backward`` stands in for it.
"""

from __future__ import annotations

import contextlib
import unittest.mock as um
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten


_ACTIVE: list["FakeCuda"] = []


class DeviceMixError(AssertionError):
    """An operation got a CUDA tensor and a CPU tensor with one or more dimensions (a RuntimeError on a GPU)."""


class FakeCudaTensor(torch.Tensor):
    """A tensor on ``cuda:0`` whose data is the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False) -> "FakeCudaTensor":
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=CUDA, requires_grad=requires_grad)
        r.elem = elem
        return r

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"FakeCudaTensor({self.elem!r})"

    def numpy(self, *, force: bool = False) -> Any:  # torch's own message for a CUDA tensor
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def tolist(self) -> Any:  # one device-to-host copy
        if _ACTIVE:
            _ACTIVE[-1].syncs["tolist"] += 1
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        raise RuntimeError(f"{func}: a fake CUDA tensor used outside `with FakeCuda()`")


# operations whose output size depends on the values (bincount: on the ids' maximum; CUDA reads their min and max)
# or that return a host value: the host must wait for the device
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten._unique.default,
                   aten.unique_dim.default, aten.unique_consecutive.default, aten.equal.default,
                   aten.repeat_interleave.Tensor, aten.nonzero_static.default, aten.bincount.default}
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
                aten.new_empty_strided.default, aten.empty_like.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _is_view(func: Any) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


class FakeCuda(TorchDispatchMode):
    """The mode (see the module docstring). ``fc.reset()`` clears the counts; ``fc.counts()`` returns them;
    ``fc.dtypes[op]`` is a Counter of the input dtypes of the convolutions (``conv``), matrix products
    (``matmul``) and softmaxes (``softmax``) run on the device."""

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def __init__(self) -> None:
        super().__init__()
        # registered as the fake-tensor mode: torch then skips CUDA's lazy initialisation for cuda devices
        self._mode_key = torch._C._TorchDispatchModeKey.FAKE
        self._pinned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> pinned CPU tensor
        self._stack = contextlib.ExitStack()
        self._depth = 0
        self.reset()

    def reset(self) -> None:
        self.syncs: Counter = Counter()
        self.h2d_pageable = 0
        self.h2d_pinned = 0
        self.launches = 0
        self.dtypes: dict[str, Counter] = {"conv": Counter(), "matmul": Counter(), "softmax": Counter()}

    def counts(self) -> dict[str, int]:
        return {"syncs": sum(self.syncs.values()), "h2d_pageable": self.h2d_pageable,
                "h2d_pinned": self.h2d_pinned, "launches": self.launches}

    # -- entering: what a CUDA build with a GPU would say ------------------------------------------------
    def __enter__(self) -> "FakeCuda":
        self._depth += 1
        if self._depth > 1:  # re-entered from __torch_dispatch__ (a decomposition)
            super().__enter__()
            return self
        s = self._stack
        # without a driver, the CUDA device guard becomes a no-op one (as under FakeTensorMode)
        torch._C._ensureCUDADeviceGuardSet()
        only_cpu = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        s.callback(torch._C._set_only_lift_cpu_tensors, only_cpu)
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)  # module.to(cuda): new Parameters
        s.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwrite)
        s.enter_context(um.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False))
        s.enter_context(um.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True))
        super().__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth > 0:
            super().__exit__(*exc)
            return
        try:
            _ACTIVE.remove(self)
            super().__exit__(*exc)
        finally:
            self._stack.close()

    # -- every operation ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, C901
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        fake = [x for x in flat if isinstance(x, FakeCudaTensor)]
        host = [x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, FakeCudaTensor)]
        dev = kwargs.get("device")
        to_cuda = dev is not None and torch.device(dev).type == "cuda"
        if to_cuda:
            kwargs["device"] = torch.device("cpu")

        if func.overloadpacket is aten.to and func.decompose is not None:
            # under inference_mode ``to`` arrives whole (its device may be positional): run its decomposition
            with self:
                out = func.decompose(*args, **kwargs)
            return out if out is not NotImplemented else func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is aten.is_pinned.default:
            return self._is_pinned(args[0])
        if func is aten._pin_memory.default:
            out = args[0].clone()
            self._pinned[id(out)] = out
            return out

        if func is aten._to_copy.default:
            src = args[0]
            if isinstance(src, FakeCudaTensor):
                wrap = dev is None or to_cuda
                if not wrap:
                    self.syncs["copy to host"] += 1
            else:
                wrap = to_cuda
                if wrap:
                    self._count_h2d(src)
        elif func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, FakeCudaTensor) and not isinstance(src, FakeCudaTensor):
                self._count_h2d(src)
            elif isinstance(src, FakeCudaTensor) and not isinstance(dst, FakeCudaTensor):
                self.syncs["copy to host"] += 1
            wrap = isinstance(dst, FakeCudaTensor)
        else:
            big_host = [h for h in host if h.dim() > 0]
            if fake and big_host:
                if func in _INDEXING and all(h.dtype in (torch.long, torch.int) for h in big_host):
                    # CUDA accepts CPU index tensors and copies them over (from pageable memory)
                    for h in big_host:
                        self._count_h2d(h)
                else:
                    shapes = [tuple(h.shape) for h in big_host]
                    raise DeviceMixError(f"{func}: CUDA tensor(s) mixed with CPU tensor(s) of shape {shapes}")
            wrap = bool(fake) or to_cuda
            if fake:
                if func is aten._local_scalar_dense.default:
                    self.syncs["item"] += 1
                elif func in _DATA_DEPENDENT:
                    self.syncs[func.overloadpacket.__name__] += 1
                elif func in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in flat[1:]):
                    self.syncs["boolean mask index"] += 1
                self._record_dtype(func, fake)

        unwrapped_args, unwrapped_kwargs = tree_map(_unwrap, (args, kwargs))
        out = func(*unwrapped_args, **unwrapped_kwargs)
        if not wrap:
            return out
        if not (_is_view(func) or func in _ALLOCATIONS or func is aten._local_scalar_dense.default):
            self.launches += 1
        # in-place operations return their input: hand back the same wrapper
        by_elem = {id(x.elem): x for x in fake}

        def rewrap(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or isinstance(t, FakeCudaTensor):
                return t
            same = by_elem.get(id(t))
            return FakeCudaTensor(t) if same is None else same

        return tree_map(rewrap, out)

    def _count_h2d(self, src: torch.Tensor) -> None:
        if self._is_pinned(src) or (src._base is not None and self._is_pinned(src._base)):
            self.h2d_pinned += 1
        else:
            self.h2d_pageable += 1

    def _is_pinned(self, t: torch.Tensor) -> bool:
        return self._pinned.get(id(t)) is t

    def _record_dtype(self, func: Any, fake: list) -> None:
        name = func.overloadpacket.__name__
        kind = ("conv" if name in ("convolution", "_convolution", "conv2d") else
                "matmul" if name in ("mm", "addmm", "bmm", "baddbmm", "matmul") else
                "softmax" if name in ("_softmax", "_log_softmax") else None)
        if kind is not None:
            self.dtypes[kind][fake[0].dtype] += 1


def _unwrap(x: Any) -> Any:
    return x.elem if isinstance(x, FakeCudaTensor) else x


@contextlib.contextmanager
def skip_backward(params: Iterator[torch.nn.Parameter] | None = None) -> Iterator[list[torch.Tensor]]:
    """Replace ``Tensor.backward`` (which needs a real CUDA context) by a recorder: yields the list of the
    tensors ``backward`` was called on; each call gives every parameter in ``params`` without a gradient a
    zero gradient (so that the optimizer step runs as after a real backward)."""
    params = list(params or [])
    called: list[torch.Tensor] = []

    def fake_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        called.append(self)
        for p in params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    with um.patch.object(torch.Tensor, "backward", fake_backward):
        yield called
