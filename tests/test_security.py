"""TLS, mutual TLS, bearer tokens and the plaintext-exposure rule (certificates made here, real servers)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
from conftest import REPO, quartz_like, random_field_model
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from macefield_client import AsyncClient, AuthenticationError, Client, ServerUnavailable, TLSConfig
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as pb_grpc
from pki import make_cert, new_key, pem_cert, pem_key
from serving import ServerProcess, request_for, save_tiny_model

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import ConfigError, SecurityConfig, ServerConfig, load_config
from macefield_server.serving.registry import ServedModel
from macefield_server.serving.security import TOKENS_ENV, TokenAuthInterceptor, is_loopback, load_tokens, parse_tokens
from macefield_server.cli.serve import build_config, parse_args

TOKEN = "s3cret-token-A"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
OTHER_TOKEN = "second-token-B"


# --------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate (127.0.0.1 / localhost) and a client certificate, plus an unrelated CA
    with its own client certificate.  Returns {name: path}."""
    d = tmp_path_factory.mktemp("pki")
    files = {}

    def write(name, data):
        path = d / name
        path.write_bytes(data)
        files[name] = path

    ca_key, other_key = new_key(), new_key()
    ca = make_cert("MACE-Field test CA", ca_key, ca=True)
    other = make_cert("Unrelated CA", other_key, ca=True)
    write("ca.pem", pem_cert(ca))
    write("other-ca.pem", pem_cert(other))

    server_key = new_key()
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    write("server.pem", pem_cert(make_cert("localhost", server_key, ca, ca_key, san=san)))
    write("server.key", pem_key(server_key))

    client_key = new_key()
    write("client.pem", pem_cert(make_cert("client-1", client_key, ca, ca_key, client=True)))
    write("client.key", pem_key(client_key))

    rogue_key = new_key()
    write("rogue.pem", pem_cert(make_cert("rogue", rogue_key, other, other_key, client=True)))
    write("rogue.key", pem_key(rogue_key))

    write("tokens", f"# bearer tokens of the test\n\n  {TOKEN}  \n# {'commented-out'}\n{OTHER_TOKEN}\n".encode())
    return files


def _served():
    return [ServedModel("tiny", random_field_model(heads=("sio2", "other"), seed=3), "sio2")]


def _serving(security: SecurityConfig, env_tokens: str | None = None):
    """Fixture body: a BackgroundServer on 127.0.0.1 with ``security`` (and
    $MACEFIELD_AUTH_TOKENS while it starts); yields its address, stops it afterwards."""
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, security=security)
    saved = os.environ.pop(TOKENS_ENV, None)
    if env_tokens is not None:
        os.environ[TOKENS_ENV] = env_tokens
    try:
        srv = BackgroundServer(config, _served()).start()
    finally:
        os.environ.pop(TOKENS_ENV, None)
        if saved is not None:
            os.environ[TOKENS_ENV] = saved
    try:
        yield f"127.0.0.1:{srv.port}"
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tls_server(pki):
    """TLS (server certificate only) and the token file's tokens."""
    yield from _serving(SecurityConfig(tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]),
                                       auth_token_file=str(pki["tokens"])))


@pytest.fixture(scope="module")
def mtls_server(pki):
    """Mutual TLS: client certificates signed by ca.pem required; no tokens."""
    yield from _serving(SecurityConfig(tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]),
                                       tls_client_ca=str(pki["ca.pem"])))


@pytest.fixture(scope="module")
def env_token_server():
    """Plaintext on loopback, tokens from $MACEFIELD_AUTH_TOKENS only."""
    yield from _serving(SecurityConfig(), env_tokens=f" {TOKEN} ,, {OTHER_TOKEN}")


def health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20).status


# --------------------------------------------------------------------------- TLS


