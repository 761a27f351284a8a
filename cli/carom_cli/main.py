"""``carom-consume`` / ``carom-produce``: tail and feed Carom topics from a terminal.

Both follow Pulsar's own ``pulsar-client`` so that a Pulsar user's habits carry over: the same
flags (``-s`` subscription, ``-t`` type, ``-p`` Earliest/Latest, ``-n`` count with 0 = forever,
``-mp`` metadata) and, for ``carom-consume``, the same output as Pulsar 4.0's ``pulsar-client
consume`` (``AbstractCmdConsume.interpretMessage`` in ``pulsar-client-tools``): a ``----- got
message -----`` line, then ``publishTime:[ms], eventTime:[ms], key:[...], properties:[...],
content:<payload>``, and ``N messages successfully consumed`` at the end. The payload is printed
as it is on the wire, so no float is ever rounded, and output can be diffed against Pulsar's.

Unlike ``pulsar-client consume``, ``-s`` is optional: without it a reader is used, which leaves no
subscription (and no retained backlog) behind on the broker. With it the subscription is durable
and outlives the command; the command says so, and ``--unsubscribe-on-exit`` /
``--delete-subscription`` remove it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulsar

from carom import channels, schemas
from carom_runtime.config import PulsarSettings, TopicNames
from carom_runtime.pulsar_io import make_client, make_producer, quiet_logger

_TYPES = {
    "exclusive": pulsar.ConsumerType.Exclusive,
    "shared": pulsar.ConsumerType.Shared,
    "failover": pulsar.ConsumerType.Failover,
    "key_shared": pulsar.ConsumerType.KeyShared,
}
#: Every kind each topic carries (the truth topic also has not-sent frames and session ends,
#: the centroid topic the pages' stats, the errors topic each session's final "every frame due
#: has its result").
_KINDS: dict[str, object] = {
    "truth": schemas.TruthTopic,
    "centroids": schemas.CentroidTopic,
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


def _say(text: str) -> None:
    """A line on stderr that never raises: it runs while exiting, when stderr may be gone."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# --- Pulsar's consume output ---------------------------------------------------------------------

#: The line ``pulsar-client consume`` prints before every message.
MESSAGE_BOUNDARY = "----- got message -----"


def message_id_text(ledger: int, entry: int, partition: int, batch_index: int) -> str:
    """A message id as the Java client prints it: ``ledger:entry:partition[:batchIndex]``.

    Java's ``MessageIdImpl`` (a message that is its own entry) has no batch index, and
    ``BatchMessageIdImpl`` (one message of a batched entry) adds it; the Python client reports
    -1 for the first. So ids read ``10:0:-1`` and ``10:0:-1:0``, as in Pulsar's own tools and
    logs, where Python's own ``str()`` gives ``(10,0,-1,-1)``.
    """
    base = f"{ledger}:{entry}:{partition}"
    return f"{base}:{batch_index}" if batch_index >= 0 else base


