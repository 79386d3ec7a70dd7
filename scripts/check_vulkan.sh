#!/usr/bin/env bash
# Build llama-cpp-python with the Vulkan backend in a separate venv and run the session tests against it.
# Without a GPU, Mesa's lavapipe gives a software Vulkan device. Needs root for apt (Debian/Ubuntu).
#
#   bash scripts/check_vulkan.sh            # venv in /tmp/ggfwd-vulkan
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/ggfwd-vulkan}
if ! dpkg -s libvulkan-dev glslc spirv-headers mesa-vulkan-drivers vulkan-tools >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq libvulkan-dev glslc spirv-headers mesa-vulkan-drivers vulkan-tools
fi
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName" || true
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_ARGS="-DGGML_VULKAN=on" "$VENV/bin/pip" install --no-cache-dir --force-reinstall --no-binary llama-cpp-python \
    "llama-cpp-python>=0.3.30"
"$VENV/bin/pip" install -q ".[demo]" pytest
"$VENV/bin/python" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
echo "== session and adapter tests on the Vulkan build"
(cd tests && "$VENV/bin/python" -m pytest -q test_session.py test_adapter.py)
echo "== losses: Vulkan build vs this machine's CPU build"
python3 scripts/backend_losses.py > /tmp/ggfwd-cpu-losses.json
"$VENV/bin/python" scripts/backend_losses.py --compare /tmp/ggfwd-cpu-losses.json
