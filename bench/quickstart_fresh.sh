#!/usr/bin/env bash
# The README's first command on a fresh clone (of the repository given, default .) in a fresh venv, timed:
#   bash bench/quickstart_fresh.sh [REPO]   (run it with nothing else running; the output is in /tmp/qs)
set -euo pipefail
rm -rf /tmp/qs && git clone -q "${1:-.}" /tmp/qs && cd /tmp/qs
cmd=$(awk '/^## Set up/{f=1} f && /^pip install/{print; exit}' README.md)
python3 -m venv /tmp/qs/.venv && . /tmp/qs/.venv/bin/activate
pip_part=${cmd%% && lowrank *}
run_part="lowrank ${cmd#* && lowrank }"
echo "+ $pip_part"; s=$(date +%s.%N)
eval "$pip_part" > /tmp/qs-pip.log 2>&1
m=$(date +%s.%N); echo "pip: $(echo "$m - $s" | bc) s"
echo "+ $run_part"
eval "$run_part" > /tmp/qs-out.log 2> /tmp/qs-err.log
e=$(date +%s.%N); echo "compress: $(echo "$e - $m" | bc) s; total: $(echo "$e - $s" | bc) s"
