#!/usr/bin/env python3
"""Check lmgen's OpenAI batch output with the `openai` package's own types.

    python scripts/check_openai_batch.py [--lmgen PATH] [--update] [--smollm2 FILE.gguf]

Runs `lmgen generate` on tests/fixtures/openai/batch.jsonl with a tiny fixture model (the
qwen2 fixture plus tests/fixtures/openai/chat_template.jinja), then validates every output
line: its shape (`id`, `custom_id`, `response` {`status_code`, `request_id`, `body`},
`error`), and each body with `openai.types.Completion`, `openai.types.chat.ChatCompletion`
or `openai.types.CreateEmbeddingResponse` `.model_validate(...)` (error bodies: the
OpenAI error object). With --update, writes the validated output (its `created` times set
to 0) to tests/fixtures/openai/expected.jsonl, which `cargo test` compares lmgen's output
with (crates/lmgen-cli/tests/openai.rs), no Python needed.

--smollm2 FILE.gguf also runs chat and completion requests through the real
SmolLM2-135M-Instruct (its chat template comes from the GGUF metadata) and validates them.
Needs: openai (pip install openai).
"""
import argparse
import base64
import json
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile

from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "openai"
# The command line of the golden run (crates/lmgen-cli/tests/openai.rs uses the same).
ARGS = ["--seed", "1", "--max-new-tokens", "10", "--threads", "1", "--batch-size", "4"]
TYPES = {
    "/v1/completions": Completion,
    "/v1/chat/completions": ChatCompletion,
    "/v1/embeddings": CreateEmbeddingResponse,
}


def fixture_model(tmp: pathlib.Path) -> pathlib.Path:
    model = tmp / "model"
    shutil.copytree(ROOT / "tests" / "fixtures" / "qwen2", model)
    shutil.copy(FIX / "chat_template.jinja", model / "chat_template.jinja")
    return model


def run(lmgen, model, inp, out, extra=()):
    cmd = [lmgen, "generate", str(model), "--input", str(inp), "--output", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"lmgen failed ({p.returncode}): {p.stderr}")
    return [json.loads(l) for l in pathlib.Path(out).read_text().splitlines()]


def check(requests, records):
    """Validate each output line against its request; returns a count per kind."""
    assert len(records) == len(requests), (len(records), len(requests))
    seen = {}
    for req, rec in zip(requests, records):
        assert list(rec) == ["id", "custom_id", "response", "error"], list(rec)
        assert rec["id"].startswith("batch_req_"), rec["id"]
        assert rec["error"] is None
        resp = rec["response"]
        assert list(resp) == ["status_code", "request_id", "body"], list(resp)
        assert resp["request_id"].startswith("req_")
        if req is not None and isinstance(req.get("custom_id"), str):
            assert rec["custom_id"] == req["custom_id"], (rec["custom_id"], req)
        body = resp["body"]
        if resp["status_code"] == 200:
            kind = TYPES[req["url"]]
            if kind is CreateEmbeddingResponse:
                # base64 vectors (little-endian f32) are decoded before validation, as the
                # SDK's own embeddings.create does.
                body = json.loads(json.dumps(body))
                for d in body["data"]:
                    if isinstance(d["embedding"], str):
                        raw = base64.b64decode(d["embedding"])
                        d["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
            obj = kind.model_validate(body)
            if kind is not CreateEmbeddingResponse:
                n = req["body"].get("n", 1)
                prompts = req["body"].get("prompt", "")
                k = len(prompts) if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else 1
                assert [c.index for c in obj.choices] == list(range(n * k)), obj.choices
                assert obj.usage.total_tokens == obj.usage.prompt_tokens + obj.usage.completion_tokens
            else:
                for d in obj.data:
                    vec = d.embedding
                    norm = sum(x * x for x in vec) ** 0.5
                    assert abs(norm - 1) < 1e-4, norm
            name = kind.__name__
        else:
            assert resp["status_code"] == 400, resp
            err = body["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert err["type"] == "invalid_request_error" and err["message"]
            name = "error (400)"
        seen[name] = seen.get(name, 0) + 1
    return seen


def requests_of(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lmgen", default=str(ROOT / "target" / "debug" / "lmgen"))
    ap.add_argument("--update", action="store_true")
    ap.add_argument("--smollm2")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model = fixture_model(tmp)
        records = run(a.lmgen, model, FIX / "batch.jsonl", tmp / "out.jsonl", ARGS)
        seen = check(requests_of(FIX / "batch.jsonl"), records)
        print(f"fixture: {len(records)} lines valid: {seen}")
        if a.update:
            with open(FIX / "expected.jsonl", "w") as f:
                for r in records:
                    if "created" in r["response"]["body"]:
                        r["response"]["body"]["created"] = 0
                    f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
            print(f"wrote {(FIX / 'expected.jsonl').relative_to(ROOT)}")
        if a.smollm2:
            reqs = [
                {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                          "max_tokens": 20, "temperature": 0}},
                {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
                 "body": {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}},
                {"custom_id": "embedding", "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": "smollm2", "input": "Paris"}},
            ]
            inp = tmp / "smollm2.jsonl"
            inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
            recs = run(a.lmgen, a.smollm2, inp, tmp / "smollm2-out.jsonl", ["--threads", "2"])
            seen = check(reqs, recs)
            print(f"SmolLM2: {len(recs)} lines valid: {seen}")
            for r in recs[:2]:
                c = r["response"]["body"]["choices"][0]
                print(f"  {r['custom_id']}: {json.dumps(c.get('message', {}).get('content', c.get('text')))}")


if __name__ == "__main__":
    main()
