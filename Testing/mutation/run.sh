#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3 (not part of `make test`).
#
#   Testing/mutation/run.sh [WORK_DIR [MUTANT_NAME...]]   # default: $TMPDIR/inversereg-mutation
#
# MUTANT_NAME (mutmut's names, '*' allowed, e.g. 'InverseRegLib.warp.x_warp__mutmut_*') reruns
# only those mutants, e.g. the survivors of the last run after new tests were added.
#
# Needs `pip install mutmut==3.8.1` in the environment that runs the tests. The repository is
# copied into WORK_DIR (mutmut writes its mutants/ folder and cache there, never into the
# checkout), the modules below are mutated one change at a time, and for each mutant only the
# tests that call the mutated function run (mutmut's coverage-based selection). The surviving
# mutants are listed in WORK_DIR/survivors.txt; `cd WORK_DIR && mutmut show NAME` shows one.
# docs/mutation_testing.md records the last run and what was done about each survivor.
#
# MODULES and TESTS can be overridden from the environment (space-separated paths).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${1:-${TMPDIR:-/tmp}/inversereg-mutation}"
shift || true
PYTHON="${PYTHON:-python}"
MODULES="${MODULES:-InverseRegLib/outputs.py InverseRegLib/metrics.py InverseRegLib/warp.py}"
# the tests that judge these modules from outside and are quick (a mutant in a function runs
# only the selected tests that call that function)
FI=Testing/Python/test_failure_injection.py
TESTS="${TESTS:-$FI::test_register_outputs_are_all_old_or_all_new $FI::test_a_failed_first_run_leaves_no_files \
$FI::test_the_report_names_every_file_and_nothing_else $FI::test_a_persistent_failure_never_deletes_the_previous_result \
$FI::test_when_one_previous_file_cannot_be_put_back_its_report_is_not_either \
Testing/Python/test_contract.py::test_python_api_files_honour_the_contract Testing/Python/test_metrics.py Testing/Python/test_warp.py Testing/Python/test_mutation_kills.py}"
CHILDREN="${CHILDREN:-2}"

"$PYTHON" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: pip install mutmut==3.8.1" >&2; exit 2; }
case "$WORK" in "$ROOT"|"$ROOT"/*) echo "WORK_DIR must be outside the checkout" >&2; exit 2;; esac

mkdir -p "$WORK"
# a fresh copy of what the tests need (mutmut's own mutants/ folder and cache stay in WORK)
rm -rf "$WORK/InverseRegLib" "$WORK/Testing" "$WORK/Resources"
cp -R "$ROOT/InverseRegLib" "$ROOT/Testing" "$ROOT/Resources" "$ROOT/pyproject.toml" "$WORK/"
find "$WORK/InverseRegLib" "$WORK/Testing" -name __pycache__ -prune -exec rm -rf {} +

{
  echo "[mutmut]"
  echo "source_paths = InverseRegLib"
  echo "only_mutate ="
  for m in $MODULES; do echo "    $m"; done
  echo "pytest_add_cli_args_test_selection ="
  for t in $TESTS; do echo "    $t"; done
  echo "pytest_add_cli_args ="
  echo "    -q"
  echo "    -p"
  echo "    no:cacheprovider"
  echo "    -k"
  echo "    not demo and not slow"
  echo "also_copy ="
  echo "    Testing"
  echo "    Resources"
  # torch is not fork-safe after it has run: fork each mutant from a clean server process
  echo "process_isolation = forkserver"
} > "$WORK/setup.cfg"

cd "$WORK"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
started=$(date +%s)
"$PYTHON" -m mutmut run --max-children "$CHILDREN" "$@" || true
"$PYTHON" -m mutmut results --all true > results.txt 2>&1 || "$PYTHON" -m mutmut results > results.txt 2>&1 || true
grep -E ": (survived|no tests)" results.txt > survivors.txt || true
echo "mutmut took $(( $(date +%s) - started )) s; $(wc -l < survivors.txt) survivors listed in $WORK/survivors.txt"
