#!/usr/bin/env bash
# Set up difflab in ./.venv. Idempotent: once done, a second run returns at once.
#   ./setup.sh         the package and what it needs to run
#   ./setup.sh --dev   also the test tools, and Debian's chromium + chromium-driver for the demo's
#                      browser tests (when run as root with apt-get; elsewhere those tests are skipped)
set -euo pipefail
cd "$(dirname "$0")"

has_chromium() { command -v chromium && command -v chromedriver; } >/dev/null

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
if [ -n "$extras" ] && ! has_chromium; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver for the browser tests" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: the demo's browser tests need chromium and chromium-driver" \
         "(sudo apt-get install chromium chromium-driver); until then they are skipped" >&2
  fi
fi
stamp=".venv/.setup-$(cat pyproject.toml constraints.txt setup.sh | sha1sum | cut -c1-12)"
[ -f "$stamp-dev" ] && exit 0  # a --dev setup holds everything a plain one does
stamp="$stamp${extras:+-dev}"
[ -f "$stamp" ] && exit 0

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null; then python=$candidate; break; fi
  done
fi
echo "setup: preparing .venv with $python (first time takes a minute or two)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check --quiet --constraint constraints.txt)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  elif .venv/bin/python -m pip install --disable-pip-version-check --quiet --no-index --no-deps torch==2.13.0 2>/dev/null; then
    "${pip[@]}" torch  # the local CPU wheel is in; now its dependencies
  else
    # No GPU: the CPU build first, so that nothing later pulls in the multi-GB CUDA build.
    "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
"${pip[@]}" --editable ".$extras"
rm -f .venv/.setup-*
touch "$stamp"
echo "setup: done" >&2
