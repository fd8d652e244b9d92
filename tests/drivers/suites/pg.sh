# node-postgres (`pg`): its own integration suite, packages/pg/test/integration/**/*-tests.js,
# each file run by itself with node as its Makefile's `test-integration` does. One result per
# file: pass when node exits 0.
#
# Source: the npm tarball has no tests, so the suite comes from the repository:
#   NODE_POSTGRES_SRC  a checkout of brianc/node-postgres, or its git directory
#   else $CACHE/src/node-postgres, cloned once (git clone) when missing.
#   NODE_POSTGRES_REF  commit to use (default: the one these results were made with; HEAD if absent)
# Nothing is built: lib/ and test/ are plain JavaScript; pg's dependencies (pg-protocol,
# pg-types, pg-pool, ...) and the test-only ones come from the npm registry at the versions the
# source's package.json names.

NODE_POSTGRES_URL=${NODE_POSTGRES_URL:-https://github.com/brianc/node-postgres.git}
NODE_POSTGRES_REF=${NODE_POSTGRES_REF:-c9e57617}
PG_TEST_TIMEOUT=${PG_TEST_TIMEOUT:-120}

suite_prepare() {
    command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm || return 1
    local src=${NODE_POSTGRES_SRC:-$CACHE/src/node-postgres} gitdir
    if [ ! -e "$src" ]; then
        mkdir -p "$(dirname "$src")"
        git clone --quiet "$NODE_POSTGRES_URL" "$src" || { echo "cannot get node-postgres: set NODE_POSTGRES_SRC"; return 1; }
    fi
    if [ -d "$src/.git" ]; then gitdir=$src/.git; elif [ -f "$src/HEAD" ]; then gitdir=$src; else gitdir=""; fi
    rm -rf "$WORK/pg" && mkdir -p "$WORK/pg"
    if [ -n "$gitdir" ]; then
        local ref=$NODE_POSTGRES_REF
        git --git-dir="$gitdir" cat-file -e "$ref^{commit}" 2>/dev/null || ref=HEAD
        echo "node-postgres $(git --git-dir="$gitdir" rev-parse --short "$ref") ($(git --git-dir="$gitdir" log -1 --format=%cs "$ref"))" | tee "$WORK/pg.version"
        git --git-dir="$gitdir" archive "$ref" packages/pg | tar -x -C "$WORK/pg" --strip-components=2
    else
        cp -r "$src/packages/pg/." "$WORK/pg/"
        echo "node-postgres from $src" | tee "$WORK/pg.version"
    fi
    cp "$WORK/pg.version" "$OUT/pg.version"
    # Dependencies from npm, at the versions packages/pg/package.json asks for.
    local deps
    deps=$(node -e '
        const p = require(process.argv[1]);
        const want = Object.assign({}, p.dependencies);
        for (const d of ["async", "bluebird", "co", "pg-copy-streams"]) if (p.devDependencies[d]) want[d] = p.devDependencies[d];
        console.log(Object.entries(want).map(([k, v]) => k + "@" + v).sort().join(" "));
    ' "$WORK/pg/package.json") || return 1
    local nm=$CACHE/node-postgres-deps
    mkdir -p "$nm"
    if [ ! -f "$nm/.deps" ] || [ "$(cat "$nm/.deps")" != "$deps" ]; then
        [ "$INSTALL" = 1 ] || { echo "npm dependencies missing (--no-install)"; return 1; }
        echo "npm install $deps"
        (cd "$nm" && echo '{"name":"bulkhead-drivers-pg","private":true}' >package.json \
            && npm install --no-audit --no-fund --silent $deps) || return 1
        echo "$deps" >"$nm/.deps"
    fi
    ln -sfn "$nm/node_modules" "$WORK/pg/node_modules"
}

suite_run() {
    local mode=$1 port=$2 db=$3 dir=$4 f name t0 rc
    cd "$WORK/pg" || return 1
    : >"$dir/results.tsv"
    mkdir -p "$dir/files"
    export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGPASSWORD=postgres PGDATABASE=$db \
        SCRAM_TEST_PGUSER=scram_test SCRAM_TEST_PGPASSWORD=test4scram \
        SCRAM_TEST_PGUSER_UNICODE=scram_unicode_test SCRAM_TEST_PGPASSWORD_UNICODE=$'IX-\xe2\x85\xa8' # IX-U+2168
    find test/integration -name '*-tests.js' | LC_ALL=C sort | while read -r f; do
        name=${f#test/integration/}
        [ -n "$ONLY" ] && [[ $name != *$ONLY* ]] && continue
        t0=$(date +%s%N)
        timeout -k 5 "$PG_TEST_TIMEOUT" node "$f" >"$dir/files/${name//\//__}.log" 2>&1 </dev/null
        rc=$?
        if [ $rc = 0 ]; then st=pass; else st=fail; fi
        printf '%s\t%s\t%.1f\t%s\n' "$name" "$st" "$(( ($(date +%s%N) - t0) / 1000000 ))e-3" "rc=$rc" >>"$dir/results.tsv"
        echo "$name $st rc=$rc"
    done
}
