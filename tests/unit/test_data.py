"""Readers: every supported format parses, and every malformed row names its file and line."""

import gzip
import json

import pytest
from conftest import SHARED_DATA, write_jsonl

from rlhf.data import DataError, read_demonstrations, read_prompts
from rlhf.data.records import parse_hh_dialogue


def test_native_prompts_both_forms(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "prompt": "Hi?"},
            "",
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
        ],
    )
    prompts = read_prompts(path)
    assert [p.id for p in prompts] == ["a", "p:3"]  # a missing id becomes FILE_STEM:LINE
    assert prompts[0].messages == ({"role": "user", "content": "Hi?"},)
    assert prompts[1].text == "Why?" and prompts[1].messages[0]["role"] == "system"


def test_native_demonstrations(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "response": "4"}])
    (demo,) = read_demonstrations(path)
    assert demo.messages == ({"role": "user", "content": "2+2?"},) and demo.response == "4"
    assert demo.source.endswith("d.jsonl:1")


@pytest.mark.parametrize(
    ("row", "reader", "problem"),
    [
        ({"id": "x"}, read_prompts, 'field "prompt" is missing'),
        ({"prompt": 3}, read_prompts, 'field "prompt" must be a string'),
        ({"prompt": "  "}, read_prompts, 'field "prompt" is empty'),
        ({"prompt": "a", "messages": []}, read_prompts, "not both"),
        ({"messages": [{"role": "user"}]}, read_prompts, 'messages[0] must be an object with "role" and "content"'),
        ({"messages": [{"role": "bot", "content": "x"}]}, read_prompts, "messages[0].role is 'bot'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, read_prompts, "last message must be from the user"),
        ({"prompt": "q"}, read_demonstrations, 'field "response" is missing'),
        ({"prompt": "q", "response": ""}, read_demonstrations, 'field "response" is empty'),
        ({"instruction": "Do it", "input": ""}, read_demonstrations, 'field "output" is missing'),
        ({"instruction": "", "output": "y"}, read_demonstrations, 'field "instruction" is empty'),
        ({"instruction": "Do", "instances": [{"input": ""}]}, read_demonstrations, 'instances[0]: field "output"'),
        ({"instruction": "Do", "instances": []}, read_demonstrations, 'field "instances" must be a non-empty list'),
        ({"chosen": "Human: hi\n\nAssistant: yo"}, read_demonstrations, "must start with"),
        ({"chosen": "\n\nHuman: hi"}, read_demonstrations, "must end with an Assistant turn"),
        ({"chosen": "\n\nAssistant: hi"}, read_prompts, "first turn must be the Human's"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, row, reader, problem):
    good = {"prompt": "fine", "response": "ok"} if "chosen" not in row and "instruction" not in row else row
    if "instruction" in row:
        good = {"instruction": "fine", "output": "ok"}
    if "chosen" in row:
        good = {"chosen": "\n\nHuman: fine\n\nAssistant: ok"}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        reader(path)
    assert f"{path}:2: " in str(e.value)
    assert problem in str(e.value)


def test_invalid_json_and_non_object(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, '{"prompt": "unterminated'])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompts(path)
    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"list.jsonl:1: expected a JSON object"):
        read_prompts(path)


def test_all_bad_rows_reported_together_and_nothing_skipped(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"x": 1}, {"prompt": "fine"}, {"y": 2}])
    with pytest.raises(DataError) as e:
        read_prompts(path)
    assert "p.jsonl:2:" in str(e.value) and "p.jsonl:4:" in str(e.value)


def test_duplicate_prompt_ids_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(DataError, match=r'p.jsonl:2: id "a" was already used on line 1'):
        read_prompts(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")


def test_alpaca_and_self_instruct(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"id": "t2", "instruction": "Name a colour.", "instances": [{"input": "", "output": "Blue"}]},
            {
                "id": "t3",
                "instruction": "Add.",
                "instances": [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}],
            },
        ],
    )
    demos = read_demonstrations(path)
    assert [d.id for d in demos] == ["a:1", "t2", "t3-0", "t3-1"]
    assert demos[0].messages[0]["content"] == "Translate to French.\n\ncat" and demos[0].response == "chat"
    assert demos[1].messages[0]["content"] == "Name a colour."
    assert read_prompts(path)[2].text == "Add.\n\n1+1"


def test_hh_dialogue_as_demo_and_prompt(tmp_path):
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": text, "rejected": "\n\nHuman: x\n\nAssistant: y"}])
    (demo,) = read_demonstrations(path)
    assert [m["role"] for m in demo.messages] == ["user", "assistant", "user"]
    assert demo.response == "Fine, thanks." and demo.messages[-1]["content"] == "How are you?"
    (prompt,) = read_prompts(path)
    assert prompt.messages == demo.messages
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant:") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
    ]


def test_gzip_file(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"prompt": "zipped"}) + "\n" + "{oops\n")
    with pytest.raises(DataError, match=r"p.jsonl.gz:2: not valid JSON"):
        read_prompts(path)


def test_project_examples_load():
    from conftest import ROOT

    prompts = read_prompts(ROOT / "examples" / "prompts.jsonl")
    demos = read_demonstrations(ROOT / "examples" / "demos.jsonl")
    assert len(prompts) == 200 and len(demos) == 100
    by_id = {p.id: p for p in prompts}
    assert all(by_id[d.id].text == d.prompt.text for d in demos)  # demonstrations answer library prompts


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
def test_shared_real_data():
    assert len(read_demonstrations(SHARED_DATA / "self-instruct-seed-tasks.jsonl")) >= 175
    # Four real HH rows are not valid dialogues ("Human:" inside an Assistant turn); each is named by line.
    with pytest.raises(DataError) as e:
        read_prompts(SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz")
    assert "hh-rlhf-harmless-base-test.jsonl.gz:1255:" in str(e.value)
