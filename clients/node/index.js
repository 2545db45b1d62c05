'use strict';
/**
 * Node.js client of nats-order-sidecar: a small typed wrapper (see index.d.ts) over the
 * gRPC contract in proto/ordersidecar/v1/sidecar.proto, loaded at run time.
 *
 *   const { SidecarClient } = require('@nats-order-sidecar/client');
 *   const sidecar = new SidecarClient('127.0.0.1:50051');
 *   const result = await sidecar.publish({ entityType: 'patient', entityId: '42',
 *                                          operation: 'create', payload: '{"name":"Ada"}' });
 *   console.log(result.sequence, result.subject); // 1n events.patient.3.42
 *
 * Every call has a deadline. A refused or failed call rejects with a SidecarError that
 * carries the gRPC status code (`code`, `codeName`); see the proto for what each means.
 * Transient failures (UNAVAILABLE, ABORTED) are retried with the event's idempotency
 * key, which is made once per publish() call, so a retried event lands once.
 */

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** The repository's contract, two folders up; override with options.protoPath. */
const DEFAULT_PROTO = path.resolve(__dirname, '..', '..', 'proto', 'ordersidecar', 'v1', 'sidecar.proto');

const OPERATIONS = {
  create: 'OPERATION_CREATE',
  update: 'OPERATION_UPDATE',
  delete: 'OPERATION_DELETE',
};

/** gRPC status codes that a retry with the same idempotency key may get past. */
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.ABORTED]);

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** A refused or failed call: `code` is the gRPC status code, `codeName` its name. */
class SidecarError extends Error {
  constructor(code, message) {
    const codeName = CODE_NAMES[code] || `CODE_${code}`;
    super(`${codeName}: ${message}`);
    this.name = 'SidecarError';
    this.code = code;
    this.codeName = codeName;
    this.details = message;
  }

  /** Whether sending the same event again (same idempotency key) may succeed. */
  get retryable() {
    return RETRYABLE.has(this.code);
  }

  static fromGrpc(error) {
    if (error instanceof SidecarError) return error;
    const code = typeof error.code === 'number' ? error.code : grpc.status.UNKNOWN;
    return new SidecarError(code, error.details || error.message || String(error));
  }
}

const serviceCache = new Map();

function loadService(protoPath) {
  if (!serviceCache.has(protoPath)) {
    const definition = protoLoader.loadSync(protoPath, {
      keepCase: false,
      longs: String, // uint64 arrives as a decimal string; the wrapper turns it into BigInt
      enums: String,
      defaults: true,
      oneofs: true,
    });
    serviceCache.set(protoPath, grpc.loadPackageDefinition(definition).ordersidecar.v1.Sidecar);
  }
  return serviceCache.get(protoPath);
}

function toRequest(event, leaseId) {
  if (!event || typeof event !== 'object') throw new TypeError('event must be an object');
  const operation = OPERATIONS[String(event.operation || '').toLowerCase()];
  if (!operation) {
    throw new TypeError(`operation ${JSON.stringify(event.operation)} is not one of create, update, delete`);
  }
  const request = {
    entityType: event.entityType,
    entityId: event.entityId,
    operation,
    payload: typeof event.payload === 'string' ? Buffer.from(event.payload) : Buffer.from(event.payload || []),
    headers: { ...(event.headers || {}) },
    idempotencyKey: event.idempotencyKey || crypto.randomUUID(),
    leaseId: leaseId || event.leaseId || '',
  };
  // proto3 `optional`: set only when given, so 0 ("no event yet") is sent as a value.
  if (event.expectedSequence !== undefined && event.expectedSequence !== null) {
    request.expectedSequence = String(event.expectedSequence);
  }
  if (event.entityVersion !== undefined && event.entityVersion !== null) {
    request.entityVersion = String(event.entityVersion);
  }
  return request;
}

function toPublished(response) {
  return {
    sequence: BigInt(response.sequence),
    streamSequence: BigInt(response.streamSequence),
    subject: response.subject,
    duplicate: Boolean(response.duplicate),
  };
}

