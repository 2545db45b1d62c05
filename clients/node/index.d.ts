// Types of the Node.js client of nats-order-sidecar (index.js).
import type { ChannelCredentials, ChannelOptions } from '@grpc/grpc-js';

export type Operation = 'create' | 'update' | 'delete';

/** One entity change event (proto: ordersidecar.v1.PublishRequest). */
export interface Event {
  /** Schema name: 1-64 characters of [A-Za-z0-9_-]. */
  entityType: string;
  /** The entity's id: 1-256 bytes of UTF-8, no control characters, no outer whitespace. */
  entityId: string;
  operation: Operation;
  payload?: Buffer | Uint8Array | string;
  /** Passed through as message headers; names may not start with Nats- or Entity-. */
  headers?: Record<string, string>;
  /** Makes retries safe; default: a random UUID made once per publish() call. */
  idempotencyKey?: string;
  /** Publish only if the entity's last sequence is this (0: no event yet). */
  expectedSequence?: bigint | number;
  /** Your own monotonic version of the entity; a stale one is refused. */
  entityVersion?: bigint | number;
  leaseId?: string;
}

/** Where an event is in the stream (proto: PublishResponse). */
export interface Published {
  /** The entity's sequence number: 1, 2, 3, ... with no gap. */
  sequence: bigint;
  streamSequence: bigint;
  subject: string;
  duplicate: boolean;
}

export type BatchResult = { ok: true; published: Published } | { ok: false; error: SidecarError };

/** One event of a publishStream and its result, yielded as the event completes. */
export interface StreamResult {
  event: Event;
  result: BatchResult;
}

export interface Lease {
  leaseId: string;
  entityType: string;
  entityId: string;
  /** The entity's last sequence when acquired (0n: no event yet). */
  fencingToken: bigint;
  /** The entity's last Entity-Version when acquired, if it had one. */
  lastVersion: bigint | null;
  expiresAt: Date;
  ttlMs: number;
}

export interface ClientOptions {
  /** Deadline of each call in ms (default 10000). */
  deadlineMs?: number;
  /** Tries of a publish on UNAVAILABLE or ABORTED, the first included (default 4). */
  attempts?: number;
  /** First retry's backoff ceiling in ms, doubled per retry, full jitter (default 50). */
  backoffMs?: number;
  /** The contract; default: the repository's proto/ordersidecar/v1/sidecar.proto. */
  protoPath?: string;
  /** Default: insecure (the sidecar is on localhost). */
  credentials?: ChannelCredentials;
  channelOptions?: ChannelOptions;
}

export interface CallOptions {
  deadlineMs?: number;
}

export interface LeaseOptions extends CallOptions {
  /** How long the lease lives without renewal (default 10000; 0: the sidecar's --lock-ttl). */
  ttlMs?: number;
  /** How long to wait for the entity's holder (default 5000; 0: try once). */
  waitMs?: number;
}

export declare class SidecarError extends Error {
  /** The gRPC status code, e.g. status.INVALID_ARGUMENT (3). */
  readonly code: number;
  /** Its name, e.g. 'INVALID_ARGUMENT'. */
  readonly codeName: string;
  /** The sidecar's message: what went wrong and what to do. */
  readonly details: string;
  readonly retryable: boolean;
  constructor(code: number, message: string);
}

export declare class SidecarClient {
  readonly target: string;
  constructor(target?: string, options?: ClientOptions);
  publish(event: Event, options?: CallOptions & { leaseId?: string }): Promise<Published>;
  publishBatch(events: Event[], options?: CallOptions): Promise<BatchResult[]>;
  /**
   * Publish events over one PublishStream, many per message; yields each event's result as
   * it completes. No deadline unless `deadlineMs` is given. Throws when the call fails as a
   * whole, or what `events` threw.
   */
  publishStream(
    events: Iterable<Event> | AsyncIterable<Event>,
    options?: CallOptions,
  ): AsyncGenerator<StreamResult, void, undefined>;
  acquireLease(entityType: string, entityId: string, options?: LeaseOptions): Promise<Lease>;
  renewLease(leaseId: string, options?: CallOptions): Promise<Lease>;
  releaseLease(leaseId: string, options?: CallOptions): Promise<void>;
  withLease<T>(
    entityType: string,
    entityId: string,
    work: (lease: Lease) => Promise<T>,
    options?: LeaseOptions,
  ): Promise<T>;
  status(options?: CallOptions): Promise<Record<string, unknown>>;
  waitForReady(timeoutMs?: number): Promise<void>;
  close(): void;
}

export declare const DEFAULT_PROTO: string;
export { status } from '@grpc/grpc-js';
