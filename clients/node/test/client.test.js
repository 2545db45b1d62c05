'use strict';
// Tests of the Node.js client against a running sidecar:
//
//   SIDECAR_TARGET=127.0.0.1:50051 node --test test/client.test.js
//
// SIDECAR_TEST_ID makes entity ids unique per run; SIDECAR_TEST_RESULTS names a JSON file
// where the replies are written, so tests/test_node_client.py can compare them with what
// landed in the stream. Without SIDECAR_TARGET every test is skipped.
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { test, after } = require('node:test');
const { SidecarClient, SidecarError, status } = require('../index');

const target = process.env.SIDECAR_TARGET;
const runId = process.env.SIDECAR_TEST_ID || String(process.pid);
const skip = target ? false : 'SIDECAR_TARGET is not set';
const sidecar = target ? new SidecarClient(target, { deadlineMs: 5000 }) : null;
const results = {};

after(() => {
  if (sidecar) sidecar.close();
  if (process.env.SIDECAR_TEST_RESULTS) {
    const json = JSON.stringify(results, (key, value) => (typeof value === 'bigint' ? value.toString() : value), 2);
    fs.writeFileSync(process.env.SIDECAR_TEST_RESULTS, json);
  }
});

test('publishes one entity in order, with headers and payload', { skip }, async () => {
  const entity = { entityType: 'patient', entityId: `node-${runId}` };
  const published = [];
  for (const operation of ['create', 'update', 'delete']) {
    published.push(
      await sidecar.publish({
        ...entity,
        operation,
        payload: JSON.stringify({ operation }),
        headers: { 'x-source': 'node' },
      }),
    );
  }
  assert.deepEqual(
    published.map((p) => p.sequence),
    [1n, 2n, 3n],
  );
  assert.equal(new Set(published.map((p) => p.subject)).size, 1);
  assert.ok(published.every((p) => !p.duplicate && typeof p.streamSequence === 'bigint'));
  results.ordered = { ...entity, published };
});

test('a repeated idempotency key is a duplicate, not a second event', { skip }, async () => {
  const event = { entityType: 'patient', entityId: `dup-${runId}`, operation: 'create', idempotencyKey: `key-${runId}` };
  const first = await sidecar.publish(event);
  const again = await sidecar.publish(event);
  assert.equal(first.duplicate, false);
  assert.equal(again.duplicate, true);
  assert.equal(again.sequence, first.sequence);
  assert.equal(again.streamSequence, first.streamSequence);
  results.duplicate = { entityId: event.entityId, first, again };
});

test('publishBatch answers one result per event, in order', { skip }, async () => {
  const events = [
    { entityType: 'order', entityId: `a-${runId}`, operation: 'create' },
    { entityType: 'order', entityId: `b-${runId}`, operation: 'create' },
    { entityType: 'order', entityId: `a-${runId}`, operation: 'update' },
    { entityType: 'order', entityId: `bad id ${runId} `, operation: 'update' }, // trailing space
  ];
  const batch = await sidecar.publishBatch(events);
  assert.equal(batch.length, 4);
  assert.deepEqual(
    batch.slice(0, 3).map((r) => r.ok && r.published.sequence),
    [1n, 1n, 2n],
  );
  assert.equal(batch[3].ok, false);
  assert.ok(batch[3].error instanceof SidecarError);
  assert.equal(batch[3].error.code, status.INVALID_ARGUMENT);
  results.batch = { ids: events.map((e) => e.entityId), codes: batch.map((r) => (r.ok ? 0 : r.error.code)) };
});

test('bad input is refused with INVALID_ARGUMENT', { skip }, async () => {
  const error = await sidecar
    .publish({ entityType: 'not a type!', entityId: `x-${runId}`, operation: 'create' })
    .then(() => assert.fail('published an invalid entity type'), (e) => e);
  assert.ok(error instanceof SidecarError, String(error));
  assert.equal(error.code, status.INVALID_ARGUMENT);
  assert.equal(error.codeName, 'INVALID_ARGUMENT');
  assert.equal(error.retryable, false);
  assert.ok(error.details.length > 0);
  results.invalid = { entityId: `x-${runId}`, code: error.code, codeName: error.codeName, details: error.details };
});

test('a lease fences publishes and carries the entity version', { skip }, async () => {
  const entity = { entityType: 'patient', entityId: `leased-${runId}` };
  await sidecar.publish({ ...entity, operation: 'create' });
  const leased = await sidecar.withLease(entity.entityType, entity.entityId, async (lease) => {
    assert.equal(lease.fencingToken, 1n);
    assert.equal(lease.lastVersion, null);
    assert.ok(lease.expiresAt.getTime() > Date.now());
    // While held, another acquire waits and gives up with ABORTED.
    const aborted = await sidecar.acquireLease(entity.entityType, entity.entityId, { waitMs: 100 }).then(
      () => assert.fail('acquired a held lease'),
      (e) => e,
    );
    assert.equal(aborted.code, status.ABORTED, String(aborted));
    // The call's deadline reaches the sidecar, which bounds its wait by it: the answer
    // comes within the 300 ms deadline, not after the 5 s wait asked for.
    const started = Date.now();
    const bounded = await sidecar
      .acquireLease(entity.entityType, entity.entityId, { waitMs: 5000, deadlineMs: 300 })
      .then(() => assert.fail('acquired a held lease'), (e) => e);
    assert.ok([status.ABORTED, status.DEADLINE_EXCEEDED].includes(bounded.code), String(bounded));
    assert.ok(Date.now() - started < 2000, `waited ${Date.now() - started} ms`);
    return sidecar.publish({ ...entity, operation: 'update', entityVersion: 7 }, { leaseId: lease.leaseId });
  });
  assert.equal(leased.sequence, 2n);
  // expected_sequence 0 ("no event yet") must reach the sidecar as a value, not as unset.
  const stale = await sidecar
    .publish({ ...entity, operation: 'update', expectedSequence: 0 })
    .then(() => assert.fail('published with a wrong expected sequence'), (e) => e);
  assert.equal(stale.code, status.FAILED_PRECONDITION, String(stale));
  const released = await sidecar.acquireLease(entity.entityType, entity.entityId, { waitMs: 3000 });
  assert.equal(released.fencingToken, 2n);
  assert.equal(released.lastVersion, 7n);
  await sidecar.releaseLease(released.leaseId);
  const gone = await sidecar.releaseLease(released.leaseId).then(() => assert.fail('released twice'), (e) => e);
  assert.equal(gone.code, status.NOT_FOUND);
  results.leased = { ...entity, sequence: leased.sequence };
});

