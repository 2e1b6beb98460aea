"""The event-stream readers and the built-in worker profiles, on the CLIs' documented output."""

from __future__ import annotations

import json

import pytest

from worker_server.event_formats import ClaudeReader, CodexReader, TextReader, WorkerEvent
from worker_server.profiles import BUILTIN_PROFILES, WorkerProfile, merge_profile


def feed(reader, events: list[object]) -> list[WorkerEvent]:  # noqa: ANN001
    out: list[WorkerEvent] = []
    for event in events:
        out += reader.feed(event if isinstance(event, str) else json.dumps(event))
    return out


def test_codex_jsonl_session_activity_final_and_failure() -> None:
    reader = CodexReader()
    events = feed(reader, [
        {"type": "thread.started", "thread_id": "0199a213-81c0-7800-8aa1-bbab2a035a53"},
        # A start-up warning (codex 0.171.0 with a model it has no metadata for): log only.
        {"type": "item.completed", "item": {"id": "item_0", "type": "error",
                                            "message": "Model metadata for `m` not found."}},
        {"type": "turn.started"},
        {"type": "item.completed", "item": {"id": "item_0", "type": "reasoning", "text": "**Scanning**"}},
        {"type": "item.completed", "item": {"id": "item_1", "type": "command_execution",
                                            "command": "bash -lc ls", "aggregated_output": "a\nb", "exit_code": 0}},
        {"type": "item.completed", "item": {"id": "item_2", "type": "agent_message", "text": "First look done."}},
        "a stray line that is not JSON",
        {"type": "item.completed", "item": {"id": "item_4", "type": "error", "message": "patch rejected"}},
        {"type": "item.completed", "item": {"id": "item_3", "type": "agent_message", "text": "All tests pass."}},
        {"type": "turn.completed", "usage": {"input_tokens": 24763, "output_tokens": 122}},
    ])  # fmt: skip
    assert events[0] == WorkerEvent("session", "0199a213-81c0-7800-8aa1-bbab2a035a53")
    activity = [e.text for e in events if e.kind == "activity"]
    assert activity == [
        "$ bash -lc ls (exit 0)",
        "First look done.",
        "a stray line that is not JSON",
        "error: patch rejected",
        "All tests pass.",
    ]
    assert reader.final() == "All tests pass."
    failed = feed(CodexReader(), [{"type": "turn.failed", "error": {"message": "stream disconnected"}}])
    assert failed == [WorkerEvent("failure", "stream disconnected")]
    # A top-level error is what Codex prints while it reconnects: a notice, not the end.
    assert feed(CodexReader(), [{"type": "error", "message": "Reconnecting... 1/5"}]) == [
        WorkerEvent("notice", "Reconnecting... 1/5")
    ]
    # The API's own message, not the JSON body Codex passes on.
    body = json.dumps({"error": {"message": "model x does not exist", "type": "invalid_request_error"}})
    assert feed(CodexReader(), [{"type": "turn.failed", "error": {"message": body}}]) == [
        WorkerEvent("failure", "model x does not exist")
    ]


def test_codex_and_claude_usage() -> None:
    codex = feed(CodexReader(), [{"type": "turn.completed", "usage": {
        "input_tokens": 2400, "cached_input_tokens": 400, "output_tokens": 60, "reasoning_output_tokens": 10}}])  # fmt: skip
    assert codex[-1].usage == {"input_tokens": 2400, "cached_input_tokens": 400, "output_tokens": 60,
                               "reasoning_tokens": 10, "cost_usd": None, "worker_s": None}  # fmt: skip
    claude = feed(ClaudeReader(), [
        {"type": "assistant", "message": {"id": "m1", "model": "c", "content": [],
                                          "usage": {"input_tokens": 50, "cache_read_input_tokens": 10, "output_tokens": 1}}},
        {"type": "result", "is_error": False, "result": "ok", "total_cost_usd": 0.0123,
         "usage": {"input_tokens": 100, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 5,
                   "output_tokens": 7, "output_tokens_details": {"thinking_tokens": 2}}},
    ])  # fmt: skip
    usage = [e.usage for e in claude if e.kind == "usage"]
    assert usage[0]["input_tokens"] == 60 and usage[0]["output_tokens"] == 1
    # Anthropic counts cached input apart; taskwarden's input_tokens includes it.
    assert usage[-1] == {"input_tokens": 125, "cached_input_tokens": 20, "output_tokens": 7,
                         "reasoning_tokens": 2, "cost_usd": 0.0123, "worker_s": None}  # fmt: skip


