"""Fuzz targets: one function per parser, bytes in; anything but the parser's own error is a crash.

Each target also checks a property the code promises (a round trip, a decision that more bytes
can't change), so a wrong answer is a crash too, not only an exception. The same functions run
under atheris (``scripts/fuzz TARGET``) and in CI, where ``test_corpus.py`` replays the corpus.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httptools
import yaml

from tether.api import protolite
from tether.api.gen import (
    destination_lite,
    destination_pb2,
    identity_lite,
    identity_pb2,
    inbound_lite,
    inbound_pb2,
    outbound_lite,
    outbound_pb2,
    tap_lite,
    tap_pb2,
)
from tether.control.injector.admission import ReviewError, mutate, validate
from tether.core import transport_header
from tether.core.http import h1, h2frames, hpack
from tether.core.http import h2proto as proto
from tether.core.http.detect import Detected, client_hello_sni, detect, looks_like_http1_prefix
from tether.core.identity import csr, names
from tether.core.inject import InjectValues, merge
from tether.core.resources import Loaded, decode, load_text

Target = Callable[[bytes], None]


class _Head:
    """httptools callbacks that apply the proxy's head rules, as the HTTP/1 server does."""

    def __init__(self, parser: httptools.HttpRequestParser | None = None) -> None:
        self.parser = parser
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.in_head = True
        self.done = 0
        self.framing: h1.Framing | None = None

    def on_message_begin(self) -> None:
        self.url, self.headers, self.in_head = b"", [], True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        (self.headers if self.in_head else self.trailers).append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        assert self.parser is not None
        self.framing = h1.check_request_head(self.parser.get_http_version(), self.headers)
        authority, path = h1.split_target(self.parser.get_method(), self.url)
        assert b"@" not in authority
        assert path[:1] in (b"/", b"*") or (path == b"" and self.parser.get_method() == b"CONNECT")
        if self.framing.chunked:
            assert self.framing.content_length is None

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done += 1


def h1_head(data: bytes) -> None:
    """An HTTP/1 request head: the request-line check, then llhttp with the proxy's head rules."""
    eol = data.find(b"\n")
    if eol >= 0:
        try:
            h1.check_request_line(data[:eol])
            method, target, version = data[:eol].split(b" ")
            assert version.startswith(b"HTTP/1.") and target and method
        except h1.H1Error as e:
            assert e.status in (400, 505)
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    head.parser = parser
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade, h1.H1Error):
        pass
    try:
        h1.check_host(data[:200])
    except h1.H1Error:
        pass


_CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def h1_chunked(data: bytes) -> None:
    """Chunked framing: arbitrary bytes as a chunked body, and chunks we encode read back intact."""
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    head.parser = parser
    try:
        parser.feed_data(_CHUNKED_HEAD + data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade, h1.H1Error):
        pass
    # Round trip: the input cut at its 0x00 bytes is a list of chunks; encoded and parsed, the
    # body must come back whole, with the trailers.
    pieces = [p for p in data.split(b"\x00") if p]
    trailers = [(b"x-t", bytes(b for b in data[:8] if 0x21 <= b <= 0x7E) or b"v")]
    wire = b"".join(h1.encode_chunk(p) for p in pieces) + h1.encode_last_chunk(trailers)
    back = _Head()
    p2 = httptools.HttpRequestParser(back)
    back.parser = p2
    p2.feed_data(_CHUNKED_HEAD + wire)
    assert back.done == 1 and bytes(back.body) == b"".join(pieces), (back.done, len(back.body))
    assert back.trailers == trailers


_PARSERS: list[Callable[[bytes, int, int], object]] = [
    lambda p, fl, sid: h2frames.strip_padding(p, fl, sid),
    lambda p, fl, sid: h2frames.parse_priority(p, sid),
    lambda p, fl, sid: h2frames.parse_headers_payload(p, fl, sid),
    lambda p, fl, sid: h2frames.parse_rst_stream(p),
    lambda p, fl, sid: h2frames.parse_settings(p),
    lambda p, fl, sid: h2frames.parse_push_promise(p, fl),
    lambda p, fl, sid: h2frames.parse_ping(p),
    lambda p, fl, sid: h2frames.parse_goaway(p),
    lambda p, fl, sid: h2frames.parse_window_update(p),
]