/** Record each PublishStream call's messages: whether single, and how many packed. */
function recordStreamMessages(client) {
  const calls = [];
  const open = client.stub.PublishStream.bind(client.stub);
  client.stub.PublishStream = (...args) => {
    const call = open(...args);
    const traffic = { requests: [], responses: [] };
    calls.push(traffic);
    const write = call.write.bind(call);
    call.write = (message, ...rest) => {
      traffic.requests.push({ single: Boolean(message.event), packed: message.events?.length ?? 0 });
      return write(message, ...rest);
    };
    call.on('data', (response) => {
      traffic.responses.push({ single: Boolean(response.result), packed: response.results.length });
    });
    return call;
  };
  return { calls, restore: () => delete client.stub.PublishStream };
}

function assertPacked(traffic, events, { together = true } = {}) {
  const count = (messages) => messages.reduce((sum, m) => sum + m.packed + (m.single ? 1 : 0), 0);
  assert.ok(traffic.requests.every((m) => !m.single && m.packed > 0 && m.packed <= 256), JSON.stringify(traffic.requests));
  assert.ok(traffic.responses.every((m) => !m.single && m.packed > 0), JSON.stringify(traffic.responses));
  assert.equal(count(traffic.requests), events);
  assert.equal(count(traffic.responses), events);
  assert.ok(traffic.requests.length < events / 10, `${traffic.requests.length} request messages for ${events} events`);
  if (together) {
    assert.ok(traffic.responses.length < events, `${traffic.responses.length} response messages for ${events} events`);
  }
}

test('publishStream packs events, keeps each entity in order, answers each once', { skip }, async () => {
  const recorder = recordStreamMessages(sidecar);
  try {
    const ids = ['a', 'b', 'c'].map((x) => `stream-${x}-${runId}`);
    const events = Array.from({ length: 300 }, (_, n) => ({
      entityType: 'order',
      entityId: ids[n % 3],
      operation: 'update',
      payload: String(n),
    }));
    // An invalid event (a Nats- header) is refused, and so are its entity's later ones.
    const bad = `stream-bad-${runId}`;
    const badEvents = ['create', 'update', 'update'].map((operation, n) => ({
      entityType: 'order',
      entityId: bad,
      operation,
      payload: `bad${n + 1}`,
      headers: n === 1 ? { 'Nats-Foo': 'x' } : {},
    }));
    events.splice(10, 0, ...badEvents);
    const answers = new Map();
    for await (const { event, result } of sidecar.publishStream(events)) {
      assert.ok(!answers.has(event), 'an event was answered twice');
      answers.set(event, result);
    }
    assert.equal(answers.size, events.length);
    assert.ok(events.every((event) => answers.has(event)));
    for (const id of ids) {
      const sequences = events.filter((e) => e.entityId === id).map((e) => answers.get(e).published.sequence);
      assert.deepEqual(
        sequences,
        Array.from({ length: 100 }, (_, i) => BigInt(i + 1)),
      );
    }
    const [bad1, bad2, bad3] = badEvents.map((e) => answers.get(e));
    assert.ok(bad1.ok && bad1.published.sequence === 1n);
    assert.equal(bad2.error.code, status.INVALID_ARGUMENT);
    assert.equal(bad3.error.code, status.FAILED_PRECONDITION, String(bad3.error));
    assertPacked(recorder.calls[0], events.length);

    // An async iterable is packed too: what settles within a turn of the loop goes together.
    const single = `stream-async-${runId}`;
    async function* generated() {
      for (let n = 0; n < 40; n += 1) yield { entityType: 'order', entityId: single, operation: 'update' };
    }
    const sequences = [];
    for await (const { result } of sidecar.publishStream(generated())) sequences.push(result.published.sequence);
    assert.deepEqual(
      sequences,
      Array.from({ length: 40 }, (_, i) => BigInt(i + 1)),
    );
    // One entity's events complete one at a time, so their results need not share messages.
    assertPacked(recorder.calls[1], 40, { together: false });
    results.stream = { ids, bad, single };
  } finally {
    recorder.restore();
  }
});

test('publishStream throws what the caller\'s events threw', { skip }, async () => {
  function* broken() {
    yield { entityType: 'not a type!', entityId: `broken-${runId}`, operation: 'create' }; // never lands
    throw new Error('the caller\'s generator broke');
  }
  const error = await (async () => {
    for await (const _ of sidecar.publishStream(broken()));
  })().then(() => assert.fail('the stream ended without the error'), (e) => e);
  assert.match(String(error), /generator broke/);
});
