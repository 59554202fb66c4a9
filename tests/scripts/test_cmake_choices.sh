#!/usr/bin/env bash
# The CMake choices PION_CUDA, PION_MPI and PION_CUDNN: a value other than AUTO, ON or OFF stops
# the configure step with a message naming the option (it would otherwise read as AUTO).
# Usage: tests/scripts/test_cmake_choices.sh SOURCE_DIR (ctest: ScriptCmakeChoices).
source "$(dirname "$0")/lib.sh" "${1:-}"

for choice in PION_CUDA PION_MPI PION_CUDNN; do
  if cmake -S "$src" -B "$tmp/build-$choice" "-D$choice=MAYBE" >"$tmp/$choice.log" 2>&1; then
    fail "$choice=MAYBE configured"
  elif grep -q "$choice must be AUTO, ON or OFF, got 'MAYBE'" "$tmp/$choice.log"; then
    ok "$choice=MAYBE stops the configure step, naming it"
  else
    fail "$choice=MAYBE: no message naming it"; tail -5 "$tmp/$choice.log"
  fi
done

finish test_cmake_choices
