"""Checks Tandem with the official `openai` Python client: models, chat, completions,
streaming, and the client's error classes. Usage: openai_client.py BASE_URL MODEL"""

import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    models = [m.id for m in client.models.list()]
    assert model in models, models

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens >= 1

    done = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0, logprobs=2)
    assert done.choices[0].text
    assert len(done.choices[0].logprobs.tokens) == done.usage.completion_tokens

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces), "no streamed text"
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= 1

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=9)
        raise AssertionError("bad temperature accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert "temperature" in str(e)

    print("all openai client checks passed")


if __name__ == "__main__":
    main()
