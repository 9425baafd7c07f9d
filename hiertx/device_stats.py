"""What XLA and the devices say about a compiled step: buffer sizes and
FLOPs of a compiled function, the allocator's peak, and the matmul peak MFU
and HFU divide by (vendors' data sheets, or a matmul measured on CPU)."""

import time

import jax
import jax.numpy as jnp


def xla_memory(compiled) -> dict[str, int]:
  """Bytes from XLA's buffer assignment of a compiled function.

  peak = argument + output + temp - alias (donated inputs reuse their buffers).
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
      "memory/xla_argument_bytes": m.argument_size_in_bytes,
      "memory/xla_output_bytes": m.output_size_in_bytes,
      "memory/xla_temp_bytes": m.temp_size_in_bytes,
      "memory/xla_alias_bytes": m.alias_size_in_bytes,
      "memory/xla_generated_code_bytes": m.generated_code_size_in_bytes,
  }
  out["memory/xla_peak_bytes"] = (out["memory/xla_argument_bytes"] + out["memory/xla_output_bytes"]
                                  + out["memory/xla_temp_bytes"] - out["memory/xla_alias_bytes"])
  return out


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def device_peak_bytes() -> int | None:
  """Allocator peak on device 0, where the backend reports it (GPU/TPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (backends without stats raise various errors)
    return None
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


# Dense matmul peaks per chip in FLOP/s, (float32, bfloat16), from the vendors'
# data sheets. GPUs run float32 matmuls as TF32 by default, hence the TF32 figure;
# TPUs run them as bfloat16 passes.
DEVICE_PEAK_FLOPS = {
    "H100": (494.7e12, 989.4e12),
    "H200": (494.7e12, 989.4e12),
    "A100": (156e12, 312e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
    "TPU v6e": (918e12, 918e12),
}


def measured_matmul_peak(dtype: str = "float32", n: int = 1024, seconds: float = 0.2) -> float:
  """FLOP/s of a square matmul on this host's default device, best of several runs."""
  a = jnp.ones((n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  best, t_end = float("inf"), time.time() + seconds
  while time.time() < t_end or best == float("inf"):
    t0 = time.perf_counter()
    mm(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


_MEASURED: dict = {}


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """Peak matmul FLOP/s of all devices in the job and where the number comes from.

  Accelerators: the data-sheet figure per chip times the device count. CPU:
  a matmul measured on this host (all its cores) times the process count;
  simulated CPU devices share the same cores, so they do not multiply it.
  """
  dev = jax.devices()[0]
  column = 1 if dtype in ("bfloat16", "float16") else 0
  if dev.platform != "cpu":
    for name, peaks in DEVICE_PEAK_FLOPS.items():
      if name.lower() in dev.device_kind.lower():
        return peaks[column] * jax.device_count(), f"data sheet ({dev.device_kind})"
    return float("nan"), f"unknown device {dev.device_kind!r}"
  if dtype not in _MEASURED:
    _MEASURED[dtype] = measured_matmul_peak(dtype)
  return _MEASURED[dtype] * jax.process_count(), "measured 1024x1024 matmul on this host"
