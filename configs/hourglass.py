r"""Hourglass (Nawrot et al. 2021): pre blocks, shortening, inner hourglass,
upsampling into the residual, post blocks; hierarchy in `N@f` notation.

  python -m hiertx.train --config=configs/hourglass.py --workdir=/tmp/hourglass
  python -m hiertx.train --config=configs/hourglass.py \
      --config.model.hierarchy='2@1 16@3 2@1' ...   # the enwik8 shape of its Table 1

  python -m hiertx.train --config=configs/hourglass.py \
      --config.model.boundaries=whitespace ...   # groups end at spaces (docs/models.md)

Sizes: tiny, small (default), base, paper30 (width 256: 2@1 26@4 2@1).
"""

from hiertx import config as config_lib

SIZES = {
    "tiny": "1@1 1@2 1@4 1@2 1@1",
    "small": "2@1 4@4 2@1",
    "base": "2@1 8@4 2@1",
    "paper30": "2@1 26@4 2@1",
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", runlocal=False)
  c = config_lib.base_config()
  c.model = config_lib.model_config(
      "hourglass", arg.size, hierarchy=config_lib.choose(SIZES, arg.size, "size"))
  config_lib.apply_size_defaults(c, arg)
  return c
