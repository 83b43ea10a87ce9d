// The README's relay example, compiled with the client's tests so that it
// stays right: check an API key by its hash, record a call's usage.
import { createHash, randomUUID } from "node:crypto";
import { Hybridstore, UnavailableError } from "../src/index.js";

const store = new Hybridstore({ baseUrl: "http://127.0.0.1:8080", token: process.env.RELAY_TOKEN! });

export async function authorize(apiKey: string) {
  const keyHash = createHash("sha256").update(apiKey).digest("hex");
  const key = await store.collection("api_keys").lookup("key_hash", keyHash);
  if (key === null || key.data.disabled === true) return null;
  return key;
}

export async function recordUsage(keyId: string, model: string, tokens: number, costUsd: number) {
  // The same Idempotency-Key on a retry: counted once, whatever failed.
  const idempotencyKey = randomUUID();
  for (let attempt = 0; ; attempt++) {
    try {
      return await store.counters.increment(
        `usage:${keyId}:model:${model}`,
        { requests: 1, tokens, cost_usd: costUsd },
        { idempotencyKey },
      );
    } catch (err) {
      if (!(err instanceof UnavailableError) || attempt >= 5) throw err;
      await new Promise((r) => setTimeout(r, (err.retryAfter ?? 1) * 1000));
    }
  }
}
