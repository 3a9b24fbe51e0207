#!/usr/bin/env bash
# The declared minimums are true: install every runtime dependency at the lowest version pyproject.toml allows
# (each `name>=X` becomes `name==X`) into a fresh venv, then run the test suite there.
#
#   bash scripts/check_floors.sh                 # the whole suite (about as long as one normal run)
#   bash scripts/check_floors.sh tests/test_cli.py -x    # arguments go to pytest
#
# transformers is not installed: its own floors are the transformers matrix's job (.ci/run), and this run is also
# the suite without transformers (its tests skip, the rest must pass). The test extra is installed at its newest.
# The venv is .venv-floors (FLOORS_VENV=path to change it); it is rebuilt from nothing on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLOORS_VENV:-.venv-floors}"

python3 -m venv --clear "$venv"
. "$venv/bin/activate"
floors=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = []
for dep in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", dep)
    if not m:
        raise SystemExit(f"check_floors: {dep!r} has no plain `>=` floor to install; give it one.")
    version = m[2] if m[2].count(".") >= 2 else m[2] + ".0"
    pins.append(f"{m[1]}=={version}")
print(" ".join(pins))
PY
)
echo "floors: $floors"
pip install -q -e ".[test]" $floors
python - <<'PY'
import importlib.metadata as md, tomllib, re
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", dep)[0]
    print(f"  {name} {md.version(name)}")
PY
python -m pytest -q -p no:cacheprovider "$@"