def pulsar_date(ms: int, tz: dt.tzinfo | None = None) -> str:
    """Epoch milliseconds as Pulsar's ``DateFormatter.format`` prints them.

    That is Java's ``ISO_OFFSET_DATE_TIME`` in the machine's zone: ``Z`` for UTC, no fraction
    when the milliseconds are 0, and trailing zeros dropped (``...T10:00:00.5+02:00``).
    """
    sec, milli = divmod(ms, 1000)
    when = dt.datetime.fromtimestamp(sec, dt.UTC).astimezone(tz)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if milli:
        text += f".{milli:03d}".rstrip("0")
    offset = when.utcoffset() or dt.timedelta(0)
    if not offset:
        return text + "Z"
    sign, minutes = ("-", -offset) if offset < dt.timedelta(0) else ("+", offset)
    hours, rest = divmod(int(minutes.total_seconds()) // 60, 60)
    return f"{text}{sign}{hours:02d}:{rest:02d}"


@dataclass(frozen=True)
class Received:
    """What the command shows of one message, read out of the client's ``pulsar.Message``.

    Kept apart from the client so that the output format is a pure function, tested in memory.
    """

    message_id: str
    """``ledger:entry:partition[:batchIndex]`` (``message_id_text``)."""
    publish_ms: int
    """Set by the producer's client when it sent the message, epoch ms."""
    event_ms: int
    """The application's event time, epoch ms; 0 when none was set (as Pulsar prints it)."""
    key: str | None
    """The partition key, None without one (the Python client gives "" for both)."""
    properties: dict[str, str]
    data: bytes
    producer_name: str
    redelivery_count: int
    ordering_key: str
    schema_version: str

    @classmethod
    def of(cls, msg: pulsar.Message) -> Received:
        mid = msg.message_id()
        version = msg.schema_version()
        return cls(
            message_id=message_id_text(
                mid.ledger_id(), mid.entry_id(), mid.partition(), mid.batch_index()
            ),
            publish_ms=msg.publish_timestamp(),
            event_ms=msg.event_timestamp(),
            key=msg.partition_key() or None,
            properties=dict(msg.properties()),
            data=msg.data(),
            producer_name=msg.producer_name() or "",
            redelivery_count=msg.redelivery_count(),
            ordering_key=_text(msg.ordering_key()),
            schema_version=_text(version),
        )


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def pulsar_lines(msg: Received, print_metadata: bool = False) -> str:
    """One message as ``pulsar-client consume`` (Pulsar 4.0) prints it, boundary line included.

    Properties print as Java's ``Arrays.toString`` of the map's entries (``[a=1, b=2]``, ``[]``
    when none) and the payload as UTF-8 text, byte for byte: the full precision of every float.
    ``print_metadata`` (``-mp``) appends what Pulsar appends that the Python client exposes:
    event-time, message-id, producer-name, redelivery-count, ordering-key and schema-version.
    Pulsar's sequence-id and replicated-from are not available from the Python client and are
    left out, as are the broker publish-time and index, which Pulsar prints only for brokers
    that add broker entry metadata (Carom's do not).
    """
    props = ", ".join(f"{k}={v}" for k, v in msg.properties.items())
    line = (
        f"publishTime:[{msg.publish_ms}], eventTime:[{msg.event_ms}], "
        f"key:[{'null' if msg.key is None else msg.key}], properties:[{props}], "
        f"content:{msg.data.decode('utf-8', 'replace')}"
    )
    if print_metadata:
        line += (
            f", event-time:{pulsar_date(msg.event_ms)}"
            f", message-id:{msg.message_id}"
            f", producer-name:{msg.producer_name}"
            f", redelivery-count:{msg.redelivery_count}"
            f", ordering-key:{msg.ordering_key}"
            f", schema-version:{msg.schema_version}"
        )
    return f"{MESSAGE_BOUNDARY}\n{line}"


def check(data: bytes, kind: Any) -> tuple[dict[str, object] | None, str | None]:
    """Decode against the topic's kinds (any Carom kind for other topics): (fields, problem)."""
    try:
        msg = schemas.decode(data, kind) if kind is not None else schemas.decode_any(data)
    except schemas.SchemaError as exc:
        return None, str(exc)
    return schemas.to_dict(msg), None


def json_line(msg: Received, topic: str, kind: Any) -> str:
    """``--json``: one object per message, the decoded fields under ``message`` (floats in full)."""
    fields, problem = check(msg.data, kind)
    out: dict[str, object] = {
        "topic": topic,
        "message_id": msg.message_id,
        "publish_time": msg.publish_ms,
        "event_time": msg.event_ms,
        "key": msg.key,
        "properties": msg.properties,
    }
    if fields is not None:
        out["message"] = fields
    else:
        out["invalid"] = problem
        out["raw"] = msg.data.decode("utf-8", "replace")
    return json.dumps(out, separators=(",", ":"))


# --- durable subscriptions -----------------------------------------------------------------------


def left_behind(prog: str, topic_arg: str, topic: str, name: str) -> str:
    """The one warning a run with ``-s`` ends with: what stays on the broker, and how to remove it.

    A durable subscription makes the broker keep every message published after it, whether
    anyone reads them or not, so a forgotten one from a quick look at a topic grows a backlog
    (and disk) for as long as the topic is written to.
    """
    return (
        f"{prog}: subscription '{name}' on {topic} is durable: it stays on the broker after this "
        "command and keeps every new message until it is removed.\n"
        f"{prog}: remove it with: {prog} {topic_arg} -s {name} --delete-subscription "
        "(or run with --unsubscribe-on-exit)"
    )


def admin_path(topic: str) -> str:
    """``persistent://tenant/ns/name`` (or ``name``, ``tenant/ns/name``) -> its admin REST path."""
    domain, sep, rest = topic.partition("://")
    if not sep:
        domain, rest = "persistent", topic
    parts = rest.split("/")
    if len(parts) == 1:
        parts = ["public", "default", *parts]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"not a topic name: {topic}")
    return "/".join([domain, *(urllib.parse.quote(p, safe="") for p in parts)])


