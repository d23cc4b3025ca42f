"""Text models in the server: tokenization, ragged re-batching, BYTES inputs over REST and gRPC.

The bundle is a tiny random BERT built and exported in a few seconds (model_export/text.py
`build_tiny_text_bundle`); the tests compare the server's answers with each sample run alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fastapi.testclient import TestClient  # noqa: E402

from model_export.text import TINY_WORDS, build_tiny_text_bundle  # noqa: E402
from server.bundle import Bundle, load_bundle  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.runtime import OrtStageRunner  # noqa: E402
from server.http.app import create_app  # noqa: E402
from server.http.text_codec import serialize_bytes  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.policy import ExitPolicy  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.text import TextTokenizer, TokenRows, pad_concat, tokenizer_for  # noqa: E402
from tests.fakes import ServerProcess  # noqa: E402

MODEL = "text-tiny"
ATOL = 1e-5  # probabilities: a row in a padded, merged batch vs the same row alone


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(build_tiny_text_bundle(tmp_path_factory.mktemp("text") / "bundle"))


def sentences(n: int, seed: int = 0, longest: int = 14) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TINY_WORDS, int(rng.integers(0, longest)))) for _ in range(n)]


def alone(runner: OrtStageRunner, rows: TokenRows) -> list[np.ndarray]:
    """Every exit's probabilities of each row run by itself, unpadded: [S][N, C]."""
    per_row = []
    for r in range(len(rows)):
        width = int(rows.mask[r].sum())
        x: Any = TokenRows(rows.data[r:r + 1, :width], rows.mask[r:r + 1, :width])
        outs = []
        for stage in range(runner.num_stages):
            out = runner.run(stage, x)
            outs.append(out.probabilities()[0])
            x = out.hidden
        per_row.append(outs)
    return [np.stack([p[s] for p in per_row]) for s in range(runner.num_stages)]


def test_server_tokenization_equals_the_tokenizers(bundle: Bundle) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = tokenizer_for(bundle)
    texts = sentences(20) + ["", "GOOD Film!!", "unknownword " * 40]
    ids, mask = tok.encode(texts)
    raw = Tokenizer.from_file(str(bundle.root / "tokenizer.json"))
    raw.enable_truncation(tok.max_length)
    for row, enc in enumerate(raw.encode_batch(texts)):
        n = len(enc.ids)
        assert ids[row, :n].tolist() == enc.ids and mask[row].sum() == n and not ids[row, n:].any()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(bundle.root / "tokenizer.json"), pad_token="[PAD]")
    want = hf(texts, padding="longest", truncation=True, max_length=tok.max_length, return_tensors="np")
    assert np.array_equal(ids, want["input_ids"]) and np.array_equal(mask, want["attention_mask"])
    assert mask.shape[1] == tok.max_length  # the long sentence was truncated, specials included
    assert ids[texts.index("")].tolist()[:2] == [2, 3]  # the empty string is [CLS] [SEP]


@pytest.mark.parametrize(("bind", "bucket"), [(None, 0), (None, 4), (None, 16), ("cpu", 16)])
def test_ragged_rebatching_equals_running_each_row_alone(bundle: Bundle, bind: str | None, bucket: int) -> None:
    """Survivors of batches of different lengths, merged (padded) at every stage, in many random
    compositions: each row's exit probabilities equal that row run alone, whether a stage runs the
    merged batch as one padded run (bucket 0) or per length bucket. `bind="cpu"` runs the
    IO-binding code the GPU runs (hidden states as OrtValues, Gather/Slice/Pad graphs)."""
    runner = OrtStageRunner(bundle, Settings(intra_op_threads=1, length_bucket_tokens=bucket), bind_device=bind)
    tok = tokenizer_for(bundle)
    rng = np.random.default_rng(1)
    for trial in range(6):
        groups = [TokenRows(*tok.encode(sentences(int(rng.integers(1, 7)), seed=100 * trial + g,
                                                  longest=int(rng.integers(2, 15))))) for g in range(3)]
        everyone = pad_concat(groups)
        want = alone(runner, everyone)
        # Stage 0 per group; then at each stage keep a random subset of each part and merge.
        parts = [(runner.run(0, g), np.arange(len(g)) + sum(len(h) for h in groups[:i]))
                 for i, g in enumerate(groups)]
        for stage in range(runner.num_stages):
            for out, ids in parts:
                got = out.probabilities()
                np.testing.assert_allclose(got, want[stage][ids], atol=ATOL, rtol=0)
            if stage == runner.num_stages - 1:
                break
            kept = []
            for out, ids in parts:
                keep = np.flatnonzero(rng.random(len(ids)) < 0.7)
                if len(keep):
                    kept.append((runner.take(out.hidden, keep), ids[keep]))
            if not kept:
                break
            merged = runner.concat([h for h, _ in kept])
            width = max(int(h.mask.shape[1]) for h, _ in kept)
            assert merged.mask.shape == (sum(len(i) for _, i in kept), width)
            parts = [(runner.run(stage + 1, merged), np.concatenate([i for _, i in kept]))]
    runner.close()