def test_claude_stream_json_session_activity_and_result() -> None:
    reader = ClaudeReader()
    events = feed(reader, [
        {"type": "system", "subtype": "init", "session_id": "8f3c-session", "tools": ["Bash"], "model": "claude"},
        {"type": "assistant", "message": {"content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}},
        ]}},
        {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a"}]}},
        {"type": "result", "subtype": "success", "is_error": False, "result": "Done: 3 files.",
         "session_id": "8f3c-session"},
    ])  # fmt: skip
    assert events[0] == WorkerEvent("session", "8f3c-session")
    assert [e.text for e in events if e.kind == "activity"] == ["Let me look.", "→ Bash"]
    assert reader.final() == "Done: 3 files."
    err = feed(ClaudeReader(), [{"type": "result", "subtype": "error_max_turns", "is_error": True, "result": "Max turns"}])
    assert err == [WorkerEvent("failure", "Max turns")]


def test_text_keeps_only_the_last_lines_as_the_final_output() -> None:
    reader = TextReader()
    events = feed(reader, [f"line {i}" for i in range(500)] + ["", ""])
    assert len([e for e in events if e.kind == "activity"]) == 500
    final = reader.final()
    assert final is not None and final.splitlines()[-1] == "line 499"
    assert len(final.splitlines()) == TextReader.KEEP_LINES - 2


def test_builtin_profiles_build_their_commands() -> None:
    codex = BUILTIN_PROFILES["codex"]
    # Writing inside cwd is the default; never the bypass switches.
    assert codex.argv(cwd="/src/app", prompt="hi", session=None) == [
        "codex", "exec", "--json", "--skip-git-repo-check", "-C", "/src/app", "-c", 'sandbox_mode="workspace-write"', "-",
    ]  # fmt: skip
    assert codex.argv(
        cwd="/src/app", prompt="hi", session="th_1", options={"model": "o9", "effort": "high", "sandbox": "read-only"}
    )[-9:] == [
        "resume", "-m", "o9", "-c", 'model_reasoning_effort="high"', "-c", 'sandbox_mode="read-only"', "th_1", "-",
    ]  # fmt: skip
    claude = BUILTIN_PROFILES["claude"]
    assert claude.argv(cwd="/x", prompt="hi", session="s1")[-4:] == ["--permission-mode", "acceptEdits", "--resume", "s1"]
    assert claude.argv(cwd="/x", prompt="hi", session=None, options={"sandbox": "read-only", "effort": "low"})[-4:] == [
        "--effort", "low", "--permission-mode", "manual",
    ]  # fmt: skip
    for profile in BUILTIN_PROFILES.values():
        for template in (profile.command, profile.resume or []):
            assert not any("dangerously" in part or "bypass" in part.lower() for part in template)
    shell = BUILTIN_PROFILES["shell"]
    assert shell.argv(cwd="/x", prompt="make test", session=None) == ["/bin/sh", "-c", "make test"]


def test_a_config_profile_overrides_only_the_keys_it_sets() -> None:
    merged = merge_profile(BUILTIN_PROFILES["codex"], {"max_concurrent": 2})
    assert merged.max_concurrent == 2 and merged.command == BUILTIN_PROFILES["codex"].command
    assert merged.supported_options() == ["model", "effort", "sandbox"]
    # A command of one's own without {options} takes no options (and still loads).
    own = merge_profile(BUILTIN_PROFILES["codex"], {"command": ["codex", "exec", "--json", "-"]})
    assert own.supported_options() == []
    assert BUILTIN_PROFILES["shell"].supported_options() == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"command": ["agent", "{prmpt}"]}, "unknown placeholder {prmpt}"),
        ({"command": ["agent"], "prompt": "arg"}, "needs a {prompt} placeholder"),
        ({"command": ["agent"], "resume": ["agent", "again"]}, "resume: needs a {session} placeholder"),
        ({"command": []}, "at least 1 item"),
        ({"command": ["agent"], "max_concurrent": 0}, "greater than or equal to 1"),
        ({"command": ["agent"], "model_args": ["-m", "{model}"]}, "need an {options} element"),
        ({"command": ["agent", "x{options}"]}, "{options} must be a whole element"),
        ({"command": ["agent", "{options}"], "sandbox_args": {"read-only": []}}, "sandbox_args: give the arguments"),
    ],
)
def test_bad_profiles_are_refused_with_the_key(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        WorkerProfile.model_validate(data)