def delete_subscription(admin_url: str, topic: str, name: str, timeout: float) -> tuple[bool, str]:
    """Delete a subscription through the admin REST API (``pulsar-admin topics unsubscribe``).

    The admin API rather than a consumer's ``unsubscribe()``: a consumer would first create the
    subscription it is asked to delete, so a mistyped name would be "deleted" instead of
    reported, and the broker's answer names the reason (not found, consumers still attached).
    """
    url = (
        f"{admin_url.rstrip('/')}/admin/v2/{admin_path(topic)}"
        f"/subscription/{urllib.parse.quote(name, safe='')}"
    )
    request = urllib.request.Request(url, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True, f"subscription '{name}' deleted from {topic}"
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        try:
            reason = str(json.loads(body).get("reason") or body)
        except (ValueError, AttributeError):
            reason = body.strip() or exc.reason
        return False, f"cannot delete subscription '{name}' from {topic}: {reason} ({exc.code})"
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        return False, f"cannot reach the Pulsar admin API at {admin_url}: {why}"


# --- consume -------------------------------------------------------------------------------------


def consume(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="carom-consume",
        description="Print a Carom topic's messages as `pulsar-client consume` prints them.",
        epilog="With -s the subscription is durable: it stays on the broker after the command "
        "ends and keeps a backlog of every new message. Add --unsubscribe-on-exit to remove it "
        "when the command ends, or remove it later with -s NAME --delete-subscription.",
    )
    _common(parser)
    parser.add_argument(
        "-s",
        "--subscription",
        "--subscription-name",
        dest="subscription",
        help="durable subscription (default: a reader, which leaves nothing on the broker)",
    )
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
    parser.add_argument(
        "-mp",
        "--print-metadata",
        action="store_true",
        help="append message metadata (message-id, producer-name, ...) as pulsar-client does",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--unsubscribe-on-exit",
        action="store_true",
        help="with -s: delete the subscription when the command ends (count reached or Ctrl-C)",
    )
    parser.add_argument(
        "--delete-subscription",
        action="store_true",
        help="with -s: delete that subscription from the topic (admin API) and exit; reads nothing",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("PULSAR_ADMIN_URL", PulsarSettings().admin_url),
        help="admin API, for --delete-subscription (default: $PULSAR_ADMIN_URL or %(default)s)",
    )
    args = parser.parse_args(argv)
    if (args.unsubscribe_on_exit or args.delete_subscription) and not args.subscription:
        parser.error("--unsubscribe-on-exit and --delete-subscription need -s NAME")
    if args.num_messages < 0:
        parser.error("-n must be 0 (forever) or more")
    topic, kind = resolve_topic(args.topic, TopicNames())
    if args.delete_subscription:
        try:
            done, text = delete_subscription(args.admin_url, topic, args.subscription, args.timeout)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"{parser.prog}: {text}", file=sys.stdout if done else sys.stderr)
        return 0 if done else 1
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
        return _read(parser.prog, args, source, topic, kind)
    finally:
        try:
            client.close()
        except pulsar.PulsarException:
            pass


