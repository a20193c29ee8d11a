"""The official `openai` Python client against a real tokenfleet fleet (coordinator + two agents
on the real model)."""

import openai
import pytest
from openai import OpenAI

from conftest import API_KEY, MODEL

PROMPT = [{"role": "user", "content": "Explain why the sky is blue."}]


@pytest.fixture()
def client(fleet):
    return OpenAI(base_url=fleet, api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_non_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=32, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "sky" in choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 32
    assert r.usage.prompt_tokens > 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 32


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=32, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == "length"
    assert usage.completion_tokens == 32


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=10, temperature=0)
    assert r.choices[0].text
    assert r.usage.completion_tokens == 10


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_extension_fields_pass_through_the_official_client(client):
    r = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=4, temperature=0,
        extra_body={"tokenfleet": {"class": "batch"}},
    )
    assert r.usage.completion_tokens == 4
    # The server reads what the client passes: a region the fleet does not have, and a class
    # it does not know, are refused naming the extension's field (a server ignoring
    # `tokenfleet` would answer both).
    for ext, param in [({"residency": ["Atlantis"]}, "tokenfleet.residency"),
                       ({"class": "urgent"}, "tokenfleet.class")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=4, extra_body={"tokenfleet": ext},
            )
        assert err.value.status_code == 400
        assert err.value.body["param"] == param, err.value.body


def test_invalid_key_gets_401_in_openai_shape(fleet):
    bad = OpenAI(base_url=fleet, api_key="not-a-valid-key-at-all", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4)
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"
    assert err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=PROMPT, max_tokens=4)
    assert err.value.body["code"] == "model_not_found"
