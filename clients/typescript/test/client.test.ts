// Runs against a real service: HYBRIDSTORE_URL and HYBRIDSTORE_TOKEN (the
// admin token) name it. The Rust test `typescript_client` starts one in each
// mode and runs this file against it; ids are unique per run, so a service
// already holding data does not matter.
import { strict as assert } from "node:assert";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import {
  Hybridstore,
  InvalidRequestError,
  NotFoundError,
  UnauthorizedError,
  UniqueViolationError,
  VersionConflictError,
} from "../src/index.js";

const baseUrl = process.env.HYBRIDSTORE_URL;
const token = process.env.HYBRIDSTORE_TOKEN;
if (!baseUrl || !token) {
  throw new Error("set HYBRIDSTORE_URL and HYBRIDSTORE_TOKEN (the Rust test typescript_client does)");
}
const store = new Hybridstore({ baseUrl, token });
const run = randomUUID().slice(0, 8);

test("records: versions from writes, If-Match, create-only, merge patch, delete", async () => {
  const accounts = store.collection("accounts");
  const id = `ts-${run}-a`;
  assert.equal(await accounts.get(id), null, "absent is null");

  const created = await accounts.put(id, { plan: "free", seats: 1 });
  assert.equal(created.id, id);
  assert.deepEqual(created.data, { plan: "free", seats: 1 });
  const read = await accounts.get(id);
  assert.equal(read?.version, created.version);

  const replaced = await accounts.put(id, { plan: "pro", seats: 1 }, { ifMatch: created.version });
  assert.ok(replaced.version > created.version);
  await assert.rejects(
    accounts.put(id, { plan: "stale" }, { ifMatch: created.version }),
    (err: unknown) =>
      err instanceof VersionConflictError && err.status === 412 && err.code === "version_conflict",
  );
  await assert.rejects(accounts.put(id, { plan: "again" }, { createOnly: true }), VersionConflictError);

  const patched = await accounts.patch(id, { seats: 5, plan: null }, { ifMatch: replaced.version });
  assert.deepEqual(patched.data, { seats: 5 });

  await accounts.delete(id, { ifMatch: patched.version });
  assert.equal(await accounts.get(id), null);
  await assert.rejects(accounts.delete(id), NotFoundError);
});

test("records: a list page by prefix, and a batch get with missing ids", async () => {
  const groups = store.collection("groups");
  for (const n of [1, 2, 3]) {
    await groups.put(`ts-${run}-g${n}`, { n });
  }
  const first = await groups.list({ prefix: `ts-${run}-g`, limit: 2 });
  assert.deepEqual(
    first.records.map((r) => r.id),
    [`ts-${run}-g1`, `ts-${run}-g2`],
  );
  assert.ok(first.next, "a cursor to the next page");
  const second = await groups.list({ prefix: `ts-${run}-g`, limit: 2, after: first.next ?? undefined });
  assert.deepEqual(
    second.records.map((r) => r.id),
    [`ts-${run}-g3`],
  );

  const batch = await groups.batchGet([`ts-${run}-g3`, `ts-${run}-nope`, `ts-${run}-g1`]);
  assert.deepEqual(
    batch.records.map((r) => r.id),
    [`ts-${run}-g3`, `ts-${run}-g1`],
  );
  assert.deepEqual(batch.missing, [`ts-${run}-nope`]);
});

test("lookup by a unique index, and a unique violation as its own error", async () => {
  const keys = store.collection("api_keys");
  const hash = `sha256-${run}`;
  await keys.put(`ts-${run}-k1`, { key_hash: hash, owner: "u1" });
  const found = await keys.lookup("key_hash", hash);
  assert.equal(found?.id, `ts-${run}-k1`);
  assert.equal(await keys.lookup("key_hash", `${hash}-absent`), null);
  await assert.rejects(
    keys.put(`ts-${run}-k2`, { key_hash: hash, owner: "u2" }),
    (err: unknown) => err instanceof UniqueViolationError && err.status === 409,
  );
});

test("counters: an increment retried with its Idempotency-Key counts once", async () => {
  const scope = `usage:ts-${run}`;
  const key = randomUUID();
  const first = await store.counters.increment(scope, { requests: 1, cost_usd: 0.012 }, { idempotencyKey: key });
  assert.equal(first.totals.requests, 1);
  const retry = await store.counters.increment(scope, { requests: 1, cost_usd: 0.012 }, { idempotencyKey: key });
  assert.deepEqual(retry.totals, first.totals, "the first answer again");
  await store.counters.increment(scope, { requests: 2 });
  const read = await store.counters.read(scope);
  assert.equal(read.granularity, "total");
  assert.equal(read.buckets[0].values.requests, 3);
  assert.equal(read.buckets[0].values.cost_usd, 0.012);
  const hours = await store.counters.read(scope, { granularity: "hour" });
  assert.equal(hours.buckets.length, 1);
});

test("problems: a bad token, a bad name and bad data are typed errors that write nothing", async () => {
  const stranger = new Hybridstore({ baseUrl, token: "not-a-token-of-this-service" });
  await assert.rejects(
    stranger.collection("accounts").get("x"),
    (err: unknown) => err instanceof UnauthorizedError && err.code === "unauthorized",
  );
  await assert.rejects(
    store.collection("accounts").put("bad id", { n: 1 }),
    (err: unknown) => err instanceof InvalidRequestError && err.status === 400,
  );
  await assert.rejects(
    store.collection("nowhere").get("x"),
    (err: unknown) => err instanceof NotFoundError && err.code === "unknown_collection",
  );
  await assert.rejects(
    store.counters.increment(`usage:ts-${run}-bad`, {}),
    (err: unknown) => err instanceof InvalidRequestError && err.problem.detail.length > 0,
  );
  assert.deepEqual((await store.counters.read(`usage:ts-${run}-bad`)).buckets, []);
});

test("the generated client reaches operations the layer does not wrap", async () => {
  const { data, response } = await store.api.GET("/admin/database/status");
  assert.equal(response.status, 200);
  assert.ok(data?.instance_id);
  assert.ok(data?.collections.some((c) => c.name === "accounts"));
});
