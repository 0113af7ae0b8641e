#!/usr/bin/env python3
"""Drives a running Tollgate gateway with the official `openai` and `anthropic` Python SDKs.

Usage: sdk_check.py http://127.0.0.1:PORT API_KEY

API_KEY is a credential the gateway accepts (a service token or a JWT); the SDKs send it where they always
send their key (`Authorization: Bearer` for OpenAI, `x-api-key` for Anthropic).

The gateway must route `gpt-*` and `text-embedding-*` to an OpenAI-kind provider and `claude-*` to an
Anthropic-kind provider, both
being `tollgate-mock`, whose output is deterministic: token i is the i-th word of MOCK_WORDS plus a space, the
output token count is min(16, max_tokens), and the input token count is taken from `x-mock-input-tokens`
when sent (the gateway forwards it). A budget with `stream_cutoff = true` must apply to every request (the
cut-off check streams more than the default reservation covers). Prints one line per check; exits 1 if any
check fails.
"""

import sys
import traceback

import anthropic
import openai

MOCK_WORDS = (
    "Hello from the Tollgate mock provider this is a deterministic stream of words for load tests"
).split()
INPUT_TOKENS = 37
HEADERS = {"x-mock-input-tokens": str(INPUT_TOKENS)}
MESSAGES = [{"role": "user", "content": "Say hello"}]
TIMEOUT = 30.0


def expected(n):
    """The mock's text for n output tokens."""
    return "".join(w + " " for w in MOCK_WORDS[:n])


def check_openai_chat(oa):
    raw = oa.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5, extra_headers=HEADERS
    )
    rid = raw.headers.get("x-request-id")
    assert rid and len(rid) == 24, f"x-request-id header: {rid!r}"
    r = raw.parse()
    assert r.object == "chat.completion", f"object: {r.object!r}"
    assert len(r.choices) == 1, f"choices: {r.choices!r}"
    content = r.choices[0].message.content
    assert content == expected(5), f"content: {content!r}"
    assert r.choices[0].message.role == "assistant", f"role: {r.choices[0].message.role!r}"
    assert r.usage is not None, "no usage"
    assert r.usage.completion_tokens == 5, f"completion_tokens: {r.usage.completion_tokens}"
    assert r.usage.prompt_tokens == INPUT_TOKENS, f"prompt_tokens: {r.usage.prompt_tokens}"
    return f"content={content!r} usage={r.usage.prompt_tokens}+{r.usage.completion_tokens} request_id={rid}"


def check_openai_chat_default_input_tokens(oa):
    # Without the header the mock counts ceil(body bytes / 4): the SDK's exact bytes are its business.
    r = oa.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=3)
    assert r.choices[0].message.content == expected(3), f"content: {r.choices[0].message.content!r}"
    assert r.usage.prompt_tokens > 0, f"prompt_tokens: {r.usage.prompt_tokens}"
    assert r.usage.completion_tokens == 3, f"completion_tokens: {r.usage.completion_tokens}"
    return f"prompt_tokens={r.usage.prompt_tokens}"


def check_openai_stream(oa):
    stream = oa.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_completion_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=HEADERS,
    )
    text, chunks, usage, finish = [], 0, None, None
    with stream:
        for chunk in stream:
            chunks += 1
            assert chunk.object == "chat.completion.chunk", f"chunk object: {chunk.object!r}"
            if chunk.usage is not None:
                assert usage is None, "two usage chunks"
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    text.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
    text = "".join(text)
    assert text == expected(6), f"streamed text: {text!r}"
    assert finish is not None, "no finish_reason"
    assert usage is not None, "no usage chunk"
    assert usage.completion_tokens == 6, f"completion_tokens: {usage.completion_tokens}"
    assert usage.prompt_tokens == INPUT_TOKENS, f"prompt_tokens: {usage.prompt_tokens}"
    return f"{chunks} chunks text={text!r} finish={finish} usage={usage.prompt_tokens}+{usage.completion_tokens}"


def check_openai_stream_cut_off(oa):
    """No output cap: 4,096 tokens are reserved and the mock streams 6,000; the gateway's cut-off ends the
    stream at the reservation with a final chunk the SDK reads as finish_reason "length"."""
    stream = oa.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={**HEADERS, "x-mock-output-tokens": "6000", "x-mock-token-delay-ms": "0"},
    )
    words, finish = 0, None
    with stream:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    words += 1
                if choice.finish_reason:
                    finish = choice.finish_reason
    assert finish == "length", f"finish_reason: {finish!r}"
    assert 0 < words < 6000, f"{words} content chunks"
    return f"{words} content chunks, finish={finish}"


RESPONSES_HEADERS = {"x-mock-input-tokens": str(INPUT_TOKENS), "x-mock-output-tokens": "7"}