def test_environment_fills_the_arguments_not_given_in_every_interface(tls_server, pki, monkeypatch):
    """$MACEFIELD_TLS_CA, $MACEFIELD_TOKEN and $MACEFIELD_TLS_SERVER_NAME reach Client, AsyncClient and the ASE
    calculator alike (not only the CLI); an explicit argument wins."""
    from macefield_client.ase import MACEFieldCalculator

    atoms = quartz_like()
    monkeypatch.setenv("MACEFIELD_TLS_CA", str(pki["ca.pem"]))
    monkeypatch.setenv("MACEFIELD_TOKEN", TOKEN)
    monkeypatch.setenv("MACEFIELD_TLS_SERVER_NAME", "localhost")  # on the certificate, as 127.0.0.1 is
    with Client(tls_server, timeout=60, retry=0) as c:
        assert c.predict(atoms, outputs=["forces"]).forces.shape == (len(atoms), 3)
        with pytest.raises(AuthenticationError):  # an explicit token wins over $MACEFIELD_TOKEN
            Client(tls_server, token="wrong", timeout=60, retry=0).list_models()

    async def run():
        async with AsyncClient(tls_server, timeout=60, retry=0) as c:
            return await c.predict(atoms, outputs=["forces"])

    assert asyncio.run(run()).forces.shape == (len(atoms), 3)
    calc = MACEFieldCalculator(tls_server, timeout=60)
    atoms.calc = calc
    assert atoms.get_forces().shape == (len(atoms), 3)
    calc.close()
    with pytest.raises(ServerUnavailable):  # an explicit tls=False wins over $MACEFIELD_TLS_CA: plaintext to TLS
        Client(tls_server, tls=False, timeout=10, retry=0).list_models()
    monkeypatch.setenv("MACEFIELD_TLS_SERVER_NAME", "not-on-the-certificate.example")
    with pytest.raises(ServerUnavailable):
        Client(tls_server, timeout=10, retry=0).list_models()
    monkeypatch.setenv("MACEFIELD_TLS_CA", str(pki["ca.pem"]) + ".missing")
    with pytest.raises(ValueError, match=r"\$MACEFIELD_TLS_CA: file not found"):
        Client(tls_server)


def test_tls_predict_end_to_end_with_ca_path_and_bytes(tls_server, pki):
    atoms = quartz_like()
    with Client(tls_server, tls=str(pki["ca.pem"]), token=TOKEN, timeout=60) as c:
        r = c.predict(atoms, electric_field=(0.0, 0.0, 0.02), outputs=["forces"])
        assert r.forces.shape == (len(atoms), 3) and r.energy == r.energy
    with Client(tls_server, tls=pki["ca.pem"].read_bytes(), token=OTHER_TOKEN, timeout=60) as c:
        again = c.predict(atoms, electric_field=(0.0, 0.0, 0.02), outputs=["forces"])
    assert again.energy == pytest.approx(r.energy, rel=1e-12)
    with Client(tls_server, tls=TLSConfig(ca=pki["ca.pem"]), token=TOKEN, timeout=60) as c:
        assert [m.name for m in c.list_models().models] == ["tiny"]


def test_tls_wrong_ca_and_plaintext_are_refused_clearly(tls_server, pki):
    with Client(tls_server, tls=str(pki["other-ca.pem"]), token=TOKEN, timeout=20, retry=0) as c:
        with pytest.raises(ServerUnavailable, match=re.escape(tls_server)) as info:
            c.predict(quartz_like())
    assert re.search(r"handshake|certificate|CERTIFICATE", str(info.value)), str(info.value)
    with Client(tls_server, token=TOKEN, timeout=20, retry=0) as c:  # plaintext to a TLS port
        with pytest.raises(ServerUnavailable):
            c.predict(quartz_like())


def test_health_without_token_over_tls_reflection_needs_one(tls_server, pki):
    creds = grpc.ssl_channel_credentials(pki["ca.pem"].read_bytes())
    with grpc.secure_channel(tls_server, creds) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([ask]), timeout=20))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (reply,) = stub.ServerReflectionInfo(iter([ask]), timeout=20, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert "macefield.v1.MaceField" in {s.name for s in reply.list_services_response.service}


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", TOKEN[:-1]],
                         ids=["none", "wrong", "longer", "prefix"])
def test_token_refused_unary_and_stream(tls_server, pki, token):
    with Client(tls_server, tls=str(pki["ca.pem"]), token=token, timeout=30) as c:
        with pytest.raises(AuthenticationError) as info:
            c.predict(quartz_like())
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and tls_server in str(info.value)
        with pytest.raises(AuthenticationError):
            c.list_models()
        with c.session() as s, pytest.raises(AuthenticationError):
            s.predict(quartz_like())


