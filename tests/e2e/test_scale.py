"""`loraswap scale` on a local Ray cluster on loopback: 2 replicas of a tiny Llama with 4 adapters (2 resident a
replica), behind the router. Every answer equals an in-process single server's; each adapter's requests land on one
replica (its home: Ray Serve's multiplexing), the adapters spread over both, and most find their adapter resident;
a streamed completion streams through; admin changes reach every replica, also one started after them; /metrics
labels each replica's series. First, `loraswap scale` itself: SIGTERM takes it down with the Ray it started.
Skips, saying why, without Ray Serve (the `scale` extra)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.scale.routing import REPLICA_HEADER
from tests.e2e.test_live_server import free_port
from tests.server_helpers import ADMIN, SQUAD_CONTEXT, ready_client, samples_of, settings_in
from tests.tiny_models import make_adapter

ray = pytest.importorskip("ray", reason='needs Ray Serve: pip install -e ".[scale]"')
serve = pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install -e ".[scale]"')
psutil = pytest.importorskip("psutil")  # Ray's dependency

ADAPTERS = ("one", "two", "three", "four")
REPLICAS = 2
ROUNDS = 4  # requests per adapter and route after the first
QUESTIONS = ("Which NFL team won Super Bowl 50?", "Where was the game played?", "Who lost?", "When was it?")
# Ray Serve's routers learn which replica holds an adapter within this (0.1 s pushes, then the controller's long
# poll): a sleep, as no public state says what they know (serve.status() and its replica details name no model
# ids; the request router's RunningReplica.multiplexed_model_ids lives in the router deployment's process)
ROUTING_DELAY_S = 1.0
REPLACEMENT_TIMEOUT_S = 120  # for Ray Serve to replace a replica killed (a new process loading the model)
TAKE_DOWN_TIMEOUT_S = 60  # for `loraswap scale` to take the application and its Ray down (about 10 s on 2 cores)
SECOND_RUN_TIMEOUT_S = 180  # for a `loraswap scale` refused on a cluster to end (torch and Ray load, then it joins)


@pytest.fixture(scope="module")
def settings(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("scale")
    adapters = {name: make_adapter(tiny_llama_dir, root / "made" / name, seed=seed)
                for seed, name in enumerate(ADAPTERS)}
    return settings_in(root, tiny_llama_dir, adapters, max_resident=2, qa_adapter="one", nli_adapter="two")


@pytest.fixture(scope="module")
def single(settings):
    with ready_client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def scaled(settings) -> Iterator[httpx.Client]:
    """The scaled service on a Ray cluster of its own (2 logical CPUs: one a replica), taken down at the end."""
    from service.scale.app import APP_NAME, ScaleConfig, build_app

    ray.init(num_cpus=REPLICAS, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, ScaleConfig(replicas=REPLICAS)), name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def running(processes: list) -> list:
    """Those of ``processes`` still running (a zombie has ended: only its parent has not reaped it)."""
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def ready(url: str) -> bool:
    """Whether GET ``url`` answers 200 (Ray Serve's proxy answers 404 or 503 before the application runs)."""
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def deployments(processes: list) -> dict[str, psutil.Process]:
    """Those of ``processes`` that run a deployment of loraswap's application (Ray names each after its deployment:
    ``ray::ServeReplica:loraswap:Router``, and while it runs a method ``...:Router.handle_request_with_rejection``: the
    suite's run of c3e14ac failed on it), by their deployment's name."""
    from service.scale.app import APP_NAME

    named = {}
    for process in running(processes):
        title = " ".join(process.cmdline())
        if f"ServeReplica:{APP_NAME}:" in title:
            named[title.split(f"ServeReplica:{APP_NAME}:")[1].split()[0].split(".")[0]] = process
    return named


def holds_bitsandbytes(process: psutil.Process) -> bool:
    """Whether ``process`` has bitsandbytes' native library mapped (imported with peft where it is installed)."""
    return "bitsandbytes" in Path(f"/proc/{process.pid}/maps").read_text()


def test_sigterm_takes_scale_down_with_the_ray_it_started(settings, tmp_path):
    """A review: ray.init replaced loraswap's SIGTERM handler with its own (``sys.exit(15)``): exit status 134, and
    Ray's dashboard and runtime-env agents left running. Now as Ctrl-C: status 0, every process Ray started ended; a
    Ctrl-C 0.05 s after the SIGTERM changes nothing (taken down once, no traceback).
    Its replica's start warnings name the settings as its command line gave them (a review: they named the fields,
    max_new_tokens and qa_adapter), and bitsandbytes' warning is not among them (a review: each replica said it); nor
    is bitsandbytes in the replica's process, nor in the router's, of a full-precision base, as it is not in serve's
    (a review: 44 MiB each). First in the module: its own Ray, before the module's cluster starts (two would crowd 2
    cores)."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli.entry", "scale", "--replicas", "1", "--host", "127.0.0.1",
               "--port", str(port), "--base-model", settings.base_model, "--adapters-dir", str(settings.adapters_dir),
               "--cache-dir", str(settings.cache_dir), "--device", "cpu", "--max-new-tokens", "8"]
    with open(tmp_path / "scale.log", "w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        started = []
        try:
            ready_by = time.monotonic() + 180
            while not ready(f"http://127.0.0.1:{port}/ready"):
                assert process.poll() is None and time.monotonic() < ready_by, "loraswap scale did not get ready"
                time.sleep(1)
            started = psutil.Process(process.pid).children(recursive=True)  # Ray's processes, its agents among them
            served = deployments(started)
            assert sorted(served) == ["LoraswapReplica", "Router"]
            assert [name for name, deployment in served.items() if holds_bitsandbytes(deployment)] == []
            process.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            process.send_signal(signal.SIGINT)  # a second stop (Ctrl-C after timeout's SIGTERM): ignored (README)
            assert process.wait(timeout=TAKE_DOWN_TIMEOUT_S) == 0
            gone_by = time.monotonic() + 10
            while running(started) and time.monotonic() < gone_by:
                time.sleep(0.5)
            assert not [(child.pid, child.name()) for child in running(started)]
            log.seek(0)
            warned = log.read()
            assert "--max-new-tokens 8 leaves 504 of the base model's 512 positions" in warned  # the replica's
            assert "--qa-adapter 'squad' is not registered" in warned and "qa_adapter" not in warned
            assert "pip install kernels" not in warned  # bitsandbytes' advice, which serve does not say either
            assert warned.count("interrupted: taking the application down") == 1 and "Traceback" not in warned
        finally:
            process.kill()
            process.wait()
            for child in running(started):
                child.kill()
            log.seek(0)
            print(log.read()[-4000:])  # shown when the test fails


# `loraswap scale`, with a process taking its port once the preflight has found it free (before Ray starts)
TAKEN_AFTER_PREFLIGHT = """
import socket, sys
import service.scale.preflight as preflight
from service.cli.main import main
checked, taken, reuse_port = preflight.check_scale, [], sys.argv.pop(1) == "reuse_port"

def check_then_take(settings, args):
    checked(settings, args)
    taken.append(socket.create_server((settings.host, settings.port), reuse_port=reuse_port))

preflight.check_scale = check_then_take
sys.exit(main())
"""


@pytest.mark.parametrize("taker", ["alone", "reuse_port"])
def test_a_port_taken_after_the_preflight_is_a_usage_error_naming_the_port(settings, taker):
    """The preflight checks the port free, and Ray Serve's proxy binds it 10-30 s later, once Ray has started: a
    process that took it meanwhile made serve.start raise its proxy's RuntimeError as a traceback (exit status 1);
    one that took it with SO_REUSEPORT (as a second `loraswap scale` on the port, started at once, does) shared it
    with the proxy, which bound it with SO_REUSEPORT too: the service ran, the kernel spreading the connections over
    both. Now one line naming --port, status 2, the Ray started taken down. Before the module's
    cluster, as the test above (its own Ray)."""
    port = free_port()
    command = [sys.executable, "-c", TAKEN_AFTER_PREFLIGHT, taker, "scale", "--replicas", "1", "--host", "127.0.0.1",
               "--port", str(port), "--base-model", settings.base_model, "--adapters-dir", str(settings.adapters_dir),
               "--cache-dir", str(settings.cache_dir), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SECOND_RUN_TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-4000:]
    assert done.stderr.splitlines()[-1] == (
        f"loraswap scale: error: --port {port}: Ray Serve's HTTP proxy cannot listen on port {port} of 127.0.0.1 "
        f"(Failed to bind to address '127.0.0.1:{port}'.): a process took the port after loraswap scale found it "
        "free, or, on a cluster (--address), holds it on the head node: end that process, or give another --port")


def content(reply: httpx.Response) -> dict:
    """The body of a 200 ``reply``, less its latency."""
    assert reply.status_code == 200, reply.text
    return {key: value for key, value in reply.json().items() if key != "latency_ms"}


def approximately(body: dict) -> dict:
    """``body`` with its numbers (``score``, ``probabilities``) compared to 1e-5: a replica and the single server hold
    different prefix caches, and a prompt run past a cached prefix rounds differently in float32 from the same prompt
    run whole (README, prefix caching). Everything else, the answer text and its offsets included, compares exactly."""
    return {key: pytest.approx(value, rel=1e-5) if key in ("score", "probabilities") and value is not None else value
            for key, value in body.items()}


def both(scaled: httpx.Client, single, path: str, body: dict) -> str:
    """POST ``body`` to both services; assert the replies are equal; the replica that served the scaled one."""
    reply = scaled.post(path, json=body)
    assert content(reply) == approximately(content(single.post(path, json=body))), (path, body)
    return reply.headers[REPLICA_HEADER]


def answer_body(adapter: str, round_: int) -> dict:
    return {"context": SQUAD_CONTEXT, "question": QUESTIONS[round_ % len(QUESTIONS)], "adapter": adapter}


def nli_body(adapter: str, round_: int) -> dict:
    return {"premise": f"A man plays a guitar on stage number {round_}.", "hypothesis": "A person makes music.",
            "adapter": adapter}


def test_answers_equal_a_single_servers_and_each_adapter_has_a_home_replica(scaled, single):
    for adapter in ADAPTERS:  # the first request for each: Ray Serve places it on the replica holding fewest adapters
        both(scaled, single, "/answer", answer_body(adapter, 0))
        time.sleep(ROUTING_DELAY_S)
    hits: dict[str, Counter] = {adapter: Counter() for adapter in ADAPTERS}
    for round_ in range(1, ROUNDS + 1):
        for adapter in ADAPTERS:
            hits[adapter][both(scaled, single, "/answer", answer_body(adapter, round_))] += 1
            hits[adapter][both(scaled, single, "/nli", nli_body(adapter, round_))] += 1
    homes = {adapter: counts.most_common(1)[0] for adapter, counts in hits.items()}
    print("requests per adapter and replica:", {adapter: dict(counts) for adapter, counts in hits.items()})
    for adapter, (_, count) in homes.items():
        assert count >= 0.75 * 2 * ROUNDS, (adapter, hits[adapter])
    assert len({replica for replica, _ in homes.values()}) == REPLICAS, homes  # the adapters spread over both


def test_the_bare_base_model_and_defaults_answer_as_a_single_server(scaled, single):
    both(scaled, single, "/answer", {"context": SQUAD_CONTEXT, "question": QUESTIONS[0], "adapter": None})
    both(scaled, single, "/answer", {"context": SQUAD_CONTEXT, "question": QUESTIONS[0]})  # the qa_adapter, one
    both(scaled, single, "/nli", {"premise": "A dog runs.", "hypothesis": "An animal moves."})  # nli_adapter, two
    for reply in (scaled.post("/answer", json={"context": "x", "question": "y", "adapter": "absent"}),
                  scaled.post("/nli", content=b"{not json", headers={"Content-Type": "application/json"})):
        expected = single.post(reply.request.url.path, content=reply.request.content,
                               headers={"Content-Type": "application/json"})
        assert (reply.status_code, reply.json()) == (expected.status_code, expected.json())


def events(reply) -> list[dict]:
    """The data of a streamed reply's events, less their id and creation time."""
    data = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", reply.text
    return [{key: value for key, value in json.loads(item).items() if key not in ("id", "created")}
            for item in data[:-1]]


def test_a_streamed_completion_streams_through(scaled, single):
    body = {"model": "three", "prompt": "The game was played", "max_tokens": 6, "temperature": 0, "stream": True}
    with scaled.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["transfer-encoding"] == "chunked"  # streamed on as it came, not handed over whole
        assert "content-length" not in reply.headers
        assert reply.headers[REPLICA_HEADER]
        got = httpx.Response(200, content=reply.read())
    assert events(got) == events(single.post("/v1/completions", json=body))


def test_metrics_label_each_replica_and_most_requests_find_their_adapter_resident(scaled):
    reply = scaled.get("/metrics")
    assert reply.status_code == 200
    samples = samples_of(reply.text)
    replicas = set(reply.headers[REPLICA_HEADER].split(","))
    assert len(replicas) == REPLICAS
    assert {dict(labels).get("replica") for name, labels in samples if name.startswith("loraswap_")} == replicas
    arrived = {resident: sum(value for (name, labels), value in samples.items()
                             if name == "loraswap_scale_adapter_requests_total" and ("resident", resident) in labels)
               for resident in ("true", "false")}
    assert arrived["true"] >= 3 * arrived["false"], arrived


def adapters_by_replica(scaled: httpx.Client, count: int | None = REPLICAS) -> dict[str, set[str]]:
    """The adapters each replica has registered, read from the gathered metrics (a resident gauge per adapter); there
    are ``count`` replicas (None: any number)."""
    reply = scaled.get("/metrics")
    assert reply.status_code == 200, reply.text
    held: dict[str, set[str]] = {}
    for name, labels in samples_of(reply.text):
        if name == "loraswap_adapter_resident":
            held.setdefault(dict(labels)["replica"], set()).add(dict(labels)["adapter"])
    assert count is None or len(held) == count, held
    return held


def test_admin_changes_reach_every_replica(scaled, single, settings):
    assert scaled.delete("/adapters/four").status_code == 401  # no admin key: refused by both, nothing changed
    assert all("four" in held for held in adapters_by_replica(scaled).values())
    reply = scaled.delete("/adapters/four", headers=ADMIN)
    assert (reply.status_code, reply.json()) == (200, {"deleted": "four"})
    assert len(reply.headers[REPLICA_HEADER].split(",")) == REPLICAS
    assert not any("four" in held for held in adapters_by_replica(scaled).values())
    for _ in range(2 * REPLICAS):
        assert scaled.post("/answer", json=answer_body("four", 0)).status_code == 404
    assert scaled.delete("/adapters/four", headers=ADMIN).status_code == 404  # both: unknown

    path = str(settings.adapters_dir / "four")
    reply = scaled.post("/v1/load_lora_adapter", json={"lora_name": "four", "lora_path": path}, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert all("four" in held for held in adapters_by_replica(scaled).values())
    for round_ in range(2):
        both(scaled, single, "/answer", answer_body("four", round_))


def test_a_replica_that_starts_after_admin_changes_applies_them_first(scaled, single):
    """A replica killed and replaced by Ray Serve starts from the adapters folder; the change made before (three
    unregistered) reaches it before it serves."""
    assert scaled.delete("/adapters/three", headers=ADMIN).status_code == 200
    before = adapters_by_replica(scaled)
    victim = sorted(before)[0]
    (name,) = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
               if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(f"#{victim}")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
    while True:
        held = adapters_by_replica(scaled, count=None)
        if len(held) == REPLICAS and victim not in held:
            break
        assert time.monotonic() < deadline, f"no replica replaced {victim} within {REPLACEMENT_TIMEOUT_S} s: {held}"
        time.sleep(1)
    assert all(adapters == before[sorted(before)[1]] for adapters in held.values()), held
    assert "three" not in set().union(*held.values())
    for round_ in range(2 * REPLICAS):
        assert scaled.post("/answer", json=answer_body("three", round_)).status_code == 404
        both(scaled, single, "/answer", answer_body("two", round_))


def test_joining_a_serve_that_listens_on_another_port_is_refused_before_deploying(scaled):
    """A review: on a cluster whose Serve already ran, `loraswap scale --address auto --port P` served on the earlier
    run's port (Serve keeps the HTTP options it started with; serve.start only logs that it ignores new ones). Now a
    usage error naming the port Serve listens on; the same host and port join it."""
    from service.cli.command import UsageError
    from service.scale.app import start_serve

    port = scaled.base_url.port
    with pytest.raises(UsageError, match=f"HTTP proxies on 127.0.0.1:{port}, not 127.0.0.1:{port + 1}: .*--port"):
        start_serve("127.0.0.1", port + 1)
    assert scaled.get("/ready").status_code == 200


def test_a_second_run_on_the_cluster_is_refused_before_deploying_and_leaves_the_first(scaled, settings):
    """A review: a second `loraswap scale` on the cluster and port of a running one deployed its application, of the
    same name, in the first's place without a word. Now a usage error (one line, status 2) before it deploys, naming
    the application and how to end it; the first's application runs on, untouched."""
    port, deployed = scaled.base_url.port, serve.status().applications["loraswap"].last_deployed_time_s
    command = [sys.executable, "-m", "service.cli.entry", "scale", "--replicas", "1", "--host", "127.0.0.1", "--port",
               str(port), "--address", ray.get_runtime_context().gcs_address, "--base-model", settings.base_model,
               "--adapters-dir", str(settings.adapters_dir), "--cache-dir", str(settings.cache_dir), "--device", "cpu"]
    environment = {**os.environ, "RAY_AUTH_MODE": "token"}  # an explicit address: Ray sends its token (README)
    second = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=SECOND_RUN_TIMEOUT_S)
    assert second.returncode == 2, second.stderr[-4000:]
    assert second.stderr.splitlines()[-1] == (
        f"loraswap scale: error: Ray Serve on this cluster already runs the application loraswap (RUNNING, another "
        f"loraswap scale's) on 127.0.0.1:{port}: end that run first (Ctrl-C or SIGTERM; `serve shutdown` ends every "
        "Serve application of the cluster)")
    assert serve.status().applications["loraswap"].last_deployed_time_s == deployed
    assert scaled.get("/ready").status_code == 200



def test_an_address_of_a_raylet_or_of_a_token_authenticated_head_without_ray_auth_mode_is_refused_at_once(
        scaled, monkeypatch):
    """A review: a raylet's port passed the gRPC check, and ray.init waited long; a head with token authentication
    (Ray 2.60's default) addressed without RAY_AUTH_MODE=token failed some 20 s later with InvalidAuthToken, and so did
    one addressed with a wrong RAY_AUTH_TOKEN ('Failed to connect to Ray cluster'). Now the head's own gRPC server
    tells: its reflection lists the GCS's service (a raylet's does not), and it refuses a call without a token, or
    with a wrong one; the head passes where RAY_AUTH_MODE=token is set, with its token."""
    from service.cli.command import UsageError
    from service.scale.preflight import check_address

    head = ray.get_runtime_context().gcs_address
    node = next(node for node in ray.nodes() if node["Alive"])
    raylet = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    check_address(head)
    with pytest.raises(UsageError, match=f"--address {raylet}: no Ray cluster answers there .*lists no "
                       "ray.rpc.NodeInfoGcsService"):
        check_address(raylet)
    # Ray's channel sends the token wherever this process's Ray has token authentication on (ray.init here): the
    # environment without RAY_AUTH_MODE is another process's
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    for environment, refusal in [
            (env, "takes only token-authenticated calls, and RAY_AUTH_MODE is not token here: set RAY_AUTH_MODE=token"),
            ({**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-cluster-token"},
             "refuses the token sent from here (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names")]:
        done = subprocess.run([sys.executable, "-c", "from service.scale.preflight import check_address; "
                               f"check_address({head!r})"], env=environment, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode != 0 and f"--address {head}: the Ray cluster there {refusal}" in done.stderr, done.stderr
