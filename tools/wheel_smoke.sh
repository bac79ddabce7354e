#!/usr/bin/env bash
# The package as a user installs it (CI, after the tests): build the wheel, install it into a fresh
# virtual environment, and run commands from it in an empty folder, so that package data (configs,
# class lists, the WordNet table, the web page) is read from the installed wheel, never from this source tree.
# --system-site-packages reuses the installed dependencies (torch is large); larvseg itself must come
# from the wheel, which the script checks.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python -m pip wheel -q --no-deps -w "$scratch/dist" .
python -m venv --system-site-packages "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --no-deps "$scratch"/dist/larvseg-*.whl
cd "$scratch"
export OMP_NUM_THREADS=1 LARVSEG_DATA=  # nothing from this machine's data folders
export XDG_CACHE_HOME="$scratch/cache"  # the amp calibration and file indexes of this run stay in the scratch folder
unset PYTHONPATH  # larvseg must come from the wheel
py="$scratch/venv/bin/python"
"$py" - <<'PY'
import sys
from pathlib import Path
import larvseg, larvseg.serve
from larvseg.config import CONFIG_DIR
from larvseg.data.vocabulary import load_class_names
from larvseg.data.wordnet import WORDNET_TABLE, wordnet
where = Path(larvseg.__file__).resolve()
assert str(where).startswith(sys.prefix), f"larvseg imported from {where}, not from the wheel in {sys.prefix}"
assert larvseg.serve.PAGE.is_file() and (CONFIG_DIR / "tiny_cpu.yaml").is_file()
assert len(load_class_names("ade847")) == 847
assert WORDNET_TABLE.is_file() and wordnet().descendants("n02084071")  # the packaged WordNet table (dog*)
print(f"wheel: larvseg from {where.parent}")
PY
"$scratch/venv/bin/larvseg" train tiny_cpu train.work_dir=run > train.log
"$scratch/venv/bin/larvseg" predict run/final.safetensors work_dirs/tiny_cpu_data/A847/images/validation --out preds --device cpu > predict.log
test -s preds/areas.json
echo "wheel smoke run: train tiny_cpu and predict from the installed wheel: ok"
