// RocketMQ 5 scenarios run by tests/tests/rocketmq.rs with the official
// Node.js client (npm rocketmq-client-nodejs), against a halfmq broker.
//
// Usage: node scenarios.js ADDR SCENARIO [ARGS...]. Each scenario prints one
// line `RESULT <json>` and exits 0, or exits 1 with the error.
'use strict';

const { Producer, SimpleConsumer, PushConsumer, ConsumeResult, FilterExpression } =
  require('rocketmq-client-nodejs');
const { TransactionResolution } =
  require('rocketmq-client-nodejs/proto/apache/rocketmq/v2/definition_pb');

const [ , , endpoints, scenario, ...args ] = process.argv;
const credentials = process.env.RMQ_AK
  ? { sessionCredentials: { accessKey: process.env.RMQ_AK, accessSecret: process.env.RMQ_SK } }
  : {};
const common = { endpoints, namespace: '', requestTimeout: 5000, ...credentials };
const sleep = ms => new Promise(r => setTimeout(r, ms));

function result(v) {
  console.log('RESULT ' + JSON.stringify(v));
}

/** Bounds a startup (it has no deadline of its own). */
function within(p, ms, what) {
  return Promise.race([ p, new Promise((_, rej) =>
    setTimeout(() => rej(new Error(`${what} took over ${ms} ms`)), ms).unref()) ]);
}

function codeOf(e) {
  const m = /code[=: ]+(\d{5}|[A-Z_]{4,})/.exec(String(e && (e.stack || e.message || e)));
  return m ? m[1] : String(e && e.message || e);
}

async function send(topic, n) {
  const p = new Producer({ ...common, topics: [ topic ] });
  await within(p.startup(), 20000, 'producer startup');
  const ids = [];
  for (let i = 0; i < Number(n); i++) {
    const r = await p.send({ topic, tag: 'node', keys: [ `k${i}` ],
      properties: new Map([ [ 'from', 'node' ] ]), body: Buffer.from(`node-${i}`) });
    ids.push(r.messageId);
  }
  await p.shutdown();
  result({ ids });
}

async function receive(group, topic, n) {
  const c = new SimpleConsumer({ ...common, consumerGroup: group,
    subscriptions: new Map([ [ topic, '*' ] ]), awaitDuration: 2000 });
  await within(c.startup(), 20000, 'consumer startup');
  const bodies = [], ids = [];
  const deadline = Date.now() + 30000;
  while (bodies.length < Number(n) && Date.now() < deadline) {
    for (const m of await c.receive(16, 15000)) {
      bodies.push(m.body.toString());
      ids.push(m.messageId);
      await c.ack(m);
    }
  }
  await c.shutdown();
  result({ bodies, ids });
}

async function tx(topic) {
  const p = new Producer({ ...common, topics: [ topic ],
    checker: { async check() { return TransactionResolution.ROLLBACK; } } });
  await within(p.startup(), 20000, 'producer startup');
  let t = p.beginTransaction();
  await p.send({ topic, body: Buffer.from('node-commit') }, t);
  await t.commit();
  t = p.beginTransaction();
  await p.send({ topic, body: Buffer.from('node-rollback') }, t);
  await t.rollback();
  await p.shutdown();
  result({ ok: true });
}

async function orphan(topic, waitS) {
  const checked = [];
  const p = new Producer({ ...common, topics: [ topic ], checker: {
    async check(mv) {
      const body = mv.body.toString();
      checked.push(body);
      return body.endsWith('commit') ? TransactionResolution.COMMIT : TransactionResolution.ROLLBACK;
    },
  } });
  await within(p.startup(), 20000, 'producer startup');
  for (const body of [ 'node-orphan-commit', 'node-orphan-rollback' ]) {
    await p.send({ topic, body: Buffer.from(body) }, p.beginTransaction());
  }
  const deadline = Date.now() + Number(waitS) * 1000;
  while (checked.length < 2 && Date.now() < deadline) await sleep(100);
  await sleep(500);
  await p.shutdown();
  result({ checked: checked.sort() });
}

async function pushFail(group, topic, secs) {
  const attempts = [];
  const c = new PushConsumer({ ...common, consumerGroup: group,
    subscriptions: new Map([ [ topic, new FilterExpression('*') ] ]),
    messageListener: { async consume(mv) { attempts.push(mv.deliveryAttempt); return ConsumeResult.FAILURE; } },
  });
  await within(c.startup(), 20000, 'push consumer startup');
  await sleep(Number(secs) * 1000);
  await within(c.shutdown(), 20000, 'push consumer shutdown').catch(() => {});
  result({ attempts });
}

async function bad(topic, big) {
  const out = {};
  const p = new Producer({ ...common, topics: [ topic ] });
  await within(p.startup(), 20000, 'producer startup');
  try {
    await p.send({ topic, body: Buffer.alloc(Number(big), 'x') });
    out.oversized = 'accepted';
  } catch (e) { out.oversized = codeOf(e); }
  await p.send({ topic, body: Buffer.from('after-bad') });
  await p.shutdown();
  result(out);
}

const scenarios = { send, receive, tx, orphan, 'push-fail': pushFail, bad };

// A push consumer leaves a logger timer behind, so exit explicitly.
scenarios[scenario](...args).then(() => process.exit(0), e => {
  console.error('scenario failed:', e);
  process.exit(1);
});