function toLease(reply) {
  const seconds = (duration) => Number(duration?.seconds || 0) + (duration?.nanos || 0) / 1e9;
  return {
    leaseId: reply.leaseId,
    entityType: reply.entityType,
    entityId: reply.entityId,
    fencingToken: BigInt(reply.fencingToken),
    lastVersion: reply.lastVersion === undefined || reply.lastVersion === null ? null : BigInt(reply.lastVersion),
    expiresAt: new Date(seconds(reply.expiresAt) * 1000),
    ttlMs: Math.round(seconds(reply.ttl) * 1000),
  };
}

function toDuration(ms) {
  const whole = Math.floor(ms / 1000);
  return { seconds: String(whole), nanos: Math.round((ms - whole * 1000) * 1e6) };
}

function toResult(result) {
  return result.code === 0
    ? { ok: true, published: toPublished(result.response) }
    : { ok: false, error: new SidecarError(result.code, result.message) };
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Bounds of one packed PublishStream message, as the Python client's: what is queued goes
// in one message, up to this many events or about this many bytes (well under the
// sidecar's default 4 MiB --max-message-bytes; an event larger than this goes alone).
const PACK_EVENTS = 256;
const PACK_BYTES = 1024 * 1024;
// Field keys, length prefixes, the operation and the optional numbers of one event.
const EVENT_OVERHEAD = 64;
// Results waiting for a slow caller before the call stops reading (gRPC flow control
// then holds the sidecar's replies back).
const READ_AHEAD = 4 * PACK_EVENTS;
const NOT_READY = Symbol('not ready');

function wireSize(tag, request) {
  let size = EVENT_OVERHEAD + tag.length + request.payload.length + request.idempotencyKey.length;
  size += Buffer.byteLength(String(request.entityType ?? '')) + Buffer.byteLength(String(request.entityId ?? ''));
  for (const [name, value] of Object.entries(request.headers)) {
    size += Buffer.byteLength(name) + Buffer.byteLength(String(value)) + 8;
  }
  return size + request.leaseId.length;
}

/**
 * The caller's events, tagged and taken in packs: `take()` waits for one event, then
 * takes those already available (a sync iterable's next ones, an async iterable's that
 * settle within this turn of the event loop), never waiting for more.
 */
class StreamFeed {
  constructor(events) {
    this.async = typeof events?.[Symbol.asyncIterator] === 'function';
    if (!this.async && typeof events?.[Symbol.iterator] !== 'function') {
      throw new TypeError('events must be an iterable or an async iterable');
    }
    this.source = this.async ? events[Symbol.asyncIterator]() : events[Symbol.iterator]();
    this.number = 0;
    this.pending = null; // an async next() that was not ready when a pack was closed
    this.carried = null; // an event that did not fit in the last pack
    this.ended = false;
  }

  async take() {
    const pack = [];
    let bytes = 0;
    let item = this.carried || (await this._next(true));
    this.carried = null;
    while (item) {
      const size = wireSize(item.tag, item.request);
      if (pack.length && bytes + size > PACK_BYTES) {
        this.carried = item;
        break;
      }
      pack.push(item);
      bytes += size;
      if (pack.length >= PACK_EVENTS) break;
      item = await this._next(false);
    }
    return pack;
  }

  async _next(wait) {
    if (this.ended) return null;
    const next = this.pending || this.source.next();
    this.pending = null;
    let step = next;
    if (this.async) {
      const turn = wait ? null : new Promise((resolve) => setImmediate(resolve, NOT_READY));
      step = await (turn ? Promise.race([next, turn]) : next);
      if (step === NOT_READY) {
        this.pending = next;
        return null;
      }
    }
    if (step.done) {
      this.ended = true;
      return null;
    }
    this.number += 1;
    return { tag: String(this.number), event: step.value, request: toRequest(step.value) };
  }

  /** Stop reading the caller's events (they are not all consumed). */
  close() {
    if (!this.ended) {
      this.ended = true;
      Promise.resolve(this.source.return?.()).catch(() => {
        // The caller's iterator failed to close: nothing more to read from it anyway.
      });
    }
  }
}

/** Replies of one PublishStream call, packed or single, queued for the caller. */
class StreamReplies {
  constructor(call) {
    this.call = call;
    this.sent = new Map();
    this.ready = [];
    this.done = false;
    this.failure = null;
    this.wake = () => {};
    call.on('data', (response) => this._received(response));
    call.on('error', (error) => this._finish(SidecarError.fromGrpc(error)));
    call.on('end', () => this._finish(null));
  }

  _received(response) {
    const items = response.results?.length ? response.results : [{ tag: response.tag, result: response.result }];
    for (const { tag, result } of items) {
      const event = this.sent.get(tag);
      this.sent.delete(tag);
      this.ready.push({ event, result: toResult(result) });
    }
    if (this.ready.length >= READ_AHEAD) this.call.pause();
    this.wake();
  }

  _finish(failure) {
    this.done = true;
    this.failure = this.failure || failure;
    this.wake();
  }

  /** Fail the stream with the caller's own error (it wins over the cancellation). */
  fail(error) {
    this.failure = error;
    this.call.cancel();
    this.wake();
  }

  async *results() {
    for (;;) {
      if (this.ready.length) {
        const item = this.ready.shift();
        if (this.ready.length < PACK_EVENTS && this.call.isPaused()) this.call.resume();
        yield item;
      } else if (this.failure) {
        throw this.failure;
      } else if (this.done) {
        return;
      } else {
        await new Promise((resolve) => {
          this.wake = resolve;
        });
      }
    }
  }
}

/** Resolve once the call takes writes again, or has ended. */
function writable(call) {
  return new Promise((resolve) => {
    const done = () => {
      call.off('drain', done);
      call.off('status', done);
      call.off('close', done);
      resolve();
    };
    call.on('drain', done);
    call.on('status', done);
    call.on('close', done);
  });
}

/** Write the feed's packs to the call, one message each, as fast as the call takes them. */
async function pump(call, feed, replies) {
  try {
    let pack;
    while (!replies.done && (pack = await feed.take()).length) {
      if (replies.done) break;
      for (const { tag, event } of pack) replies.sent.set(tag, event); // before any reply
      const message = { events: pack.map(({ tag, request }) => ({ tag, event: request })) };
      if (!call.write(message)) await writable(call);
    }
    if (!replies.done) call.end();
  } catch (error) {
    replies.fail(error);
  } finally {
    feed.close();
  }
}

class SidecarClient {
  /**
   * @param {string} [target] the sidecar, host:port (normally the one on localhost)
   * @param {import('./index').ClientOptions} [options]
   */
  constructor(target = '127.0.0.1:50051', options = {}) {
    const Service = loadService(options.protoPath || DEFAULT_PROTO);
    this.target = target;
    this.deadlineMs = options.deadlineMs ?? 10_000;
    this.attempts = Math.max(1, options.attempts ?? 4);
    this.backoffMs = options.backoffMs ?? 50;
    this.stub = new Service(target, options.credentials || grpc.credentials.createInsecure(), options.channelOptions);
  }

  _call(method, request, deadlineMs) {
    const deadline = new Date(Date.now() + (deadlineMs ?? this.deadlineMs));
    return new Promise((resolve, reject) => {
      this.stub[method](request, { deadline }, (error, reply) => {
        if (error) reject(SidecarError.fromGrpc(error));
        else resolve(reply);
      });
    });
  }

  async _retrying(method, request, options = {}) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this._call(method, request, options.deadlineMs);
      } catch (error) {
        if (!error.retryable || attempt >= this.attempts) throw error;
        // Full jitter, so replicas that failed together do not retry together.
        await delay(Math.random() * this.backoffMs * 2 ** (attempt - 1));
      }
    }
  }

  /** Publish one event; resolves to where it is in the stream. */
  async publish(event, options = {}) {
    const request = toRequest(event, options.leaseId);
    return toPublished(await this._retrying('Publish', request, options));
  }

  /**
   * Publish many events in one call; each entity's events in the order given. Resolves to
   * one result per event, in order: `{ ok: true, published }` or `{ ok: false, error }`.
   * Rejects only when the call as a whole fails.
   */
  async publishBatch(events, options = {}) {
    const request = { events: events.map((event) => toRequest(event)) };
    const reply = await this._retrying('PublishBatch', request, options);
    if (reply.results.length !== events.length) {
      throw new SidecarError(grpc.status.INTERNAL, `sidecar answered ${reply.results.length} results for ${events.length} events`);
    }
    return reply.results.map(toResult);
  }

  /**
   * Publish `events` (an iterable or async iterable) over one PublishStream; yields
   * `{ event, result }` as each event completes, `result` as in publishBatch. What is
   * queued goes out packed, many events per message, and `events` is read only as fast
   * as the call takes messages (back-pressure). Each entity's events are published in
   * the order given. Failed events are not retried here: after a failure the stream
   * refuses that entity's later events, so send the failed ones again, in order. Throws
   * when the call as a whole fails, or what `events` threw.
   */
  async *publishStream(events, options = {}) {
    const feed = new StreamFeed(events);
    const call = this.stub.PublishStream(
      options.deadlineMs === undefined ? {} : { deadline: new Date(Date.now() + options.deadlineMs) },
    );
    const replies = new StreamReplies(call);
    pump(call, feed, replies);
    try {
      yield* replies.results();
    } finally {
      if (!replies.done) call.cancel(); // the caller stopped reading early
      feed.close();
    }
  }

  /**
   * Take the entity's lock for the caller (e.g. across a database transaction). Rejects
   * with ABORTED when the entity stayed locked for the whole wait. Not retried: a lease
   * that may have been granted unseen would block the entity until its TTL ran out.
   */
  async acquireLease(entityType, entityId, options = {}) {
    const ttlMs = options.ttlMs ?? 10_000;
    const waitMs = options.waitMs ?? 5_000;
    const request = { entityType, entityId, ttl: toDuration(ttlMs), waitTimeout: toDuration(waitMs) };
    return toLease(await this._call('AcquireLease', request, options.deadlineMs ?? waitMs + this.deadlineMs));
  }

  /** Extend a lease by its TTL; FAILED_PRECONDITION when it already expired or was lost. */
  async renewLease(leaseId, options = {}) {
    return toLease(await this._call('RenewLease', { leaseId }, options.deadlineMs));
  }

  /** Give a lease up; NOT_FOUND for an unknown, expired or released lease. */
  async releaseLease(leaseId, options = {}) {
    await this._call('ReleaseLease', { leaseId }, options.deadlineMs);
  }

  /**
   * Run `work(lease)` holding the entity's lease, then release it (also when work throws).
   * Publish under it with `client.publish(event, { leaseId: lease.leaseId })`.
   */
  async withLease(entityType, entityId, work, options = {}) {
    const lease = await this.acquireLease(entityType, entityId, options);
    try {
      return await work(lease);
    } finally {
      await this.releaseLease(lease.leaseId).catch(() => {
        // Expired or lost already: nothing left to give up.
      });
    }
  }

  /** The sidecar's state (GetStatus), as the proto's SidecarStatus in camelCase. */
  async status(options = {}) {
    return this._call('GetStatus', {}, options.deadlineMs);
  }

  /** Resolve once the channel is connected, or reject after `timeoutMs`. */
  waitForReady(timeoutMs = 10_000) {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(new Date(Date.now() + timeoutMs), (error) => (error ? reject(error) : resolve()));
    });
  }

  close() {
    this.stub.close();
  }
}

module.exports = { SidecarClient, SidecarError, DEFAULT_PROTO, status: grpc.status };
