#!/usr/bin/env bash
# Proves that the package installs and works outside the repository: builds a wheel from a clean
# copy of the committed tree, installs it (and, separately, an editable install) into fresh
# virtual environments, then imports the package, reads its package data and runs the console
# commands from a folder that is not the repository.
#
#   tools/check_install.sh [PYTHON]
#
# PYTHON (default: python3) must already have PaddlePaddle and the requirements installed; the
# fresh venvs see its site-packages through a .pth file. The build runs in pip's usual isolated
# build environment (pip fetches setuptools, as for any user); NO_BUILD_ISOLATION=1 builds with
# PYTHON's own setuptools instead (offline; setuptools >= 70.1, or the wheel package, needed).
set -euo pipefail
PYTHON=${1:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" -W ignore::UserWarning -c 'import paddle' || { echo "check_install: $PYTHON has no paddle"; exit 1; }
ISOLATION=()
if [ "${NO_BUILD_ISOLATION:-0}" = 1 ]; then ISOLATION=(--no-build-isolation); fi

git -C "$REPO" archive --format=tar HEAD | (mkdir -p "$WORK/src" && tar -x -C "$WORK/src")

check_env() {  # $1: venv folder
  local venv=$1
  cd "$WORK"   # not the repository: the import must come from the installed package
  "$venv/bin/python" - <<'PY'
import os, paddle_cae
from paddle_cae.data.imagenet_classes import imagenet_class_names
from paddle_cae.fast.kernels import extension
root = os.path.dirname(paddle_cae.__file__)
for name in ("block.cc", "optimizer.cc", "tokenizer.cc", "common.h"):
    assert os.path.isfile(os.path.join(root, "fast", "kernels", name)), f"{name} not installed"
assert os.path.isfile(os.path.join(root, "fast", "resample.c")), "resample.c not installed"
assert len(imagenet_class_names()) == 1000
print("import ok:", root)
PY
  for cmd in paddle-cae-pretrain paddle-cae-finetune paddle-cae-linprobe paddle-cae-infer; do
    "$venv/bin/$cmd" --help > "$WORK/help.txt" 2>&1 || { cat "$WORK/help.txt"; exit 1; }
    grep -q "usage" "$WORK/help.txt" || { echo "$cmd --help printed no usage"; exit 1; }
  done
  (cd "$WORK" && rm -rf demo_run && mkdir demo_run && cd demo_run &&
   "$venv/bin/paddle-cae-pretrain" --epochs 1 --max_train_step 2 --num_workers 0 > log.txt 2>&1 &&
   test -f output/demo_mae/checkpoint-0.pd) || { tail -20 "$WORK/demo_run/log.txt"; echo "demo outside the checkout failed"; exit 1; }
  echo "console commands ok (the pretraining demo runs outside the checkout)"
}

new_venv() {  # $1: folder
  "$PYTHON" -m venv "$1"
  local site
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$SITE" > "$site/_base_site.pth"
}

# wheel, regular install
new_venv "$WORK/venv_wheel"
"$WORK/venv_wheel/bin/python" -m pip wheel --quiet --no-deps "${ISOLATION[@]}" "$WORK/src" -w "$WORK/dist"
ls "$WORK/dist"
"$WORK/venv_wheel/bin/python" -m pip install --quiet --no-deps --no-index "$WORK"/dist/*.whl
check_env "$WORK/venv_wheel"

# editable install
new_venv "$WORK/venv_edit"
"$WORK/venv_edit/bin/python" -m pip install --quiet --no-deps "${ISOLATION[@]}" -e "$WORK/src"
check_env "$WORK/venv_edit"
echo "check_install: ok"
