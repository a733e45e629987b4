"""RocketMQ 5 scenarios run by tests/tests/rocketmq.rs with the official
Python client (PyPI rocketmq-python-client), against a halfmq broker.

Usage: scenarios.py ADDR SCENARIO [ARGS...]. Each scenario prints one line
`RESULT <json>` and exits 0, or raises (exit 1). Written for halfmq's tests.
"""

import json
import os
import sys
import threading
import time

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials,
                      FilterExpression, Message, MessageListener, Producer,
                      PushConsumer, SimpleConsumer, TransactionChecker,
                      TransactionResolution)

ADDR = sys.argv[1]
SCENARIO = sys.argv[2]
ARGS = sys.argv[3:]
CFG = ClientConfiguration(
    ADDR,
    Credentials(os.environ.get("RMQ_AK", ""), os.environ.get("RMQ_SK", "")),
    request_timeout=5,
)


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def message(topic, body, tag=None, keys=None, group=None, deliver_at=None, props=None):
    m = Message()
    m.topic = topic
    m.body = body.encode()
    if tag:
        m.tag = tag
    if keys:
        m.keys = keys
    if group:
        m.message_group = group
    if deliver_at:
        m.delivery_timestamp = deliver_at
    for k, v in (props or {}).items():
        m.add_property(k, v)
    return m


def code_of(e):
    """The RocketMQ status code an exception carries, if any."""
    for attr in ("code", "_code"):
        if hasattr(e, attr):
            return getattr(e, attr)
    text = str(e)
    for token in text.replace(",", " ").replace(":", " ").split():
        if token.isdigit() and len(token) == 5:
            return int(token)
    return text


def receive_n(group, topic, n, seconds, ack=True):
    c = SimpleConsumer(CFG, group, {topic: FilterExpression("*")}, await_duration=2)
    c.startup()
    got = []
    try:
        deadline = time.time() + seconds
        while len(got) < n and time.time() < deadline:
            for m in c.receive(16, 15):
                got.append(m)
                if ack:
                    c.ack(m)
    finally:
        c.shutdown()
    return got


def send():
    topic, n = ARGS[0], int(ARGS[1])
    p = Producer(CFG, (topic,))
    p.startup()
    ids = []
    try:
        for i in range(n):
            r = p.send(message(topic, f"py-{i}", tag="py", keys=f"k{i}", props={"from": "python"}))
            ids.append(r.message_id)
    finally:
        p.shutdown()
    result(ids=ids)


def receive():
    group, topic, n = ARGS[0], ARGS[1], int(ARGS[2])
    got = receive_n(group, topic, n, 30)
    result(
        bodies=[m.body.decode() for m in got],
        ids=[m.message_id for m in got],
        tags=[m.tag for m in got],
        props=[dict(m.properties) for m in got],
        attempts=[m.delivery_attempt for m in got],
    )


def tx():
    topic = ARGS[0]
    p = Producer(CFG, (topic,), checker=Decide())
    p.startup()
    try:
        t = p.begin_transaction()
        p.send(message(topic, "py-commit"), t)
        t.commit()
        t = p.begin_transaction()
        p.send(message(topic, "py-rollback"), t)
        t.rollback()
    finally:
        p.shutdown()
    result(ok=True)


class Decide(TransactionChecker):
    """Commits halves whose body ends in 'commit', rolls back the rest."""

    checked = []

    def check(self, message):
        body = message.body.decode()
        Decide.checked.append(body)
        if body.endswith("commit"):
            return TransactionResolution.COMMIT
        return TransactionResolution.ROLLBACK


def orphan():
    """Sends two halves and ends neither; the checker decides them when the
    broker checks back."""
    topic, wait = ARGS[0], float(ARGS[1])
    p = Producer(CFG, (topic,), checker=Decide())
    p.startup()
    try:
        p.send(message(topic, "py-orphan-commit"), p.begin_transaction())
        p.send(message(topic, "py-orphan-rollback"), p.begin_transaction())
        deadline = time.time() + wait
        while len(Decide.checked) < 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        p.shutdown()
    result(checked=sorted(Decide.checked))


def half():
    """Sends one half and exits without ending it (a producer that died)."""
    topic, body = ARGS[0], ARGS[1]
    # The client needs a checker to begin a transaction; it exits before
    # any check comes (transaction_timeout_ms).
    p = Producer(CFG, (topic,), checker=Decide())
    p.startup()
    r = p.send(message(topic, body), p.begin_transaction())
    result(message_id=r.message_id)


def delay():
    topic, secs = ARGS[0], int(ARGS[1])
    p = Producer(CFG, (topic,))
    p.startup()
    try:
        at = int(time.time()) + secs
        p.send(message(topic, "py-delayed", deliver_at=at))
    finally:
        p.shutdown()
    result(deliver_at=at)


def fifo_send():
    topic, groups, per = ARGS[0], int(ARGS[1]), int(ARGS[2])
    p = Producer(CFG, (topic,))
    p.startup()
    try:
        for i in range(per):
            for g in range(groups):
                p.send(message(topic, f"g{g}-{i}", group=f"g{g}"))
    finally:
        p.shutdown()
    result(ok=True)


def fifo_consume():
    """Two simple consumers of one FIFO group, acking each message after a
    short wait; the order each message group was consumed in."""
    group, topic, total = ARGS[0], ARGS[1], int(ARGS[2])
    seen = []
    lock = threading.Lock()

    def run():
        c = SimpleConsumer(CFG, group, {topic: FilterExpression("*")}, await_duration=2)
        c.startup()
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                with lock:
                    if len(seen) >= total:
                        return
                for m in c.receive(4, 20):
                    time.sleep(0.01)
                    with lock:
                        seen.append(m.body.decode())
                    c.ack(m)
        finally:
            c.shutdown()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result(seen=seen)


