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


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"]},
    },
}


def check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"), args


def tool_calls(client: openai.OpenAI, model: str) -> None:
    """A named and a required call fit their schemas at temperature 1, streamed and not; a call's
    result goes back through the template and the model answers."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER, CLOCK], tool_choice=named, temperature=1, seed=1, max_tokens=100
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", r
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather", call
    check_weather_args(call.function.arguments)

    for seed in range(2):
        r = client.chat.completions.create(
            model=model, messages=ask, tools=[WEATHER, CLOCK], tool_choice="required", temperature=1, seed=seed, max_tokens=100
        )
        c = r.choices[0].message.tool_calls[0]
        assert c.function.name in ("get_weather", "get_time"), r
        if c.function.name == "get_weather":
            check_weather_args(c.function.arguments)
        else:
            assert isinstance(json.loads(c.function.arguments)["timezone"], str)

    names, arguments, argument_chunks, finish = [], "", 0, None
    stream = client.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER], tool_choice=named, temperature=1, seed=2, max_tokens=100, stream=True
    )
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                if tc.function.name:
                    names.append(tc.function.name)
                arguments += tc.function.arguments or ""
                argument_chunks += bool(tc.function.arguments)
            finish = ch.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls", (names, finish)
    # The arguments stream as the model writes them, not in one piece at the end.
    assert argument_chunks > 2, (argument_chunks, arguments)
    check_weather_args(arguments)

    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    final = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER, CLOCK], tool_choice="none", temperature=0, max_tokens=30
    )
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length"), final

    try:
        client.chat.completions.create(
            model=model, messages=ask, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
        )
        raise AssertionError("a tool_choice naming no tool was accepted")
    except openai.BadRequestError as e:
        assert "tool_choice" in str(e)


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


def log_likelihood(client: openai.OpenAI, model: str) -> None:
    """What lm-eval's loglikelihood tasks send: context and continuation echoed back, scored,
    nothing generated; and the same with one token generated, as its older versions ask."""
    context, continuation = "The capital of France is", " Paris"
    for max_tokens in (0, 1):
        done = client.completions.create(
            model=model, prompt=context + continuation, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0
        )
        lp = done.choices[0].logprobs
        assert done.choices[0].text.startswith(context + continuation), done
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
        prompt_tokens = done.usage.prompt_tokens
        assert len(lp.tokens) == prompt_tokens + max_tokens, (lp.tokens, done.usage)
        assert "".join(lp.tokens[:prompt_tokens]) == context + continuation
        # The continuation's log-likelihood, and whether it is the greedy one, as lm-eval reads them.
        last = prompt_tokens - 1
        assert lp.token_logprobs[last] < 0
        assert len(lp.top_logprobs[last]) == 1
        assert done.usage.completion_tokens == max_tokens


def refusals(client: openai.OpenAI, model: str) -> None:
    """What is not carried out is refused by name, not ignored."""
    for kwargs, param in (
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"extra_body": {"prompt_logprobs": 1}, "stream": True}, "prompt_logprobs"),
    ):
        try:
            client.completions.create(model=model, prompt="Hi", max_tokens=2, **kwargs)
            raise AssertionError(f"{param} was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and param in str(e), e


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
    tool_calls(client, model)
    log_likelihood(client, model)
    refusals(client, model)

    print("all openai client checks passed")


if __name__ == "__main__":
    main()
