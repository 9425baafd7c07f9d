r"""Top-down multi-scale LM (coarsest stack first, each finer stack gets its
pooled embeddings plus the upsampled coarser output).

  python -m hiertx.train --config=configs/top_down.py --workdir=/tmp/top_down
  python -m hiertx.train --config=configs/top_down.py --config.model.upsampling=attention ...
  python -m hiertx.train --config=configs/top_down.py --config.model.pool_factors='(4,)' \
      --config.model.layers_per_scale='(2,2)' --config.model.boundaries=whitespace ...

Sizes: tiny, small (default), base, paper30 (width 256: 4 fine + 10 at k=4 +
16 at k=16 = 30 layers).
"""

from hiertx import config as config_lib

SIZES = {
    # layers_per_scale (fine .. coarsest), pool_factors
    "tiny": ((1, 1, 1), (2, 2)),
    "small": ((2, 2, 2), (4, 4)),
    "base": ((3, 3, 3), (4, 4)),
    "paper30": ((4, 10, 16), (4, 4)),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", runlocal=False)
  c = config_lib.base_config()
  per_scale, factors = config_lib.choose(SIZES, arg.size, "size")
  c.model = config_lib.model_config(
      "top_down", arg.size, layers_per_scale=per_scale, pool_factors=factors)
  config_lib.apply_size_defaults(c, arg)
  return c
