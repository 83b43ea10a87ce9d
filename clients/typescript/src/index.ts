// A thin layer over the client generated from hybridstore's OpenAPI document
// (`src/schema.ts`, made by `npm run generate` from `openapi.json`).
//
// The generated client (`Hybridstore.api`) can call every operation with
// typed paths, parameters and bodies. This layer adds what each caller would
// otherwise write again: versions as numbers (read from the ETag, sent as
// If-Match), `Idempotency-Key` on writes, "not found" as `null` on reads, and
// problem+json errors as typed exceptions carrying the stable `code`.

import createClient, { type Client } from "openapi-fetch";
import type { components, paths } from "./schema.js";

export type { components, paths } from "./schema.js";

/** A record as the API returns it (`version` totally orders its writes). */
export type StoredRecord = components["schemas"]["RecordDoc"];
export type RecordData = { [field: string]: unknown };
export type IncrementAnswer = components["schemas"]["IncrementAnswer"];
export type CounterRead = components["schemas"]["ReadAnswer"];
export type ListPage = components["schemas"]["ListPageDoc"];
export type BatchGet = components["schemas"]["BatchGetDoc"];

/** An RFC 9457 problem document, as every error answer carries it. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  /** Stable across versions: branch on it. */
  code: string;
  [member: string]: unknown;
}

/** Any refusal or failure the service answered with a problem document. */
export class HybridstoreError extends Error {
  readonly status: number;
  readonly code: string;
  readonly problem: Problem;
  /** Seconds to wait before retrying, when the answer said (503, 409). */
  readonly retryAfter?: number;

  constructor(problem: Problem, retryAfter?: number) {
    super(`${problem.code}: ${problem.detail}`);
    this.name = new.target.name;
    this.status = problem.status;
    this.code = problem.code;
    this.problem = problem;
    this.retryAfter = retryAfter;
  }
}

/** 400, 413, 415, 422: the request itself is wrong; nothing was written. */
export class InvalidRequestError extends HybridstoreError {}
/** 401: no token, or one the service does not know. */
export class UnauthorizedError extends HybridstoreError {}
/** 403: the token lacks the scope. */
export class ForbiddenError extends HybridstoreError {}
/** 404: no such record, collection or route. */
export class NotFoundError extends HybridstoreError {}
/** 412: If-Match / If-None-Match did not hold. */
export class VersionConflictError extends HybridstoreError {
  /** The record's version now, when the service said. */
  get currentVersion(): number | undefined {
    const current = this.problem["current_version"];
    return typeof current === "number" ? current : undefined;
  }
}
/** 409 `unique_violation`: another record holds that unique index value. */
export class UniqueViolationError extends HybridstoreError {}
/** 409 other than a unique violation (`force_required`, `not_allowed`, ...). */
export class ConflictError extends HybridstoreError {}
/**
 * 503: no tier can serve now (`backends_unavailable`), the service sheds
 * load (`overloaded`), or a write's outcome is unknown (`outcome_unknown`:
 * retry it with the same Idempotency-Key). Wait `retryAfter` seconds.
 */
export class UnavailableError extends HybridstoreError {}
/** 500: failed inside the service (logged there). */
export class InternalError extends HybridstoreError {}

function errorFor(problem: Problem, retryAfter?: number): HybridstoreError {
  switch (problem.status) {
    case 401:
      return new UnauthorizedError(problem, retryAfter);
    case 403:
      return new ForbiddenError(problem, retryAfter);
    case 404:
      return new NotFoundError(problem, retryAfter);
    case 409:
      return problem.code === "unique_violation"
        ? new UniqueViolationError(problem, retryAfter)
        : new ConflictError(problem, retryAfter);
    case 412:
      return new VersionConflictError(problem, retryAfter);
    case 503:
      return new UnavailableError(problem, retryAfter);
    default:
      if (problem.status >= 500) return new InternalError(problem, retryAfter);
      return new InvalidRequestError(problem, retryAfter);
  }
}

