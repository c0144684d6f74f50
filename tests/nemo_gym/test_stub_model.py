"""The stub model's answers, as a pure function (no network): what the conformance cases rely on."""

from __future__ import annotations

import json

import orjson

from tests.nemo_gym.stub_model import FAIL_MARKER, respond
from tests.nemo_gym.test_conformance import gymnasium, weather


def test_weather_row_gets_a_get_weather_call_then_a_message_quoting_the_tool_output() -> None:
    rcp = weather()[0]["responses_create_params"]
    status, first = respond(rcp)
    call = first["output"][0]
    assert status == 200 and call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "San Francisco"}
    tool_output = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"weather": "cold"}'}
    status, second = respond({**rcp, "input": [*rcp["input"], call, tool_output]})
    assert status == 200 and second["output"][0]["content"][0]["text"].endswith('{"weather": "cold"}')


def test_answers_are_a_pure_function_of_the_request() -> None:
    rcp = weather()[1]["responses_create_params"]
    assert orjson.dumps(respond(rcp)) == orjson.dumps(respond(json.loads(json.dumps(rcp))))
    assert respond(rcp)[1]["id"] != respond(weather()[2]["responses_create_params"])[1]["id"]


def test_every_gymnasium_turn_has_an_answer_and_the_last_one_holds_the_expected_answer() -> None:
    for row in gymnasium():
        questions = [row["responses_create_params"]["input"][0]["content"], *row["follow_ups"]]
        for question in questions:
            text = respond({"input": [{"role": "user", "content": question}]})[1]["output"][0]["content"][0]["text"]
            assert text != "I do not know.", question
        assert row["expected_answer"].lower() in text.lower()


def test_marked_rows_are_rejected_with_400_unless_switched_off() -> None:
    body = {"input": [{"role": "user", "content": f"weather in sf {FAIL_MARKER}"}]}
    assert respond(body)[0] == 400
    assert respond(body, fail_marked=False)[0] == 200
