"""Tiny model configs (D=16) covering every architecture and its options, and
their parameters, initialised once per session."""

import functools

import jax
import jax.numpy as jnp

from hiertx import models

V = 23  # the tests' vocabulary

COMMON = dict(d_model=16, num_heads=2, mlp_dim=32, max_len=64, dropout=0.0)

# Rotary positions run in the variants that use them beside other structure
# (a vanilla with rotary positions would add only what they cover).
MODELS = {
    "vanilla": dict(name="vanilla", num_layers=2),
    "bottom_up": dict(name="bottom_up", layers_per_scale=(1, 1, 1), pool_factors=(2, 3),
                      post_layers=1),
    "bottom_up_attn_pool": dict(name="bottom_up", layers_per_scale=(1, 1, 1),
                                pool_factors=(2, 2), pooling="attention", post_layers=1,
                                query_adds_coarse=True, positions="rotary"),
    "top_down": dict(name="top_down", layers_per_scale=(1, 1, 1), pool_factors=(2, 3)),
    "top_down_linear": dict(name="top_down", layers_per_scale=(1, 0, 1), pool_factors=(2, 2),
                            pooling="linear", upsampling="linear"),
    "top_down_attention": dict(name="top_down", layers_per_scale=(1, 1), pool_factors=(3,),
                               upsampling="attention", positions="rotary"),
    "retina": dict(name="retina", num_layers=2, pool_factor=2, windows=(3, 2), chunk_size=4),
    "retina_dense": dict(name="retina", num_layers=2, pool_factor=2, windows=(3, 2),
                         implementation="dense"),
    "hourglass": dict(name="hourglass", hierarchy="1@1 1@2 1@4 1@2 1@1"),
    "hourglass_attention": dict(name="hourglass", hierarchy="1@1 2@3 1@1",
                                pooling="attention", upsampling="attention"),
    # Content groups (hiertx.boundaries); vocabulary ids 12..16 are space-like.
    "hourglass_whitespace": dict(name="hourglass", hierarchy="1@1 1@3 1@1",
                                 boundaries="whitespace", max_group=4, positions="rotary"),
    "hourglass_entropy": dict(name="hourglass", hierarchy="1@1 1@2 1@1", boundaries="entropy",
                              entropy_threshold=4.0, max_group=3, pooling="attention",
                              upsampling="attention"),
    "hourglass_learned": dict(name="hourglass", hierarchy="1@1 1@2 1@1", boundaries="learned",
                              max_group=5, group_capacity=1.25, upsampling="attention",
                              positions="rotary"),
    "hourglass_dynamic": dict(name="hourglass", hierarchy="1@1 1@2 1@1", boundaries="dynamic",
                              positions="rotary"),
    # H-Net's 2-stage model: bytes -> chunks -> chunks of chunks.
    "hourglass_dynamic2": dict(name="hourglass", hierarchy="1@1 1@2 1@4 1@2 1@1",
                               boundaries="dynamic", positions="rotary"),
    "top_down_learned": dict(name="top_down", layers_per_scale=(1, 1), pool_factors=(2,),
                             boundaries="learned", max_group=4, pooling="attention",
                             upsampling="attention"),
}


def model_cfg(key: str, **overrides) -> dict:
  return {**COMMON, **MODELS[key], **overrides}


@functools.lru_cache(maxsize=None)
def _params(key: str, structure: tuple):
  model = models.build(model_cfg(key, attention="dense", **dict(structure)), V, 64)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.ones((1, 24), jnp.int32))["params"]
  # A matrix initialised to zero on purpose (H-Net's residual projection)
  # gets the small random values training would give it, so that every path
  # the tests follow carries signal (at zero a position that does not close a
  # chunk would not read its own byte).
  leaves, tree = jax.tree_util.tree_flatten(params)
  leaves = [0.05 * jax.random.normal(jax.random.PRNGKey(i), a.shape, a.dtype)
            if a.ndim == 2 and not a.any() else a for i, a in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(tree, leaves)


def params(key: str, **structure):
  """The parameters of tiny model `key` (with `structure` overrides) from
  PRNGKey(1). Parameters depend on the model's structure only, not on its
  attention implementation, precision, remat policy or input, so tests of one
  model share one initialisation: compiled once per process, and across
  processes through the tests' compilation cache."""
  return _params(key, tuple(sorted(structure.items())))