def h2_frames(data: bytes) -> None:
    """The HTTP/2 frame decoders: each payload parser on arbitrary payloads and flags."""
    if len(data) < 9:
        return
    length, ftype, flags, sid = h2frames.parse_header(data, 0)
    assert length < 1 << 24 and sid < 1 << 31
    payload = data[9:]
    try:
        _PARSERS[ftype % len(_PARSERS)](payload, flags, sid)
    except h2frames.FrameError:
        pass


def hpack_decode(data: bytes) -> None:
    """HPACK: decode a field block; what decodes re-encodes and decodes to the same list."""
    dec = hpack.Decoder(max_header_list_size=16384)
    try:
        fields = dec.decode(data)
    except hpack.HPACKError:
        return
    again = hpack.Decoder(max_header_list_size=1 << 20).decode(hpack.Encoder().encode(fields))
    assert again == fields
    try:
        text = hpack.huffman_decode(data)
    except hpack.HPACKError:
        return
    assert hpack.huffman_decode(hpack.huffman_encode(text)) == text


def h2_connection(data: bytes) -> None:
    """The HTTP/2 connection state machine, server side: a preface, then arbitrary frames.

    The first byte picks how the bytes are cut into reads; each request gets an answer.
    """
    if not data:
        return
    step = 1 + data[0] % 64
    stream = h2frames.PREFACE + h2frames.settings_frame([]) + data[1:]
    conn = proto.H2Connection(client_side=False, max_concurrent_streams=8, max_closed_streams=16)
    conn.initiate_connection()
    try:
        for i in range(0, len(stream), step):
            for ev in conn.receive_data(stream[i : i + step]):
                if isinstance(ev, proto.RequestReceived):
                    try:
                        conn.send_headers(ev.stream_id, [(b":status", b"200")], end_stream=True)
                    except (proto.H2UsageError, proto.ProtocolError):
                        pass
            conn.data_to_send()
    except proto.ProtocolError:
        conn.data_to_send()


def detection(data: bytes) -> None:
    """Protocol detection: a decision, once made, is what any longer prefix gets too."""
    limit = 64 + (data[0] if data else 0) * 4
    data = data[: limit + 8]  # past the limit nothing more is read
    full = detect(data, limit)
    for k in range(1, len(data)):
        early = detect(data[:k], limit)
        if early is not Detected.NEED_MORE:
            assert early is full, (data[:k], early, full)
            break
    looks_like_http1_prefix(data)
    if full is Detected.TLS:
        result = client_hello_sni(data)
        assert result is None or isinstance(result, (str, Detected))


def transport_header_decode(data: bytes) -> None:
    """The transport header: decode; what decodes encodes back to the same header."""
    for blob in (data, transport_header.PREFACE + data):
        try:
            got = transport_header.decode(blob)
        except transport_header.TransportHeaderError:
            continue
        if got is not None:
            header, used = got
            assert 0 < used <= len(blob)
            again = transport_header.decode(transport_header.encode(header))
            assert again is not None and again[0] == header


def identity_names(data: bytes) -> None:
    """SPIFFE ids and identity names: parse; a parsed identity prints to what parses back to it."""
    text = data.decode("utf-8", "replace")
    for parse in (names.parse_identity_name, lambda t: names.identity_from_spiffe_id(t, "linkerd")):
        try:
            ident = parse(text)
        except names.IdentityNameError:
            continue
        assert names.parse_identity_name(ident.dns_name) == ident
        assert names.identity_from_spiffe_id(ident.spiffe_id, ident.control_plane_ns) == ident
    try:
        names.parse_spiffe_id(text)
    except names.IdentityNameError:
        pass
    try:
        names.check_trust_domain(text)
    except names.IdentityNameError:
        pass


_IDENTITY = names.WorkloadIdentity("web", "demo", "linkerd", "cluster.local")


def csr_validate(data: bytes) -> None:
    """CSR validation: arbitrary DER is refused with CsrError, never anything else."""
    try:
        csr.validate_csr(data, _IDENTITY)
    except csr.CsrError:
        pass


def resources(data: bytes) -> None:
    """The resource loader (``tether apply``, the local store): YAML text in, models or located errors out.

    Any input gives a LoadResult whose errors are one line each (what the CLI prints), never an
    exception; a resource that loads dumps to a document that loads back to the same resource.
    """
    text = data.decode("utf-8", "replace")
    result = load_text(text, "fuzz.yaml")
    for err in result.errors:
        line = str(err)
        assert line.startswith("fuzz.yaml") and "\n" not in line, line
    for item in result.loaded:
        dumped = item.resource.dump()
        again = decode(dumped, "again.yaml")
        assert isinstance(again, Loaded), [str(e) for e in again]
        assert again.resource.dump() == dumped


