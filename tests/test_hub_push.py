"""`push_to_hub` for real, against the in-memory fake Hub of tests/hub_server.py, and back with `from_pretrained`.

The client code runs in subprocesses pointed at the fake Hub (see hub_server's docstring for why). To stay fast, the
independent clients run two at a time: the push with a token beside the push without one, then the download round trip
beside the README usage snippet.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hub_server import FAKE_TOKEN, FAKE_USER, FakeHub, client_env, start_client
from huggingface_hub import ModelCard
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = ROOT / "hub_configs" / "tiny-random"
REPO_ID = f"{FAKE_USER}/tiny-blip2"
NO_TOKEN_REPO_ID = f"{FAKE_USER}/pushed-without-token"
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")

# Shared by the client scripts: the tiny model (random weights) and its processor.
_BUILD = """
import json
import sys

from transformers import AutoTokenizer

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ImageTextProcessor, blip2_image_processor


def build(tiny_folder, tests_folder):
    sys.path.insert(0, tests_folder)
    from tiny import randomise_

    model = randomise_(Blip2ForConditionalGeneration(Blip2Config.from_pretrained(tiny_folder))).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    processor = Blip2ImageTextProcessor(blip2_image_processor(28), tokenizer, num_query_tokens=4)
    return model, processor


def save_state_dict(model, path):
    from safetensors.torch import save_file

    # clone: tied weights share storage, which save_file refuses
    save_file({name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}, path)


def describe(processor):
    return {
        "class": f"{type(processor).__module__}.{type(processor).__qualname__}",
        "num_query_tokens": processor.num_query_tokens,
        "image_token_id": processor.image_token_id,
        "vocab": processor.tokenizer.get_vocab(),
        "image_size": dict(processor.image_processor.to_dict()["size"]),
    }
"""

# argv: repo_id, out_folder, tiny_folder, tests_folder. The token comes from HF_TOKEN (token=None everywhere).
PUSH = (
    _BUILD
    + """
from huggingface_hub import EvalResult

repo_id, out, tiny_folder, tests_folder = sys.argv[1:5]
model, processor = build(tiny_folder, tests_folder)
save_state_dict(model, f"{out}/reference.safetensors")
model_commit = model.push_to_hub(
    repo_id,
    max_shard_size="100KB",
    commit_message="Upload tiny BLIP-2",
    base_model=["facebook/opt-125m"],
    datasets=["coco"],
    eval_results=[
        EvalResult(
            task_type="image-to-text",
            dataset_type="coco",
            dataset_name="COCO Karpathy test",
            metric_type="cider",
            metric_value=1.25,
        )
    ],
    training_hyperparameters={"learning_rate": 1e-5},
    tags=["tiny"],
    description="A tiny random BLIP-2 for tests.",
)
processor_commit = processor.push_to_hub(repo_id)
report = {
    "model_commit": model_commit.oid,
    "processor_commit": processor_commit.oid,
    "processor": describe(processor),
}
with open(f"{out}/push.json", "w") as file:
    json.dump(report, file)
"""
)

# argv: repo_id, report_path, tiny_folder, tests_folder. No HF_TOKEN, an empty HF_HOME, token=None.
PUSH_WITHOUT_TOKEN = (
    _BUILD
    + """
from huggingface_hub import get_token

repo_id, report_path, tiny_folder, tests_folder = sys.argv[1:5]
model, processor = build(tiny_folder, tests_folder)
report = {"token": get_token()}
for name, pushable in (("model", model), ("processor", processor)):
    try:
        pushable.push_to_hub(repo_id, token=None)
    except ValueError as error:
        report[name] = str(error)
    else:
        report[name] = None
with open(report_path, "w") as file:
    json.dump(report, file)
"""
)

# argv: repo_id, out_folder.
PULL = (
    _BUILD
    + """
import modeling_blip2  # registers the Auto classes
from transformers import AutoProcessor

repo_id, out = sys.argv[1:3]
model = modeling_blip2.Blip2ForConditionalGeneration.from_pretrained(repo_id)
save_state_dict(model, f"{out}/loaded.safetensors")
processor = AutoProcessor.from_pretrained(repo_id)
report = {"model_class": f"{type(model).__module__}.{type(model).__qualname__}", "processor": describe(processor)}
with open(f"{out}/pull.json", "w") as file:
    json.dump(report, file)
"""
)


# argv: repo_a, repo_b, out_folder, tiny_folder, tests_folder. Two versions pushed to each repo with other weights and
# the other weight layout: repo_a by push_to_hub (one file, then shards), repo_b by save_pretrained(push_to_hub=True)
# (shards, then one file); after each second push the repo is loaded back.
REPUSH = (
    _BUILD
    + """
