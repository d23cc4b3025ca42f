"""The HTTP baseline of `offramp bench`: `reference.onnx` behind the simplest fast V2 endpoint.

A bare ASGI app under uvicorn (the same server and HTTP implementation offramp uses), no
framework, no engine, no batching: each infer request is decoded with offramp's own V2 codec, run
through the monolithic graph in one `session.run`, and encoded. Putting offramp's HTTP figures
beside this row separates what the HTTP layer costs from what the engine costs.

    python -m load_tests.reference_server BUNDLE --port 8100 [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from server.bundle import load_bundle
from server.engine.runtime import open_session
from server.errors import OfframpError
from server.exits import softmax
from server.http import codec
from server.interface import InferResult
from server.jsonio import dumps
from server.text import ATTENTION_MASK, TokenRows


def model_feed(manifest: Any, x: Any) -> dict[str, np.ndarray]:
    """reference.onnx's inputs for a decoded request: the array, or a text model's ids and mask."""
    if isinstance(x, TokenRows):
        return {manifest.input.name: x.data, ATTENTION_MASK: x.mask}
    return {manifest.input.name: x}


def build_app(bundle_dir: Path, threads: int) -> Any:
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    assert manifest.reference is not None, f"{bundle_dir} has no reference.onnx"
    session = open_session(bundle.root / manifest.reference.file, intra_op_threads=threads)
    final = manifest.reference.outputs[-1]
    last = manifest.num_stages - 1
    infer_path = f"/v2/models/{manifest.name}/infer"

    async def send_json(send: Any, status: int, doc: Any) -> None:
        body = dumps(doc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["method"] == "GET" and path.startswith("/v2/health/"):
            await send_json(send, 200, {"ready": True, "live": True})
            return
        if scope["method"] != "POST" or path != infer_path:
            await send_json(send, 404, {"error": f"no route {path}"})
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = dict(scope["headers"])
        try:
            req = codec.decode_request(body, headers.get(codec.INFER_HEADER.lower().encode(), b"").decode()
                                       or None, bundle, max_samples=1 << 20)
        except OfframpError as err:
            await send_json(send, err.status_code, {"error": err.message})
            return
        logits = session.run([final], model_feed(manifest, req.x))[0]
        probs = softmax(logits)
        result = InferResult(probs.argmax(axis=-1), probs, np.full(len(probs), last, np.int32))
        content, out_headers = codec.encode_infer_response(manifest, req, result)
        raw = [(k.encode(), v.encode()) for k, v in out_headers.items()]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*raw, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m load_tests.reference_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    # uvicorn's fastest stack where installed (uvloop, httptools), as offramp serve uses.
    uvicorn.run(build_app(args.bundle, args.threads), host="127.0.0.1", port=args.port, log_level="warning",
                loop="auto", http="auto", lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
