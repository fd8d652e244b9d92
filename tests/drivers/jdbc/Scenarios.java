// pgjdbc scenarios for tests/drivers: what a Java application does with PostgreSQL, each a named
// test. Run: java -cp postgresql.jar Scenarios.java HOST PORT DATABASE
// Prints one line per scenario: name<TAB>pass|fail<TAB>seconds<TAB>message.
import java.io.ByteArrayInputStream;
import java.io.StringReader;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class Scenarios {
    static String host, db;
    static int port;

    interface Body { void run() throws Exception; }

    static Connection connect(String... props) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", "postgres");
        p.setProperty("password", "postgres");
        p.setProperty("sslmode", "disable");
        for (int i = 0; i + 1 < props.length; i += 2) p.setProperty(props[i], props[i + 1]);
        return DriverManager.getConnection("jdbc:postgresql://" + host + ":" + port + "/" + db, p);
    }

    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    static void eq(Object want, Object got, String what) {
        if (!Objects.equals(want, got)) throw new AssertionError(what + ": want " + want + ", got " + got);
    }

    static String state(Throwable e) {
        return e instanceof SQLException ? ((SQLException) e).getSQLState() : null;
    }

    static long scalarLong(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getLong(1);
        }
    }

    static void test(String name, Body body) {
        if (ONLY != null && !name.contains(ONLY)) return;
        long t0 = System.nanoTime();
        String status = "pass", msg = "";
        try {
            body.run();
        } catch (Throwable e) {
            status = "fail";
            msg = e.getClass().getSimpleName() + (state(e) != null ? " [" + state(e) + "]" : "") + ": " + e.getMessage();
            e.printStackTrace(System.err);
        }
        msg = msg.replace('\t', ' ').replace('\n', ' ');
        if (msg.length() > 300) msg = msg.substring(0, 300);
        System.out.printf(Locale.ROOT, "%s\t%s\t%.2f\t%s%n", name, status, (System.nanoTime() - t0) / 1e9, msg);
        System.out.flush();
    }

    static String ONLY = System.getenv("ONLY") == null || System.getenv("ONLY").isEmpty() ? null : System.getenv("ONLY");

    public static void main(String[] args) throws Exception {
        host = args[0];
        port = Integer.parseInt(args[1]);
        db = args[2];

        test("connect_and_version", () -> {
            try (Connection c = connect()) {
                check(c.getMetaData().getDatabaseProductVersion().startsWith("15"), "server version");
                eq(1L, scalarLong(c, "SELECT 1"), "select 1");
            }
        });

        test("backend_pid_matches_server", () -> {
            try (Connection c = connect(); Connection other = connect()) {
                int pid = ((PGConnection) c).getBackendPID();
                eq((long) pid, scalarLong(c, "SELECT pg_backend_pid()"), "getBackendPID vs pg_backend_pid()");
                eq(1L, scalarLong(other, "SELECT count(*) FROM pg_stat_activity WHERE pid = " + pid), "pid in pg_stat_activity");
            }
        });

        for (String mode : new String[] {"extended", "extendedForPrepared", "simple"}) {
            test("prepared_statement_reuse_" + mode, () -> {
                // prepareThreshold=3: from the third execution on, a named server-side statement.
                try (Connection c = connect("prepareThreshold", "3", "preferQueryMode", mode);
                     PreparedStatement ps = c.prepareStatement("SELECT $1::int + ?::int AS s, ?::text AS t".replace("$1", "?"))) {
                    for (int i = 0; i < 20; i++) {
                        ps.setInt(1, i);
                        ps.setInt(2, 1);
                        ps.setString(3, "x" + i);
                        try (ResultSet r = ps.executeQuery()) {
                            r.next();
                            eq(i + 1, r.getInt(1), "sum");
                            eq("x" + i, r.getString(2), "text");
                        }
                    }
                }
            });
        }

        test("prepared_statement_force_binary", () -> {
            try (Connection c = connect("prepareThreshold", "-1");
                 PreparedStatement ps = c.prepareStatement("SELECT ?::int8, ?::float8, ?::numeric, ?::timestamptz, ?::bytea, ?::uuid")) {
                UUID u = UUID.randomUUID();
                Timestamp ts = Timestamp.valueOf("2024-02-29 12:34:56.789");
                for (int i = 0; i < 5; i++) {
                    ps.setLong(1, Long.MAX_VALUE - i);
                    ps.setDouble(2, 1.5 * i);
                    ps.setBigDecimal(3, new java.math.BigDecimal("12345678901234567890.123456789"));
                    ps.setTimestamp(4, ts);
                    ps.setBytes(5, new byte[] {0, 1, 2, (byte) 255});
                    ps.setObject(6, u);
                    try (ResultSet r = ps.executeQuery()) {
                        r.next();
                        eq(Long.MAX_VALUE - i, r.getLong(1), "int8");
                        eq(1.5 * i, r.getDouble(2), "float8");
                        eq(new java.math.BigDecimal("12345678901234567890.123456789"), r.getBigDecimal(3), "numeric");
                        eq(ts, r.getTimestamp(4), "timestamptz");
                        check(Arrays.equals(new byte[] {0, 1, 2, (byte) 255}, r.getBytes(5)), "bytea");
                        eq(u, r.getObject(6), "uuid");
                    }
                }
            }
        });

        test("prepared_statement_plan_invalidated", () -> {
            // A cached server-side statement whose result type changes under it: the driver
            // sees 0A000 "cached plan must not change result type" and re-prepares (autosave).
            try (Connection c = connect("prepareThreshold", "1", "autosave", "conservative")) {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS jdbc_inval; CREATE TABLE jdbc_inval (a int)");
                    s.execute("INSERT INTO jdbc_inval VALUES (1)");
                }
                c.setAutoCommit(false);
                try (PreparedStatement ps = c.prepareStatement("SELECT * FROM jdbc_inval")) {
                    for (int i = 0; i < 3; i++) try (ResultSet r = ps.executeQuery()) { r.next(); }
                    try (Statement s = c.createStatement()) { s.execute("ALTER TABLE jdbc_inval ADD COLUMN b text DEFAULT 'x'"); }
                    try (ResultSet r = ps.executeQuery()) {
                        r.next();
                        eq("x", r.getString(2), "new column");
                    }
                }
                c.commit();
            }
        });

        test("batch_insert", () -> {
            for (String rewrite : new String[] {"false", "true"}) {
                try (Connection c = connect("reWriteBatchedInserts", rewrite)) {
                    try (Statement s = c.createStatement()) {
                        s.execute("DROP TABLE IF EXISTS jdbc_batch; CREATE TABLE jdbc_batch (id int primary key, v text)");
                    }
                    c.setAutoCommit(false);
                    try (PreparedStatement ps = c.prepareStatement("INSERT INTO jdbc_batch VALUES (?, ?)")) {
                        for (int i = 0; i < 5000; i++) {
                            ps.setInt(1, i);
                            ps.setString(2, "v" + i);
                            ps.addBatch();
                        }
                        ps.executeBatch();
                    }
                    c.commit();
                    eq(5000L, scalarLong(c, "SELECT count(*) FROM jdbc_batch"), "rows (rewrite=" + rewrite + ")");
                }
            }
        });

        test("batch_with_error", () -> {
            try (Connection c = connect()) {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS jdbc_batch2; CREATE TABLE jdbc_batch2 (id int primary key)");
                }
                try (PreparedStatement ps = c.prepareStatement("INSERT INTO jdbc_batch2 VALUES (?)")) {
                    for (int i : new int[] {1, 2, 2, 3}) { ps.setInt(1, i); ps.addBatch(); }
                    ps.executeBatch();
                    throw new AssertionError("duplicate key not reported");
                } catch (BatchUpdateException e) {
                    eq("23505", e.getSQLState() != null ? e.getSQLState() : state(e.getNextException()), "sqlstate");
                }
                eq(1L, scalarLong(c, "SELECT 1"), "connection usable after a failed batch");
            }
        });

        test("copy_in_and_out", () -> {
            try (Connection c = connect()) {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS jdbc_copy; CREATE TABLE jdbc_copy (id int, v text)");
                }
                CopyManager cm = ((PGConnection) c).getCopyAPI();
                StringBuilder sb = new StringBuilder();
                for (int i = 0; i < 100000; i++) sb.append(i).append('\t').append("row ").append(i).append('\n');
                long n = cm.copyIn("COPY jdbc_copy FROM STDIN", new StringReader(sb.toString()));
                eq(100000L, n, "copy in count");
                StringWriter w = new StringWriter();
                long m = cm.copyOut("COPY (SELECT * FROM jdbc_copy ORDER BY id) TO STDOUT", w);
                eq(100000L, m, "copy out count");
                eq(sb.toString(), w.toString(), "copy out content");
            }
        });

        test("copy_in_error", () -> {
            try (Connection c = connect()) {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS jdbc_copy2; CREATE TABLE jdbc_copy2 (id int)");
                }
                CopyManager cm = ((PGConnection) c).getCopyAPI();
                try {
                    cm.copyIn("COPY jdbc_copy2 FROM STDIN", new ByteArrayInputStream("1\nnot a number\n".getBytes(StandardCharsets.UTF_8)));
                    throw new AssertionError("bad COPY data accepted");
                } catch (SQLException e) {
                    eq("22P02", e.getSQLState(), "sqlstate");
                }
                eq(0L, scalarLong(c, "SELECT count(*) FROM jdbc_copy2"), "nothing copied");
            }
        });

        test("listen_notify", () -> {
            try (Connection l = connect(); Connection n = connect()) {
                try (Statement s = l.createStatement()) { s.execute("LISTEN jdbc_chan"); }
                int npid = ((PGConnection) n).getBackendPID();
                try (Statement s = n.createStatement()) { s.execute("NOTIFY jdbc_chan, 'hello'"); s.execute("SELECT pg_notify('jdbc_chan', 'world')"); }
                List<PGNotification> got = new ArrayList<>();
                long deadline = System.currentTimeMillis() + 5000;
                while (got.size() < 2 && System.currentTimeMillis() < deadline) {
                    PGNotification[] ns = ((PGConnection) l).getNotifications(500);
                    if (ns != null) got.addAll(Arrays.asList(ns));
                }
                eq(2, got.size(), "notifications");
                eq("hello", got.get(0).getParameter(), "payload");
                eq(npid, got.get(0).getPID(), "notifying pid");
            }
        });

        test("statement_cancel", () -> {
            try (Connection c = connect(); Statement s = c.createStatement()) {
                ScheduledExecutorService ex = Executors.newSingleThreadScheduledExecutor();
                ex.schedule(() -> { try { s.cancel(); } catch (SQLException e) { throw new RuntimeException(e); } }, 500, TimeUnit.MILLISECONDS);
                long t0 = System.nanoTime();
                try {
                    s.execute("SELECT pg_sleep(10)");
                    throw new AssertionError("not cancelled");
                } catch (SQLException e) {
                    eq("57014", e.getSQLState(), "sqlstate");
                } finally {
                    ex.shutdown();
                }
                check((System.nanoTime() - t0) < 5_000_000_000L, "cancel took too long");
                eq(1L, scalarLong(c, "SELECT 1"), "connection usable after cancel");
            }
        });

        test("query_timeout", () -> {
            try (Connection c = connect(); Statement s = c.createStatement()) {
                s.setQueryTimeout(1);
                try {
                    s.execute("SELECT pg_sleep(10)");
                    throw new AssertionError("not timed out");
                } catch (SQLException e) {
                    eq("57014", e.getSQLState(), "sqlstate");
                }
                s.setQueryTimeout(0);
                eq(1L, scalarLong(c, "SELECT 1"), "connection usable after timeout");
            }
        });

        test("transactions_and_savepoints", () -> {
            try (Connection c = connect()) {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS jdbc_tx; CREATE TABLE jdbc_tx (id int)");
                }
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    s.execute("INSERT INTO jdbc_tx VALUES (1)");
                    Savepoint sp = c.setSavepoint();
                    s.execute("INSERT INTO jdbc_tx VALUES (2)");
                    c.rollback(sp);
                    s.execute("INSERT INTO jdbc_tx VALUES (3)");
                }
                c.commit();
                try (Statement s = c.createStatement()) { s.execute("INSERT INTO jdbc_tx VALUES (4)"); }
                c.rollback();
                c.setAutoCommit(true);
                eq(2L, scalarLong(c, "SELECT count(*) FROM jdbc_tx"), "rows");
                eq(4L, scalarLong(c, "SELECT sum(id) FROM jdbc_tx"), "sum");
            }
        });

        test("error_in_transaction_and_autosave", () -> {
            try (Connection c = connect()) {
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    try { s.execute("SELECT 1/0"); throw new AssertionError("no error"); }
                    catch (SQLException e) { eq("22012", e.getSQLState(), "division by zero"); }
                    try { s.execute("SELECT 1"); throw new AssertionError("no 25P02"); }
                    catch (SQLException e) { eq("25P02", e.getSQLState(), "aborted transaction"); }
                }
                c.rollback();
                eq(1L, scalarLong(c, "SELECT 1"), "after rollback");
            }
            try (Connection c = connect("autosave", "always")) {
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    try { s.execute("SELECT 1/0"); } catch (SQLException e) { eq("22012", e.getSQLState(), "division by zero"); }
                    eq(1L, scalarLong(c, "SELECT 1"), "autosave rolled back to the savepoint");
                }
                c.commit();
            }
        });

        test("fetch_size_cursor", () -> {
            // autocommit off + fetchSize: Execute with a row limit, PortalSuspended, more Executes.
            try (Connection c = connect()) {
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    s.setFetchSize(100);
                    long n = 0, sum = 0;
                    try (ResultSet r = s.executeQuery("SELECT g FROM generate_series(1, 10000) g")) {
                        while (r.next()) { n++; sum += r.getLong(1); }
                    }
                    eq(10000L, n, "rows");
                    eq(50005000L, sum, "sum");
                }
                c.commit();
            }
        });

        test("large_values", () -> {
            try (Connection c = connect(); PreparedStatement ps = c.prepareStatement("SELECT length(?::bytea), md5(?::bytea), ?::bytea")) {
                byte[] big = new byte[32 * 1024 * 1024];
                new Random(1).nextBytes(big);
                ps.setBytes(1, big);
                ps.setBytes(2, big);
                ps.setBytes(3, big);
                try (ResultSet r = ps.executeQuery()) {
                    r.next();
                    eq((long) big.length, r.getLong(1), "length");
                    check(Arrays.equals(big, r.getBytes(3)), "bytes round trip");
                }
            }
        });

        test("many_parameters", () -> {
            // 30,000 Bind parameters (the protocol's limit is 65,535) in one ARRAY[...].
            int n = 30000;
            StringBuilder sql = new StringBuilder("SELECT (SELECT sum(x) FROM unnest(ARRAY[");
            for (int i = 0; i < n; i++) sql.append(i == 0 ? "?" : ",?");
            sql.append("]::int[]) x)");
            try (Connection c = connect(); PreparedStatement ps = c.prepareStatement(sql.toString())) {
                for (int i = 1; i <= n; i++) ps.setInt(i, 1);
                try (ResultSet r = ps.executeQuery()) { r.next(); eq((long) n, r.getLong(1), "sum"); }
            }
        });

        test("metadata_and_parameter_metadata", () -> {
            try (Connection c = connect()) {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS jdbc_meta; CREATE TABLE jdbc_meta (id int primary key, v text)");
                }
                try (ResultSet r = c.getMetaData().getTables(null, "public", "jdbc_meta", null)) { check(r.next(), "table listed"); }
                try (ResultSet r = c.getMetaData().getColumns(null, "public", "jdbc_meta", null)) {
                    int cols = 0; while (r.next()) cols++;
                    eq(2, cols, "columns");
                }
                try (PreparedStatement ps = c.prepareStatement("SELECT v FROM jdbc_meta WHERE id = ?")) {
                    eq(Types.INTEGER, ps.getParameterMetaData().getParameterType(1), "parameter type");
                    eq("v", ps.getMetaData().getColumnName(1), "column name");
                }
            }
        });

        test("notice_and_warnings", () -> {
            try (Connection c = connect(); Statement s = c.createStatement()) {
                s.execute("DO $$ BEGIN RAISE NOTICE 'hello notice'; END $$");
                SQLWarning w = s.getWarnings();
                check(w != null && w.getMessage().contains("hello notice"), "notice delivered as a warning");
            }
        });

        test("multiple_result_sets", () -> {
            try (Connection c = connect(); Statement s = c.createStatement()) {
                check(s.execute("SELECT 1; SELECT 2, 3; SELECT 'x'"), "first is a result set");
                int sets = 1;
                while (s.getMoreResults() || s.getUpdateCount() != -1) sets++;
                eq(3, sets, "result sets");
            }
        });

        test("auth_scram_md5_and_wrong_password", () -> {
            try (Connection c = connect("user", "scram_test", "password", "test4scram")) { eq(1L, scalarLong(c, "SELECT 1"), "scram"); }
            try (Connection c = connect("user", "md5_test", "password", "test4md5")) { eq(1L, scalarLong(c, "SELECT 1"), "md5"); }
            try (Connection c = connect("user", "scram_test", "password", "wrong")) {
                throw new AssertionError("wrong password accepted");
            } catch (SQLException e) {
                eq("28P01", e.getSQLState(), "sqlstate");
            }
        });

        test("ssl_require", () -> {
            try (Connection c = connect("sslmode", "require", "user", "scram_test", "password", "test4scram", "channelBinding", "disable")) {
                eq(1L, scalarLong(c, "SELECT 1"), "select over TLS");
            }
        });

        test("terminated_by_server", () -> {
            try (Connection victim = connect(); Connection killer = connect()) {
                int pid = ((PGConnection) victim).getBackendPID();
                eq(true, scalarLong(killer, "SELECT CASE WHEN pg_terminate_backend(" + pid + ") THEN 1 ELSE 0 END") == 1, "terminated");
                Thread.sleep(200);
                try {
                    scalarLong(victim, "SELECT 1");
                    throw new AssertionError("terminated connection still answers");
                } catch (SQLException e) {
                    check(e.getSQLState() != null && (e.getSQLState().equals("57P01") || e.getSQLState().startsWith("08")), "sqlstate " + e.getSQLState());
                }
                check(victim.isClosed() || !victim.isValid(2), "connection reported closed");
            }
        });

        test("two_phase_commit", () -> {
            try (Connection c = connect()) {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS jdbc_2pc; CREATE TABLE jdbc_2pc (id int)");
                }
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    s.execute("INSERT INTO jdbc_2pc VALUES (1)");
                    s.execute("PREPARE TRANSACTION 'jdbc_gid_" + port + "'");
                }
                c.setAutoCommit(true);
                try (Statement s = c.createStatement()) { s.execute("COMMIT PREPARED 'jdbc_gid_" + port + "'"); }
                eq(1L, scalarLong(c, "SELECT count(*) FROM jdbc_2pc"), "committed");
            }
        });

        test("concurrent_connections", () -> {
            ExecutorService ex = Executors.newFixedThreadPool(16);
            List<Future<Long>> fs = new ArrayList<>();
            for (int t = 0; t < 64; t++) {
                final int k = t;
                fs.add(ex.submit(() -> {
                    try (Connection c = connect(); PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2")) {
                        long sum = 0;
                        for (int i = 0; i < 50; i++) { ps.setInt(1, k); try (ResultSet r = ps.executeQuery()) { r.next(); sum += r.getLong(1); } }
                        return sum;
                    }
                }));
            }
            long total = 0;
            for (Future<Long> f : fs) total += f.get(60, TimeUnit.SECONDS);
            ex.shutdown();
            eq(50L * 2 * (63 * 64 / 2), total, "sum");
        });
    }
}
