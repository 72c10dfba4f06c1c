"""A minimal OpenAI-compatible chat server for a local HF model: ``/v1/models`` and ``/v1/chat/completions``.

For the sandbox and tests of ``[evaluation] mode = "endpoint"``: it stands in for the operator's own server (vLLM,
TGI, SGLang...) and serves one model directory with transformers' greedy generation, one request at a time. It
formats a chat the way EvalScope's local ``llm_ckpt`` mode does (the tokenizer's chat template with the generation
prompt, decoded without special tokens), so both modes score the same model the same way.

Usage: ``python -m sandbox.openai_server MODEL_DIR --port PORT [--model-id ID] [--api-key-env NAME]``. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any


def build_app(model_dir: Path, model_id: str, api_key: str = "") -> Any:
    """The FastAPI app serving ``model_dir`` as ``model_id`` (requests must carry ``api_key`` when it is set)."""
    import torch
    from fastapi import FastAPI, Header, HTTPException
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()  # one generation at a time: the model is not shared between threads
    app = FastAPI()

    def check(authorization: str | None) -> None:
        if api_key and authorization != f"Bearer {api_key}":
            raise HTTPException(status_code=401, detail="bad api key")

    @app.get("/v1/models")
    def models(authorization: str | None = Header(default=None)) -> dict[str, Any]:
        check(authorization)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "fedbridge"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any], authorization: str | None = Header(default=None)) -> dict[str, Any]:
        check(authorization)
        if body.get("model") != model_id:
            raise HTTPException(status_code=404, detail=f"model {body.get('model')!r} is not served here")
        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                     else "".join(p.get("text", "") for p in m["content"])} for m in body["messages"]]
        if tok.chat_template is not None:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        enc = tok([prompt], return_tensors="pt")
        max_new = int(body.get("max_tokens") or body.get("max_completion_tokens") or 32)
        with lock, torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= max_new else "stop"
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": int(enc["input_ids"].shape[1]), "completion_tokens": int(len(new)),
                          "total_tokens": int(enc["input_ids"].shape[1] + len(new))}}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-id", default="merged")
    p.add_argument("--api-key-env", default="", help="name of the env var holding the key clients must send")
    args = p.parse_args(argv)
    key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    uvicorn.run(build_app(args.model_dir, args.model_id, key), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