def check_openai_responses(oa):
    raw = oa.responses.with_raw_response.create(
        model="gpt-4o-mini", input="Say hello", max_output_tokens=64, extra_headers=RESPONSES_HEADERS
    )
    cost = raw.headers.get("x-tollgate-cost")
    assert cost, "no x-tollgate-cost header"
    r = raw.parse()
    assert r.object == "response", f"object: {r.object!r}"
    assert r.status == "completed", f"status: {r.status!r}"
    assert r.output_text == expected(7), f"output_text: {r.output_text!r}"
    assert r.usage is not None, "no usage"
    assert r.usage.input_tokens == INPUT_TOKENS, f"input_tokens: {r.usage.input_tokens}"
    assert r.usage.output_tokens == 7, f"output_tokens: {r.usage.output_tokens}"
    assert r.usage.input_tokens_details.cached_tokens == 0, f"cached: {r.usage.input_tokens_details}"
    assert r.usage.output_tokens_details.reasoning_tokens == 0, f"reasoning: {r.usage.output_tokens_details}"
    return f"output_text={r.output_text!r} usage={r.usage.input_tokens}+{r.usage.output_tokens} cost={cost}"


def check_openai_responses_stream(oa):
    stream = oa.responses.create(
        model="gpt-4o-mini",
        input=[{"role": "user", "content": "Say hello"}],
        instructions="Be brief.",
        stream=True,
        extra_headers=RESPONSES_HEADERS,
    )
    text, kinds, usage, seq = [], [], None, -1
    with stream:
        for event in stream:
            kinds.append(event.type)
            assert event.sequence_number == seq + 1, f"sequence_number {event.sequence_number} after {seq}"
            seq = event.sequence_number
            if event.type == "response.output_text.delta":
                text.append(event.delta)
            if event.type == "response.completed":
                usage = event.response.usage
    assert kinds[0] == "response.created", f"first event: {kinds[0]}"
    assert kinds[-1] == "response.completed", f"last event: {kinds[-1]}"
    assert "".join(text) == expected(7), f"text: {''.join(text)!r}"
    assert usage is not None, "no usage in response.completed"
    assert usage.input_tokens == INPUT_TOKENS and usage.output_tokens == 7, f"usage: {usage}"
    # The SDK's accumulating helper reads the same stream into a final response.
    with oa.responses.stream(model="gpt-4o-mini", input="Say hello", extra_headers=RESPONSES_HEADERS) as s:
        final = s.get_final_response()
    assert final.output_text == expected(7), f"final output_text: {final.output_text!r}"
    assert final.usage.output_tokens == 7, f"final usage: {final.usage}"
    return f"{len(kinds)} events, text={''.join(text)!r} usage={usage.input_tokens}+{usage.output_tokens}"


def check_openai_responses_unbounded_tool(oa):
    try:
        oa.responses.create(model="gpt-4o-mini", input="search", tools=[{"type": "web_search"}])
    except openai.BadRequestError as e:
        assert e.code == "cost_unbounded", f"code: {e.code!r}"
        assert "tools[0]" in str(e), f"message: {e}"
        return f"BadRequestError code={e.code}"
    raise AssertionError("a built-in tool was accepted")


def check_anthropic_messages(an):
    m = an.messages.create(
        model="claude-3-5-haiku-latest", max_tokens=5, messages=MESSAGES, extra_headers=HEADERS
    )
    assert m.type == "message", f"type: {m.type!r}"
    assert m.role == "assistant", f"role: {m.role!r}"
    texts = [b.text for b in m.content if b.type == "text"]
    assert texts == [expected(5)], f"content: {m.content!r}"
    assert m.usage.output_tokens == 5, f"output_tokens: {m.usage.output_tokens}"
    assert m.usage.input_tokens == INPUT_TOKENS, f"input_tokens: {m.usage.input_tokens}"
    return f"text={texts[0]!r} usage={m.usage.input_tokens}+{m.usage.output_tokens} stop={m.stop_reason}"


def check_anthropic_stream(an):
    with an.messages.stream(
        model="claude-sonnet-4-20250514", max_tokens=7, messages=MESSAGES, extra_headers=HEADERS
    ) as stream:
        deltas = list(stream.text_stream)
        final_text = stream.get_final_text()
        final = stream.get_final_message()
    assert "".join(deltas) == expected(7), f"text_stream: {deltas!r}"
    assert final_text == expected(7), f"get_final_text: {final_text!r}"
    assert final.usage.output_tokens == 7, f"output_tokens: {final.usage.output_tokens}"
    assert final.usage.input_tokens == INPUT_TOKENS, f"input_tokens: {final.usage.input_tokens}"
    assert final.stop_reason is not None, "no stop_reason"
    return (
        f"{len(deltas)} deltas text={final_text!r} usage={final.usage.input_tokens}+{final.usage.output_tokens}"
        f" stop={final.stop_reason}"
    )