/** The error a failed response means (problem+json, or anything else). */
async function failure(response: Response, body: unknown): Promise<HybridstoreError> {
  const retry = response.headers.get("retry-after");
  const retryAfter = retry === null ? undefined : Number(retry);
  if (body && typeof body === "object" && "code" in body) {
    return errorFor(body as Problem, retryAfter);
  }
  return errorFor(
    {
      type: "about:blank",
      title: response.statusText,
      status: response.status,
      detail: typeof body === "string" ? body : JSON.stringify(body ?? null),
      code: "unexpected_answer",
    },
    retryAfter,
  );
}

/** Options of a record write. */
export interface WriteOptions {
  /** Only if the record is at this version (optimistic concurrency). */
  ifMatch?: number;
  /** Only if the record does not exist (`If-None-Match: *`; PUT only). */
  createOnly?: boolean;
  /** The record's lifetime in seconds (PUT only). */
  ttlSecs?: number;
  /** A retry with the same key gets the first answer; nothing is applied twice. */
  idempotencyKey?: string;
}

export interface ClientOptions {
  /** Where the service listens, e.g. `http://127.0.0.1:8080`. */
  baseUrl: string;
  /** A client token (scopes `read:`, `write:`, `counters`) or the admin token. */
  token: string;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
}

function writeHeaders(options: WriteOptions = {}): Record<string, string> {
  const headers: Record<string, string> = {};
  if (options.ifMatch !== undefined) headers["If-Match"] = `"${options.ifMatch}"`;
  if (options.createOnly) headers["If-None-Match"] = "*";
  if (options.idempotencyKey !== undefined) headers["Idempotency-Key"] = options.idempotencyKey;
  return headers;
}

/** The records of one collection. */
export class Collection {
  constructor(
    private readonly api: Client<paths>,
    readonly name: string,
  ) {}

  // Collection names are an enum of the deployment the document was made
  // from; another deployment declares its own, so any name is passed on.
  private get named(): never {
    return this.name as never;
  }

  private path(id: string) {
    return { path: { collection: this.named, id } };
  }

  /** The record, or null when there is none. */
  async get(id: string): Promise<StoredRecord | null> {
    const { data, error, response } = await this.api.GET(
      "/v1/collections/{collection}/records/{id}",
      { params: this.path(id) },
    );
    if (response.status === 404 && (error as Problem | undefined)?.code === "not_found") {
      return null;
    }
    if (error !== undefined || data === undefined) throw await failure(response, error);
    return data;
  }

  /** Creates or replaces a record; answers it with its new version. */
  async put(id: string, data: RecordData, options: WriteOptions = {}): Promise<StoredRecord> {
    const answer = await this.api.PUT("/v1/collections/{collection}/records/{id}", {
      params: {
        ...this.path(id),
        query: options.ttlSecs === undefined ? undefined : { ttl: options.ttlSecs },
      },
      body: data as never,
      headers: writeHeaders(options),
    });
    if (answer.error !== undefined || answer.data === undefined) {
      throw await failure(answer.response, answer.error);
    }
    return answer.data;
  }

  /** Applies a JSON Merge Patch (RFC 7396: null removes a field). */
  async patch(
    id: string,
    patch: RecordData,
    options: Pick<WriteOptions, "ifMatch" | "idempotencyKey"> = {},
  ): Promise<StoredRecord> {
    const answer = await this.api.PATCH("/v1/collections/{collection}/records/{id}", {
      params: this.path(id),
      body: patch as never,
      headers: { ...writeHeaders(options), "Content-Type": "application/merge-patch+json" },
    });
    if (answer.error !== undefined || answer.data === undefined) {
      throw await failure(answer.response, answer.error);
    }
    return answer.data;
  }

