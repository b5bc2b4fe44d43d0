"""Device backends: how the engine runs the plain model (:mod:`aquilachat.model`) fast on a device.

A backend is created and owned by the engine (:class:`aquilachat.engine.Engine`). It reads the
model's parameters and modules, never replaces them, and keeps whatever it derives on itself;
:meth:`~CpuDecodeBackend.release` forgets it, leaving the model as one that was never served.

* :class:`CpuDecodeBackend`: prefill and decode over the engine's KV cache on the CPU, in float32
  and bfloat16, with few-row products that read each weight once (:mod:`.cpu_kernels`);
  quantized linears (:mod:`aquilachat.quantization`) run through their own modules.
"""

from .cpu import BackendUnsupported, CpuDecodeBackend

__all__ = ["BackendUnsupported", "CpuDecodeBackend"]
