// node-postgres (pg@8) through dbward: one node process runs several named scenarios, each on
// its own connection(s) whose application_name is "<prefix>-<scenario>" so the Python test can
// find its audit records.
//
//   node checks.js <prefix> <scenario>...     (connection from PGHOST, PGPORT, PGUSER,
//                                              PGPASSWORD, PGDATABASE, as libpq reads them)
//
// Prints one JSON object per scenario on its own line:
//   {"scenario": "...", "ok": true|false, "error": "...", "facts": {...}}
// A scenario checks the results itself (check(...) throws with what it saw); the facts are what
// the Python side needs for its own assertions. Exit status 0 whatever the scenarios did.
"use strict";

const assert = require("node:assert/strict");
const pg = require("pg");
const fs = require("node:fs");
const Cursor = require("pg-cursor");
const QueryStream = require("pg-query-stream");
const sasl = require("pg/lib/crypto/sasl");

// the SASL mechanisms the clients chose, to tell SCRAM-SHA-256-PLUS (channel binding) apart
const mechanisms = [];
const startSession = sasl.startSession;
sasl.startSession = (...args) => {
  const session = startSession(...args);
  mechanisms.push(session.mechanism);
  return session;
};

const prefix = process.argv[2];

function config(scenario, extra = {}) {
  return {
    application_name: `${prefix}-${scenario}`,
    connectionTimeoutMillis: 10000,
    ...extra,
  };
}

async function withClient(scenario, body) {
  const client = new pg.Client(config(scenario));
  await client.connect();
  try {
    return await body(client);
  } finally {
    await client.end();
  }
}

async function expectError(promise, what) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new assert.AssertionError({ message: `${what}: no error` });
}

