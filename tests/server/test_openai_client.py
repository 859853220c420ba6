"""The official `openai` client, sync and async, streaming and not, against `surge serve`."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server._helpers import ServerProcess

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is batching?"},
            {"role": "assistant", "content": "Many at once."},
            {"role": "user", "content": "Say more."}]


@pytest.fixture
def sync_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.timeout(180)  # the first test of the session also starts the shared server
def test_completion_sync(sync_client: openai.OpenAI, server: ServerProcess) -> None:
    out = sync_client.completions.create(model="tiny", prompt="The quick brown fox",
                                         max_tokens=8, temperature=0, extra_body={
                                             "ignore_eos": True})
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        len(_tokenize(server, "The quick brown fox")), 8)
    # Prompts and outputs stay out of the log unless --log-prompts.
    assert "quick brown" not in server.log() and out.choices[0].text not in server.log()


@pytest.mark.timeout(60)
def test_streamed_completion_equals_unstreamed(sync_client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "Hello, my name is", "max_tokens": 12,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = sync_client.completions.create(**kwargs)
    chunks = list(sync_client.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


@pytest.mark.timeout(60)
def test_chat_sync_and_stream_agree(sync_client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    whole = sync_client.chat.completions.create(**kwargs)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    chunks = list(sync_client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


@pytest.mark.timeout(60)
def test_async_client_concurrent_chat_and_completion(async_client: openai.AsyncOpenAI) -> None:
    async def main() -> tuple[str, str, str]:
        chat = async_client.chat.completions.create(
            model="tiny", messages=MESSAGES[:2], max_tokens=6, temperature=0)
        completion = async_client.completions.create(
            model="tiny", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0)
        stream = await async_client.chat.completions.create(
            model="tiny", messages=MESSAGES[:2], max_tokens=6, temperature=0, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        chat_out, completion_out = await asyncio.gather(chat, completion)
        return chat_out.choices[0].message.content, streamed, completion_out.choices[0].text

    chat_text, streamed_text, completion_text = asyncio.run(main())
    assert chat_text == streamed_text
    assert isinstance(completion_text, str)


@pytest.mark.timeout(60)
def test_n_choices_with_seed_are_reproducible(sync_client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": ["one", "two"], "n": 3, "max_tokens": 8,
              "temperature": 1.0, "seed": 1234, "extra_body": {"ignore_eos": True}}
    first = sync_client.completions.create(**kwargs)
    second = sync_client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == list(range(6))
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    # seed + i per choice: the three samples of one prompt are not all the same
    assert len({c.text for c in first.choices[:3]}) > 1
    assert first.usage.completion_tokens == 6 * 8


@pytest.mark.timeout(60)
def test_stop_string_cuts_the_text(sync_client: openai.OpenAI) -> None:
    base = sync_client.completions.create(model="tiny", prompt="Once upon", max_tokens=16,
                                          temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = sync_client.completions.create(model="tiny", prompt="Once upon", max_tokens=16,
                                         temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.timeout(60)
def test_logprobs_completion_and_chat(sync_client: openai.OpenAI) -> None:
    out = sync_client.completions.create(model="tiny", prompt="Hello", max_tokens=4,
                                         temperature=0, logprobs=3,
                                         extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) >= 3 for top in logprobs.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(lp == pytest.approx(max(top.values())) for lp, top in
               zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True))
    chat = sync_client.chat.completions.create(model="tiny", messages=MESSAGES[:2],
                                               max_tokens=3, temperature=0, logprobs=True,
                                               top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) == 2 for entry in content)


@pytest.mark.timeout(30)
def test_models_lists_the_served_model(sync_client: openai.OpenAI) -> None:
    models = sync_client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].max_model_len == 2048


@pytest.mark.timeout(30)
def test_client_raises_typed_errors(sync_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sync_client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sync_client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    assert bad.value.body["param"] == "temperature"


def _tokenize(server: ServerProcess, text: str) -> list[int]:
    return httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
