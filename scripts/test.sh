#!/usr/bin/env bash
# Set up (scripts/setup.sh, quick when already done), then run every check and the whole
# test suite. This is the command the README gives for tests and what CI (.ci/run) runs.
# All checks run even when one fails; the exit status is 1 if any failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

BIN="$ROOT/.venv/bin"
failed=()

step() {
  local name="$1"
  shift
  printf '\n=== %s: %s\n' "$name" "$*"
  if "$@"; then
    printf '=== %s: ok\n' "$name"
  else
    printf '=== %s: FAILED\n' "$name"
    failed+=("$name")
  fi
}

run_pytest() {
  local rc=0
  "$BIN/pytest" -q -p no:cacheprovider || rc=$?
  if ((rc == 5)); then
    echo "pytest collected no tests: the suite must run tests" >&2
  fi
  return "$rc"
}

step "ruff check" "$BIN/ruff" check .
step "ruff format" "$BIN/ruff" format --check .
step "mypy" "$BIN/mypy" src/blixard
step "import rules" "$BIN/python" scripts/check_imports.py
step "pytest" run_pytest

if ((${#failed[@]})); then
  printf '\nFAILED: %s\n' "$(IFS=,; echo "${failed[*]}")" >&2
  exit 1
fi
printf '\nall checks and tests passed\n'
