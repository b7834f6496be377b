"""Checks Tandem with the official `openai` Python client: models, chat, completions,
streaming, structured output, and the client's error classes.
Usage: openai_client.py BASE_URL MODEL"""

import json
import sys
from typing import Literal

import openai
import pydantic


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)
    postcode: int = pydantic.Field(ge=0, le=99999)


class Person(pydantic.BaseModel):
    """Nested, with an enum, integers and a boolean: what structured output must always fit."""

    name: str = pydantic.Field(max_length=24)
    age: int = pydantic.Field(ge=0, le=130)
    member: bool
    role: Literal["admin", "user", "guest"]
    address: Address


def structured_output(client: openai.OpenAI, model: str) -> None:
    """At temperature 1 the small model would rarely write valid JSON of this shape unaided; the
    constraint makes every answer parse and validate, streamed or not."""
    ask = [{"role": "user", "content": "Describe a made-up person as JSON."}]
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in range(3):
        r = parse(model=model, messages=ask, response_format=Person, temperature=1, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "stop", r
        assert isinstance(r.choices[0].message.parsed, Person), r

    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True}}
    for seed in range(2):
        text = ""
        stream = client.chat.completions.create(
            model=model, messages=ask, response_format=schema, temperature=1, seed=seed, max_tokens=200, stream=True
        )
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        Person.model_validate_json(text)

    obj = client.chat.completions.create(
        model=model, messages=ask, response_format={"type": "json_object"}, temperature=1, seed=7, max_tokens=120
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict), obj

    choice = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is this review positive? 'Great food.'"}],
        temperature=1,
        max_tokens=10,
        extra_body={"guided_choice": ["positive", "negative", "neutral"]},
    )
    assert choice.choices[0].message.content in ("positive", "negative", "neutral"), choice

    done = client.completions.create(
        model=model, prompt="My phone number is", max_tokens=20, temperature=1, extra_body={"guided_regex": r" \d{3}-\d{4}"}
    )
    text = done.choices[0].text
    assert len(text) == 9 and text[0] == " " and text[4] == "-" and text.replace("-", "").strip().isdigit(), text

    try:
        client.chat.completions.create(model=model, messages=ask, response_format={"type": "yaml"})
        raise AssertionError("an unknown response_format was accepted")
    except openai.BadRequestError as e:
        assert "response_format" in str(e)


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

    structured_output(client, model)

    print("all openai client checks passed")


if __name__ == "__main__":
    main()
