"""``carom-consume`` / ``carom-produce``: tail and feed Carom topics from a terminal.

Flags follow Pulsar's own ``pulsar-client consume``: ``-s`` subscription, ``-t`` type,
``-p`` Earliest/Latest, ``-n`` count (0 = forever). Without ``-s`` a reader is used, which leaves
no subscription (and no retained backlog) behind on the broker.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import pulsar

from carom import schemas
from carom.config import PulsarSettings, TopicNames
from carom.pulsar_io import make_client, make_producer, quiet_logger

_TYPES = {
    "exclusive": pulsar.ConsumerType.Exclusive,
    "shared": pulsar.ConsumerType.Shared,
    "failover": pulsar.ConsumerType.Failover,
    "key_shared": pulsar.ConsumerType.KeyShared,
}
#: Every kind each topic carries (the truth topic also has not-sent frames and session ends,
#: the errors topic each session's final "every frame due has its result").
_KINDS: dict[str, object] = {
    "truth": schemas.TruthTopic,
    "centroids": schemas.Centroid,
    "errors": schemas.ErrorsTopic,
}


def resolve_topic(name: str, topics: TopicNames) -> tuple[str, Any]:
    """A Carom alias (truth, centroids, errors) or a full topic name -> (topic, schema or None)."""
    if name in _KINDS:
        return getattr(topics, name), _KINDS[name]
    for alias, kind in _KINDS.items():
        if name == getattr(topics, alias):
            return name, kind
    return name, None


def _settings(args: argparse.Namespace) -> PulsarSettings:
    return PulsarSettings(url=args.url, operation_timeout_s=max(1, int(args.timeout)))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", help="truth | centroids | errors, or a full topic name")
    parser.add_argument(
        "--url",
        default=os.environ.get("PULSAR_URL", PulsarSettings().url),
        help="broker service URL (default: $PULSAR_URL or %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)"
    )


def _fail(prog: str, exc: BaseException, args: argparse.Namespace) -> int:
    if isinstance(exc, pulsar.Timeout):
        text = f"no answer from {args.url} within {args.timeout:g} s"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"{prog}: cannot reach Pulsar: {text}", file=sys.stderr)
    return 1


# --- consume -------------------------------------------------------------------------------------


def _time(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _decoded(data: bytes, kind: Any) -> tuple[dict[str, object] | None, str | None]:
    try:
        msg = schemas.decode(data, kind) if kind is not None else schemas.decode_any(data)
    except schemas.SchemaError as exc:
        return None, str(exc)
    return schemas.to_dict(msg), None


def format_message(msg: pulsar.Message, kind: Any, as_json: bool, topic: str) -> str:
    data = msg.data()
    fields, problem = _decoded(data, kind)
    if as_json:
        out: dict[str, object] = {
            "topic": topic,
            "key": msg.partition_key() or None,
            "publish_time": _time(msg.publish_timestamp()),
            "message_id": str(msg.message_id()),
        }
        if fields is not None:
            out["message"] = fields
        else:
            out["invalid"] = problem
            out["raw"] = data.decode("utf-8", "replace")
        return json.dumps(out, separators=(",", ":"))
    lines = [
        "----- got message -----",
        f"key:[{msg.partition_key()}], properties:{msg.properties() or []}, "
        f"publish_time:[{_time(msg.publish_timestamp())}]",
    ]
    if fields is None:
        lines.append(f"content (not a valid Carom message: {problem}):")
        lines.append(data.decode("utf-8", "replace"))
    else:
        kind_name = fields.pop("kind")
        lines.append(f"{kind_name}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def consume(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carom-consume", description=__doc__.splitlines()[0])
    _common(parser)
    parser.add_argument("-s", "--subscription", help="durable subscription (default: a reader)")
    parser.add_argument(
        "-t",
        "--subscription-type",
        default="Exclusive",
        type=lambda s: s.lower().replace("-", "_").replace("keyshared", "key_shared"),
        choices=list(_TYPES),
        help="Exclusive | Shared | Failover | Key_Shared (with -s)",
    )
    parser.add_argument(
        "-p",
        "--subscription-position",
        default="Latest",
        type=str.capitalize,
        choices=["Latest", "Earliest"],
    )
    parser.add_argument(
        "-n", "--num-messages", type=int, default=1, help="messages to read, 0 = forever"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    topic, kind = resolve_topic(args.topic, TopicNames())
    earliest = args.subscription_position == "Earliest"
    try:
        client = make_client(_settings(args), quiet_logger(100))
    except pulsar.PulsarException as exc:  # e.g. a malformed URL
        return _fail(parser.prog, exc, args)
    try:
        try:
            if args.subscription:
                source: Any = client.subscribe(
                    topic,
                    args.subscription,
                    consumer_type=_TYPES[args.subscription_type],
                    initial_position=pulsar.InitialPosition.Earliest
                    if earliest
                    else pulsar.InitialPosition.Latest,
                )
            else:
                source = client.create_reader(
                    topic,
                    pulsar.MessageId.earliest if earliest else pulsar.MessageId.latest,
                    reader_name=f"carom-consume-{uuid.uuid4().hex[:8]}",
                )
        except pulsar.PulsarException as exc:
            return _fail(parser.prog, exc, args)
        seen = 0
        while args.num_messages <= 0 or seen < args.num_messages:
            try:
                msg = source.read_next(200) if not args.subscription else source.receive(200)
            except pulsar.Timeout:
                continue
            print(format_message(msg, kind, args.json, topic), flush=True)
            if args.subscription:
                source.acknowledge(msg)
            seen += 1
        if not args.json:
            print(f"{seen} messages received", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # e.g. `carom-consume ... | head`
        sys.stderr.close()
        return 0
    except pulsar.PulsarException as exc:
        return _fail(parser.prog, exc, args)
    finally:
        try:
            client.close()
        except pulsar.PulsarException:
            pass


# --- produce -------------------------------------------------------------------------------------


def produce(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="carom-produce",
        description="Publish JSON messages to a Carom topic, validated against its schema.",
    )
    _common(parser)
    parser.add_argument(
        "-m", "--messages", action="append", default=[], help="a JSON message (repeatable)"
    )
    parser.add_argument("-f", "--file", help="JSON lines file ('-' for stdin)")
    parser.add_argument("-k", "--key", help="partition key (default: the message's session_id)")
    parser.add_argument("-n", "--num-produce", type=int, default=1, help="send each N times")
    args = parser.parse_args(argv)
    topic, kind = resolve_topic(args.topic, TopicNames())
    texts = list(args.messages)
    if args.file:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        with stream:
            texts += [line for line in stream if line.strip()]
    if not texts:
        parser.error("nothing to send: give -m JSON or -f FILE")
    payloads: list[tuple[bytes, str]] = []
    for i, text in enumerate(texts, 1):
        try:
            msg = schemas.decode(text, kind) if kind is not None else schemas.decode_any(text)
        except schemas.SchemaError as exc:
            print(f"{parser.prog}: message {i}: {exc}", file=sys.stderr)
            return 2
        payloads.append((schemas.encode(msg), args.key or msg.session_id))
    try:
        client = make_client(_settings(args), quiet_logger(100))
        try:
            producer = make_producer(client, topic, _settings(args))
            for _ in range(args.num_produce):
                for data, key in payloads:
                    producer.send(data, partition_key=key)
            producer.flush()
        finally:
            client.close()
    except pulsar.PulsarException as exc:
        return _fail(parser.prog, exc, args)
    except KeyboardInterrupt:
        return 130
    print(f"{len(payloads) * args.num_produce} messages produced to {topic}")
    return 0


def _exit(code: int) -> None:
    # The C++ client can abort ("terminate called ...") while the interpreter tears down after a
    # failed connect; the client is closed by now, so leave without that teardown.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(code)


def consume_main() -> None:
    _exit(consume())


def produce_main() -> None:
    _exit(produce())