def _read(prog: str, args: argparse.Namespace, source: Any, topic: str, kind: Any) -> int:
    """The receive loop, then what Pulsar prints at the end and what stays on the broker."""
    seen, code = 0, 0
    try:
        # Not the loop as the try's first statement: CPython 3.11 checks for Ctrl-C after a
        # `continue` has jumped to the loop's head, and there the try did not catch it
        # (seen here: a traceback instead of a clean exit).
        receive = source.receive if args.subscription else source.read_next
        while args.num_messages == 0 or seen < args.num_messages:
            try:
                msg = receive(200)
            except pulsar.Timeout:
                continue
            got = Received.of(msg)
            if args.json:
                print(json_line(got, topic, kind), flush=True)
            else:
                print(pulsar_lines(got, args.print_metadata), flush=True)
                # Pulsar's block stays two lines; a payload that is not a valid Carom message
                # of this topic's kinds is flagged beside it, never hidden.
                _, problem = check(got.data, kind)
                if problem is not None:
                    _say(f"{prog}: message {got.message_id}: {problem}")
            if args.subscription:
                source.acknowledge(msg)
            seen += 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # e.g. `carom-consume ... | head`
        pass
    except pulsar.PulsarException as exc:
        code = _fail(prog, exc, args)
    _say(f"{seen} messages successfully consumed")
    if args.subscription:
        if args.unsubscribe_on_exit:
            try:
                source.unsubscribe()
                _say(f"{prog}: subscription '{args.subscription}' deleted from {topic}")
            except (pulsar.PulsarException, KeyboardInterrupt) as exc:
                # The broker refuses while other consumers are attached (seen here: a second
                # Shared consumer); the C++ client then names only the code it got back.
                why = str(exc) or type(exc).__name__
                if "MetadataError" in why:
                    why += ", the broker's answer while other consumers are attached"
                _say(f"{prog}: subscription '{args.subscription}' not deleted: {why}")
                _say(left_behind(prog, args.topic, topic, args.subscription))
        else:
            _say(left_behind(prog, args.topic, topic, args.subscription))
    return code


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
    parser.add_argument(
        "-k", "--key", help="partition key (default: the message's session_id, if it has one)"
    )
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
    payloads: list[tuple[bytes, str | None]] = []
    for i, text in enumerate(texts, 1):
        try:
            msg = schemas.decode(text, kind) if kind is not None else schemas.decode_any(text)
        except schemas.SchemaError as exc:
            print(f"{parser.prog}: message {i}: {exc}", file=sys.stderr)
            return 2
        # Keyed by session like the services; a kind without a session (a tracker's status)
        # goes without a key unless -k gives one.
        payloads.append((schemas.encode(msg), args.key or getattr(msg, "session_id", None)))
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


# --- channels -------------------------------------------------------------------------------------

#: Where ``carom-channels`` finds the routes file unless ``--routes`` says (the router's default).
ROUTES_FILE = "router/routes.yaml"