from huggingface_hub import HfApi

repo_a, repo_b, out, tiny_folder, tests_folder = sys.argv[1:6]
model, processor = build(tiny_folder, tests_folder)
from tiny import randomise_  # build put the tests folder on sys.path

report = {}


def pull(repo_id, name):
    loaded = Blip2ForConditionalGeneration.from_pretrained(repo_id)
    save_state_dict(loaded, f"{out}/{name}-loaded.safetensors")
    report[f"{name}_files"] = sorted(HfApi().list_repo_files(repo_id))


randomise_(model, seed=1)
model.push_to_hub(repo_a)
processor.push_to_hub(repo_a)
randomise_(model, seed=2)
model.push_to_hub(repo_a, max_shard_size="100KB")
save_state_dict(model, f"{out}/a-expected.safetensors")
pull(repo_a, "a")

local = f"{out}/local-b"
randomise_(model, seed=3)
model.save_pretrained(local, push_to_hub=True, repo_id=repo_b, max_shard_size="100KB")
randomise_(model, seed=4)
model.save_pretrained(local, push_to_hub=True, repo_id=repo_b)
save_state_dict(model, f"{out}/b-expected.safetensors")
pull(repo_b, "b")
report["b_local_files"] = sorted(os.listdir(local))
with open(f"{out}/repush.json", "w") as file:
    json.dump(report, file)
