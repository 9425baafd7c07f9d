r"""Bottom-up multi-scale LM (fine -> coarse, aggregation layer, fine post blocks).

  python -m hiertx.train --config=configs/bottom_up.py --workdir=/tmp/bottom_up

Sizes: tiny, small (default), base, paper30 (width 256, 30 layers: 4 fine +
8 at k=4 + 14 at k=16 + aggregation + 3 post; the hierarchical side of the
paper's headline, compared with configs/vanilla.py:size=paper14).
"""

from hiertx import config as config_lib

SIZES = {
    # layers_per_scale (fine .. coarsest), pool_factors, post_layers
    "tiny": ((1, 1, 1), (2, 2), 1),
    "small": ((2, 2, 2), (4, 4), 1),
    "base": ((2, 3, 3), (4, 4), 1),
    "paper30": ((4, 8, 14), (4, 4), 3),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", runlocal=False)
  c = config_lib.base_config()
  per_scale, factors, post = config_lib.choose(SIZES, arg.size, "size")
  c.model = config_lib.model_config(
      "bottom_up", arg.size, layers_per_scale=per_scale, pool_factors=factors,
      post_layers=post)
  config_lib.apply_size_defaults(c, arg)
  return c
