"""The official `openai` Python client against the gateway (in front of mock replicas).

Run by tests/python/run.sh BASE_URL (the Rust test `openai_python_client` starts the gateway and the
replicas and calls it). Plain asserts; exits non-zero on the first failure.
"""
import sys

import openai
from openai import OpenAI

MODEL = "mock-llama-3-70b"


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
    session = {"x-session-id": "py-conv-1"}

    # Non-streamed chat completion, with usage.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is data parallel inference?"}],
        max_tokens=6,
        extra_headers=session,
    )
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content, r
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0, r.usage

    # Raw response: the gateway's routing headers.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_headers=session
    )
    assert raw.headers.get("x-replica-affinity") == "home", dict(raw.headers)
    assert raw.headers.get("x-replica-id"), dict(raw.headers)
    raw.parse()

    # Streamed chat completion: deltas, then the usage chunk.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream a short answer."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=session,
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) == 12, pieces
    assert usage is not None and usage.completion_tokens == 12, usage

    # Legacy completions, streamed and not.
    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert c.choices[0].text and c.usage.completion_tokens == 4, c
    texts = [ch.choices[0].text for ch in client.completions.create(model=MODEL, prompt="abc", max_tokens=3, stream=True)]
    assert len([t for t in texts if t]) == 3, texts

    # Models list through the gateway.
    assert [m.id for m in client.models.list().data] == [MODEL]

    # A malformed request is a clean 400 the client raises as BadRequestError.
    try:
        client.chat.completions.create(model=MODEL, messages="not a list", max_tokens=1)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
    else:
        raise AssertionError("expected a 400")

    print("openai client: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
