"""`labs serve`: a real server process on 127.0.0.1, the official `openai` client, a real model.

One llama-tiny server (with a LoRA adapter and an API key) is shared by the module; greedy answers are
compared with plain `model.generate` on the same weights (the preset's seed-0 random weights) built here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import REPO, Server, alive, serve_ranks, shm_files
from serve_helpers import generate as _generate
from serve_helpers import reference as _reference

KEY = "test-key-123"
PROMPTS = ["The quick brown fox", "Parallelism on CPUs is", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def ref():
    return _reference()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, ref):
    """A LoRA adapter over llama-tiny with random (non-zero) B matrices: its answers differ from the base."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    peft = get_peft_model(copy.deepcopy(ref[0]), LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj",
                                                            "down_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "tuned"
    peft.save_pretrained(out)
    return out, peft.eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter):
    s = Server(["llama-tiny", "--lora", f"tuned={adapter[0]}", "--api-key", KEY, "--max-batch", "8",
                "--max-queue", "8", "--threads", "1"], tmp_path_factory.mktemp("serve") / "one", key=KEY)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_health_loading_then_ready_and_models(server):
    assert 503 in server.health_codes and server.health_codes[-1] == 200  # loading, then ready
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"llama-tiny", "tuned"}
    assert models["tuned"].model_extra["parent"] == "llama-tiny"
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key
    assert httpx.get(server.url + "/health").status_code == 200  # /health needs none


