"""The documentation site builds with `mkdocs build --strict` (a broken link
or a page outside the nav fails), and docs/configuration.md is what
`python -m hiertx.config_reference` generates from the code."""

import os
import subprocess
import sys

from hiertx import config_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configuration_reference_is_generated_from_the_code():
  with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
    committed = f.read()
  assert committed == config_reference.render(), (
      "docs/configuration.md is stale: python -m hiertx.config_reference > docs/configuration.md")
  # Every field of every registered model has a row.
  for field in ("hierarchy", "boundaries", "dynamic_rules", "windows", "pool_factors"):
    assert f"| `{field}` |" in committed, field


def test_docs_build_strict(tmp_path):
  out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert (tmp_path / "site" / "adding-a-model" / "index.html").exists()
