# psycopg 3: its own test suite (tests/: psycopg and psycopg_pool, about 5,700 tests), run with
# pytest against the DSN given by --test-dsn, as its CI does. One result per test.
#
# The driver is psycopg[binary]==PSYCOPG_VERSION from PyPI (the C implementation over its own
# libpq; the pure-Python one over ctypes takes over 20 minutes a run on two cores). The PyPI
# sdist has no tests, so they come from the repository at the tag of that version:
#   PSYCOPG_SRC  a checkout of psycopg/psycopg, or its git directory
#   else $CACHE/src/psycopg, cloned once (git clone) when missing.
# Nothing is built from it: tests/, tools/pproxy_fix.py (the fixture that cuts connections) and
# psycopg_pool/ (pure Python, put on PYTHONPATH) only.
# Left out: mypy-marked tests (they type-check examples: no server involved, minutes of CPU), and
# tests/test_free_threading.py (meant for free-threaded Python; with psycopg-binary on the usual
# build it can crash the interpreter, which loses the whole run's report).
# Each test may take PSYCOPG_TEST_TIMEOUT seconds (pytest-timeout; default 120).
# PSYCOPG_MARKERS is the -m expression; default "not mypy and not refcount" (refcount: tests that
# count Python objects over hundreds of gc.collect() calls; no server involved, minutes of CPU).
# PSYCOPG_PYTEST_ARGS adds pytest arguments (e.g. "tests/test_copy.py").

PSYCOPG_URL=${PSYCOPG_URL:-https://github.com/psycopg/psycopg.git}
PSYCOPG_VERSION=${PSYCOPG_VERSION:-3.3.4}
PSYCOPG_TIMEOUT=${PSYCOPG_TIMEOUT:-1200}
PSYCOPG_TEST_TIMEOUT=${PSYCOPG_TEST_TIMEOUT:-120}
PSYCOPG_MARKERS=${PSYCOPG_MARKERS:-not mypy and not refcount}

suite_prepare() {
    apt_install python3-venv || return 1
    local src=${PSYCOPG_SRC:-$CACHE/src/psycopg} gitdir
    if [ ! -e "$src" ]; then
        mkdir -p "$(dirname "$src")"
        git clone --quiet --bare "$PSYCOPG_URL" "$src" || { echo "cannot get psycopg: set PSYCOPG_SRC"; return 1; }
    fi
    if [ -d "$src/.git" ]; then gitdir=$src/.git; elif [ -f "$src/HEAD" ]; then gitdir=$src; else
        echo "PSYCOPG_SRC must be a git checkout or git directory"; return 1; fi
    git --git-dir="$gitdir" cat-file -e "$PSYCOPG_VERSION^{commit}" 2>/dev/null \
        || { echo "no tag $PSYCOPG_VERSION in $src"; return 1; }
    rm -rf "$WORK/psycopg" && mkdir -p "$WORK/psycopg"
    git --git-dir="$gitdir" archive "$PSYCOPG_VERSION" psycopg_pool tests tools/pproxy_fix.py pyproject.toml | tar -x -C "$WORK/psycopg" || return 1
    local venv=$CACHE/psycopg-venv
    local want="psycopg[binary]==$PSYCOPG_VERSION anyio>=4.0 pproxy>=2.7 pytest>=6.2.5 pytest-timeout typing-extensions>=4.6"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.deps" 2>/dev/null)" != "$want" ]; then
        [ "$INSTALL" = 1 ] || { echo "psycopg venv missing (--no-install)"; return 1; }
        python3 -m venv "$venv" && "$venv/bin/pip" install -q $want || return 1
        echo "$want" >"$venv/.deps"
    fi
    echo "psycopg $("$venv/bin/python" -c 'import psycopg; print(psycopg.__version__, psycopg.pq.__impl__)'), tests and pool from tag $PSYCOPG_VERSION ($(git --git-dir="$gitdir" rev-parse --short "$PSYCOPG_VERSION^{commit}"))" | tee "$OUT/psycopg.version"
}

suite_run() {
    local mode=$1 port=$2 db=$3 dir=$4
    cd "$WORK/psycopg" || return 1
    local dsn="host=127.0.0.1 port=$port user=postgres password=postgres dbname=$db"
    local sel=() extra=()
    eval "extra=(${PSYCOPG_PYTEST_ARGS:-})"
    [ -n "$ONLY" ] && sel=(-k "$ONLY")
    # The fixtures' own proxy (pproxy) and direct connections take PG* from the environment.
    env -u PGHOST -u PGPORT -u PGDATABASE -u PGUSER -u PGPASSWORD \
        PYTHONPATH="$WORK/psycopg/psycopg_pool" \
        timeout -k 10 "$PSYCOPG_TIMEOUT" "$CACHE/psycopg-venv/bin/python" -bb -m pytest -q -rfE \
        -p no:randomly -m "$PSYCOPG_MARKERS" -o cache_dir="$dir/.pytest_cache" --timeout "$PSYCOPG_TEST_TIMEOUT" \
        --ignore=tests/test_free_threading.py --junitxml="$dir/junit.xml" --test-dsn "$dsn" "${sel[@]}" "${extra[@]}"
    echo "pytest exit $?"
    python3 "$HERE/junit2tsv.py" "$dir/junit.xml" >"$dir/results.tsv"
}