def push_fail():
    """A push consumer that fails every message for SECS seconds."""
    group, topic, secs = ARGS[0], ARGS[1], float(ARGS[2])
    attempts = []

    class Fail(MessageListener):
        def consume(self, message):
            attempts.append(message.delivery_attempt)
            return ConsumeResult.FAILURE

    c = PushConsumer(CFG, group, Fail(), {topic: FilterExpression("*")})
    c.startup()
    time.sleep(secs)
    c.shutdown()
    result(attempts=attempts)


def push_ok():
    group, topic, n = ARGS[0], ARGS[1], int(ARGS[2])
    bodies = []

    class Ok(MessageListener):
        def consume(self, message):
            bodies.append(message.body.decode())
            return ConsumeResult.SUCCESS

    c = PushConsumer(CFG, group, Ok(), {topic: FilterExpression("*")})
    c.startup()
    deadline = time.time() + 30
    while len(bodies) < n and time.time() < deadline:
        time.sleep(0.1)
    c.shutdown()
    result(bodies=bodies)


def push_slow():
    """A push consumer that takes SLEEP seconds over each message, then
    succeeds; runs until N messages were consumed (or 40 s)."""
    group, topic, sleep_s, n = ARGS[0], ARGS[1], float(ARGS[2]), int(ARGS[3])
    seen = []
    done = []

    class Slow(MessageListener):
        def consume(self, message):
            seen.append([message.body.decode(), message.delivery_attempt])
            time.sleep(sleep_s)
            done.append(message.body.decode())
            return ConsumeResult.SUCCESS

    c = PushConsumer(CFG, group, Slow(), {topic: FilterExpression("*")})
    c.startup()
    deadline = time.time() + 40
    while len(done) < n and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    c.shutdown()
    result(seen=seen)


def try_send():
    """One send; its outcome: "ok" or the refusal's code."""
    topic = ARGS[0]
    p = Producer(CFG)
    p.startup()
    try:
        p.send(message(topic, "try"))
        out = "ok"
    except Exception as e:  # noqa: BLE001
        out = code_of(e)
        if not isinstance(out, int):
            cause = e.__cause__ or e.__context__
            out = code_of(cause) if cause else out
    finally:
        p.shutdown()
    result(outcome=out)


def bench():
    """Closed-loop load: CONC threads each sending (or, tx, sending a half
    and committing it) one message of SIZE bytes at a time for SECS after
    2 s of warm-up; ops/s and latency percentiles."""
    topic, mode, secs, conc, size = ARGS[0], ARGS[1], float(ARGS[2]), int(ARGS[3]), int(ARGS[4])
    tx = mode == "tx"
    p = Producer(CFG, (topic,), checker=Decide() if tx else None)
    p.startup()
    start = time.time()
    measure_from = start + 2
    end = measure_from + secs
    lat = []
    lock = threading.Lock()
    body = "x" * size

    def run():
        mine = []
        while time.time() < end:
            t0 = time.time()
            try:
                if tx:
                    t = p.begin_transaction()
                    p.send(message(topic, body), t)
                    t.commit()
                else:
                    p.send(message(topic, body))
            except Exception:  # noqa: BLE001
                continue
            t1 = time.time()
            if t0 >= measure_from and t1 <= end:
                mine.append(t1 - t0)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.shutdown()
    lat.sort()

    def pct(q):
        return lat[min(int(len(lat) * q), len(lat) - 1)] * 1000 if lat else 0

    result(ops_per_s=len(lat) / secs, p50_ms=pct(0.5), p99_ms=pct(0.99), ops=len(lat))


def bad():
    """Bad input: each refusal's code, then a good send still works."""
    topic, big = ARGS[0], int(ARGS[1])
    out = {}
    p = Producer(CFG, (topic,))
    p.startup()
    try:
        try:
            p.send(message(topic, "x" * big))
            out["oversized"] = "accepted"
        except Exception as e:  # noqa: BLE001
            out["oversized"] = code_of(e)
        try:
            p.send(message("%reserved", "x"))
            out["bad_topic"] = "accepted"
        except Exception as e:  # noqa: BLE001
            out["bad_topic"] = code_of(e)
        p.send(message(topic, "after-bad"))
    finally:
        p.shutdown()
    c = SimpleConsumer(CFG, "py-bad", {topic: FilterExpression("*")}, await_duration=2)
    c.startup()
    try:
        msgs = []
        deadline = time.time() + 20
        while not msgs and time.time() < deadline:
            msgs = c.receive(1, 15)
        m = msgs[0]
        c.ack(m)
        try:
            c.ack(m)  # the handle is stale now
            out["stale_ack"] = "accepted"
        except Exception as e:  # noqa: BLE001
            out["stale_ack"] = code_of(e)
        out["after_bad"] = m.body.decode()
    finally:
        c.shutdown()
    result(**out)


SCENARIOS = {
    "send": send,
    "receive": receive,
    "tx": tx,
    "orphan": orphan,
    "half": half,
    "delay": delay,
    "fifo-send": fifo_send,
    "fifo-consume": fifo_consume,
    "push-fail": push_fail,
    "push-ok": push_ok,
    "push-slow": push_slow,
    "try-send": try_send,
    "bench": bench,
    "bad": bad,
}

if __name__ == "__main__":
    SCENARIOS[SCENARIO]()
    sys.stdout.flush()
    # The client's background threads need not be waited for.
    os._exit(0)
