"""The shared multi-scale primitives and retina's regions, checked by enumeration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiertx import models, scales
from hiertx.models import retina
import tiny_models
from tiny_models import model_cfg


def test_shifted_groups_end_at_multiples_of_k():
  x = jnp.arange(1, 13, dtype=jnp.float32)[None, :, None]  # values = position + 1
  fine = scales.fine_scale(jnp.ones((1, 12), jnp.int32))
  members, valid = scales.shifted_groups(x, fine, 3)
  # Group g holds positions 3g-2 .. 3g; group 0 holds only position 0.
  np.testing.assert_array_equal(members[0, :, :, 0], [[0, 0, 1], [2, 3, 4], [5, 6, 7], [8, 9, 10]])
  np.testing.assert_array_equal(valid[0], [[0, 0, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
  coarse = scales.coarser(fine, 3)
  np.testing.assert_array_equal(coarse.end_L, [0, 3, 6, 9])
  np.testing.assert_array_equal(scales.mean_pool(x, fine, 3)[0, :, 0], [1, 3, 6, 9])


def test_scale_mask_is_the_end_rule():
  fine = scales.fine_scale(jnp.ones((1, 8), jnp.int32))
  c1 = scales.coarser(fine, 2)
  c2 = scales.coarser(c1, 2)
  m = np.asarray(scales.mask(fine, scales.concat_scales(fine, c1, c2)))[0]
  ends = np.concatenate([np.arange(8), np.arange(4) * 2, np.arange(2) * 4])
  np.testing.assert_array_equal(m, ends[None, :] <= np.arange(8)[:, None])


def test_pooling_and_upsampling_respect_documents():
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])
  fine = scales.fine_scale(seg)
  x = jnp.arange(8, dtype=jnp.float32)[None, :, None]
  members, valid = scales.shifted_groups(x, fine, 2)
  # Group 2 = positions 3, 4 (both doc 2); group 1 = positions 1, 2 (doc 1).
  np.testing.assert_array_equal(valid[0], [[0, 1], [1, 1], [1, 1], [1, 1]])
  seg2 = jnp.array([[1, 1, 2, 2, 2, 2, 2, 2]])
  _, valid2 = scales.shifted_groups(x, scales.fine_scale(seg2), 2)
  np.testing.assert_array_equal(valid2[0], [[0, 1], [0, 1], [1, 1], [1, 1]])  # pos 1 is doc 1
  coarse = scales.coarser(fine, 2)
  up = scales.upsample_repeat(jnp.ones((1, 4, 1)), coarse, fine, 2)[0, :, 0]
  # Position 3 (doc 2) would get coarse index 1, which ends at 2 in doc 1: dropped.
  np.testing.assert_array_equal(up, [1, 1, 1, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("k,windows", [(2, (3, 2)), (3, (1, 1, 2)), (4, (5,)), (2, (1,))])
def test_retina_regions_cover_the_past_exactly_once(k, windows):
  t_max = 70
  t = jnp.arange(t_max)
  bounds = [np.asarray(b) for b in retina.region_bounds(t, k, windows)]
  levels = len(windows)
  for q in range(t_max):
    covered = np.zeros(t_max, int)
    for s in range(levels + 1):
      hi = bounds[s][q]
      lo = bounds[s + 1][q] if s < levels else -10**9
      for g in range(t_max):
        end = g * k ** s
        if lo < end <= hi:
          assert end <= q
          covered[max(0, end - k ** s + 1):end + 1] += 1
      if s < levels:  # at least w_s blocks unless the region reaches position 0
        count = sum(1 for g in range(t_max) if lo < g * k ** s <= hi)
        assert count >= windows[s] or lo < 0, (q, s, count)
    np.testing.assert_array_equal(covered[:q + 1], 1, err_msg=f"query {q}")
    assert covered[q + 1:].sum() == 0


@pytest.mark.parametrize("t", [16, 29])
@pytest.mark.parametrize("chunk", [4, 8])
def test_retina_chunked_equals_dense(t, chunk):
  dense = models.build(model_cfg("retina", implementation="dense"), 23, 64)
  chunked = models.build(model_cfg("retina", implementation="chunked", chunk_size=chunk), 23, 64)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, t), 1, 23)
  seg = jnp.array([[1] * 9 + [2] * (t - 9), [1] * t])
  params = tiny_models.params("retina")
  a = jax.jit(dense.apply)({"params": params}, tokens, seg)
  b = jax.jit(chunked.apply)({"params": params}, tokens, seg)
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_retina_window_sizes_bound_what_a_chunk_reaches():
  """The static per-level windows hold every key any query of a chunk needs."""
  sizes = retina.window_sizes(retina.RetinaSpec(3, (2, 1, 2), 5, "chunked"))
  t = jnp.arange(400)
  bounds = [np.asarray(b) for b in retina.region_bounds(t, 3, (2, 1, 2))]
  for q0 in range(0, 395, 5):
    for s, size in enumerate(sizes):
      first = bounds[s + 1][q0] // 3 ** s + 1
      last = bounds[s][q0 + 4] // 3 ** s
      assert last - first + 1 <= size
