# asyncpg: its own test suite, from the PyPI sdist (which ships tests/), run with pytest against
# a running server as asyncpg's harness allows (PGHOST set: it uses that server and does not
# start its own; tests that must edit pg_hba.conf or restart a cluster then skip or fail the
# same way directly and through bulkhead). The driver itself is the PyPI wheel of the same
# version. One result per test.
#   ASYNCPG_VERSION  default 0.32.0
# Left out: tests/test__sourcecode.py (runs flake8/mypy over the source; no server involved).

ASYNCPG_VERSION=${ASYNCPG_VERSION:-0.32.0}
ASYNCPG_TIMEOUT=${ASYNCPG_TIMEOUT:-900}

suite_prepare() {
    apt_install python3-venv || return 1
    local venv=$CACHE/asyncpg-venv want="asyncpg==$ASYNCPG_VERSION pytest distro"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.deps" 2>/dev/null)" != "$want" ]; then
        [ "$INSTALL" = 1 ] || { echo "asyncpg venv missing (--no-install)"; return 1; }
        python3 -m venv "$venv" && "$venv/bin/pip" install -q $want || return 1
        echo "$want" >"$venv/.deps"
    fi
    local sdist=$CACHE/src/asyncpg-$ASYNCPG_VERSION.tar.gz
    if [ ! -f "$sdist" ]; then
        mkdir -p "$CACHE/src"
        local d; d=$(mktemp -d)
        "$venv/bin/pip" download -q --no-deps --no-binary :all: -d "$d" "asyncpg==$ASYNCPG_VERSION" || return 1
        mv "$d"/asyncpg-*.tar.gz "$sdist" && rm -rf "$d"
    fi
    rm -rf "$WORK/asyncpg" && mkdir -p "$WORK/asyncpg"
    tar -xzf "$sdist" -C "$WORK/asyncpg" --strip-components=1 "asyncpg-$ASYNCPG_VERSION/tests" || return 1
    rm -f "$WORK/asyncpg/tests/test__sourcecode.py"
    # asyncpg's own pytest options (pyproject.toml), without --capture=no.
    printf '[pytest]\naddopts = --assert=plain --strict-markers --tb=native --import-mode=importlib\ntestpaths = tests\nfilterwarnings = default\n' >"$WORK/asyncpg/pytest.ini"
    echo "asyncpg $ASYNCPG_VERSION (tests from the sdist)" | tee "$OUT/asyncpg.version"
}

suite_run() {
    local mode=$1 port=$2 db=$3 dir=$4
    cd "$WORK/asyncpg" || return 1
    local sel=() extra=()
    eval "extra=(${ASYNCPG_PYTEST_ARGS:-})"
    [ -n "$ONLY" ] && sel=(-k "$ONLY")
    PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGPASSWORD=postgres PGDATABASE=$db \
        timeout -k 10 "$ASYNCPG_TIMEOUT" "$CACHE/asyncpg-venv/bin/python" -m pytest -q -rfE \
        -p no:cacheprovider --junitxml="$dir/junit.xml" "${sel[@]}" "${extra[@]}"
    echo "pytest exit $?"
    python3 "$HERE/junit2tsv.py" "$dir/junit.xml" >"$dir/results.tsv"
}