def load_routes(path: str) -> channels.Routes:
    """The routes file (``ValueError`` naming it and the key)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"cannot read routes file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"routes file {path} is not valid YAML: {exc}") from None
    try:
        return channels.parse_routes(tree, path)
    except channels.ChannelError as exc:
        raise ValueError(str(exc)) from None


def resolve_channel(name: str, routes: channels.Routes) -> tuple[str, str | None]:
    """A type of the routes file or a full topic name -> (topic, its type or None)."""
    route = routes.routes.get(name)
    if route is not None:
        return route.topic, name
    for type_, route in routes.routes.items():
        if route.topic == name:
            return name, type_
    if "://" not in name:
        raise ValueError(f"{name!r} is neither a type of the routes file nor a topic URL")
    return name, None


def channel_line(record: channels.Record) -> str:
    """One channel record as a line: who, which type and seq, and what it holds, decoded.

    Chat shows its text, media its chunk header (codec, key, timestamp, bytes), points the
    array's shape; a ``ChannelEnd`` the router's account of the session's type.
    """
    who = f"{record.session_id} {record.type}"
    if isinstance(record, channels.ChannelEnd):
        listed = f", refused seqs {record.refused_seqs}" if record.refused_seqs else ""
        failed = f", failed seqs {record.failed_seqs}" if record.failed_seqs else ""
        return (
            f"{who} end: accepted {record.accepted}, last seq {record.last_seq}, "
            f"refused {record.refused}{listed}{failed}"
            + (f" ({record.reason})" if record.reason else "")
        )
    head = f"{who} #{record.seq}"
    meta, size = record.meta, len(record.payload)
    if record.format == "text":
        return f"{head} text: {record.payload.decode('utf-8', 'replace')}"
    if record.format == "points":
        return f"{head} points: shape {channels.points_shape(record)}, {size} bytes"
    if record.format == "video":
        dims = f" {meta['width']}x{meta['height']}" if "width" in meta and "height" in meta else ""
        return (
            f"{head} video: {meta.get('codec')} {'key' if meta.get('key') else 'delta'}{dims} "
            f"ts {meta.get('timestamp_us')} us, {size} bytes"
        )
    if record.format == "audio":
        return (
            f"{head} audio: {meta.get('codec')} {meta.get('sample_rate')} Hz "
            f"x{meta.get('channels')} ts {meta.get('timestamp_us')} us, {size} bytes"
        )
    return f"{head} bytes: {size} bytes"


def session_chunks(
    records: Sequence[channels.Record], session: str
) -> tuple[list[channels.ChannelMessage], int]:
    """One session's messages, one per seq (the first copy), in seq order; and the duplicates."""
    first: dict[int, channels.ChannelMessage] = {}
    dups = 0
    for r in records:
        if isinstance(r, channels.ChannelMessage) and r.session_id == session:
            if r.seq in first:
                dups += 1
            else:
                first[r.seq] = r
    return [first[s] for s in sorted(first)], dups


def write_media_file(msgs: Sequence[channels.ChannelMessage], path: str | None, stem: str) -> str:
    """A session's video or audio messages as a playable file (``carom_runtime.media``)."""
    from carom_runtime import media

    if not msgs:
        raise ValueError("no messages of that session")
    fmt, meta = msgs[0].format, msgs[0].meta
    codec = str(meta.get("codec"))
    chunks = [
        media.Chunk(
            m.payload,
            int(m.meta.get("timestamp_us", 0)),
            bool(m.meta.get("key", True)),
            m.meta.get("duration_us") if isinstance(m.meta.get("duration_us"), int) else None,
        )
        for m in msgs
    ]
    if fmt == "video":
        out = path or stem + media.VIDEO_SUFFIX.get(codec, ".mkv")
        written = media.write_video(chunks, codec, out)
    elif fmt == "audio":
        out = path or stem + media.AUDIO_SUFFIX.get(codec, ".ogg")
        written = media.write_opus(
            chunks, out, int(meta.get("sample_rate", 48_000)), int(meta.get("channels", 1))
        )
    else:
        raise ValueError(f"a {fmt} channel has no media file (video or audio only)")
    frames = media.count_frames(out, fmt)
    return (
        f"wrote {out}: {written.packets} {codec} chunks"
        + (f" ({written.skipped} before the first keyframe left out)" if written.skipped else "")
        + f", {frames} frames decode"
    )


