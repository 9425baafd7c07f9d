"""Blockwise attention against the dense reference: the function alone, every
model, and mixed precision training (DESIGN.md section 4)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiertx import attention, metrics, models, profiling, train
from hiertx.errors import ConfigError
from tiny_models import MODELS, model_cfg

V = 23


def _inputs(q_len, k_end, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  s_len = len(k_end)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), dtype) for n in (q_len, s_len, s_len))
  return q, k, v


def _loss(fn, q, k, v, w_o, w_l):
  o, lse = fn(q, k, v)
  # Rows with no allowed key have lse = -inf; weight only the finite ones.
  return (o * w_o).sum() + jnp.where(jnp.isfinite(lse), lse * w_l, 0.0).sum()


# How chunk pairs are batched: as the backend's defaults give (all pairs in
# one batch here), one pair per batch (every query chunk split over batches),
# and the per-call cap on batches (several pairs per batch, some chunks split).
BATCHINGS = {"default": {}, "pair by pair": {"BATCH_SCORES": {"cpu": 1}, "MAX_BATCHES": 10**6},
             "capped": {"BATCH_SCORES": {"cpu": 1}, "MAX_BATCHES": 3}}


@pytest.mark.parametrize("batching", sorted(BATCHINGS))
@pytest.mark.parametrize("q_chunk,k_chunk", [(8, 16), (4, 4), (64, 64)])
def test_blockwise_equals_dense_with_its_gradients(q_chunk, k_chunk, batching, monkeypatch):
  """Fine queries over fine and coarse keys (not monotone), two documents, a
  query with no allowed key; chunkings that do and do not divide the lengths,
  as many chunk pairs and as one pair, batched in every way."""
  for name, value in BATCHINGS[batching].items():
    monkeypatch.setattr(attention, name, value)
  q_end = np.arange(37)
  k_end = np.concatenate([np.arange(37), np.arange(10) * 4])
  q_seg = jnp.asarray([[1] * 10 + [2] * 27, [1] * 37])
  k_seg = jnp.concatenate([q_seg, q_seg[:, ::4]], 1)
  q_seg = q_seg.at[0, 3].set(7)  # a query whose document has no keys at all
  q, k, v = _inputs(37, k_end)
  dense = lambda q, k, v: attention.dense(  # noqa: E731
      q, k, v, attention.end_rule_mask(q_end, k_end, q_seg, k_seg))
  block = lambda q, k, v: attention.blockwise(  # noqa: E731
      q, k, v, q_end, k_end, q_seg, k_seg, q_chunk, k_chunk)
  plan = attention.plan(q_end, k_end, q_chunk, k_chunk)
  assert (plan.pairs == 1) == (q_chunk == 64)
  (od, ld), (ob, lb) = dense(q, k, v), jax.jit(block)(q, k, v)
  np.testing.assert_allclose(ob, od, atol=1e-6)
  np.testing.assert_array_equal(np.isfinite(lb), np.isfinite(ld))
  assert not np.isfinite(ld[0, 3]).any() and float(jnp.abs(ob[0, 3]).max()) == 0.0
  np.testing.assert_allclose(jnp.where(jnp.isfinite(lb), lb, 0), jnp.where(jnp.isfinite(ld), ld, 0),
                             atol=1e-6)
  rng = np.random.default_rng(1)
  w_o, w_l = jnp.asarray(rng.normal(size=od.shape)), jnp.asarray(rng.normal(size=ld.shape))
  gd = jax.grad(functools.partial(_loss, dense), argnums=(0, 1, 2))(q, k, v, w_o, w_l)
  gb = jax.jit(jax.grad(functools.partial(_loss, block), argnums=(0, 1, 2)))(q, k, v, w_o, w_l)
  for a, b in zip(gd, gb):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_pairs_are_batched_by_whole_query_chunks_where_they_fit():
  causal = attention.plan(np.arange(64), np.arange(64), 16, 16)  # chunks read 1, 2, 3, 4 pairs
  got = [(list(qi), list(kj)) for qi, kj in attention.pair_batches(causal, 3)]
  assert got == [([0, 1, 1], [0, 0, 1]), ([2, 2, 2], [0, 1, 2]), ([3, 3, 3], [0, 1, 2]),
                 ([3], [3])]
  assert len(attention.pair_batches(causal, 100)) == 1
  # Every pair exactly once, in every batching.
  for size in (1, 2, 5, 10):
    pairs = [(i, j) for qi, kj in attention.pair_batches(causal, size) for i, j in zip(qi, kj)]
    assert sorted(pairs) == [(i, j) for i in range(4) for j in range(i + 1)]
  # The score budget sets the batch size; the cap on batches per call wins.
  assert attention.pairs_per_batch(36, 1, 8, 256 * 256, "cpu") == 8
  assert attention.pairs_per_batch(528, 1, 8, 256 * 256, "cpu") == 17
  assert attention.pairs_per_batch(36, 16, 8, 256 * 256, "gpu") == 16


def test_the_compiled_train_step_has_no_loops_over_chunk_pairs():
  """Several chunk pairs per attention call (sequence 64, chunks of 8), fine
  and coarse: the compiled step holds no while loop."""
  from conftest import config_path
  from hiertx import config as config_lib
  from hiertx import steps
  for name, arg in (("vanilla", "size=tiny"), ("hourglass", "size=tiny")):
    config = config_lib.load(config_path(name) + ":" + arg)
    config.model.attention_q_chunk = config.model.attention_k_chunk = 8
    run = steps.build_run(config, devices=jax.devices()[:1])
    text = run.train_step.lower(run.abstract_state, steps.batch_spec(config, run)).compile(
    ).as_text()
    assert config.data.seq_len >= 64 and " while(" not in text, name


def test_the_plan_skips_what_the_rule_forbids():
  """Causal self-attention computes about half the chunk pairs; fine queries
  over a coarse scale skip every coarse chunk that ends after a query chunk."""
  causal = attention.plan(np.arange(1024), np.arange(1024), 128, 128)
  assert causal.pairs == 8 * 9 // 2 and causal.scores == 36 * 128 * 128
  coarse = attention.plan(np.arange(1024), np.arange(64) * 16, 128, 16)
  assert coarse.pairs == sum(min(4, -(-(128 * (i + 1)) // 256)) for i in range(8))
  assert attention.score_count(np.arange(8), np.arange(8), attention.AttentionConfig("dense")) == 64


def test_merging_disjoint_key_sets_is_attention_over_their_union():
  k_end = np.arange(20)
  q_end, q_seg = np.arange(20), jnp.ones((2, 20), jnp.int32)
  q, k, v = _inputs(20, k_end)
  whole = attention.dense(q, k, v, attention.end_rule_mask(q_end, k_end, q_seg, q_seg))
  first = attention.dense(q, k[:, :7], v[:, :7],
                          attention.end_rule_mask(q_end, k_end[:7], q_seg, q_seg[:, :7]))
  rest = attention.dense(q, k[:, 7:], v[:, 7:],
                         attention.end_rule_mask(q_end, k_end[7:], q_seg, q_seg[:, 7:]))
  merged = attention.merge(first, rest)
  np.testing.assert_allclose(merged[0], whole[0], atol=1e-6)
  np.testing.assert_allclose(merged[1], whole[1], atol=1e-6)


def test_fused_causal_kernel_plumbing_matches_the_rule():
  """The call cuDNN gets on GPU (run here through its XLA implementation)
  computes the end rule for fine causal self-attention with documents; the
  dispatcher sends nothing else there."""
  seg = jnp.asarray([[1] * 9 + [2] * 23, [1] * 32])
  q, k, v = _inputs(32, np.arange(32))
  want = attention.dense(q, k, v, attention.end_rule_mask(np.arange(32), np.arange(32), seg,
                                                          seg))[0]
  got = attention.fused_causal(q, k, v, seg, seg, implementation=None)
  np.testing.assert_allclose(got, want, atol=1e-5)
  fine = np.arange(32)
  refusal = lambda q, k, dtype=jnp.bfloat16, backend="gpu": attention.cudnn_refusal(  # noqa: E731
      q, k, dtype, 64, backend=backend)
  assert refusal(fine, fine) == ""
  # Any scale's own strictly increasing ends: causal in index order.
  assert refusal(fine[::4] + 3, fine[::4] + 3) == ""
  assert "GPU" in refusal(fine, fine, backend="cpu")
  assert "float32" in refusal(fine, fine, jnp.float32)
  assert "own scale" in refusal(fine, fine[::2])
  assert "own scale" in refusal(fine[::-1], fine[::-1])
  coarse, cseg = fine[::4] + 3, seg[:, ::4]
  want = attention.dense(q[:, :8], k[:, :8], v[:, :8],
                         attention.end_rule_mask(coarse, coarse, cseg, cseg))[0]
  got = attention.fused_causal(q[:, :8], k[:, :8], v[:, :8], cseg, cseg, implementation=None)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_splash_kernel_matches_the_rule_on_a_mesh(monkeypatch):
  """The Pallas splash kernel TPUs get (run here in its interpreter): outputs
  and gradients of fine causal self-attention with documents equal `dense`,
  alone and under `shard_map` on the 8-device mesh (2 data x 2 fsdp x 2
  tensor); `attend` sends it nothing but that mask, and only on TPU."""
  t = attention.SPLASH_BLOCK * 2
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(8, t, 4, 16)), jnp.float32) for _ in range(3))
  # Rows with a second document starting at different places, one with none.
  starts = np.asarray([30, 129, 200, 255, 1, 100, 60, t])
  seg = jnp.asarray(np.where(np.arange(t)[None] < starts[:, None], 1, 2).astype(np.int32))
  fine = np.arange(t)
  ref = lambda q, k, v: attention.dense(  # noqa: E731
      q, k, v, attention.end_rule_mask(fine, fine, seg, seg))[0]
  np.testing.assert_allclose(attention.splash_causal(q, k, v, seg, interpret=True),
                             ref(q, k, v), atol=1e-5)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2),
                           ("data", "fsdp", "tensor"))
  monkeypatch.setattr(attention, "_backend", lambda: "tpu")
  cfg = attention.AttentionConfig("splash", 64, 64)
  attend = lambda q, k, v: attention.attend(q, k, v, fine, fine, seg, seg, cfg)  # noqa: E731
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  with jax.sharding.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(attend)(q, k, v))
    got, grads = jax.jit(jax.value_and_grad(lambda *a: (attend(*a) * w).sum(), (0, 1, 2)))(
        q, k, v)
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  want, want_grads = jax.value_and_grad(lambda *a: (ref(*a) * w).sum(), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, wg in zip(grads, want_grads):
    np.testing.assert_allclose(g, wg, atol=5e-5)
  # Coarse keys, or a length off the kernel's block: not the kernel; refused
  # unless a fallback is configured.
  assert attention.splash_refusal(fine, fine, backend="tpu") == ""
  assert attention.splash_refusal(fine[::2], fine[::2], backend="tpu") == ""
  assert "TPU" in attention.splash_refusal(fine, fine, backend="gpu")
  assert "own scale" in attention.splash_refusal(fine, fine[::4], backend="tpu")
  assert "multiple" in attention.splash_refusal(fine[:100], fine[:100], backend="tpu")
  cross = lambda cfg: lambda q, k, v: attention.attend(  # noqa: E731
      q, k[:, ::4], v[:, ::4], fine, fine[::4], seg, seg[:, ::4], cfg, site="x/attn")
  with pytest.raises(ConfigError, match="splash cannot run x/attn .*own scale"):
    jax.make_jaxpr(cross(cfg))(q, k, v)
  fallback = attention.AttentionConfig("splash", 64, 64, fallback="blockwise")
  assert "pallas_call" not in str(jax.make_jaxpr(cross(fallback))(q, k, v))


# Every model and variant: blockwise (small chunks, so several pairs and
# lengths that divide neither the chunks nor the pooling) equals dense. Content
# groups reach attention the same way whatever their source (index-ordered
# coarse self-attention, dense cross-scale attention): one variant of them,
# with attention pooling and upsampling.
EQUALITY = sorted(k for k in MODELS if not k.endswith(("_whitespace", "_learned")))


@pytest.mark.parametrize("key", EQUALITY)
def test_every_model_blockwise_equals_dense_logits_and_gradients(key):
  t = 29  # divides no tiny model's pooling nor the chunks below
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, t), 1, V)
  seg = jnp.asarray([[1] * 11 + [2] * 18, [1] * 3 + [2] * 26])
  pos = jnp.asarray([list(range(11)) + list(range(18)), list(range(3)) + list(range(26))])
  dense = models.build(model_cfg(key, attention="dense"), V, 64)
  block = models.build(model_cfg(key, attention="blockwise", attention_q_chunk=4,
                                 attention_k_chunk=8), V, 64)
  params = jax.jit(dense.init)(jax.random.PRNGKey(1), tokens)["params"]

  def loss(model, params):
    logits = model.apply({"params": params}, tokens, seg, pos)
    return (jax.nn.log_softmax(logits) * jax.nn.one_hot(tokens, V)).sum(), logits

  (_, ld), gd = jax.jit(jax.value_and_grad(functools.partial(loss, dense), has_aux=True))(params)
  (_, lb), gb = jax.jit(jax.value_and_grad(functools.partial(loss, block), has_aux=True))(params)
  np.testing.assert_allclose(lb, ld, atol=1e-5, rtol=0)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5),
                         gd, gb)


def test_bfloat16_training_tracks_float32(tiny_config, tmp_path):
  """The same tiny run in float32 and in mixed precision (bfloat16 matmuls and
  activations; float32 parameters, optimizer state, softmax and layer-norm
  statistics, logits and loss). Tolerance: a bfloat16 value carries a relative
  rounding error of at most 2^-9 (0.2%); the loss averages 512 tokens, so most
  of that cancels, and the two runs stay within 0.03% of each other here over
  20 steps. 1% leaves room for other shapes and CPUs and still catches a run
  that drifts (a bfloat16 optimizer or loss, or a diverging step, moves the
  losses by far more)."""
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config("top_down", model__dtype=dtype, train__log_every=1,
                         eval__every=20, train__checkpoint_every=20)
    workdir = str(tmp_path / dtype)
    train.train_and_evaluate(config, workdir)
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    losses[dtype] = np.array([r["train/loss"] for r in rows if "train/loss" in r])
  assert len(losses["bfloat16"]) == 20 and np.all(np.isfinite(losses["bfloat16"]))
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.01)
  assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.5
  assert not np.array_equal(losses["bfloat16"], losses["float32"])  # it did run in bf16


def test_profile_steps_write_a_trace_and_a_summary(tiny_config, tmp_path):
  config = tiny_config("vanilla", train__steps=4, train__profile_steps="2,3",
                       eval__every=4, train__checkpoint_every=4)
  train.train_and_evaluate(config, str(tmp_path))
  path = profiling.newest_trace(str(tmp_path))
  ops, total = profiling.top_ops(path, top=5)
  assert len(ops) == 5 and total > 0 and all(ms > 0 for _, ms, _ in ops)
  assert ops == sorted(ops, key=lambda o: -o[1])
  assert list(tmp_path.glob("profile/**/*.xplane.pb"))  # what TensorBoard reads


def _forced_gpu(monkeypatch):
  """`cudnn` sites traced on CPU: the backend reads as GPU and the kernel call
  runs its XLA twin (what the fused-kernel test above checks)."""
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  xla_twin = attention.fused_causal
  monkeypatch.setattr(attention, "fused_causal", lambda *a: xla_twin(*a[:5]))


def test_sites_get_the_kernel_at_every_scale_and_nothing_falls_back_silently(monkeypatch):
  """Hourglass with attention pooling and upsampling under `cudnn`: the
  self-attention of both scales takes the kernel (and computes what blockwise
  does), the cross-scale sites are refused by name, or run the configured
  fallback; every site is recorded with what it got."""
  _forced_gpu(monkeypatch)
  t = 24
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, t), 1, V)
  seg = jnp.asarray([[1] * 9 + [2] * 15, [1] * 24])
  pos = jnp.asarray([list(range(9)) + list(range(15)), list(range(24))])
  cfg = lambda **kw: model_cfg("hourglass_attention", dtype="bfloat16", **kw)  # noqa: E731
  blockwise = models.build(cfg(attention="blockwise"), V, 64)
  params = jax.jit(blockwise.init)(jax.random.PRNGKey(1), tokens)["params"]
  apply = lambda m: m.apply({"params": params}, tokens, seg, pos)  # noqa: E731
  refused = models.build(cfg(attention="cudnn"), V, 64)
  with pytest.raises(ConfigError, match=r"config.model.attention: cudnn cannot run "
                     r"\S+/attn \(\d+ queries x \d+ keys\): keys are not the queries' own "
                     r"scale; set model.attention_fallback"):
    jax.eval_shape(lambda: apply(refused))
  fused = models.build(cfg(attention="cudnn", attention_fallback="blockwise"), V, 64)
  with attention.record_sites() as sites:
    got = jax.jit(lambda: apply(fused))()
  want = jax.jit(lambda: apply(blockwise))()
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=0.05, rtol=0.05)
  kinds = {(s.queries, s.keys, s.implementation) for s in sites}
  # 1@1 2@3 1@1: fine (24) and coarse (8) self-attention on the kernel;
  # attention pooling (each group's query over its 3 members) and upsampling
  # (24 queries over 8 coarse keys) fall back, saying why.
  assert kinds == {(24, 24, "cudnn"), (8, 8, "cudnn"), (1, 3, "blockwise"),
                   (24, 8, "blockwise")}, kinds
  assert all(s.why for s in sites if s.implementation == "blockwise")
  assert all(not s.why for s in sites if s.implementation == "cudnn")
  lines = attention.sites_text(sites)
  assert len(lines) == 5 and "pre_1/block_{0..1}/attn: 8 queries x 8 keys -> cudnn [x2]" in lines, lines


def test_vanilla_float32_is_refused_by_cudnn_with_the_reason(monkeypatch):
  _forced_gpu(monkeypatch)
  model = models.build(model_cfg("vanilla", attention="cudnn"), V, 64)
  tokens = jnp.ones((1, 16), jnp.int32)
  with pytest.raises(ConfigError, match="float32 .cuDNN takes bfloat16 or float16"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