const scenarios = {
  // client.query(text) with no values: the simple Query protocol; a multi-statement string;
  // an error from PostgreSQL and the client going on
  async simple(facts) {
    await withClient("simple", async (client) => {
      const one = await client.query("SELECT 1 AS one, 'x'::text AS t");
      assert.deepEqual(one.rows, [{ one: 1, t: "x" }]);
      const many = await client.query("SELECT 1 AS a; SELECT 2 AS b, 3 AS c");
      assert.equal(many.length, 2);
      assert.deepEqual(many[1].rows, [{ b: 2, c: 3 }]);
      const err = await expectError(client.query("SELEC 1"), "syntax error");
      facts.syntax_error_code = err.code;
      facts.syntax_error_message = err.message;
      const empty = await client.query("");
      assert.equal(empty.command, null);
      const comment = await client.query({ text: "-- nothing but a comment", queryMode: "extended" });
      assert.equal(comment.command, null);
      const after = await client.query("SELECT 'still here' AS s");
      assert.equal(after.rows[0].s, "still here");
    });
  },

  // {text, values}: the extended protocol with the unnamed statement; several types; NULLs
  async params(facts) {
    await withClient("params", async (client) => {
      const when = new Date("2026-11-27T06:30:15.123Z");
      const blob = Buffer.from([0, 1, 0xff, 39, 92]);
      const insert =
        "INSERT INTO node_items (id, name, price, at, data, flag, doc)" +
        " VALUES ($1, $2, $3, $4, $5, $6, $7)";
      await client.query("DELETE FROM node_items WHERE id < 100");
      const r1 = await client.query(insert, [
        1, "wïdget 'quoted'", "12345.67", when, blob, true, { a: [1, 2], b: "ü" },
      ]);
      assert.equal(r1.rowCount, 1);
      const r2 = await client.query(insert, [2, null, null, null, null, null, null]);
      assert.equal(r2.rowCount, 1);
      const sel = "SELECT id, name, price, at, data, flag, doc FROM node_items WHERE id = $1";
      const row = (await client.query(sel, [1])).rows[0];
      assert.equal(row.id, 1);
      assert.equal(row.name, "wïdget 'quoted'");
      assert.equal(row.price, "12345.67");
      assert.equal(row.at.getTime(), when.getTime());
      assert.deepEqual(row.data, blob);
      assert.equal(row.flag, true);
      assert.deepEqual(row.doc, { a: [1, 2], b: "ü" });
      const nulls = (await client.query(sel, [2])).rows[0];
      assert.deepEqual(Object.values(nulls), [2, null, null, null, null, null, null]);
      const arr = await client.query({
        text: "SELECT $1::int + 1, $2::text[]",
        values: [41, ["a", "b,c"]],
        rowMode: "array",
      });
      assert.deepEqual(arr.rows, [[42, ["a", "b,c"]]]);
    });
  },

  // {name, text, values}: a named statement is parsed once per connection, then only bound
  async named(facts) {
    await withClient("named", async (client) => {
      for (let i = 0; i < 6; i++) {
        const r = await client.query({
          name: "double-it",
          text: "SELECT $1::int * 2 AS v",
          values: [i],
        });
        assert.equal(r.rows[0].v, i * 2);
        const s = await client.query({
          name: "item-name",
          text: "SELECT name FROM node_items WHERE id = $1",
          values: [1],
        });
        assert.equal(s.rows[0].name, "wïdget 'quoted'");
      }
      const check = await client.query(
        "SELECT name FROM pg_prepared_statements WHERE name IN ('double-it', 'item-name')" +
          " ORDER BY name"
      );
      facts.prepared = check.rows.map((r) => r.name).join(",");
    });
  },

  async transaction(facts) {
    await withClient("transaction", async (client) => {
      await client.query("BEGIN");
      await client.query("INSERT INTO node_items (id, name) VALUES ($1, $2)", [300, "committed"]);
      await client.query("COMMIT");
      await client.query("BEGIN");
      await client.query("INSERT INTO node_items (id, name) VALUES ($1, $2)", [301, "rolled"]);
      await client.query("ROLLBACK");
      const r = await client.query("SELECT count(*)::int AS n FROM node_items WHERE id >= 300");
      assert.equal(r.rows[0].n, 1);
    });
  },

  // a statement dbward refuses: error.code 42501, the same client goes on
  async deny(facts) {
    await withClient("deny", async (client) => {
      const simple = await expectError(client.query("SET ROLE postgres"), "SET ROLE");
      facts.simple_code = simple.code;
      facts.simple_message = simple.message;
      assert.equal((await client.query("SELECT 7 AS v")).rows[0].v, 7);
      const extended = await expectError(
        client.query("SELECT set_config('role', $1, false)", ["postgres"]),
        "set_config with a parameter"
      );
      facts.extended_code = extended.code;
      assert.equal((await client.query("SELECT $1::int AS v", [8])).rows[0].v, 8);
      const named = await expectError(
        client.query({ name: "sneaky", text: "SELECT set_config('role', $1, false)", values: ["x"] }),
        "named set_config"
      );
      facts.named_code = named.code;
      assert.equal((await client.query("SELECT 9 AS v")).rows[0].v, 9);
      // in a transaction the denial aborts it, as any error does
      await client.query("BEGIN");
      const inTx = await expectError(client.query("SET ROLE postgres"), "SET ROLE in tx");
      facts.in_tx_code = inTx.code;
      const aborted = await expectError(client.query("SELECT 1"), "aborted tx");
      facts.aborted_code = aborted.code;
      await client.query("ROLLBACK");
      assert.equal((await client.query("SELECT current_user AS u")).rows[0].u.length > 0, true);
    });
  },

  // pg.Pool: 12 queries at once over at most 4 connections
  async pool(facts) {
    const pool = new pg.Pool(config("pool", { max: 4 }));
    try {
      const started = Date.now();
      const results = await Promise.all(
        Array.from({ length: 12 }, (_, i) =>
          pool.query("SELECT $1::int AS i, pg_sleep(0.2)", [i])
        )
      );
      facts.elapsed_ms = Date.now() - started;
      assert.deepEqual(results.map((r) => r.rows[0].i), [...Array(12).keys()]);
      facts.total_count = pool.totalCount;
      const client = await pool.connect();
      try {
        await client.query("BEGIN");
        await client.query("SELECT 1");
        await client.query("COMMIT");
      } finally {
        client.release();
      }
    } finally {
      await pool.end();
    }
  },

  // LISTEN on one client, NOTIFY and pg_notify from another: the 'notification' event
  async notify(facts) {
    const listener = new pg.Client(config("notify"));
    const sender = new pg.Client(config("notify"));
    await listener.connect();
    await sender.connect();
    try {
      const received = [];
      const both = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`got only ${JSON.stringify(received)}`)), 5000);
        listener.on("notification", (msg) => {
          received.push([msg.channel, msg.payload]);
          if (received.length === 2) {
            clearTimeout(timer);
            resolve();
          }
        });
      });
      await listener.query("LISTEN dbward_node_events");
      await sender.query("NOTIFY dbward_node_events, 'hello'");
      await sender.query("SELECT pg_notify($1, $2)", ["dbward_node_events", "again"]);
      await both;
      assert.deepEqual(received, [
        ["dbward_node_events", "hello"],
        ["dbward_node_events", "again"],
      ]);
    } finally {
      await listener.end();
      await sender.end();
    }
  },

  // pg-cursor: Execute with a row limit, Flush (no Sync) between reads; then pg-query-stream
  async cursor(facts) {
    await withClient("cursor", async (client) => {
      const cursor = client.query(new Cursor("SELECT g FROM generate_series(1, $1) g", [1000]));
      let total = 0;
      let reads = 0;
      for (;;) {
        const rows = await cursor.read(100);
        reads += 1;
        if (rows.length === 0) break;
        assert.equal(rows[0].g, total + 1);
        total += rows.length;
      }
      await cursor.close();
      facts.reads = reads;
      assert.equal(total, 1000);
      // a cursor closed before its end, then the client goes on
      const early = client.query(new Cursor("SELECT g FROM generate_series(1, 1000) g"));
      assert.equal((await early.read(5)).length, 5);
      await early.close();
      assert.equal((await client.query("SELECT 11 AS v")).rows[0].v, 11);
      const stream = client.query(
        new QueryStream("SELECT g, md5(g::text) AS h FROM generate_series(1, 10000) g", [], {
          batchSize: 1000,
        })
      );
      let streamed = 0;
      let sum = 0;
      for await (const row of stream) {
        streamed += 1;
        sum += row.g;
      }
      assert.equal(streamed, 10000);
      assert.equal(sum, 50005000);
      assert.equal((await client.query("SELECT 12 AS v")).rows[0].v, 12);
    });
  },

  // over TLS, verifying the server certificate against the test CA (DBWARD_TEST_CA), with
  // channel binding (SCRAM-SHA-256-PLUS) when DBWARD_TEST_CHANNEL_BINDING is set
  async tls(facts) {
    const client = new pg.Client(
      config("tls", {
        host: "localhost",
        ssl: { ca: fs.readFileSync(process.env.DBWARD_TEST_CA), rejectUnauthorized: true },
        enableChannelBinding: process.env.DBWARD_TEST_CHANNEL_BINDING === "1",
      })
    );
    await client.connect();
    try {
      facts.mechanism = mechanisms[mechanisms.length - 1];
      facts.encrypted = typeof client.connection.stream.getPeerCertificate === "function";
      const r = await client.query("SELECT $1::text AS v", ["over tls"]);
      assert.equal(r.rows[0].v, "over tls");
    } finally {
      await client.end();
    }
  },
};

async function main() {
  for (const name of process.argv.slice(3)) {
    const facts = {};
    let error = "";
    try {
      if (!scenarios[name]) throw new Error(`unknown scenario ${name}`);
      await scenarios[name](facts);
    } catch (err) {
      error = `${err && err.stack ? err.stack : err}`;
    }
    process.stdout.write(`${JSON.stringify({ scenario: name, ok: error === "", error, facts })}\n`);
  }
}

main().catch((err) => {
  process.stdout.write(`${JSON.stringify({ scenario: "main", ok: false, error: `${err.stack}` })}\n`);
});