def test_completions_equal_generate_with_exact_usage(server, ref):
    model, tok = ref
    client = server.client()
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        r = client.completions.create(model="llama-tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == _generate(model, tok, ids, 12)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_chat_uses_the_template_and_equals_generate(server, ref):
    from launcher.serve.models import DEFAULT_CHAT_TEMPLATE
    model, tok = ref
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is gloo?"}]
    ids = tok.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    r = server.client().chat.completions.create(model="llama-tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == _generate(model, tok, list(ids), 10)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10


def test_streaming_equals_non_streaming(server):
    client = server.client()
    for chat in (False, True):
        kw = dict(model="llama-tiny", max_tokens=20, temperature=0)
        kw |= {"messages": [{"role": "user", "content": PROMPTS[2]}]} if chat else {"prompt": PROMPTS[2]}
        create = client.chat.completions.create if chat else client.completions.create
        whole = create(**kw)
        chunks = list(create(**kw, stream=True, stream_options={"include_usage": True}))
        pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks if c.choices]
        text = whole.choices[0].message.content if chat else whole.choices[0].text
        assert "".join(pieces) == text and len(pieces) > 5
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_adapter_answers_like_peft_and_unlike_base(server, ref, adapter):
    model, tok = ref
    client = server.client()
    ids = tok(PROMPTS[0])["input_ids"]
    base = client.completions.create(model="llama-tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    tuned = client.completions.create(model="tuned", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert tuned.choices[0].text != base.choices[0].text
    assert tuned.choices[0].text == _generate(adapter[1], tok, ids, 12)


def test_stop_seed_and_top_p(server):
    client = server.client()
    full = client.completions.create(model="llama-tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0]
    stop = full.text[5:8]
    cut = client.completions.create(model="llama-tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    runs = [client.completions.create(model="llama-tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0,
                                      top_p=0.9, seed=s).choices[0].text for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] != full.text[:len(runs[0])]


BAD = [  # (name, body or raw, status, param)
    ("malformed JSON", b'{"model": "llama-tiny", "prompt": ', 400, None),
    ("wrong content type", "text/plain", 415, None),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("prompt longer than the context", {"prompt": "hello " * 600}, 400, "prompt"),
    ("prompt + max_tokens past the context", {"prompt": "hello " * 250, "max_tokens": 300}, 400, "max_tokens"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens absurd", {"max_tokens": 10**12}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-5"}, 404, "model"),
    ("temperature out of range", {"temperature": 3.5}, 400, "temperature"),
    ("top_p out of range", {"top_p": 0}, 400, "top_p"),
    ("n = 2", {"n": 2}, 400, "n"),
    ("token ids out of vocabulary", {"prompt": [1, 5, 32000]}, 400, "prompt"),
    ("chat without messages", {"messages": [], "chat": True}, 400, "messages"),
]


@pytest.mark.parametrize("name,bad,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, name, bad, status, param):
    route = "/v1/chat/completions" if isinstance(bad, dict) and bad.pop("chat", False) else "/v1/completions"
    headers = server.headers() | {"Content-Type": "application/json"}
    if isinstance(bad, bytes):
        content = bad
    elif bad == "text/plain":
        content, headers["Content-Type"] = b"model=llama-tiny&prompt=hi", "text/plain"
    else:
        content = json.dumps({"model": "llama-tiny", "prompt": "hi", "max_tokens": 4} | bad).encode()
    t0 = time.monotonic()
    r = httpx.post(server.url + route, content=content, headers=headers, timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    ok = server.client().completions.create(model="llama-tiny", prompt="hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


PROBE = """
import sys, time, httpx
times = []
with httpx.Client() as c:
    t_end = time.monotonic() + 60
    while len(times) < 300 and time.monotonic() < t_end and sys.stdin.readline().strip() == "go":
        t0 = time.monotonic()
        assert c.get(sys.argv[1] + "/health", timeout=2).status_code == 200
        times.append(time.monotonic() - t0)
        print(times[-1], flush=True)
"""


def test_load_32_requests_at_concurrency_8_counted_and_health_fast(server):
    """/health is timed from a process of its own (this one's threads would share its GIL with the clients)."""
    before = server.metrics()
    client = server.client()
    probe = subprocess.Popen([sys.executable, "-c", PROBE, server.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    done = threading.Event()
    health_times: list[float] = []

    def poll() -> None:
        while not done.is_set() and len(health_times) < 300:
            probe.stdin.write("go\n")
            probe.stdin.flush()
            health_times.append(float(probe.stdout.readline()))
            time.sleep(0.05)

    def one(i: int):
        return client.completions.create(model="llama-tiny", prompt=f"{PROMPTS[i % 3]} {i}", max_tokens=24,
                                         temperature=0)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(32), timeout=120))
    finally:
        done.set()
        poller.join(10)
        probe.stdin.close()
        probe.wait(10)
    after = server.metrics()
    assert len(results) == 32 and all(r.usage.completion_tokens == 24 for r in results)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta['labs_serve_requests_total{finish_reason="length"}'] == 32
    assert delta["labs_serve_prompt_tokens_total"] == sum(r.usage.prompt_tokens for r in results)
    assert delta["labs_serve_generation_tokens_total"] == 32 * 24
    assert delta["labs_serve_time_to_first_token_seconds_count"] == 32
    assert after["labs_serve_running_requests"] == 0 and after["labs_serve_queue_length"] == 0
    assert len(health_times) >= 5 and max(health_times) < 0.2, health_times


def test_queue_full_is_429_then_serving_goes_on(server):
    """24 requests at once against 8 running + 8 waiting: some are refused with 429, the rest answered."""
    gate = threading.Barrier(24, timeout=30)

    def one(i: int) -> int:
        with httpx.Client(timeout=120) as c:
            gate.wait()
            r = c.post(server.url + "/v1/completions", headers=server.headers(),
                       json={"model": "llama-tiny", "prompt": f"flood {i}", "max_tokens": 120, "temperature": 0})
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limited"
        return r.status_code

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(24), timeout=180))
    assert 429 in codes and set(codes) <= {200, 429}, codes
    assert server.client().completions.create(model="llama-tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_stops_generation(server):
    before = server.metrics().get('labs_serve_requests_total{finish_reason="cancelled"}', 0)
    body = {"model": "llama-tiny", "prompt": "a long one", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers(), timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    t_end = time.monotonic() + 10
    while time.monotonic() < t_end:
        m = server.metrics()
        if m["labs_serve_running_requests"] == 0 and m.get('labs_serve_requests_total{finish_reason="cancelled"}', 0) > before:
            break
        time.sleep(0.1)
    assert m["labs_serve_running_requests"] == 0
    assert m['labs_serve_requests_total{finish_reason="cancelled"}'] == before + 1


def test_non_loopback_host_needs_an_api_key():
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "serve", "llama-tiny", "--host", "0.0.0.0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=os.environ | {"LABS_API_KEY": ""})
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "LABS_API_KEY" in proc.stderr


def _stream_until_end(server: Server, prompt: str, out: list, started: threading.Event | None = None) -> None:
    """A streamed request of up to 480 tokens (llama-tiny's context is 512; about 1.5 s of decoding at 3 rows on
    an idle 2-core machine); `started` is set at its first data line."""
    body = {"model": "llama-tiny", "prompt": prompt, "max_tokens": 480, "temperature": 0, "stream": True}
    lines = []
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if started is not None:
                        started.set()
        out.append(lines)
    except httpx.TransportError as e:
        out.append([f"transport error {e}"])


@pytest.mark.distributed
def test_tp2_equals_one_rank_then_sigterm_with_requests_in_flight(tmp_path, server, ds_ops):
    master_port = _port()
    tp = Server(["llama-tiny", "--tp", "2", "--grace", "10", "--master_port", str(master_port)], tmp_path / "tp2")
    try:
        tp.wait_ready(240)
        one, two = server.client(), tp.client()
        for prompt in PROMPTS:
            a = one.completions.create(model="llama-tiny", prompt=prompt, max_tokens=16, temperature=0)
            b = two.completions.create(model="llama-tiny", prompt=prompt, max_tokens=16, temperature=0)
            assert b.choices[0].text == a.choices[0].text and b.usage == a.usage
        ranks = serve_ranks(tp.out)
        assert len(ranks) >= 2  # the runner, its launch.py and the two ranks all name serve.json
        streams: list = []
        started = [threading.Event() for _ in PROMPTS]
        threads = [threading.Thread(target=_stream_until_end, args=(tp, p, streams, e))
                   for p, e in zip(PROMPTS, started, strict=True)]
        for t in threads:
            t.start()
        # SIGTERM while all three generate (a fixed sleep raced a fast machine: 300 tokens took 0.7 s there)
        assert all(e.wait(30) for e in started)
        tp.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(tp.url + "/v1/completions", json={"model": "llama-tiny", "prompt": "x"}, timeout=5)
        assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
        assert tp.proc.wait(40) == 0, tp.console()
        for t in threads:
            t.join(10)
        assert len(streams) == 3 and all(s[-1] == "data: [DONE]" for s in streams), streams
        assert not [p for p in ranks if alive(p)], "a rank outlived labs serve"
        assert not shm_files(str(master_port)), "a /dev/shm file was left"
    finally:
        tp.stop()


@pytest.mark.distributed  # a rank started by DeepSpeed's launcher, killed
def test_a_dead_rank_ends_the_server_and_is_named(tmp_path):
    s = Server(["llama-tiny", "--threads", "1"], tmp_path / "dead")
    try:
        s.wait_ready()
        (pid,) = serve_ranks(s.out)
        os.kill(pid, signal.SIGKILL)
        code = s.proc.wait(60)
        assert code != 0
        assert "rank 0 on host" in s.console() and "killed by a signal" in s.console()
    finally:
        s.stop()


def _port() -> int:
    from launcher.common.proc import free_port
    return free_port()


def test_targets_resolve_without_torch_and_bad_ones_are_named(tmp_path, adapter):
    """TARGET kinds resolve in the `labs` process (no torch); each mistake is a LabsError naming it."""
    import shutil

    from launcher.common.errors import LabsError
    from launcher.serve.target import resolve
    t = resolve("llama-tiny", None, [f"tuned={adapter[0]}"])
    assert (t.name, t.model, list(t.adapters)) == ("llama-tiny", "llama-tiny", ["tuned"]) and t.context == 512
    over = tmp_path / "over"
    shutil.copytree(adapter[0], over)
    cfg = json.loads((over / "adapter_config.json").read_text())
    (over / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "llama-tiny"}))
    t = resolve(str(over), None, [])
    assert (t.name, t.model, t.adapters) == ("llama-tiny", "llama-tiny", {str(over): str(over.resolve())})
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "job.yaml").write_text("task: tinyllama\n")
    shutil.copytree(over, run / "hf" / "adapter")
    assert resolve(str(run), None, []).model == "llama-tiny"
    for target, step, loras, words in (("bert-tiny", None, [], "not a causal LM"), ("no such/thing!", None, [], "neither"),
                                       ("llama-tiny", 3, [], "--step 3"), (str(tmp_path), None, [], "job.yaml"),
                                       ("llama-tiny", None, ["x"], "NAME=PATH"),
                                       ("llama-tiny", None, [f"llama-tiny={adapter[0]}"], "already served"),
                                       (str(run / "nothing"), None, [], "neither")):
        with pytest.raises(LabsError, match=words):
            resolve(target, step, loras)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "serve", "llama-tiny", "--tp", "2", "--lora",
                           f"t={adapter[0]}", "--out", str(tmp_path / "s")], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "AutoTP does not shard PEFT" in proc.stderr
    code = "import sys, launcher.serve_cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0, "labs serve imports torch"
