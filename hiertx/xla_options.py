"""XLA compile options hiertx sets for its own programs, by backend.

XLA:CPU: matmuls only in YNNPACK fusions (`xla_cpu_experimental_ynn_fusion_type
=LIBRARY_FUSION_TYPE_DOT`). By default XLA:CPU also hands elementwise fusions
to YNNPACK; on the CPU measured here those fusions materialised transposed
copies of the MLP's activation gradients (26% of vanilla's step), and the
train step ran 1.4x faster without them (vanilla, 16 x 256; docs/performance.md).
A user's own `--xla_cpu_experimental_ynn_fusion_type` in
XLA_FLAGS wins; `HIERTX_XLA_DEFAULTS=0` turns these defaults off.
"""

import functools
import os

import jax
import jax.numpy as jnp
from absl import logging

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.lru_cache(maxsize=None)
def compile_options() -> dict:
  """Options for `jax.jit(..., compiler_options=...)` on this process's backend."""
  if os.environ.get("HIERTX_XLA_DEFAULTS", "1") == "0" or jax.default_backend() != "cpu":
    return {}
  user = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in CPU_DEFAULTS.items() if k not in user}
  if options:
    try:  # an XLA that does not know an option says so at compile time
      jax.jit(jnp.sin).lower(1.0).compile(options)
    except Exception as e:  # noqa: BLE001  (XLA reports it as a runtime error)
      logging.warning("XLA:CPU does not take hiertx's default compile options %s (%s); "
                      "compiling without them", options, str(e).splitlines()[0][:200])
      return {}
  return options
