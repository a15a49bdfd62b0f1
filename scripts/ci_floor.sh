#!/usr/bin/env bash
# Runs a fast subset of the test suite on the oldest jax/jaxlib/flax/optax that
# pyproject.toml declares (its ">=" lower bounds, pinned with "=="), so that the
# declared floor cannot rot.
#
# Usage: scripts/ci_floor.sh [extra pytest args]
# Environment:
#   FLOOR_VENV  virtual environment to (re)use (default: $TMPDIR/gsparse-floor-venv);
#               it is created when missing and its pins are re-installed when
#               they differ from pyproject.toml.
#   PYTHON      interpreter that creates the venv (default: python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLOOR_VENV:-${TMPDIR:-/tmp}/gsparse-floor-venv}"
python="${PYTHON:-python3}"

# "jax>=X" in pyproject.toml -> "jax==X", for the four floors that matter.
pins="$("$python" - "$root/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
out = []
for name in ("jax", "jaxlib", "flax", "optax"):
  m = re.search(r'"%s>=([0-9][0-9.]*)' % name, deps)
  if not m:
    sys.exit(f"pyproject.toml declares no lower bound for {name}")
  out.append(f"{name}=={m.group(1)}")
print(" ".join(out))
EOF
)"
echo "floor: $pins"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.gsparse-floor-pins"
if [ "$(cat "$stamp" 2>/dev/null)" != "$pins" ]; then
  # The other runtime dependencies resolve to versions compatible with the pins.
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $pins \
    "chex>=0.1.87" "absl-py>=2.0" "numpy>=1.26" "matplotlib>=3.8" \
    "pytest>=8" "pytest-xdist>=3.5" "hypothesis>=6.100" "scipy>=1.11"
  echo "$pins" >"$stamp"
fi
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$root"
"$venv/bin/python" -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"

# The subset: the jax surface gsparse depends on, a few tests per area: top_k
# and its barrier under jit/vmap/grad and with stats, the FFI kernel, the
# exact selection, the flax linen and nnx wrappers and an nnx/optax training
# loop, shard_map and jit on 4 forced host devices (sharding_test's
# subprocess).
cd "$root"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q -n 2 --dist loadscope \
  tests/topk_test.py \
  tests/attention_test.py::test_jit_vmap_grad \
  tests/native_test.py::test_kernel_builds_and_is_used \
  tests/native_test.py::test_jit_vmap_grad_match_lax_top_k \
  tests/native_test.py::test_exact_selection_uses_the_kernel_and_agrees_with_block_search \
  tests/native_test.py::test_kernel_inside_shard_map \
  tests/selection_test.py::test_exact_jit_vmap_and_grad \
  tests/selection_test.py::test_exact_ties_follow_lax_top_k \
  "tests/flax_test.py::AttentionFnTest::test_nnx_matches_flax_dense_when_k_covers_sequence_causal" \
  "tests/flax_test.py::AttentionFnTest::test_linen_matches_flax_dense_when_k_covers_sequence_masked_causal" \
  tests/flax_test.py::LayerSelectionTest::test_nnx_walk_rank_and_configure \
  tests/flax_test.py::test_tiny_transformer_trains_with_sparse_attention \
  tests/sharding_test.py::test_topk_attention_sharded_matches_unsharded \
  tests/sharding_test.py::test_make_mesh_and_head_checks \
  "$@"
