"""Device and link descriptions used by the cost model.

A :class:`DeviceSpec` prices a node that has not been measured (roofline: the larger of
its FLOPs over the compute rate and its bytes over the memory bandwidth), a boundary
transfer (latency plus bytes over the link bandwidth), and the host's time at each
denoiser call while the devices wait for it. Presets are named after the link that
joins the devices, as the command line's ``--link`` option names them.
"""
from __future__ import annotations

import dataclasses

from asyncfx.errors import PlanError


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One device kind and the link between two of them.

    Example:
        >>> nvlink = PRESETS["nvlink"]
        >>> nvlink.transfer_seconds(90e6) < 1e-3     # 90 MB of skip tensors
        True
    """

    name: str
    flops_per_s: float       # sustained dense throughput at the model's dtype
    bytes_per_s: float       # memory bandwidth
    link_bytes_per_s: float  # device-to-device bandwidth, one direction
    link_latency_s: float    # fixed cost of one transfer
    # the runtime's host time at each call while the devices idle: collecting the step's
    # outputs, the sampler's step, binding and dispatching the next call
    host_seconds_per_call: float = 0.0

    def compute_seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s)

    def transfer_seconds(self, nbytes: float) -> float:
        return self.link_latency_s + nbytes / self.link_bytes_per_s


#: The local executor's host time per call on a GPU machine, while the devices wait:
#: benchmarks/gpu.py on an H200 machine measured a round 0.7 to 1.7 ms a call longer than
#: every stage replayed at once without the runtime (two UNet shapes, N=2 and 4 with
#: stride 1, N=3 with stride 2: nine rows, 1.1 ms a call on average; benchmarks/RESULTS.md).
GPU_HOST_SECONDS_PER_CALL = 1.1e-3

PRESETS: dict[str, DeviceSpec] = {
    # CPU worker threads of one process; a boundary "transfer" is a memory copy. The
    # compute rates are those of eager PyTorch on one core, fitted to the per-node times
    # benchmarks/cost_estimate.py measured of SD 2.1's UNet (one thread): large GEMMs and
    # convolutions sustain about 100 GFLOP/s (AVX-512), while what an operator does per
    # byte it reads or writes (elementwise and normalisation kernels, and the layout
    # conversions oneDNN makes of a convolution's activations and weights at every call)
    # runs at about 2 GB/s, a tenth of a core's streaming bandwidth. With these rates the
    # default two-stage plan of that UNet measures 1.04 max/mean where the earlier 50
    # GFLOP/s and 20 GB/s (bytes almost never binding) gave 1.42: convolutions on 2x2
    # and 4x4 maps and linears over a few tokens are bound by their bytes, not FLOPs.
    # Copy: memcpy of a large buffer runs at about 10 GB/s per core; handing a tensor to
    # another thread costs a few microseconds.
    # Host: benchmarks/runtime_overhead.py measured 156-290 us a call in the calling thread.
    "cpu": DeviceSpec("cpu", flops_per_s=100e9, bytes_per_s=2e9,
                      link_bytes_per_s=10e9, link_latency_s=5e-6, host_seconds_per_call=0.25e-3),
    # NVIDIA A100 PCIe 40GB joined by PCIe 4.0 x16. Datasheet: 312 TFLOP/s FP16 tensor
    # (dense), 1,555 GB/s HBM2. PCIe 4.0 x16 is 31.5 GB/s raw per direction; peer-to-peer
    # copies measure about 25 GB/s, with about 10 us per cudaMemcpyPeerAsync.
    "pcie4": DeviceSpec("pcie4", flops_per_s=312e12, bytes_per_s=1.555e12,
                        link_bytes_per_s=25e9, link_latency_s=10e-6,
                        host_seconds_per_call=GPU_HOST_SECONDS_PER_CALL),
    # NVIDIA H100 SXM5 joined by NVLink 4. Datasheet: 989 TFLOP/s FP16 tensor (dense),
    # 3.35 TB/s HBM3, 900 GB/s NVLink total (450 GB/s per direction); peer copies reach
    # about 370 GB/s one way, with about 5 us latency.
    "nvlink": DeviceSpec("nvlink", flops_per_s=989e12, bytes_per_s=3.35e12,
                         link_bytes_per_s=370e9, link_latency_s=5e-6,
                         host_seconds_per_call=GPU_HOST_SECONDS_PER_CALL),
}


def device_spec(device: str | DeviceSpec) -> DeviceSpec:
    """A preset by name, or the spec itself."""
    if isinstance(device, DeviceSpec):
        return device
    try:
        return PRESETS[device]
    except KeyError:
        raise PlanError(f"unknown link/device {device!r}; use one of {sorted(PRESETS)} or pass "
                        "an asyncfx.DeviceSpec.") from None