def check_openai_embeddings(oa):
    # The SDK asks for base64 by default and decodes it into floats.
    r = oa.embeddings.create(
        model="text-embedding-3-small", input=["Say hello", "again"], dimensions=8, extra_headers=HEADERS
    )
    assert len(r.data) == 2, f"data: {r.data!r}"
    assert all(len(d.embedding) == 8 for d in r.data), f"dimensions: {[len(d.embedding) for d in r.data]}"
    assert r.usage.prompt_tokens == INPUT_TOKENS, f"prompt_tokens: {r.usage.prompt_tokens}"
    f = oa.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3]], encoding_format="float")
    assert len(f.data[0].embedding) == 1536, f"default dimensions: {len(f.data[0].embedding)}"
    return f"{len(r.data)} vectors of {len(r.data[0].embedding)}, usage={r.usage.prompt_tokens}"


def check_openai_models(oa):
    ids = [m.id for m in oa.models.list()]
    assert "gpt-4o-mini" in ids and "fast" in ids, f"ids: {ids!r}"
    assert any(i.startswith("claude-") for i in ids), f"ids: {ids!r}"
    return f"{len(ids)} models"


def check_anthropic_count_tokens(an):
    r = an.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES, extra_headers=HEADERS)
    assert r.input_tokens == INPUT_TOKENS, f"input_tokens: {r.input_tokens}"
    return f"input_tokens={r.input_tokens}"


def check_anthropic_models(an):
    page = an.models.list()
    ids = [m.id for m in page.data]
    assert "claude-sonnet-4-5" in ids, f"ids: {ids!r}"
    assert page.has_more is False, f"has_more: {page.has_more!r}"
    return f"{len(ids)} models, first={page.first_id} last={page.last_id}"


def check_openai_unknown_model(oa):
    try:
        oa.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=5)
    except openai.NotFoundError as e:
        assert e.status_code == 404, f"status: {e.status_code}"
        return f"NotFoundError {e.status_code}: {e.message}"
    raise AssertionError("no error for an unknown model")


def check_openai_unknown_model_stream(oa):
    try:
        oa.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=5, stream=True)
    except openai.NotFoundError as e:
        return f"NotFoundError {e.status_code}"
    raise AssertionError("no error for an unknown model")


def check_anthropic_unknown_model(an):
    try:
        an.messages.create(model="no-such-model", max_tokens=5, messages=MESSAGES)
    except anthropic.NotFoundError as e:
        assert e.status_code == 404, f"status: {e.status_code}"
        assert isinstance(e.body, dict) and e.body.get("type") == "error", f"body: {e.body!r}"
        return f"NotFoundError {e.status_code}: {e.message}"
    raise AssertionError("no error for an unknown model")


def check_openai_bad_key(base):
    bad = openai.OpenAI(base_url=base + "/v1", api_key="sk-not-a-tollgate-credential", max_retries=0, timeout=TIMEOUT)
    try:
        bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    except openai.AuthenticationError as e:
        assert e.status_code == 401, f"status: {e.status_code}"
        assert "sk-not-a-tollgate-credential" not in str(e.body), "the key was echoed"
        return f"AuthenticationError {e.status_code}: {e.message}"
    raise AssertionError("no error for a bad key")


def check_anthropic_bad_key(base):
    bad = anthropic.Anthropic(base_url=base, api_key="tg_" + "A" * 43, max_retries=0, timeout=TIMEOUT)
    try:
        bad.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=MESSAGES)
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401, f"status: {e.status_code}"
        return f"AuthenticationError {e.status_code}: {e.message}"
    raise AssertionError("no error for a bad key")


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    base = sys.argv[1].rstrip("/")
    key = sys.argv[2]
    print(f"python {sys.version.split()[0]} openai {openai.__version__} anthropic {anthropic.__version__}")
    oa = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
    an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=TIMEOUT)
    checks = [
        ("openai bad key", check_openai_bad_key, base),
        ("anthropic bad key", check_anthropic_bad_key, base),
        ("openai chat.completions", check_openai_chat, oa),
        ("openai chat.completions (counted input)", check_openai_chat_default_input_tokens, oa),
        ("openai chat.completions stream", check_openai_stream, oa),
        ("openai chat.completions stream cut off at its reservation", check_openai_stream_cut_off, oa),
        ("openai responses", check_openai_responses, oa),
        ("openai responses stream", check_openai_responses_stream, oa),
        ("openai responses with a built-in tool", check_openai_responses_unbounded_tool, oa),
        ("anthropic messages", check_anthropic_messages, an),
        ("anthropic messages.stream", check_anthropic_stream, an),
        ("openai embeddings", check_openai_embeddings, oa),
        ("openai models.list", check_openai_models, oa),
        ("anthropic messages.count_tokens", check_anthropic_count_tokens, an),
        ("anthropic models.list", check_anthropic_models, an),
        ("openai unknown model", check_openai_unknown_model, oa),
        ("openai unknown model (stream)", check_openai_unknown_model_stream, oa),
        ("anthropic unknown model", check_anthropic_unknown_model, an),
    ]
    failed = 0
    for name, check, client in checks:
        try:
            detail = check(client)
            print(f"ok   {name}: {detail}")
        except Exception as e:  # noqa: BLE001 - report every check, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        sys.stdout.flush()
    print(f"{len(checks) - failed}/{len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
