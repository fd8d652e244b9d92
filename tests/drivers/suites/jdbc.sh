# pgjdbc (Debian's libpostgresql-jdbc-java) driven by jdbc/Scenarios.java: prepared statements
# (and pgjdbc's switch to a named server-side statement after prepareThreshold), binary
# transfer, batches, COPY through CopyManager, LISTEN/NOTIFY, Statement.cancel and
# setQueryTimeout, savepoints and autosave, fetch-size cursors, 32 MiB values, 30,000
# parameters, metadata, SCRAM/md5/wrong password, TLS, pg_terminate_backend, 2PC, 64
# concurrent connections. Written for bulkhead, not pgjdbc's own suite (that needs Gradle and
# its own fixtures). One result per scenario.

suite_prepare() {
    command -v java >/dev/null || apt_install default-jre-headless || return 1
    apt_install libpostgresql-jdbc-java || return 1
    JDBC_JAR=$(ls /usr/share/java/postgresql.jar /usr/share/java/postgresql-*.jar 2>/dev/null | head -n1)
    [ -n "$JDBC_JAR" ] || { echo "no postgresql.jar"; return 1; }
    echo "pgjdbc $(dpkg-query -W -f '${Version}' libpostgresql-jdbc-java), $(java -version 2>&1 | head -n1)" | tee "$OUT/jdbc.version"
}

suite_run() {
    local mode=$1 port=$2 db=$3 dir=$4
    JDBC_JAR=$(ls /usr/share/java/postgresql.jar /usr/share/java/postgresql-*.jar 2>/dev/null | head -n1)
    ONLY=$ONLY timeout -k 10 600 java -Xmx2g -cp "$JDBC_JAR" "$HERE/jdbc/Scenarios.java" 127.0.0.1 "$port" "$db" \
        >"$dir/results.tsv" 2>"$dir/stderr.log"
    echo "java exit $?"
    cat "$dir/results.tsv"
}