def channels_cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="carom-channels",
        description="Read Carom's channel topics (camera, microphone, chat, points, ...): print "
        "each message decoded, or write a session's video or audio to a playable file.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    read = sub.add_parser("read", help="print each message decoded, one line each")
    save = sub.add_parser("save", help="write one session's video or audio topic to a file")
    for p in (read, save):
        p.add_argument("channel", help="a type of the routes file (camera, chat, ...) or a topic")
        p.add_argument(
            "--routes",
            default=os.environ.get("CAROM_ROUTES", ROUTES_FILE),
            help="the routes file (default: $CAROM_ROUTES or %(default)s)",
        )
        p.add_argument(
            "--url",
            default=os.environ.get("PULSAR_URL", PulsarSettings().url),
            help="broker service URL (default: $PULSAR_URL or %(default)s)",
        )
        p.add_argument("--timeout", type=float, default=5.0, help="seconds for the broker")
    read.add_argument("--session", help="only this session's messages")
    read.add_argument(
        "-p", "--position", default="Latest", type=str.capitalize, choices=["Latest", "Earliest"]
    )
    read.add_argument("-n", "--num-messages", type=int, default=0, help="stop after N (0: never)")
    save.add_argument("--session", required=True, help="the session to write")
    save.add_argument("-o", "--output", help="file (default: <session>-<type>.webm/.mkv/.ogg)")
    args = parser.parse_args(argv)
    try:
        routes = load_routes(args.routes)
        topic, type_ = resolve_channel(args.channel, routes)
    except ValueError as exc:
        if args.channel.startswith(("persistent://", "non-persistent://")):
            topic, type_ = args.channel, None
        else:
            parser.error(str(exc))
    prog = f"{parser.prog} {args.command}"
    try:
        client = make_client(_settings(args), quiet_logger(100))
    except pulsar.PulsarException as exc:
        return _fail(prog, exc, args)
    try:
        try:
            reader = client.create_reader(
                topic,
                pulsar.MessageId.latest
                if args.command == "read" and args.position == "Latest"
                else pulsar.MessageId.earliest,
                reader_name=f"carom-channels-{uuid.uuid4().hex[:8]}",
            )
        except pulsar.PulsarException as exc:
            return _fail(prog, exc, args)
        if args.command == "read":
            return _read_channel(prog, args, reader)
        return _save_channel(prog, args, reader, type_ or topic.rsplit("/", 1)[-1])
    finally:
        try:
            client.close()
        except pulsar.PulsarException:
            pass


def _decode(prog: str, msg: pulsar.Message) -> channels.Record | None:
    try:
        return channels.decode_record(msg.data())
    except channels.ChannelError as exc:
        _say(f"{prog}: message {msg.message_id()}: {exc}")
        return None


def _read_channel(prog: str, args: argparse.Namespace, reader: Any) -> int:
    seen = 0
    try:
        while args.num_messages == 0 or seen < args.num_messages:
            try:
                msg = reader.read_next(200)
            except pulsar.Timeout:
                continue
            record = _decode(prog, msg)
            if record is None or (args.session and record.session_id != args.session):
                continue
            print(channel_line(record), flush=True)
            seen += 1
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    except pulsar.PulsarException as exc:
        return _fail(prog, exc, args)
    _say(f"{seen} messages read")
    return 0


def _save_channel(prog: str, args: argparse.Namespace, reader: Any, type_: str) -> int:
    """Read the topic from its start to the session's ``ChannelEnd`` (or the topic's end)."""
    records: list[channels.Record] = []
    ended = False
    try:
        while not ended and reader.has_message_available():
            try:
                msg = reader.read_next(1000)
            except pulsar.Timeout:
                continue
            record = _decode(prog, msg)
            if record is None or record.session_id != args.session:
                continue
            records.append(record)
            ended = isinstance(record, channels.ChannelEnd)
    except KeyboardInterrupt:
        return 130
    except pulsar.PulsarException as exc:
        return _fail(prog, exc, args)
    msgs, dups = session_chunks(records, args.session)
    if not ended:
        _say(f"{prog}: no end of session {args.session} on the topic yet: writing what is there")
    if dups:
        _say(f"{prog}: {dups} duplicate messages left out")
    try:
        print(write_media_file(msgs, args.output, f"{args.session}-{type_}"))
    except ValueError as exc:  # media.MediaError too
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
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


def channels_main() -> None:
    _exit(channels_cli())
