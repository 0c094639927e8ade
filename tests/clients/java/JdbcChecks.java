// pgjdbc through dbward: one JVM runs several named scenarios, each on its own connection whose
// ApplicationName is "<prefix>-<scenario>" so the Python test can find its audit records.
//
//   java -cp postgresql.jar JdbcChecks.java <jdbc-url> <user> <password> <prefix> <scenario>...
//
// Prints one JSON object per scenario on its own line:
//   {"scenario": "...", "ok": true|false, "error": "...", "facts": {"key": "value", ...}}
// A scenario checks the results itself (check(...) throws with what it saw); the facts are what
// the Python side needs for its own assertions (SQLSTATEs, row counts, timings).
// Exit status 0 whatever the scenarios did: the Python test reads the lines.

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Timestamp;
import java.sql.Types;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class JdbcChecks {
    interface Scenario {
        void run(Connection conn, Map<String, String> facts) throws Exception;
    }

    static String url;
    static String user;
    static String password;
    static String prefix;

    static Connection open(String scenario, Properties extra) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        props.setProperty("ApplicationName", prefix + "-" + scenario);
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "60");
        props.putAll(extra);
        return DriverManager.getConnection(url, props);
    }

    static void check(boolean condition, String what) {
        if (!condition) {
            throw new AssertionError(what);
        }
    }

    static void checkEq(Object expected, Object actual, String what) {
        boolean same = expected == null ? actual == null : expected.equals(actual);
        if (!same) {
            throw new AssertionError(what + ": expected <" + expected + "> got <" + actual + ">");
        }
    }

    static int scalarInt(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            check(rs.next(), "no row from " + sql);
            return rs.getInt(1);
        }
    }

    // ------------------------------------------------------------------ scenarios

    /** Statement and PreparedStatement, parameters of several types, NULLs, read back. */
    static void types(Connection conn, Map<String, String> facts) throws Exception {
        try (Statement st = conn.createStatement()) {
            checkEq(0, st.executeUpdate("DELETE FROM jdbc_items WHERE id BETWEEN 1 AND 99"), "delete");
            try (ResultSet rs = st.executeQuery("SELECT 1 + 1, 'plain'::text")) {
                check(rs.next(), "plain statement row");
                checkEq(2, rs.getInt(1), "int from a Statement");
                checkEq("plain", rs.getString(2), "text from a Statement");
            }
        }
        Timestamp when = Timestamp.valueOf("2026-11-27 06:30:15.123456");
        byte[] blob = {0, 1, (byte) 0xff, 39, 92};
        String insert =
            "INSERT INTO jdbc_items (id, name, price, at, data, flag) VALUES (?, ?, ?, ?, ?, ?)";
        try (PreparedStatement ps = conn.prepareStatement(insert)) {
            ps.setInt(1, 1);
            ps.setString(2, "wïdget 'quoted'");
            ps.setBigDecimal(3, new BigDecimal("12345.67"));
            ps.setTimestamp(4, when);
            ps.setBytes(5, blob);
            ps.setBoolean(6, true);
            checkEq(1, ps.executeUpdate(), "first insert");
            ps.setInt(1, 2);
            ps.setNull(2, Types.VARCHAR);
            ps.setNull(3, Types.NUMERIC);
            ps.setNull(4, Types.TIMESTAMP);
            ps.setNull(5, Types.BINARY);
            ps.setObject(6, null, Types.BOOLEAN);
            checkEq(1, ps.executeUpdate(), "insert of NULLs");
        }
        String select = "SELECT id, name, price, at, data, flag FROM jdbc_items WHERE id = ?";
        try (PreparedStatement ps = conn.prepareStatement(select)) {
            ps.setInt(1, 1);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "row 1");
                checkEq(1, rs.getInt(1), "id");
                checkEq("wïdget 'quoted'", rs.getString(2), "text");
                checkEq(new BigDecimal("12345.67"), rs.getBigDecimal(3), "numeric");
                checkEq(when, rs.getTimestamp(4), "timestamp");
                check(Arrays.equals(blob, rs.getBytes(5)), "bytea " + Arrays.toString(rs.getBytes(5)));
                checkEq(true, rs.getBoolean(6), "boolean");
                check(!rs.next(), "one row only");
            }
            ps.setInt(1, 2);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "row 2");
                checkEq(null, rs.getString(2), "NULL text");
                checkEq(null, rs.getBigDecimal(3), "NULL numeric");
                checkEq(null, rs.getTimestamp(4), "NULL timestamp");
                checkEq(null, rs.getBytes(5), "NULL bytea");
                rs.getBoolean(6);
                check(rs.wasNull(), "NULL boolean");
            }
        }
        // getGeneratedKeys: pgjdbc appends RETURNING to the INSERT
        try (PreparedStatement ps = conn.prepareStatement(
                 "INSERT INTO jdbc_serial (label) VALUES (?)", new String[] {"id"})) {
            ps.setString(1, "generated");
            checkEq(1, ps.executeUpdate(), "insert with generated keys");
            try (ResultSet keys = ps.getGeneratedKeys()) {
                check(keys.next(), "a generated key");
                facts.put("generated_key", String.valueOf(keys.getLong(1)));
            }
        }
        // a parameter typed by the driver, not the SQL: setObject with a Long and a String
        try (PreparedStatement ps = conn.prepareStatement("SELECT ? + 1, ? || '!'")) {
            ps.setObject(1, 41L);
            ps.setObject(2, "hi");
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "setObject row");
                checkEq(42L, rs.getLong(1), "setObject long");
                checkEq("hi!", rs.getString(2), "setObject string");
            }
        }
    }

    /**
     * The same PreparedStatement 8 times: from the 5th execution (prepareThreshold) pgjdbc uses a
     * named server-side statement, and from then on asks for binary results of the types it can
     * read that way (int4, numeric, timestamp, bytea, bool).
     */
    static void serverPrepare(Connection conn, Map<String, String> facts) throws Exception {
        String select =
            "SELECT id, name, price, at, data, flag, ?::int4 AS n, ?::float8 AS f FROM jdbc_items"
                + " WHERE id = ?";
        try (PreparedStatement ps = conn.prepareStatement(select)) {
            PGStatement pgs = ps.unwrap(PGStatement.class);
            checkEq(5, pgs.getPrepareThreshold(), "default prepareThreshold");
            List<Boolean> serverSide = new ArrayList<>();
            for (int i = 0; i < 8; i++) {
                ps.setInt(1, i);
                ps.setDouble(2, i + 0.5);
                ps.setInt(3, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "row on execution " + i);
                    checkEq(new BigDecimal("12345.67"), rs.getBigDecimal(3), "numeric " + i);
                    checkEq(Timestamp.valueOf("2026-11-27 06:30:15.123456"), rs.getTimestamp(4), "ts " + i);
                    check(Arrays.equals(new byte[] {0, 1, (byte) 0xff, 39, 92}, rs.getBytes(5)), "bytea " + i);
                    checkEq(true, rs.getBoolean(6), "bool " + i);
                    checkEq(i, rs.getInt(7), "int param " + i);
                    checkEq(i + 0.5, rs.getDouble(8), "float param " + i);
                }
                serverSide.add(pgs.isUseServerPrepare());
            }
            facts.put("server_side", serverSide.toString());
            check(!serverSide.get(0), "a server-side statement from the first execution");
            check(serverSide.get(7), "pgjdbc never switched to a server-side statement");
        }
    }

    /**
     * Three queries in turn, 6 times each, with a statement cache of 2: every query becomes a
     * named server-side statement and is evicted again, so pgjdbc sends Close for it, then
     * prepares it anew under a new name.
     */
    static void statementCache(Connection conn, Map<String, String> facts) throws Exception {
        String[] queries = {"SELECT ?::int + 1", "SELECT ?::int + 2", "SELECT ?::int + 3"};
        for (int round = 0; round < 6; round++) {
            for (int q = 0; q < queries.length; q++) {
                try (PreparedStatement ps = conn.prepareStatement(queries[q])) {
                    ps.setInt(1, round);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "row " + round + "/" + q);
                        checkEq(round + q + 1, rs.getInt(1), "value " + round + "/" + q);
                    }
                }
            }
        }
    }

    static String insertBatch(Connection conn, int first, int count) throws SQLException {
        try (PreparedStatement ps =
                 conn.prepareStatement("INSERT INTO jdbc_items (id, name, flag) VALUES (?, ?, ?)")) {
            for (int i = first; i < first + count; i++) {
                ps.setInt(1, i);
                ps.setString(2, "batch " + i);
                ps.setBoolean(3, i % 2 == 0);
                ps.addBatch();
            }
            int[] counts = ps.executeBatch();
            checkEq(count, counts.length, "batch result length");
            for (int c : counts) {
                check(c == 1 || c == Statement.SUCCESS_NO_INFO, "batch count " + c);
            }
            return Arrays.toString(counts);
        }
    }

    /** executeBatch of 20 INSERTs, each its own statement (reWriteBatchedInserts off). */
    static void batch(Connection conn, Map<String, String> facts) throws Exception {
        facts.put("counts", insertBatch(conn, 100, 20));
        checkEq(20, scalarInt(conn, "SELECT count(*) FROM jdbc_items WHERE id BETWEEN 100 AND 119"), "rows");
        // a failing batch: a duplicate key in the middle gives BatchUpdateException
        try {
            insertBatch(conn, 119, 2);
            throw new AssertionError("duplicate key accepted");
        } catch (BatchUpdateException e) {
            facts.put("batch_error_sqlstate", e.getSQLState());
        }
        checkEq(1, scalarInt(conn, "SELECT 1"), "connection usable after a failed batch");
    }

    /** The same with reWriteBatchedInserts=true: pgjdbc sends multi-row VALUES statements. */
    static void batchRewrite(Connection conn, Map<String, String> facts) throws Exception {
        facts.put("counts", insertBatch(conn, 200, 20));
        checkEq(20, scalarInt(conn, "SELECT count(*) FROM jdbc_items WHERE id BETWEEN 200 AND 219"), "rows");
    }

    /** setAutoCommit(false), commit, rollback, and a denied statement inside a transaction. */
    static void transaction(Connection conn, Map<String, String> facts) throws Exception {
        conn.setAutoCommit(false);
        try (PreparedStatement ps = conn.prepareStatement("INSERT INTO jdbc_items (id, name) VALUES (?, ?)")) {
            ps.setInt(1, 300);
            ps.setString(2, "committed");
            ps.executeUpdate();
            conn.commit();
            ps.setInt(1, 301);
            ps.setString(2, "rolled back");
            ps.executeUpdate();
            conn.rollback();
        }
        checkEq(1, scalarInt(conn, "SELECT count(*) FROM jdbc_items WHERE id IN (300, 301)"), "after rollback");
        conn.commit();
        // a denial in a transaction aborts it, as any error does; rollback recovers
        try (Statement st = conn.createStatement()) {
            st.executeUpdate("INSERT INTO jdbc_items (id, name) VALUES (302, 'lost')");
            try {
                st.execute("SET ROLE postgres");
                throw new AssertionError("SET ROLE inside a transaction was not refused");
            } catch (SQLException e) {
                facts.put("denied_in_tx_sqlstate", e.getSQLState());
            }
            try {
                st.executeQuery("SELECT 1");
                throw new AssertionError("the transaction was not aborted by the denial");
            } catch (SQLException e) {
                facts.put("aborted_sqlstate", e.getSQLState());
            }
            conn.rollback();
        }
        checkEq(0, scalarInt(conn, "SELECT count(*) FROM jdbc_items WHERE id = 302"), "302 rolled back");
        conn.commit();
        conn.setAutoCommit(true);
    }

    static String names(ResultSet rs, String column) throws SQLException {
        List<String> out = new ArrayList<>();
        try (rs) {
            while (rs.next()) {
                out.add(rs.getString(column));
            }
        }
        return String.join(",", out);
    }

    /** What a GUI tool asks on connect and when it opens the table tree. */
    static void metadata(Connection conn, Map<String, String> facts) throws Exception {
        DatabaseMetaData md = conn.getMetaData();
        facts.put("product", md.getDatabaseProductName() + " " + md.getDatabaseProductVersion());
        facts.put("driver", md.getDriverVersion());
        facts.put("user", md.getUserName());
        facts.put("catalogs", names(md.getCatalogs(), "TABLE_CAT"));
        facts.put("schemas", names(md.getSchemas(), "TABLE_SCHEM"));
        String tables = names(md.getTables(null, "public", "%", new String[] {"TABLE"}), "TABLE_NAME");
        facts.put("tables", tables);
        check(Arrays.asList(tables.split(",")).contains("jdbc_items"), "getTables: " + tables);
        String columns = names(md.getColumns(null, "public", "jdbc_items", "%"), "COLUMN_NAME");
        checkEq("id,name,price,at,data,flag", columns, "getColumns");
        checkEq("id", names(md.getPrimaryKeys(null, "public", "jdbc_items"), "COLUMN_NAME"), "getPrimaryKeys");
        String indexes = names(md.getIndexInfo(null, "public", "jdbc_items", false, false), "INDEX_NAME");
        check(indexes.contains("jdbc_items_pkey"), "getIndexInfo: " + indexes);
        facts.put("imported_keys", names(md.getImportedKeys(null, "public", "jdbc_items"), "FKCOLUMN_NAME"));
        check(!names(md.getTypeInfo(), "TYPE_NAME").isEmpty(), "getTypeInfo");
        facts.put("table_types", names(md.getTableTypes(), "TABLE_TYPE"));
        check(!names(md.getFunctions(null, "pg_catalog", "abs"), "FUNCTION_NAME").isEmpty(), "getFunctions");
        names(md.getProcedures(null, "public", "%"), "PROCEDURE_NAME");
        names(md.getTablePrivileges(null, "public", "jdbc_items"), "PRIVILEGE");
        names(md.getColumnPrivileges(null, "public", "jdbc_items", "%"), "PRIVILEGE");
        names(md.getBestRowIdentifier(null, "public", "jdbc_items", DatabaseMetaData.bestRowSession, true), "COLUMN_NAME");
        facts.put("keywords", String.valueOf(md.getSQLKeywords().length()));
        // ResultSetMetaData of a query: pgjdbc looks up the columns' base tables in pg_attribute
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery("SELECT id, name FROM jdbc_items LIMIT 1")) {
            checkEq("jdbc_items", rs.getMetaData().getTableName(1), "ResultSetMetaData table");
            checkEq(java.sql.ResultSetMetaData.columnNoNulls, rs.getMetaData().isNullable(1), "isNullable");
        }
        // what GUI tools set: read-only and isolation (SET SESSION CHARACTERISTICS), the schema
        conn.setReadOnly(true);
        conn.setTransactionIsolation(Connection.TRANSACTION_REPEATABLE_READ);
        conn.setSchema("public");
        checkEq("public", conn.getSchema(), "getSchema");
        checkEq(true, conn.isReadOnly(), "isReadOnly");
        conn.setReadOnly(false);
        conn.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
        // what DBeaver runs on connect besides the metadata calls
        try (Statement st = conn.createStatement()) {
            st.execute("SET search_path = \"$user\", public");
            for (String sql : new String[] {
                "SELECT current_schema(), session_user",
                "SHOW search_path",
                "SELECT version()",
                "SELECT n.oid, n.* FROM pg_catalog.pg_namespace n ORDER BY nspname",
                "SELECT db.oid, db.* FROM pg_catalog.pg_database db WHERE datname = current_database()",
                "SELECT string_agg(word, ',') FROM pg_catalog.pg_get_keywords() WHERE word <> ALL"
                    + " ('{a,abs,absolute,action}'::text[])",
                "SELECT r.rolname, r.rolsuper, r.rolcreaterole FROM pg_catalog.pg_roles r"
                    + " WHERE r.rolname = current_user",
                "SELECT e.extname, e.extversion FROM pg_catalog.pg_extension e",
                "SELECT t.oid, t.spcname FROM pg_catalog.pg_tablespace t",
                "SELECT name, setting FROM pg_catalog.pg_settings WHERE name = 'server_version_num'",
                "SELECT c.oid, c.relname, pg_catalog.obj_description(c.oid, 'pg_class')"
                    + " FROM pg_catalog.pg_class c WHERE c.relnamespace = 'public'::regnamespace",
            }) {
                try (ResultSet rs = st.executeQuery(sql)) {
                    check(rs.next(), "row from " + sql);
                }
            }
        }
    }

    /**
     * Statements PostgreSQL refuses, each at a different step of the extended protocol: at Parse
     * (an unknown table, a bad literal), at Bind (planning folds 1/0), at Execute (a duplicate
     * key). Every one is an SQLException with PostgreSQL's SQLSTATE.
     */
    static void errors(Connection conn, Map<String, String> facts) throws Exception {
        String[] failing = {
            "SELECT * FROM jdbc_no_such_table",
            "SELECT 'x'::int",
            "SELECT 1/0",
            "INSERT INTO jdbc_items (id) VALUES (500), (500)",
        };
        List<String> states = new ArrayList<>();
        try (Statement st = conn.createStatement()) {
            for (String sql : failing) {
                try {
                    st.execute(sql);
                    throw new AssertionError("no error from " + sql);
                } catch (SQLException e) {
                    states.add(e.getSQLState());
                }
            }
        }
        try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int")) {
            ps.setString(1, "not a number");
            try {
                ps.executeQuery();
                throw new AssertionError("no error from a bad parameter");
            } catch (SQLException e) {
                states.add(e.getSQLState());
            }
        }
        // getParameterMetaData before executing: Parse, Describe, Sync, and no Execute
        try (PreparedStatement ps = conn.prepareStatement("SELECT * FROM jdbc_missing WHERE id = ?")) {
            ps.getParameterMetaData();
            throw new AssertionError("no error from describing a statement on an unknown table");
        } catch (SQLException e) {
            states.add(e.getSQLState());
        }
        facts.put("sqlstates", String.join(",", states));
        checkEq(1, scalarInt(conn, "SELECT 1"), "after the errors");
    }

    /** A denied statement: SQLException 42501, the same connection goes on. */
    static void deny(Connection conn, Map<String, String> facts) throws Exception {
        try (Statement st = conn.createStatement()) {
            try {
                st.execute("SET ROLE postgres");
                throw new AssertionError("SET ROLE was not refused");
            } catch (SQLException e) {
                facts.put("statement_sqlstate", e.getSQLState());
                facts.put("statement_message", e.getMessage());
            }
            try (ResultSet rs = st.executeQuery("SELECT current_user, 7")) {
                check(rs.next(), "row after the denial");
                checkEq(7, rs.getInt(2), "query after the denial");
                facts.put("current_user", rs.getString(1));
            }
        }
        // the same through a PreparedStatement (a parameter bound into set_config)
        try (PreparedStatement ps = conn.prepareStatement("SELECT set_config('role', ?, false)")) {
            ps.setString(1, "postgres");
            try {
                ps.executeQuery();
                throw new AssertionError("set_config('role', ?) was not refused");
            } catch (SQLException e) {
                facts.put("prepared_sqlstate", e.getSQLState());
            }
        }
        checkEq(8, scalarInt(conn, "SELECT 8"), "query after the prepared denial");
    }

    /**
     * autosave=always: pgjdbc sets a savepoint before each statement in a transaction and rolls
     * back to it after an error, so a denied statement does not cost the transaction.
     */
    static void autosave(Connection conn, Map<String, String> facts) throws Exception {
        conn.setAutoCommit(false);
        try (Statement st = conn.createStatement()) {
            st.executeUpdate("INSERT INTO jdbc_items (id, name) VALUES (400, 'kept')");
            try {
                st.execute("SET ROLE postgres");
                throw new AssertionError("SET ROLE was not refused");
            } catch (SQLException e) {
                facts.put("denied_sqlstate", e.getSQLState());
            }
            st.executeUpdate("INSERT INTO jdbc_items (id, name) VALUES (401, 'kept too')");
            conn.commit();
        }
        conn.setAutoCommit(true);
        checkEq(2, scalarInt(conn, "SELECT count(*) FROM jdbc_items WHERE id IN (400, 401)"), "both kept");
    }

    /** preferQueryMode=simple: parameters interpolated by pgjdbc, Query messages only. */
    static void simpleMode(Connection conn, Map<String, String> facts) throws Exception {
        try (PreparedStatement ps = conn.prepareStatement("SELECT ?::text || '!', ?::int * 2")) {
            ps.setString(1, "it's");
            ps.setInt(2, 21);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "simple-mode row");
                checkEq("it's!", rs.getString(1), "quoted text");
                checkEq(42, rs.getInt(2), "int");
            }
        }
        try (Statement st = conn.createStatement()) {
            try {
                st.execute("SET ROLE postgres");
                throw new AssertionError("SET ROLE was not refused");
            } catch (SQLException e) {
                facts.put("denied_sqlstate", e.getSQLState());
            }
            checkEq(1, scalarInt(conn, "SELECT 1"), "after the denial");
        }
    }

    /**
     * pgjdbc's LargeObject API calls lo_creat/lo_open/... with the FunctionCall message (fastpath),
     * which dbward refuses (guard.function_call): SQLException 42501, the transaction is aborted
     * as by any error, the connection goes on. The SQL functions do the same work and are allowed.
     */
    static void largeObject(Connection conn, Map<String, String> facts) throws Exception {
        conn.setAutoCommit(false);
        try {
            conn.unwrap(PGConnection.class).getLargeObjectAPI().createLO();
            throw new AssertionError("the LargeObject API was not refused");
        } catch (SQLException e) {
            facts.put("fastpath_sqlstate", e.getSQLState());
            facts.put("fastpath_message", e.getMessage());
        }
        conn.rollback();
        long oid;
        try (PreparedStatement ps = conn.prepareStatement("SELECT lo_from_bytea(0, ?)")) {
            ps.setBytes(1, new byte[] {1, 2, 3});
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "lo_from_bytea row");
                oid = rs.getLong(1);
            }
        }
        try (PreparedStatement ps = conn.prepareStatement("SELECT lo_get(?), lo_unlink(?)")) {
            ps.setLong(1, oid);
            ps.setLong(2, oid);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "lo_get row");
                check(Arrays.equals(new byte[] {1, 2, 3}, rs.getBytes(1)), "lo_get bytes");
            }
        }
        conn.commit();
        conn.setAutoCommit(true);
    }

    /** CopyManager copyIn (text and csv) and copyOut. */
    static void copy(Connection conn, Map<String, String> facts) throws Exception {
        CopyManager cm = conn.unwrap(PGConnection.class).getCopyAPI();
        try (Statement st = conn.createStatement()) {
            st.execute("CREATE TEMP TABLE jdbc_copy (id int, t text)");
        }
        StringBuilder text = new StringBuilder();
        for (int i = 0; i < 5000; i++) {
            text.append(i).append('\t').append("row ").append(i).append('\n');
        }
        long in = cm.copyIn("COPY jdbc_copy FROM STDIN",
            new ByteArrayInputStream(text.toString().getBytes(StandardCharsets.UTF_8)));
        checkEq(5000L, in, "copyIn rows");
        long csvIn = cm.copyIn("COPY jdbc_copy (id, t) FROM STDIN (FORMAT csv)",
            new ByteArrayInputStream("-1,\"a, b\"\n-2,\"ü\"\n".getBytes(StandardCharsets.UTF_8)));
        checkEq(2L, csvIn, "csv copyIn rows");
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        long outRows = cm.copyOut("COPY (SELECT id, t FROM jdbc_copy ORDER BY id) TO STDOUT", out);
        checkEq(5002L, outRows, "copyOut rows");
        String got = out.toString(StandardCharsets.UTF_8);
        check(got.startsWith("-2\tü\n-1\ta, b\n0\trow 0\n"), "copyOut start: " + got.substring(0, 40));
        check(got.endsWith("4999\trow 4999\n"), "copyOut end");
        // a COPY the database refuses: the connection stays usable
        try {
            cm.copyIn("COPY jdbc_copy FROM STDIN", new ByteArrayInputStream("x\ty\n".getBytes(StandardCharsets.UTF_8)));
            throw new AssertionError("bad COPY data accepted");
        } catch (SQLException e) {
            facts.put("bad_copy_sqlstate", e.getSQLState());
        }
        checkEq(5002, scalarInt(conn, "SELECT count(*) FROM jdbc_copy"), "count after copy");
    }

    /** Statement.cancel() of a pg_sleep from another thread; the connection goes on. */
    static void cancel(Connection conn, Map<String, String> facts) throws Exception {
        try (Statement st = conn.createStatement()) {
            Thread canceller = new Thread(() -> {
                try {
                    Thread.sleep(700);
                    st.cancel();
                } catch (Exception e) {
                    facts.put("cancel_error", e.toString());
                }
            });
            long started = System.nanoTime();
            canceller.start();
            try {
                st.executeQuery("SELECT pg_sleep(20)");
                throw new AssertionError("pg_sleep was not cancelled");
            } catch (SQLException e) {
                facts.put("sqlstate", e.getSQLState());
            }
            long millis = (System.nanoTime() - started) / 1_000_000;
            canceller.join();
            facts.put("elapsed_ms", String.valueOf(millis));
            check(millis < 10_000, "cancel took " + millis + " ms");
            checkEq(9, scalarInt(conn, "SELECT 9"), "query after the cancel");
        }
    }

    /** setFetchSize with autocommit off: a named portal read 500 rows per Execute. */
    static void fetchSize(Connection conn, Map<String, String> facts) throws Exception {
        conn.setAutoCommit(false);
        try (PreparedStatement ps = conn.prepareStatement(
                 "SELECT g, md5(g::text) FROM generate_series(1, ?) g ORDER BY g")) {
            ps.setFetchSize(500);
            ps.setInt(1, 10_000);
            long count = 0;
            long sum = 0;
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    count++;
                    sum += rs.getInt(1);
                    if (rs.getInt(1) == 1) {
                        checkEq("c4ca4238a0b923820dcc509a6f75849b", rs.getString(2), "md5(1)");
                    }
                }
            }
            checkEq(10_000L, count, "rows fetched");
            checkEq(50_005_000L, sum, "sum of g");
        }
        // another statement while a fetch-size result is still open: its portal stays valid
        try (Statement a = conn.createStatement(); Statement b = conn.createStatement()) {
            a.setFetchSize(100);
            try (ResultSet ra = a.executeQuery("SELECT g FROM generate_series(1, 1000) g")) {
                check(ra.next(), "first row of the open result");
                try (ResultSet rb = b.executeQuery("SELECT 10")) {
                    check(rb.next(), "interleaved query");
                }
                int n = 1;
                while (ra.next()) {
                    n++;
                }
                checkEq(1000, n, "rows of the interleaved result");
            }
        }
        conn.commit();
        conn.setAutoCommit(true);
    }

    /** Over TLS: what the connection is and a query; run with sslmode=verify-full. */
    static void tls(Connection conn, Map<String, String> facts) throws Exception {
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery("SELECT 'over tls', current_user")) {
            check(rs.next(), "row over tls");
            checkEq("over tls", rs.getString(1), "value over tls");
        }
        try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int * 3")) {
            for (int i = 0; i < 6; i++) {
                ps.setInt(1, i);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "prepared row over tls");
                    checkEq(i * 3, rs.getInt(1), "prepared value over tls");
                }
            }
        }
    }

    static final Map<String, Scenario> SCENARIOS = new LinkedHashMap<>();
    static final Map<String, Properties> OPTIONS = new LinkedHashMap<>();

    static {
        SCENARIOS.put("types", JdbcChecks::types);
        SCENARIOS.put("server_prepare", JdbcChecks::serverPrepare);
        SCENARIOS.put("statement_cache", JdbcChecks::statementCache);
        SCENARIOS.put("batch", JdbcChecks::batch);
        SCENARIOS.put("batch_rewrite", JdbcChecks::batchRewrite);
        SCENARIOS.put("transaction", JdbcChecks::transaction);
        SCENARIOS.put("metadata", JdbcChecks::metadata);
        SCENARIOS.put("errors", JdbcChecks::errors);
        SCENARIOS.put("deny", JdbcChecks::deny);
        SCENARIOS.put("autosave", JdbcChecks::autosave);
        SCENARIOS.put("simple_mode", JdbcChecks::simpleMode);
        SCENARIOS.put("large_object", JdbcChecks::largeObject);
        SCENARIOS.put("copy", JdbcChecks::copy);
        SCENARIOS.put("cancel", JdbcChecks::cancel);
        SCENARIOS.put("fetch_size", JdbcChecks::fetchSize);
        SCENARIOS.put("tls", JdbcChecks::tls);
        Properties rewrite = new Properties();
        rewrite.setProperty("reWriteBatchedInserts", "true");
        OPTIONS.put("batch_rewrite", rewrite);
        Properties cache = new Properties();
        cache.setProperty("preparedStatementCacheQueries", "2");
        cache.setProperty("prepareThreshold", "1");
        OPTIONS.put("statement_cache", cache);
        Properties autosave = new Properties();
        autosave.setProperty("autosave", "always");
        OPTIONS.put("autosave", autosave);
        Properties simple = new Properties();
        simple.setProperty("preferQueryMode", "simple");
        OPTIONS.put("simple_mode", simple);
    }

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> b.append("\\\"");
                case '\\' -> b.append("\\\\");
                case '\n' -> b.append("\\n");
                case '\r' -> b.append("\\r");
                case '\t' -> b.append("\\t");
                default -> {
                    if (c < 0x20) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
                }
            }
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        url = args[0];
        user = args[1];
        password = args[2];
        prefix = args[3];
        for (String name : Arrays.copyOfRange(args, 4, args.length)) {
            Scenario scenario = SCENARIOS.get(name);
            Map<String, String> facts = new LinkedHashMap<>();
            String error = null;
            if (scenario == null) {
                error = "unknown scenario " + name;
            } else {
                try (Connection conn = open(name, OPTIONS.getOrDefault(name, new Properties()))) {
                    scenario.run(conn, facts);
                } catch (Throwable e) {
                    StringBuilder trace = new StringBuilder(e.toString());
                    for (StackTraceElement el : e.getStackTrace()) {
                        if (el.getClassName().startsWith("JdbcChecks")) {
                            trace.append(" at ").append(el);
                        }
                    }
                    error = trace.toString();
                }
            }
            StringBuilder line = new StringBuilder("{\"scenario\": ").append(json(name));
            line.append(", \"ok\": ").append(error == null);
            line.append(", \"error\": ").append(json(error == null ? "" : error));
            line.append(", \"facts\": {");
            boolean first = true;
            for (Map.Entry<String, String> fact : facts.entrySet()) {
                line.append(first ? "" : ", ").append(json(fact.getKey())).append(": ")
                    .append(json(String.valueOf(fact.getValue())));
                first = false;
            }
            System.out.println(line.append("}}"));
            System.out.flush();
        }
    }
}