class SpyRunner:
    """An OrtStageRunner that records the widths of the parts it merges."""

    def __init__(self, inner: OrtStageRunner):
        self.inner, self.num_stages, self.merges = inner, inner.num_stages, []

    def run(self, stage: int, x: Any) -> Any:
        return self.inner.run(stage, x)

    def take(self, hidden: Any, rows: np.ndarray) -> Any:
        return self.inner.take(hidden, rows)

    def concat(self, parts: list[Any]) -> Any:
        self.merges.append([p.mask.shape[1] for p in parts])
        return self.inner.concat(parts)

    def rows(self, hidden: Any) -> int:
        return self.inner.rows(hidden)

    def close(self) -> None:
        self.inner.close()


def test_the_engine_answers_concurrent_requests_of_different_lengths_as_each_alone(bundle: Bundle) -> None:
    spies: list[SpyRunner] = []

    def factory(b: Bundle, s: Settings) -> SpyRunner:
        spies.append(SpyRunner(OrtStageRunner(b, s)))
        return spies[-1]

    calib = bundle.calibration()
    scores = np.exp(calib.logits) / np.exp(calib.logits).sum(-1, keepdims=True)
    thresholds = tuple(float(np.median(scores[s].max(-1))) for s in range(2))  # about half leave each exit
    policy = ExitPolicy("max_prob", thresholds, version=1)
    settings = Settings(max_queue_delay_ms=20, max_batch_size=64, intra_op_threads=1)
    tok = tokenizer_for(bundle)
    requests = [TokenRows(*tok.encode(sentences(int(n), seed=i, longest=int(w))))
                for i, (n, w) in enumerate(zip([3, 1, 5, 2, 4, 6, 1, 3], [3, 14, 6, 10, 2, 13, 8, 5], strict=True))]

    async def scenario() -> tuple[list[Any], list[Any]]:
        engine = Engine([bundle], settings, Metrics(), {MODEL: policy}, runner_factory=factory)  # type: ignore[arg-type]
        await engine.start()
        try:
            merged = await asyncio.gather(*(engine.infer(MODEL, r, direct=False) for r in requests))
            single = []
            for r in requests:  # one at a time, each sample by itself
                for row in range(len(r)):
                    width = int(r.mask[row].sum())
                    single.append(await engine.infer(MODEL, TokenRows(r.data[row:row + 1, :width],
                                                                      r.mask[row:row + 1, :width])))
            return merged, single
        finally:
            await engine.stop()

    merged, single = asyncio.run(scenario())
    flat = [(res, row) for res in merged for row in range(len(res.labels))]
    assert len(flat) == len(single)
    for (res, row), one in zip(flat, single, strict=True):
        assert res.exit_stage[row] == one.exit_stage[0]
        assert res.labels[row] == one.labels[0]
        np.testing.assert_allclose(res.probabilities[row], one.probabilities[0], atol=ATOL, rtol=0)
    assert any(len(set(widths)) > 1 for widths in spies[0].merges), spies[0].merges  # lengths were mixed
    assert len({int(s) for res, _ in flat for s in res.exit_stage}) > 1  # rows left at several exits


