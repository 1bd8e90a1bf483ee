#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the exact versions the suite is proven with.
# A fresh virtual environment gets PyTorch (pinned, from this machine's disk), then the newest
# release of every other dependency that pyproject.toml allows; pip freeze of it is the lock.
# Run the suite with the new lock (.ci/run) before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "${TORCH_PINS[@]}"
"$venv/bin/python" -m pip install -q -e '.[test]'
{
    echo "# The exact versions the suite passes with (pip constraints: pip install -c this -e '.[test]')."
    echo "# Made by scripts/lock.sh with $("$venv/bin/python" -V) on $(uname -m); torch's nvidia-* wheels"
    echo "# are pinned exactly as installed, so pip picks the same wheels again."
    "$venv/bin/python" -m pip freeze --exclude-editable --exclude imgcls
} >requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