def test_token_accepted_unary_stream_batch_and_async(tls_server, pki):
    cases = [quartz_like(seed=i) for i in range(3)]
    with Client(tls_server, tls=str(pki["ca.pem"]), token=OTHER_TOKEN, timeout=60) as c:
        single = [c.predict(a) for a in cases]
        with c.session() as s:
            streamed = [s.predict(a) for a in cases]
        batched = c.predict_many(cases, batch_size=3)
    for a, b, d in zip(single, streamed, batched):
        assert a.energy == pytest.approx(b.energy, rel=1e-12) and a.energy == pytest.approx(d.energy, rel=1e-12)

    async def run():
        async with AsyncClient(tls_server, tls=str(pki["ca.pem"]), token=TOKEN, timeout=60) as ac:
            r = await ac.predict(cases[0])
            async with ac.session() as s:
                r2 = await s.predict(cases[0])
        async with AsyncClient(tls_server, tls=str(pki["ca.pem"]), token="nope", timeout=60) as bad:
            with pytest.raises(AuthenticationError):
                await bad.predict(cases[0])
            async with bad.session() as s:
                with pytest.raises(AuthenticationError):
                    await s.predict(cases[0])
        return r, r2

    r, r2 = asyncio.run(run())
    assert r.energy == pytest.approx(single[0].energy, rel=1e-12) and r2.energy == pytest.approx(r.energy, rel=1e-12)