_CHART = Path(__file__).resolve().parents[2] / "charts" / "tether-control-plane"
_VALUES = InjectValues.from_values(merge(yaml.safe_load((_CHART / "values.yaml").read_text()), {
    "identityTrustAnchorsPEM": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"}), "linkerd", "0.1.0")


def _namespace(name: str) -> Mapping[str, str]:
    if name == "gone":
        raise LookupError("namespace not found")
    return {"linkerd.io/inject": "enabled"} if name == "meshed" else {}


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply(doc: Any, patch: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace, as the API server applies the injector's patch (any other op fails)."""
    for op in patch:
        *parents, last = _pointer(op["path"])
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        elif op["op"] in ("add", "replace") and isinstance(target, list):
            if last == "-":
                target.append(op["value"])
            elif op["op"] == "add":
                target.insert(int(last), op["value"])
            else:
                target[int(last)] = op["value"]
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or last in target, op
            target[last] = op["value"]
        else:
            raise AssertionError(f"unexpected patch op {op!r}")
    return doc


def admission(data: bytes) -> None:
    """The webhooks: any body is an AdmissionReview answered for its uid, or a ReviewError (HTTP 400).

    A refusal carries a one-line message; an injection patch applies to the pod as the API server
    applies it, and the patched pod, reviewed again, is not injected twice (the injector is idempotent).
    """
    for review in (lambda: mutate(data, _VALUES, _namespace, "0.1.0"), lambda: validate(data)):
        try:
            out = review()
        except ReviewError as e:
            assert "\n" not in str(e), str(e)
            continue
        request = json.loads(data)["request"]
        response = out.response["response"]
        assert response["uid"] == request["uid"] and isinstance(response["allowed"], bool)
        if not response["allowed"]:
            message = response["status"]["message"]
            assert isinstance(message, str) and message and "\n" not in message, message
        if "patch" not in response:
            continue
        patch = json.loads(base64.b64decode(response["patch"]))
        pod = _apply(json.loads(json.dumps(request["object"])), patch)
        again = dict(json.loads(data), request=dict(request, object=pod))
        second = mutate(json.dumps(again).encode(), _VALUES, _namespace, "0.1.0")
        assert "patch" not in second.response["response"], (out.result, second.response)


# The messages the proxy decodes from the control plane and from tap clients, with protobuf's classes.
_PROTO_TYPES: list[tuple[type[protolite.Message], Any]] = [
    (destination_lite.Update, destination_pb2.Update),
    (destination_lite.DestinationProfile, destination_pb2.DestinationProfile),
    (outbound_lite.OutboundPolicy, outbound_pb2.OutboundPolicy),
    (inbound_lite.Server, inbound_pb2.Server),
    (tap_lite.ObserveRequest, tap_pb2.ObserveRequest),
    (identity_lite.CertifyResponse, identity_pb2.CertifyResponse),
]


def protolite_decode(data: bytes) -> None:
    """protolite, the proxy's protobuf decoder: the first byte picks a message type, the rest is decoded.
    Only DecodeError; what decodes re-encodes to the same message, and google.protobuf reads the input
    as that same message (it accepts everything protolite does)."""
    if not data:
        return
    lite, pb = _PROTO_TYPES[data[0] % len(_PROTO_TYPES)]
    raw = data[1:]
    try:
        msg = lite.FromString(raw)
    except protolite.DecodeError:
        return
    again = msg.SerializeToString()
    again2 = lite.FromString(again)
    # NaN != NaN (a float field may decode to NaN): such messages are compared by their encodings.
    assert again2 == msg or again2.SerializeToString() == again
    theirs = pb.FromString(raw)
    theirs.DiscardUnknownFields()
    ours = pb.FromString(again)
    assert ours == theirs or ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True), (raw, msg)


TARGETS: dict[str, Target] = {
    "h1_head": h1_head,
    "h1_chunked": h1_chunked,
    "h2_frames": h2_frames,
    "hpack": hpack_decode,
    "h2_connection": h2_connection,
    "detect": detection,
    "transport_header": transport_header_decode,
    "identity_names": identity_names,
    "csr": csr_validate,
    "resources": resources,
    "admission": admission,
    "protolite": protolite_decode,
}
