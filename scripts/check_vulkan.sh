#!/usr/bin/env bash
# Build llama-cpp-python with the Vulkan backend in a separate venv and run the session tests against it.
# Without a GPU, Mesa's lavapipe gives a software Vulkan device. Needs root for apt (Debian/Ubuntu).
#
#   bash scripts/check_vulkan.sh            # venv in /tmp/ggfwd-vulkan
#
# llama.cpp's Vulkan backend needs Vulkan headers newer than Debian 12's (1.3.239 lacks
# VK_EXT_layer_settings). When the system headers are older than 1.3.275, the script downloads Debian 13's
# libvulkan-dev and spirv-headers packages and unpacks them into a private folder (nothing is installed
# system-wide from them); the loader, glslc and the lavapipe driver stay the system's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/ggfwd-vulkan}
WORK=${WORK:-/tmp/ggfwd-vulkan-headers}
if ! dpkg -s libvulkan-dev glslc spirv-headers mesa-vulkan-drivers vulkan-tools >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq libvulkan-dev glslc spirv-headers mesa-vulkan-drivers vulkan-tools
fi
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName|apiVersion" || true

header_version=$(dpkg-query -W -f='${Version}' libvulkan-dev | cut -d- -f1)
extra_cmake=""
if dpkg --compare-versions "$header_version" lt 1.3.275; then
    echo "system Vulkan headers $header_version are too old; unpacking Debian 13's into $WORK"
    mkdir -p "$WORK/lists/partial" "$WORK/debs" "$WORK/root"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$WORK/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$WORK/lists")
    apt-get "${apt_opts[@]}" update -qq
    (cd "$WORK/debs" && apt-get "${apt_opts[@]}" download libvulkan-dev spirv-headers)
    for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$WORK/root"; done
    extra_cmake="-DVulkan_INCLUDE_DIR=$WORK/root/usr/include -DCMAKE_PREFIX_PATH=$WORK/root/usr"
fi

if ls "$VENV"/lib/python3*/site-packages/llama_cpp/lib/libggml-vulkan.so >/dev/null 2>&1; then
    echo "reusing the Vulkan build in $VENV"
else
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    CMAKE_ARGS="-DGGML_VULKAN=on $extra_cmake" "$VENV/bin/pip" install --no-cache-dir --force-reinstall \
        --no-binary llama-cpp-python "llama-cpp-python>=0.3.30"
fi
"$VENV/bin/pip" install -q ".[demo]" pytest
# ggml's Vulkan backend ignores CPU-type devices (lavapipe) unless they are named explicitly.
export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
echo "== which device llama.cpp uses"
"$VENV/bin/python" -c "from ggfwd.demo import demo_model; from ggfwd.session import Session; Session(demo_model(), verbose=True)" \
    2>&1 | grep -E "ggml_vulkan: [0-9]|using device|offloaded" || { echo "no Vulkan device in use"; exit 1; }
echo "== adapter reloads through llama.cpp's own file loader"
"$VENV/bin/python" scripts/adapter_reload_check.py --reloads 60 || echo "FAILED: exit code $? (crash on adapter reloads)"
echo "== session and adapter tests on the Vulkan build"
(cd tests && "$VENV/bin/python" -m pytest -q test_session.py test_adapter.py) || echo "FAILED: exit code $?"
echo "== losses: Vulkan build vs this machine's CPU build"
python3 scripts/backend_losses.py > /tmp/ggfwd-cpu-losses.json
"$VENV/bin/python" scripts/backend_losses.py --compare /tmp/ggfwd-cpu-losses.json