"""
).replace("import json\n", "import json\nimport os\n", 1)


@dataclass
class Pushed:
    hub: FakeHub
    folder: Path
    report: dict
    no_token_report: dict


@dataclass
class Pulled:
    folder: Path
    report: dict
    hf_home: Path
    snippet: str
    snippet_returncode: int
    snippet_stdout: str
    snippet_stderr: str


def _check(result, what: str) -> None:
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def hub() -> FakeHub:
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def pushed(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    folder = tmp_path_factory.mktemp("hub-push")
    empty_home = folder / "empty-hf-home"
    empty_home.mkdir()
    push = start_client(
        PUSH,
        client_env(hub, folder / "hf-home-push"),
        REPO_ID,
        str(folder),
        str(TINY),
        str(TESTS),
        cwd=folder,
        log_dir=folder / "push-log",
    )
    no_token = start_client(
        PUSH_WITHOUT_TOKEN,
        client_env(hub, empty_home, token=None),
        NO_TOKEN_REPO_ID,
        str(folder / "no-token.json"),
        str(TINY),
        str(TESTS),
        cwd=folder,
        log_dir=folder / "no-token-log",
    )
    push_result, no_token_result = push.wait(), no_token.wait()
    _check(push_result, "push")
    _check(no_token_result, "push without a token")
    return Pushed(
        hub,
        folder,
        json.loads((folder / "push.json").read_text()),
        json.loads((folder / "no-token.json").read_text()),
    )


@pytest.fixture(scope="module")
def pulled(pushed: Pushed, tmp_path_factory: pytest.TempPathFactory) -> Pulled:
    folder = tmp_path_factory.mktemp("hub-pull")
    snippet = _first_python_block(pushed.hub.files(REPO_ID)["README.md"].decode())
    # The snippet runs as a user would: a fresh interpreter, an empty cache, a folder that is not the repo's.
    snippet_run = start_client(
        snippet,
        client_env(pushed.hub, folder / "hf-home-snippet"),
        cwd=folder,
        log_dir=folder / "snippet-log",
    )
    pull = start_client(
        PULL,
        client_env(pushed.hub, folder / "hf-home-pull"),
        REPO_ID,
        str(folder),
        cwd=folder,
        log_dir=folder / "pull-log",
    )
    pull_result, snippet_result = pull.wait(), snippet_run.wait()
    _check(pull_result, "download round trip")
    return Pulled(
        folder,
        json.loads((folder / "pull.json").read_text()),
        folder / "hf-home-pull",
        snippet,
        snippet_result.returncode,
        snippet_result.stdout,
        snippet_result.stderr,
    )


def _first_python_block(markdown: str) -> str:
    match = re.search(r"```python\n(.*?)```", markdown, flags=re.DOTALL)
    assert match, "README.md has no ```python block"
    return match.group(1)


# -- what arrived on the Hub -----------------------------------------------------------------------------------------
def test_push_uploads_sharded_weights_config_processor_and_code(pushed: Pushed) -> None:
    files = pushed.hub.files(REPO_ID)

    shards = sorted(name for name in files if SHARD.fullmatch(name))
    assert len(shards) >= 2, f"max_shard_size=100KB should shard the weights, got {sorted(files)}"
    totals = {SHARD.fullmatch(name).group(2) for name in shards}
    assert totals == {f"{len(shards):05d}"}
    assert [int(SHARD.fullmatch(name).group(1)) for name in shards] == list(range(1, len(shards) + 1))
    assert "model.safetensors" not in files
    index = json.loads(files["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) == set(shards)

    config = json.loads(files["config.json"])
    assert config["model_type"] == "modeling_blip2"
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    assert set(config["custom_pipelines"]) == {"image-to-text", "visual-question-answering"}
    assert "generation_config.json" in files

    processor_config = json.loads(files["processor_config.json"])
    assert processor_config["processor_class"] == "Blip2ImageTextProcessor"
    assert processor_config["num_query_tokens"] == 4
    assert processor_config["image_processor"]["size"] == {"height": 28, "width": 28}
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)

    for name in ("pipelines.py", "processing.py"):
        assert files[name] == (ROOT / "modeling_blip2" / name).read_bytes(), name

    # One commit per push, on top of the repo's initial commit.
    assert pushed.report["processor_commit"] == pushed.hub.head(REPO_ID)
    assert pushed.hub.files(REPO_ID, pushed.report["model_commit"]).keys() <= files.keys()
    assert pushed.hub.commit_messages(REPO_ID)[:2] == ["initial commit", "Upload tiny BLIP-2"]


def test_pushed_model_card_metadata(pushed: Pushed) -> None:
    text = pushed.hub.files(REPO_ID)["README.md"].decode()
    card = ModelCard(text)
    data = card.data

    assert data.license == "mit"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-to-text"
    assert {"modeling-blip2", "blip-2", "tiny"} <= set(data.tags)
    assert data.base_model == ["facebook/opt-125m"]
    assert data.datasets == ["coco"]
    assert data.model_name == "tiny-blip2"
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_name) == (
        "image-to-text",
        "coco",
        "COCO Karpathy test",
    )
    assert (result.metric_type, result.metric_value) == ("cider", 1.25)
    assert data.to_dict()["model-index"][0]["name"] == "tiny-blip2"

    assert "A tiny random BLIP-2 for tests." in card.text
    assert "| learning_rate | 1e-05 |" in card.text
    assert f'from_pretrained("{REPO_ID}")' in card.text


def test_fake_hub_saw_only_known_authorized_calls(pushed: Pushed, pulled: Pulled) -> None:
    hub = pushed.hub
    assert hub.unhandled == []
    assert all(record.authorized for record in hub.write_requests())
    assert all(record.status < 500 for record in hub.requests)


# -- back from the Hub -----------------------------------------------------------------------------------------------
def test_round_trip_gives_identical_weights(pushed: Pushed, pulled: Pulled) -> None:
    assert pulled.report["model_class"] == "modeling_blip2.modeling.Blip2ForConditionalGeneration"
    reference = load_file(pushed.folder / "reference.safetensors")
    loaded = load_file(pulled.folder / "loaded.safetensors")
    assert loaded.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(loaded[name], reference[name])]
    assert different == []

    # It really came over HTTP: the pull's cache holds the snapshot of the Hub's head commit, every shard was fetched.
    snapshots = pulled.hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots"
    assert [path.name for path in snapshots.iterdir()] == [pushed.hub.head(REPO_ID)]
    fetched = {record.path.rsplit("/", 1)[-1] for record in pushed.hub.requests if record.method == "GET"}
    assert {name for name in pushed.hub.files(REPO_ID) if SHARD.fullmatch(name)} <= fetched


def test_round_trip_auto_processor_is_ours(pushed: Pushed, pulled: Pulled) -> None:
    loaded, reference = pulled.report["processor"], pushed.report["processor"]
    assert loaded["class"] == "modeling_blip2.processing.Blip2ImageTextProcessor"
    assert loaded["num_query_tokens"] == 4
    assert loaded == reference


def test_readme_usage_snippet_runs_against_the_hub(pulled: Pulled) -> None:
    assert "import modeling_blip2" in pulled.snippet
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO_ID}")' in pulled.snippet
    assert pulled.snippet_returncode == 0, pulled.snippet_stderr[-6000:]
    caption = pulled.snippet_stdout.strip().splitlines()[-1]
    assert caption.startswith("a photo of")


# -- pushing a new version over an old one (issue 11 item 8) --------------------------------------------------------
def test_a_second_push_replaces_the_weights_in_either_layout(hub: FakeHub, tmp_path) -> None:
    repo_a, repo_b = f"{FAKE_USER}/repushed-sharded", f"{FAKE_USER}/repushed-unsharded"
    result = start_client(
        REPUSH,
        client_env(hub, tmp_path / "hf-home"),
        repo_a,
        repo_b,
        str(tmp_path),
        str(TINY),
        str(TESTS),
        cwd=tmp_path,
        log_dir=tmp_path / "log",
    ).wait()
    _check(result, "pushing twice")
    report = json.loads((tmp_path / "repush.json").read_text())

    # Unsharded, then sharded: the old model.safetensors is gone (transformers would load it before the index).
    files = report["a_files"]
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert len([name for name in files if SHARD.fullmatch(name)]) >= 2
    assert {"processor_config.json", "tokenizer.json", "README.md"} <= set(files), "the processor's files must stay"
    # Sharded, then unsharded (through save_pretrained(push_to_hub=True)): no shard or index is left, on the Hub or in
    # the local folder.
    for files in (report["b_files"], report["b_local_files"]):
        assert "model.safetensors" in files
        assert not [name for name in files if SHARD.fullmatch(name) or name == "model.safetensors.index.json"]
    assert "README.md" in report["b_files"]
    for name in ("a", "b"):
        expected = load_file(tmp_path / f"{name}-expected.safetensors")
        loaded = load_file(tmp_path / f"{name}-loaded.safetensors")
        assert [key for key in expected if not torch.equal(loaded[key], expected[key])] == [], name
    # Each push is one commit: additions and deletions together.
    messages = hub.commit_messages(repo_a)
    assert messages == ["initial commit", "Upload BLIP-2 model", "Upload processor", "Upload BLIP-2 model"]
    assert hub.unhandled == []


# -- no token --------------------------------------------------------------------------------------------------------
def test_push_without_token_raises_and_creates_nothing(pushed: Pushed) -> None:
    report = pushed.no_token_report
    assert report["token"] is None
    for name in ("model", "processor"):
        assert report[name] is not None, f"{name}.push_to_hub without a token did not raise ValueError"
        assert "pushing to the Hub needs a token" in report[name]
    assert NO_TOKEN_REPO_ID not in pushed.hub.repos
    assert not [record for record in pushed.hub.requests if NO_TOKEN_REPO_ID.split("/")[1] in record.path]
    assert all(record.authorized for record in pushed.hub.requests if record.path == "/api/repos/create")


# -- the fake Hub itself ---------------------------------------------------------------------------------------------
def _call(
    url: str, method: str = "GET", body: dict | None = None, token: str | None = None
) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_fake_hub_speaks_the_error_protocol_huggingface_hub_expects() -> None:
    with FakeHub() as hub:
        create = f"{hub.url}/api/repos/create"
        assert _call(create, "POST", {"name": "demo"})[0] == 401
        assert _call(create, "POST", {"name": "demo"}, token="hf_wrong")[0] == 401
        assert hub.repos == {}
        status, _, body = _call(create, "POST", {"name": "demo"}, token=FAKE_TOKEN)
        assert status == 200 and json.loads(body)["url"] == f"{hub.url}/{FAKE_USER}/demo"
        assert _call(create, "POST", {"name": "demo"}, token=FAKE_TOKEN)[0] == 409  # what exist_ok=True relies on

        head = hub.head(f"{FAKE_USER}/demo")
        status, headers, _ = _call(f"{hub.url}/{FAKE_USER}/demo/resolve/main/.gitattributes", "HEAD")
        assert status == 200 and headers["X-Repo-Commit"] == head and headers["ETag"].strip('"')
        status, headers, _ = _call(f"{hub.url}/{FAKE_USER}/demo/resolve/main/missing.json", "HEAD")
        assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", head)
        status, headers, _ = _call(f"{hub.url}/{FAKE_USER}/demo/resolve/nope/config.json", "HEAD")
        assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
        status, headers, _ = _call(f"{hub.url}/{FAKE_USER}/other/resolve/main/config.json", "HEAD")
        assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")

        commit = f"{hub.url}/api/models/{FAKE_USER}/demo/commit/main"
        assert _call(commit, "POST", {"key": "header", "value": {"summary": "x"}})[0] == 401
        assert hub.unhandled == []
        assert _call(f"{hub.url}/api/spaces/{FAKE_USER}/demo")[0] == 404
        assert hub.unhandled == [f"GET /api/spaces/{FAKE_USER}/demo"]