@pytest.fixture(scope="module")
def client(bundle: Bundle) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundles=[bundle.root], max_samples_per_request=8))) as c:
        yield c


def post(client: TestClient, inputs: list[dict[str, Any]], tail: bytes = b"") -> httpx.Response:
    import json

    head = json.dumps({"inputs": inputs}).encode()
    if not tail:
        return client.post(f"/v2/models/{MODEL}/infer", content=head)
    return client.post(f"/v2/models/{MODEL}/infer", content=head + tail,
                       headers={"Inference-Header-Content-Length": str(len(head))})


def text_input(data: list[str], shape: list[int] | None = None, datatype: str = "BYTES") -> dict[str, Any]:
    return {"name": "text", "datatype": datatype, "shape": shape or [len(data)], "data": data}


def test_sentences_tokens_and_an_empty_string_answer_alike(client: TestClient, bundle: Bundle) -> None:
    texts = ["a very good film", "", "awful boring plot and not fun"]
    by_text = post(client, [text_input(texts)])
    assert by_text.status_code == 200, by_text.text
    ids, mask = tokenizer_for(bundle).encode(texts)
    by_ids = post(client, [
        {"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape), "data": ids.ravel().tolist()},
        {"name": "attention_mask", "datatype": "INT64", "shape": list(mask.shape), "data": mask.ravel().tolist()}])
    assert by_ids.status_code == 200, by_ids.text
    raw = serialize_bytes([t.encode() for t in texts])
    binary = post(client, [{"name": "text", "datatype": "BYTES", "shape": [3],
                            "parameters": {"binary_data_size": len(raw)}}], raw)
    assert binary.status_code == 200, binary.text
    column = post(client, [text_input([[t] for t in texts], shape=[3, 1])])  # type: ignore[misc]
    assert column.status_code == 200, column.text
    answers = [r.json()["outputs"] for r in (by_text, by_ids, binary, column)]
    assert all(a == answers[0] for a in answers)


def test_long_sentences_are_truncated_to_max_length(client: TestClient, bundle: Bundle) -> None:
    tok = tokenizer_for(bundle)
    long = " ".join(["good film"] * 50)
    ids, mask = tok.encode([long])
    assert ids.shape[1] == tok.max_length
    a = post(client, [text_input([long])]).json()["outputs"]
    b = post(client, [{"name": "input_ids", "datatype": "INT64", "shape": [1, tok.max_length],
                       "data": ids.ravel().tolist()},
                      {"name": "attention_mask", "datatype": "INT64", "shape": [1, tok.max_length],
                       "data": mask.ravel().tolist()}]).json()["outputs"]
    assert a == b


@pytest.mark.parametrize(("inputs", "tail", "message"), [
    ([text_input(["fine"], datatype="FP32")], b"", "BYTES"),
    ([text_input(["a", "b", "c", "d"], shape=[2, 2])], b"", "shape"),
    ([text_input(["a", "b"], shape=[3])], b"", "needs 3 strings"),
    ([text_input([], shape=[0])], b"", "0 samples"),
    ([text_input(["x"] * 9)], b"", "max_samples_per_request"),
    ([{"name": "text", "datatype": "BYTES", "shape": [1], "data": [5]}], b"", "not a string"),
    ([{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}],
     serialize_bytes([b"\xff\xfeok"]), "not valid UTF-8"),
    ([{"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 8}}],
     serialize_bytes([b"good"]), "ends before element 1"),
    ([{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10}}],
     serialize_bytes([b"good"]) + b"xx", "follow the 1 elements"),
    ([{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1.0]}], b"", "takes ['text']"),
    ([text_input(["ok"]), {"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [2]}], b"",
     "takes ['text']"),
    ([{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [2, 9, 3]},
      {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 0, 1]}], b"", "right-padded"),
    ([{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [2, 10**6]},
      {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]}], b"", "vocabulary"),
    ([{"name": "input_ids", "datatype": "INT64", "shape": [1, 30], "data": [2] * 30},
      {"name": "attention_mask", "datatype": "INT64", "shape": [1, 30], "data": [1] * 30}], b"", "max_length"),
    ([{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [2, 3]},
      {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]}], b"", "shape"),
    ([{"name": "input_ids", "datatype": "INT64", "shape": [2, 0], "data": []},
      {"name": "attention_mask", "datatype": "INT64", "shape": [2, 0], "data": []}], b"", "0 tokens"),
    ([{"name": "input_ids", "datatype": "FP32", "shape": [1, 2], "data": [2, 3]},
      {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]}], b"", "datatype"),
])
def test_bad_text_inputs_get_a_clear_400(client: TestClient, inputs: list[dict[str, Any]], tail: bytes,
                                         message: str) -> None:
    r = post(client, inputs, tail)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert post(client, [text_input(["still fine"])]).status_code == 200  # nothing broke


