#!/usr/bin/env bash
# CI, second venv: what a phone under Termux has. No torch, transformers or matplotlib; the federated extra
# (Flower, for `ggfwd join`) where Python >= 3.11; llama-cpp-python compiled with the flags llama.cpp's
# Android/Termux builds use; then the client-side tests, and the Flower tests (real SuperLink and SuperNodes on
# 127.0.0.1).
#
# pip's wheel cache does not key wheels on CMAKE_ARGS: a cached default build would be reused silently. The
# wheel is built with a cache folder of its own, named after the flags, and the build's system info is
# checked before anything runs on it.
set -euo pipefail
cd "$(dirname "$0")/.."

FLAGS="-DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF"
VENV=${TERMUX_VENV:-build/venv-termux}  # build/ is git-ignored
CACHE="build/pip-cache-termux-$(printf '%s' "$FLAGS" | sha1sum | cut -c1-12)"
# the same llama-cpp-python as the main venv when there is one, so both CI legs test one engine version
VERSION=$( (.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))" 2>/dev/null) || true)
SPEC="llama-cpp-python${VERSION:+==$VERSION}"

start=$(date +%s)
python3 -m venv --clear "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
echo "termux.sh: building $SPEC with CMAKE_ARGS=\"$FLAGS\" (cache $CACHE)"
CMAKE_ARGS="$FLAGS" pip install --quiet --cache-dir "$CACHE" --no-binary llama-cpp-python "$SPEC"

python - <<'EOF'
import llama_cpp

info = llama_cpp.llama_print_system_info()
info = info.decode() if isinstance(info, bytes) else str(info)
print("termux.sh: llama.cpp system info:", " ".join(info.split()))
for feature in ("OPENMP = 1", "LLAMAFILE = 1"):
    if feature in info:
        raise SystemExit(f"termux.sh: the build still has {feature}: CMAKE_ARGS did not apply")
EOF

# the project with its core dependencies and the federated extra (empty below Python 3.11), and the test runner
pip install --quiet --cache-dir "$CACHE" ".[federated]"
pip install --quiet --cache-dir "$CACHE" pytest hypothesis
python - <<'EOF'
import importlib.util
import sys

present = [m for m in ("torch", "transformers", "matplotlib") if importlib.util.find_spec(m)]
if present:
    raise SystemExit(f"termux.sh: the phone venv has {present}")
if sys.version_info >= (3, 11) and importlib.util.find_spec("flwr") is None:
    raise SystemExit("termux.sh: the federated extra did not install flwr")
EOF

# the tests of the client side: scoring, training, calibration, the CLI, device profiles, and the import check
pytest -q -p no:cacheprovider tests/test_no_torch.py tests/test_devices.py tests/test_profiles.py \
    tests/test_session.py tests/test_trainer.py tests/test_estimator.py tests/test_perturbation.py \
    tests/test_adapter.py tests/test_calibration.py tests/test_tasks.py tests/test_cli.py \
    tests/test_federation.py tests/test_flower.py
echo "termux.sh: passed in $(( $(date +%s) - start )) s"
