# The harness every tests/scripts/test_*.sh sources: src (the source tree, $1 or two levels up
# from the test), tmp (a scratch folder removed at exit), ok / fail to report a check, and
# finish to print the verdict and exit 1 if any check failed.
# Usage, at the top of a test:  source "$(dirname "$0")/lib.sh" "${1:-}"
set -uo pipefail
src=$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/../..}" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
ok() { echo "ok: $*"; }
finish() {  # name
  [[ $fails -eq 0 ]] && echo "$1: all passed" || echo "$1: $fails failed"
  exit $((fails > 0))
}
