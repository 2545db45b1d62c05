'use strict';
// Publish a few events through a sidecar from Node.js.
//
//   node example.js [host:port]        (default: $SIDECAR_TARGET or 127.0.0.1:50051)
const { SidecarClient, SidecarError } = require('./index');

async function main() {
  const target = process.argv[2] || process.env.SIDECAR_TARGET || '127.0.0.1:50051';
  const sidecar = new SidecarClient(target, { deadlineMs: 5000 });
  try {
    await sidecar.waitForReady(10_000);
    const patient = { entityType: 'patient', entityId: '42' };

    const created = await sidecar.publish({ ...patient, operation: 'create', payload: JSON.stringify({ name: 'Ada' }) });
    console.log(`create -> sequence ${created.sequence} on ${created.subject}`);

    // Hold the entity's lease across "your transaction", then publish under it.
    await sidecar.withLease(patient.entityType, patient.entityId, async (lease) => {
      const updated = await sidecar.publish(
        { ...patient, operation: 'update', payload: JSON.stringify({ name: 'Ada Lovelace' }), entityVersion: 2 },
        { leaseId: lease.leaseId },
      );
      console.log(`update -> sequence ${updated.sequence} (lease fencing token ${lease.fencingToken})`);
    });

    const results = await sidecar.publishBatch([
      { entityType: 'order', entityId: 'A-1', operation: 'create', payload: '{}' },
      { entityType: 'order', entityId: 'A-1', operation: 'update', payload: '{"paid":true}' },
    ]);
    for (const result of results) {
      console.log(result.ok ? `batch -> sequence ${result.published.sequence}` : `batch -> ${result.error.message}`);
    }
  } catch (error) {
    if (error instanceof SidecarError) {
      console.error(`sidecar refused: ${error.codeName} (${error.code}): ${error.details}`);
      process.exitCode = 1;
      return;
    }
    throw error;
  } finally {
    sidecar.close();
  }
}

main();