def test_raw_grpc_metadata_forms(env_token_server):
    """Tokens from $MACEFIELD_AUTH_TOKENS on a plaintext loopback port; the scheme is case-insensitive,
    other schemes and a bare token are refused; health needs no token."""
    with grpc.insecure_channel(env_token_server) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.MaceFieldStub(channel)
        request = request_for(quartz_like())
        for value in (f"Bearer {TOKEN}", f"bearer {OTHER_TOKEN}"):
            assert stub.Predict(request, timeout=60, metadata=(("authorization", value),)).n_atoms == 9
            (reply,) = stub.PredictStream(iter([request]), timeout=60, metadata=(("authorization", value),))
            assert reply.n_atoms == 9
        for md in ((), (("authorization", TOKEN),), (("authorization", f"Basic {TOKEN}"),),
                   (("authorization", "Bearer "),), (("x-token", TOKEN),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request, timeout=30, metadata=md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
            with pytest.raises(grpc.RpcError) as info:
                list(stub.PredictStream(iter([request]), timeout=30, metadata=md))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
            with pytest.raises(grpc.RpcError) as info:
                stub.PredictBatch(pb.PredictBatchRequest(structures=[request]), timeout=30, metadata=md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, md


def test_interceptor_refuses_every_method_shape():
    """unary-unary, unary-stream, stream-unary and stream-stream handlers all end UNAUTHENTICATED without the
    token and run with it (a generic service: MaceField itself has no unary-stream / stream-unary method)."""

    async def uu(request, context):
        return request

    async def us(request, context):
        yield request
        yield request

    async def su(requests, context):
        return b"".join([r async for r in requests])

    async def ss(requests, context):
        async for r in requests:
            yield r

    handlers = {"UU": grpc.unary_unary_rpc_method_handler(uu), "US": grpc.unary_stream_rpc_method_handler(us),
                "SU": grpc.stream_unary_rpc_method_handler(su), "SS": grpc.stream_stream_rpc_method_handler(ss)}

    async def main():
        server = grpc.aio.server(interceptors=[TokenAuthInterceptor([TOKEN])])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        good = (("authorization", f"Bearer {TOKEN}"),)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                calls = {
                    "UU": lambda md: ch.unary_unary("/t.Echo/UU")(b"x", metadata=md, timeout=20),
                    "US": lambda md: _collect(ch.unary_stream("/t.Echo/US")(b"x", metadata=md, timeout=20)),
                    "SU": lambda md: ch.stream_unary("/t.Echo/SU")(iter([b"x", b"y"]), metadata=md, timeout=20),
                    "SS": lambda md: _collect(ch.stream_stream("/t.Echo/SS")(iter([b"x", b"y"]), metadata=md,
                                                                           timeout=20)),
                }
                results = {}
                for name, call in calls.items():
                    results[name] = await call(good)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call((("authorization", "Bearer wrong"),))
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                return results
        finally:
            await server.stop(0)

    async def _collect(call):
        return [r async for r in call]

    assert asyncio.run(main()) == {"UU": b"x", "US": [b"x", b"x"], "SU": b"xy", "SS": [b"x", b"y"]}


def test_token_file_and_env_parsing(pki, tmp_path):
    assert parse_tokens(pki["tokens"].read_text()) == [TOKEN, OTHER_TOKEN]
    env = {TOKENS_ENV: "a, b,,  "}
    assert load_tokens(str(pki["tokens"]), env) == [TOKEN, OTHER_TOKEN, "a", "b"]
    assert load_tokens(None, {}) == []
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="security.auth_token_file: no token"):
        ServerConfig(security=SecurityConfig(auth_token_file=str(empty))).validate()


# --------------------------------------------------------------------------- mutual TLS


def test_mutual_tls(mtls_server, pki):
    atoms = quartz_like()
    good = TLSConfig(ca=pki["ca.pem"], cert=pki["client.pem"], key=pki["client.key"].read_bytes())
    with Client(mtls_server, tls=good, timeout=60) as c:
        assert c.predict(atoms).forces.shape == (len(atoms), 3)
    refused = {
        "no client certificate": str(pki["ca.pem"]),
        "certificate of another CA": TLSConfig(ca=pki["ca.pem"], cert=pki["rogue.pem"], key=pki["rogue.key"]),
    }
    for what, tls in refused.items():
        with Client(mtls_server, tls=tls, timeout=20, retry=0) as c:
            with pytest.raises(ServerUnavailable, match=re.escape(mtls_server)):
                c.predict(atoms)
            with pytest.raises(ServerUnavailable):
                with c.session() as s:
                    s.predict(atoms)
    with pytest.raises(ValueError, match="cert and key"):
        TLSConfig(ca=pki["ca.pem"], cert=pki["client.pem"])


# --------------------------------------------------------------------------- configuration and the CLIs


def test_security_config_keys_and_cli_overrides(pki, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"host: 0.0.0.0\nsecurity:\n  tls_cert: {pki['server.pem']}\n  tls_key: {pki['server.key']}\n"
                   f"  tls_client_ca: {pki['ca.pem']}\n  auth_token_file: {pki['tokens']}\n")
    loaded = load_config(cfg)
    assert loaded.security == SecurityConfig(str(pki["server.pem"]), str(pki["server.key"]), str(pki["ca.pem"]),
                                             str(pki["tokens"]), False)
    assert loaded.check_exposure() is None  # TLS on 0.0.0.0: fine
    bad = {
        "security:\n  tls_cert: x.pem\n": "security.tls_key",
        f"security:\n  tls_key: {pki['server.key']}\n": "security.tls_cert",
        f"security:\n  tls_client_ca: {pki['ca.pem']}\n": "security.tls_client_ca",
        f"security:\n  tls_cert: {tmp_path / 'missing.pem'}\n  tls_key: {pki['server.key']}\n": "security.tls_cert",
        "security:\n  auth_token_file: /nonexistent/tokens\n": "security.auth_token_file",
        "security:\n  tokens: [a]\n": "security.tokens",
        "security:\n  insecure: maybe\n": "security.insecure",
    }
    for text, key in bad.items():
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(cfg)

    args = parse_args(["--host", "::", "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
                       "--tls-client-ca", str(pki["ca.pem"]), "--auth-token-file", str(pki["tokens"]),
                       "--metrics-host", "127.0.0.1"])
    config = build_config(args)
    assert config.security.tls and config.security.tls_client_ca == str(pki["ca.pem"])
    assert config.metrics_host == "127.0.0.1" and config.host == "::"
    cfg.write_text("host: 192.168.1.20\nsecurity:\n  insecure: true\n")
    assert "plaintext" in build_config(parse_args(["--config", str(cfg)])).check_exposure()
    for host in ("0.0.0.0", "::", "[::]", "192.168.1.20", "example.org", ""):
        assert not is_loopback(host), host
        with pytest.raises(ConfigError, match="--insecure"):
            build_config(parse_args(["--host", host]))
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        assert build_config(parse_args(["--host", host])).check_exposure() is None


def test_container_configs_pass_the_exposure_rule():
    for name in ("serve.yaml", "serve.gpu.yaml"):
        config = load_config(REPO / "docker" / name)
        assert config.host == "0.0.0.0" and config.security.insecure and config.check_exposure()
    dockerfile = (REPO / "Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)
    config = build_config(parse_args(json.loads(cmd)))
    assert config.host == "0.0.0.0" and config.check_exposure()  # a warning, not a refusal


def test_client_cli_with_tls_ca_and_token(tls_server, pki, tmp_path):
    base = [sys.executable, "-m", "macefield_client.cli", "info", "--json", "--server", tls_server,
            "--tls-ca", str(pki["ca.pem"]), "--retries", "0"]
    env = dict(os.environ, MACEFIELD_TOKEN=TOKEN)
    ok = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert [m["name"] for m in json.loads(ok.stdout)["models"]] == ["tiny"]
    env.pop("MACEFIELD_TOKEN")
    refused = subprocess.run(base + ["--token", "wrong"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "refused the credentials" in refused.stderr, refused.stderr


# --------------------------------------------------------------------------- the real process


def _serve(args, **kw):
    cmd = [sys.executable, "-m", "macefield_server.cli.serve", "--port", "0", "--metrics-port", "-1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          **kw)


def test_process_refuses_plaintext_on_all_interfaces_without_insecure(tmp_path):
    model = save_tiny_model(tmp_path / "tiny.pt")
    refused = _serve(["--host", "0.0.0.0", "--model", str(model)])
    assert refused.returncode == 2, refused.stderr
    assert "not a loopback address" in refused.stderr and "--insecure" in refused.stderr
    assert '"listening"' not in refused.stdout

    # ServerProcess passes --host 127.0.0.1 --metrics-port 0 first: the later options win
    proc = ServerProcess(["--host", "0.0.0.0", "--insecure", "--model", str(model), "--metrics-host", "127.0.0.2"])
    try:
        assert proc.port > 0 and proc.proc.poll() is None
        # /metrics listens on --metrics-host only (127.0.0.2), not on the gRPC host's addresses
        page = urllib.request.urlopen(f"http://127.0.0.2:{proc.metrics_port}/metrics", timeout=20).read()
        assert b"macefield_in_flight" in page
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proc.metrics_port), timeout=10).close()
        with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as channel:  # 0.0.0.0 includes loopback
            assert health(channel) in (NOT_SERVING, SERVING)
    finally:
        proc.kill()
    assert "WARNING" in proc.stderr() and "plaintext" in proc.stderr(), proc.stderr()


def test_process_tls_and_token_file_from_the_command_line(tmp_path, pki):
    model = save_tiny_model(tmp_path / "tiny.pt")
    proc = ServerProcess(["--model", f"tiny={model}", "--tls-cert", str(pki["server.pem"]), "--tls-key",
                          str(pki["server.key"]), "--auth-token-file", str(pki["tokens"])])
    try:
        target = f"127.0.0.1:{proc.port}"
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(pki["ca.pem"].read_bytes())) as channel:
            assert health(channel) in (NOT_SERVING, SERVING)
        with Client(target, tls=str(pki["ca.pem"]), token="wrong", timeout=60, retry=0) as c:
            with pytest.raises(AuthenticationError):
                c.list_models()
    finally:
        proc.kill()
    assert "(TLS" in proc.stderr() and "bearer token(s) required" in proc.stderr(), proc.stderr()


def test_health_probe_over_tls_and_mutual_tls(tls_server, mtls_server, pki, capsys):
    from macefield_server.cli.health import main as probe

    assert probe(["--address", tls_server, "--tls-ca", str(pki["ca.pem"])]) == 0  # no token needed
    assert "SERVING" in capsys.readouterr().out
    assert probe(["--address", tls_server, "--timeout", "3"]) == 1  # plaintext probe of a TLS port
    client = ["--tls-cert", str(pki["client.pem"]), "--tls-key", str(pki["client.key"])]
    assert probe(["--address", mtls_server, "--tls-ca", str(pki["ca.pem"]), *client]) == 0
    assert probe(["--address", mtls_server, "--tls-ca", str(pki["ca.pem"]), "--timeout", "3"]) == 1  # no client cert


def test_in_process_server_refuses_plaintext_on_all_interfaces():
    from macefield_server.serving.app import MaceFieldServer

    async def start():
        server = MaceFieldServer(ServerConfig(host="0.0.0.0", port=0, metrics_port=-1), _served())
        try:
            await server.start()
        finally:
            await server.stop(0)

    with pytest.raises(ConfigError, match="insecure"):
        asyncio.run(start())
