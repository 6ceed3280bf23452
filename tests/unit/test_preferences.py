"""Preference importers: each format gives exact records, each bad row one `FILE:LINE` error, and every row is
accounted for (records + errors == rows), on small hand-made files and on the real HH-RLHF test split."""

import gzip
import hashlib
import json

import pytest
from conftest import SHARED_DATA, write_jsonl

from rlhf.data import DataError
from rlhf.data.preferences import PreferenceRecord, detect_preference_format, prompt_hash, read_preferences

HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def hh(*turns: str) -> str:
    """`hh("a", "b", "c")` → the HH transcript Human: a / Assistant: b / Human: c."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# --- each format, exact records ---------------------------------------------------------------------------------


def test_pairwise_rows(tmp_path):
    msgs = [{"role": "system", "content": "Be kind."}, user("Hello?")]
    path = write_jsonl(
        tmp_path / "pw.jsonl",
        [
            {"id": "p1", "prompt": "2+2?", "chosen": "4", "rejected": "5", "annotator": "ann-a"},
            "",
            {"messages": msgs, "chosen": "Hi!", "rejected": "Go away.", "tie": True, "labeler": "lab-b"},
        ],
    )
    result = read_preferences(path)
    assert result.errors == [] and result.rows == 2  # the blank line is no row
    hello = ({"role": "system", "content": "Be kind."}, user("Hello?"))
    assert result.records == [
        PreferenceRecord(f"{path}:1", "p1", (user("2+2?"),), ("4", "5"), [[0], [1]], "ann-a"),
        PreferenceRecord(f"{path}:3", prompt_hash(hello), hello, ("Hi!", "Go away."), [[0, 1]], "lab-b"),
    ]


def test_ranked_rows_best_first_ranking_and_ties(tmp_path):
    path = write_jsonl(
        tmp_path / "rk.jsonl",
        [
            {"id": 7, "prompt": "Name a fruit.", "responses": ["apple", "pear", "rock"]},
            {"id": 7, "prompt": "Name a fruit.", "responses": ["apple", "pear", "rock"], "ranking": [[2], [1, 0]]},
            {"id": 8, "prompt": "Count.", "responses": ["1", "2", "3", "4"], "ties": [[1, 2]], "annotator": "z"},
        ],
    )
    result = read_preferences(path)
    assert result.errors == [] and result.rows == 3
    fruit = (user("Name a fruit."),)
    assert result.records == [
        PreferenceRecord(f"{path}:1", "7", fruit, ("apple", "pear", "rock"), [[0], [1], [2]], None),
        PreferenceRecord(f"{path}:2", "7", fruit, ("apple", "pear", "rock"), [[2], [0, 1]], None),
        PreferenceRecord(f"{path}:3", "8", (user("Count."),), ("1", "2", "3", "4"), [[0], [1, 2], [3]], "z"),
    ]


def test_hh_rows_split_at_the_last_assistant_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": hh("Hi", "Hello!", "Tell a joke", "Why did..."),
                "rejected": hh("Hi", "Hello!", "Tell a joke", "No."),
            },
            {"chosen": hh("Hi", "Hey"), "rejected": hh("Hi", "What?")},
        ],
    )
    result = read_preferences(path)
    assert result.errors == [] and result.rows == 2
    long_prompt = (user("Hi"), assistant("Hello!"), user("Tell a joke"))
    assert result.records == [
        PreferenceRecord(f"{path}:1", prompt_hash(long_prompt), long_prompt, ("Why did...", "No."), [[0], [1]], None),
        PreferenceRecord(f"{path}:2", prompt_hash((user("Hi"),)), (user("Hi"),), ("Hey", "What?"), [[0], [1]], None),
    ]


def test_gzip_file(tmp_path):
    path = tmp_path / "pw.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    (record,) = read_preferences(path).records
    assert record.responses == ("a", "b") and record.source == f"{path}:1"


# --- format detection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "pairwise"),
        ({"messages": [user("q")], "chosen": "a", "rejected": "b"}, "pairwise"),
        ({"prompt": "q", "responses": ["a", "b"]}, "ranked"),
        ({"chosen": hh("q", "a"), "rejected": hh("q", "b")}, "hh"),
        ({"prompt": "q", "response": "a"}, None),
    ],
)
def test_detect_format(row, fmt):
    assert detect_preference_format(row) == fmt


def test_auto_detection_reads_each_format_and_explicit_format_overrides(tmp_path):
    for name, row, tiers in [
        ("pw", {"prompt": "q", "chosen": "a", "rejected": "b", "tie": True}, [[0, 1]]),
        ("rk", {"prompt": "q", "responses": ["a", "b", "c"]}, [[0], [1], [2]]),
        ("hh", {"chosen": hh("q", "a"), "rejected": hh("q", "b")}, [[0], [1]]),
    ]:
        (record,) = read_preferences(write_jsonl(tmp_path / f"{name}.jsonl", [row])).records
        assert record.messages == (user("q"),) and record.tiers == tiers
    # Forced "pairwise" on HH rows: each row is judged by the pairwise schema (it lacks a prompt).
    result = read_preferences(tmp_path / "hh.jsonl", fmt="pairwise")
    assert result.records == [] and result.errors == [
        f'{tmp_path / "hh.jsonl"}:1: field "prompt" is missing (or give "messages")'
    ]


def test_undetectable_format_raises(tmp_path):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "q", "response": "a"}])
    with pytest.raises(DataError, match=r"demos\.jsonl:1: cannot tell the format"):
        read_preferences(path)


# --- bad rows: one error naming FILE:LINE, the good rows still import ------------------------------------------

PW = {"prompt": "q", "chosen": "a", "rejected": "b"}
RK = {"prompt": "q", "responses": ["a", "b", "c"]}
HH = {"chosen": hh("q", "a"), "rejected": hh("q", "b")}


@pytest.mark.parametrize(
    ("good", "bad", "problem"),
    [
        (PW, '{"prompt": "q", "chosen": ', "not valid JSON (Expecting value at column 27)"),
        (PW, "[1, 2]", "expected a JSON object, got list"),
        (PW, {"prompt": "q", "rejected": "b"}, 'field "chosen" is missing'),
        (PW, {**PW, "chosen": 3}, 'field "chosen" must be a string, got int'),
        (PW, {**PW, "rejected": "  "}, 'field "rejected" is empty'),
        (PW, {**PW, "rejected": "a "}, "chosen and rejected are the same text, so the row states no preference"),
        (PW, {**PW, "tie": "yes"}, "field \"tie\" must be true or false, got 'yes'"),
        (PW, {**PW, "ranking": [[1], [0]]}, 'field "ranking" is for ranked rows'),
        (PW, {"chosen": "a", "rejected": "b"}, 'field "prompt" is missing (or give "messages")'),
        (PW, {**PW, "messages": [user("q")]}, 'give either "prompt" or "messages", not both'),
        (
            PW,
            {**{k: PW[k] for k in ("chosen", "rejected")}, "messages": [assistant("x")]},
            "last message must be from the user",
        ),
        (PW, {**PW, "annotator": 5}, 'field "annotator" must be a string, got int'),
        (PW, {**PW, "annotator": "a", "labeler": "b"}, 'give either "annotator" or "labeler", not both'),
        (PW, {**PW, "id": [1]}, 'field "id" must be a string or an integer'),
        (RK, {"prompt": "q"}, 'field "responses" is missing'),
        (RK, {**RK, "responses": ["only"]}, 'field "responses" must be a list of two or more strings'),
        (RK, {**RK, "responses": "a b"}, 'field "responses" must be a list of two or more strings'),
        (RK, {**RK, "responses": ["a", 2]}, "responses[1] must be a string, got int"),
        (RK, {**RK, "responses": ["a", ""]}, "responses[1] is empty"),
        (RK, {**RK, "responses": ["a", "b", "a"]}, "responses[2] is the same text as responses[0]"),
        (RK, {**RK, "ranking": [[0, 1]]}, '"ranking" leaves out response(s) [2]'),
        (RK, {**RK, "ranking": [[0], [1, 0], [2]]}, 'response 0 appears more than once in "ranking"'),
        (RK, {**RK, "ranking": [[0], [1], [3]]}, "ranking[2] holds 3; response indices run 0..2"),
        (RK, {**RK, "ranking": [[True], [1], [2]]}, "ranking[0] holds True"),
        (RK, {**RK, "ranking": [[0], [], [1, 2]]}, 'field "ranking" must be a list of non-empty lists'),
        (RK, {**RK, "ties": [[0, 2]]}, "ties[0] = [0, 2] is not a run of neighbours"),
        (RK, {**RK, "ties": [[0, 1], [1, 2]]}, 'response 1 appears in more than one group of "ties"'),
        (RK, {**RK, "ties": [[1]]}, "ties[0] must hold two or more response indices"),
        (RK, {**RK, "ties": [[1, 2]], "ranking": [[0], [1, 2]]}, 'give either "ranking" or "ties", not both'),
        (RK, {**RK, "tie": True}, 'field "tie" is for pairwise rows'),
        (HH, {"chosen": hh("q", "a")}, 'field "rejected" is missing'),
        (HH, {**HH, "chosen": "Human: q\n\nAssistant: a"}, 'chosen: a dialogue must start with "\\n\\nHuman: "'),
        (HH, {**HH, "rejected": hh("q", "a", "more?")}, "rejected does not end with an Assistant turn"),
        (HH, {**HH, "chosen": hh("q", "")}, "chosen's last Assistant turn is empty"),
        (HH, {**HH, "rejected": hh("q", "a")}, "chosen and rejected end with the same Assistant turn"),
        (
            HH,
            {"chosen": hh("q", "a", "q2", "c"), "rejected": hh("q", "A", "q2", "r")},
            "chosen and rejected do not share the dialogue before their last Assistant turn (they differ at turn 2)",
        ),
        (
            HH,
            {"chosen": hh("q", "a  Human: more") + "\n\nAssistant: c", "rejected": hh("q", "r")},
            "(they differ at turn 2; chosen has 2 turns before it, rejected 1; "
            'chosen turn 2 (Assistant) has "Human:" inside it)',
        ),
        (
            HH,
            {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nAssistant: c", "rejected": hh("q", "r")},
            "(they differ at turn 2; chosen has 2 turns before it, rejected 1; "
            "chosen turns 2 and 3 are both Assistant turns)",
        ),
        (
            HH,
            {
                "chosen": "\n\nHuman: q\n\nHuman: q2\n\nAssistant: a",
                "rejected": "\n\nHuman: q\n\nHuman: q2\n\nAssistant: b",
            },
            None,  # two Human turns in a row are a legal chat prompt
        ),
        (
            HH,
            {"chosen": hh("q", "x") + "\n\nAssistant: a", "rejected": hh("q", "x") + "\n\nAssistant: b"},
            'the dialogue before the last Assistant turn: the last message must be from the user, got "assistant"',
        ),
    ],
)
def test_bad_row_is_one_error_naming_file_and_line(tmp_path, good, bad, problem):
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, "", bad, good])
    result = read_preferences(path)
    assert result.rows == 3 == len(result.records) + len(result.errors)
    if problem is None:
        assert result.errors == []
        return
    (error,) = result.errors
    assert error.startswith(f"{path}:3: ") and problem in error, error
    assert [r.source for r in result.records] == [f"{path}:1", f"{path}:4"]


def test_invalid_utf8_is_a_row_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = json.dumps(PW).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "\xff"}\n' + good + b"\n")
    result = read_preferences(path)
    assert len(result.records) == 2 and result.errors == [f"{path}:2: not valid UTF-8 (byte 13)"]


def test_an_id_names_one_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "ids.jsonl",
        [{**PW, "id": "x"}, {**PW, "id": "x", "chosen": "c"}, {**PW, "id": "x", "prompt": "other"}],
    )
    result = read_preferences(path)
    assert [r.source for r in result.records] == [f"{path}:1", f"{path}:2"]  # the same prompt again is fine
    assert result.errors == [f'{path}:3: id "x" was used on line 1 for a different prompt']


# --- accounting, prompt ids, unusable files ---------------------------------------------------------------------


def test_every_row_is_accounted_for(tmp_path):
    rows = [
        PW,
        "",
        "not json",
        {**PW, "chosen": "b"},
        "   ",
        RK,
        {**PW, "tie": 1},
        {"prompt": "q2", "chosen": "x", "rejected": "y"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    result = read_preferences(path)
    assert result.rows == 6 == len(result.records) + len(result.errors)
    assert [r.source.rsplit(":", 1)[1] for r in result.records] == ["1", "8"]
    assert [e.split(": ", 1)[0] for e in result.errors] == [f"{path}:{n}" for n in (3, 4, 6, 7)]  # RK: no "chosen"


def test_prompt_id_is_stable_across_rows_and_files_and_differs_between_prompts(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [PW, {**PW, "chosen": "c"}, {**PW, "prompt": "q?"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [user("q")], "responses": ["x", "y"]}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"chosen": hh("q", "a"), "rejected": hh("q", "b")}])
    ids = [r.prompt_id for path in (a, b, c) for r in read_preferences(path).records]
    assert ids[0] == ids[1] == ids[3] == ids[4]  # one prompt, written as "prompt", "messages" or an HH dialogue
    assert ids[2] != ids[0]
    canonical = json.dumps([user("q")], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert ids[0] == "h-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    # The system turn is part of the prompt, so it changes the id.
    assert prompt_hash(({"role": "system", "content": "s"}, user("q"))) != ids[0]


def test_unusable_files_raise(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no rows in the file"):
        read_preferences(write_jsonl(tmp_path / "blank.jsonl", ["", "  "]))
    (tmp_path / "fake.jsonl.gz").write_bytes(b"plain text, not gzip\n")
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz: cannot be read"):
        read_preferences(tmp_path / "fake.jsonl.gz")


# --- the real file ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"{HH_FILE} is not here")
def test_hh_rlhf_test_split_is_fully_accounted_for():
    result = read_preferences(HH_FILE)
    assert result.rows == 2312 == len(result.records) + len(result.errors)
    assert len(result.records) >= 2250
    assert all(e.startswith(f"{HH_FILE}:") for e in result.errors)
    bad_lines = {int(e[len(f"{HH_FILE}:") :].split(":", 1)[0]) for e in result.errors}
    assert {1255, 1689, 1953, 2037} <= bad_lines  # "Human:" inside an Assistant turn: the final turns don't line up
    assert all(
        len(r.responses) == 2 and r.tiers == [[0], [1]] and r.messages[-1]["role"] == "user" for r in result.records
    )