def test_metadata_names_the_text_input_and_the_token_alternative(client: TestClient) -> None:
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    alternative = meta["parameters"]["alternative_inputs"]
    assert [a["name"] for a in alternative] == ["input_ids", "attention_mask"]
    assert meta["parameters"]["max_length"] == 24


def test_a_text_model_refuses_arrays_in_process(bundle: Bundle) -> None:
    from server.errors import BadRequest

    async def scenario() -> None:
        engine = Engine([bundle], Settings(), Metrics())
        await engine.start()
        try:
            with pytest.raises(BadRequest, match="token rows"):
                await engine.infer(MODEL, np.zeros((1, 3), np.int64))
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_token_flops_follow_the_real_lengths(client: TestClient, bundle: Bundle) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def full_flops() -> float:
        for family in text_string_to_metric_families(client.get("/metrics").text):
            for s in family.samples:
                if s.name == "offramp_full_depth_flops_total" and s.labels.get("model") == MODEL:
                    return s.value
        return 0.0

    before = full_flops()
    assert post(client, [text_input(["good", "a very good film and a fine plot"])]).status_code == 200
    tok = tokenizer_for(bundle)
    lengths = tok.encode(["good", "a very good film and a fine plot"])[1].sum(1)
    want = sum(sum(c0 + c1 * t + c2 * t * t for c0, c1, c2 in (s.flops_curve for s in bundle.manifest.stages))
               for t in lengths)
    assert full_flops() - before == pytest.approx(want)


def test_offramp_serve_answers_tritonclient_with_strings(bundle: Bundle, tmp_path: Path) -> None:
    http = pytest.importorskip("tritonclient.http")
    grpc = pytest.importorskip("tritonclient.grpc")
    texts = np.array(["a very good film", "", "awful boring plot", "fine"], dtype=object)
    proc = ServerProcess(bundle.root, tmp_path / "cache", "--grpc-port", "0")
    try:
        answers = []
        client = http.InferenceServerClient(proc.url.removeprefix("http://"))
        for binary in (False, True):
            inp = http.InferInput("text", [len(texts)], "BYTES")
            inp.set_data_from_numpy(texts, binary_data=binary)
            out = [http.InferRequestedOutput("label", binary_data=binary)]
            answers.append(client.infer(MODEL, [inp], outputs=out).as_numpy("label"))
        client.close()
        assert proc.grpc_port is not None, proc.log
        gclient = grpc.InferenceServerClient(f"127.0.0.1:{proc.grpc_port}")
        inp = grpc.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(texts)
        answers.append(gclient.infer(MODEL, [inp]).as_numpy("label"))
        gclient.close()
    finally:
        proc.stop()
    ids, mask = TextTokenizer(bundle.root / "tokenizer.json", 24).encode(list(texts))
    runner = OrtStageRunner(bundle, Settings(intra_op_threads=1))
    want = alone(runner, TokenRows(ids, mask))[-1].argmax(-1)  # the default policy here is full depth
    runner.close()
    for got in answers:
        assert got.tolist() == want.tolist()