  /** Deletes a record (NotFoundError when there is none). */
  async delete(
    id: string,
    options: Pick<WriteOptions, "ifMatch" | "idempotencyKey"> = {},
  ): Promise<void> {
    const answer = await this.api.DELETE("/v1/collections/{collection}/records/{id}", {
      params: this.path(id),
      headers: writeHeaders(options),
    });
    if (!answer.response.ok) throw await failure(answer.response, answer.error);
  }

  /** One page ordered by id; pass `next` as `after` for the following one. */
  async list(options: { after?: string; limit?: number; prefix?: string } = {}): Promise<ListPage> {
    const answer = await this.api.GET("/v1/collections/{collection}/records", {
      params: { path: { collection: this.named }, query: options },
    });
    if (answer.error !== undefined || answer.data === undefined) {
      throw await failure(answer.response, answer.error);
    }
    return answer.data;
  }

  /** Several records at once: those found (in the order asked) and the missing ids. */
  async batchGet(ids: string[]): Promise<BatchGet> {
    const answer = await this.api.POST("/v1/collections/{collection}/batch-get", {
      params: { path: { collection: this.named } },
      body: { ids },
    });
    if (answer.error !== undefined || answer.data === undefined) {
      throw await failure(answer.response, answer.error);
    }
    return answer.data;
  }

  /** The record whose unique index `index` holds `value`, or null. */
  async lookup(index: string, value: string): Promise<StoredRecord | null> {
    const answer = await this.api.GET("/v1/collections/{collection}/lookup/{index}/{value}", {
      params: { path: { collection: this.named, index: index as never, value } },
    });
    if (answer.response.status === 404 && (answer.error as Problem | undefined)?.code === "not_found") {
      return null;
    }
    if (answer.error !== undefined || answer.data === undefined) {
      throw await failure(answer.response, answer.error);
    }
    return answer.data;
  }
}

/** Usage counters. */
export class Counters {
  constructor(private readonly api: Client<paths>) {}

  /**
   * Adds every delta to the scope's fields, in every time bucket, at once.
   * With an `idempotencyKey`, a retry is counted once.
   */
  async increment(
    scope: string,
    deltas: { [field: string]: number },
    options: { at?: Date | string; idempotencyKey?: string } = {},
  ): Promise<IncrementAnswer> {
    const at = options.at instanceof Date ? options.at.toISOString() : options.at;
    const answer = await this.api.POST("/v1/counters/{scope}/increment", {
      params: { path: { scope } },
      body: (at === undefined ? { deltas } : { deltas, at }) as never,
      headers: writeHeaders({ idempotencyKey: options.idempotencyKey }),
    });
    if (answer.error !== undefined || answer.data === undefined) {
      throw await failure(answer.response, answer.error);
    }
    return answer.data;
  }

  /** The buckets of one granularity (default `total`), oldest first. */
  async read(
    scope: string,
    options: { granularity?: "total" | "hour" | "day" | "month"; from?: Date; to?: Date } = {},
  ): Promise<CounterRead> {
    const query: Record<string, string> = {};
    if (options.granularity) query.granularity = options.granularity;
    if (options.from) query.from = options.from.toISOString();
    if (options.to) query.to = options.to.toISOString();
    const answer = await this.api.GET("/v1/counters/{scope}", {
      params: { path: { scope }, query: query as never },
    });
    if (answer.error !== undefined || answer.data === undefined) {
      throw await failure(answer.response, answer.error);
    }
    return answer.data;
  }
}

/** A client of one hybridstore service. */
export class Hybridstore {
  /** The generated client: every operation of the document, typed. */
  readonly api: Client<paths>;
  readonly counters: Counters;

  constructor(options: ClientOptions) {
    this.api = createClient<paths>({
      baseUrl: options.baseUrl.replace(/\/$/, ""),
      headers: { Authorization: `Bearer ${options.token}` },
      fetch: options.fetch,
    });
    this.counters = new Counters(this.api);
  }

  collection(name: string): Collection {
    return new Collection(this.api, name);
  }
}
