"""Loading real-format data: every bad-sample reason, skip reports, line numbers, caching."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoProcessor, Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from helpers import red_image
from modistill.data import validate
from modistill.data.conversations import load_conversations
from modistill.data.preferences import load_preferences
from modistill.data.render import IGNORE_INDEX
from modistill.data.validate import (
    ALL_MASKED,
    BAD_IMAGE,
    IMAGE_TAG_MISMATCH,
    IMAGE_TRUNCATED,
    MALFORMED_JSON,
    MALFORMED_SAMPLE,
    MISSING_KEY,
    NO_ASSISTANT,
    TEACHER_MISMATCH,
    iter_records,
)
from modistill.errors import UserError
from modistill.models.build import build_vlm
from modistill.models.tiny import tiny_spec
from modistill.runtime.arguments import training_arguments
from modistill.runtime.config import TrainArgs
from modistill.runtime.trainer import StageTrainer


@pytest.fixture(scope="module")
def proc(tiny_vlm_dir):
    return AutoProcessor.from_pretrained(tiny_vlm_dir)


@pytest.fixture()
def root(tmp_path):
    red_image().save(tmp_path / "red.png")
    red_image(48).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def conv(sid, question="<image>\nwhat colour?", answer="red.", image="red.png"):
    row = {"id": sid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        row["image"] = image
    return row


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path, proc, tmp_path, **kw):
    kw.setdefault("max_length", 256)
    return load_conversations(path, processor=proc, cache_dir=tmp_path / "cache", **kw)


# ---------------------------------------------------------------- each reason, as an error


BAD_CASES = {
    "malformed_json": ('{"id": "x", "conversations": [', MALFORMED_JSON, "sample c.jsonl#1"),
    "missing_key": ({"id": "x", "image": "red.png", "convs": []}, MISSING_KEY, "'conversations'"),
    "missing_image": (conv("x", image="nowhere.png"), BAD_IMAGE, "nowhere.png not found"),
    "undecodable_image": (conv("x", image="broken.png"), BAD_IMAGE, "broken.png cannot be decoded"),
    "no_assistant": ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, NO_ASSISTANT, "no gpt"),
    "ends_with_question": (
        {
            "id": "x",
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "yes."},
                {"from": "human", "value": "and?"},
            ],
        },
        NO_ASSISTANT,
        "does not end with an assistant answer",
    ),
    "more_tags": (conv("x", question="<image> and <image>?"), IMAGE_TAG_MISMATCH, "2 <image> tag(s) for 1 image(s)"),
    "fewer_tags": (conv("x", question="what colour?"), IMAGE_TAG_MISMATCH, "0 <image> tag(s) for 1 image(s)"),
    "unknown_role": (
        {"id": "x", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "a"}]},
        MALFORMED_SAMPLE,
        "unknown role 'robot'",
    ),
    "all_masked": (conv("x", question="<image>\n" + "describe the image. " * 60), ALL_MASKED, "max_length 256"),
    "image_truncated": (
        {
            "id": "x",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "describe the image. " * 60},
                {"from": "gpt", "value": "no."},
                {"from": "human", "value": "<image> now?"},
                {"from": "gpt", "value": "red."},
            ],
        },
        IMAGE_TRUNCATED,
        "> max_length 256",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_stops_with_file_line_sample_reason(case, root, proc):
    bad, reason, detail = BAD_CASES[case]
    path = write_jsonl(root / "c.jsonl", [conv("good-1"), bad, conv("good-2")])
    with pytest.raises(UserError) as err:
        load(path, proc, root)
    sid = "c.jsonl#1" if case == "malformed_json" else "x"
    message = str(err.value)
    assert message.startswith(f"{path}:2: sample {sid}: {reason}")
    assert detail in message and message.endswith(f"({validate.FIXES[reason]})")


def test_skip_mode_counts_reasons_and_writes_the_skip_report(root, proc, capsys):
    rows = [
        conv("ok-1"),
        conv("m", image="nowhere.png"),
        '{"broken',
        conv("t", question="no tag"),
        conv("ok-2", image=None, question="text only?"),
        conv("u", image="broken.png"),
    ]
    path = write_jsonl(root / "c.jsonl", rows)
    data = load(path, proc, root, on_bad_sample="skip", report_dir=root / "report")
    assert len(data) == 2 and data.dataset["id"] == ["ok-1", "ok-2"]
    assert data.stats.skipped == {BAD_IMAGE: 2, MALFORMED_JSON: 1, IMAGE_TAG_MISMATCH: 1}
    out = capsys.readouterr().out
    assert "skipped 4 of 6 samples (2 missing or undecodable image" in out and "skipped.jsonl" in out
    report = [json.loads(line) for line in (root / "report" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["id"], r["line"], r["reason"]) for r in report] == [
        ("m", 2, BAD_IMAGE),
        ("c.jsonl#2", 3, MALFORMED_JSON),
        ("t", 4, IMAGE_TAG_MISMATCH),
        ("u", 6, BAD_IMAGE),
    ]
    assert all(r["file"] == str(path) for r in report) and "nowhere.png" in report[0]["detail"]


def test_zero_samples_is_an_error_even_when_skipping(root, proc, capsys):
    path = write_jsonl(root / "c.jsonl", [conv("a", image="nowhere.png"), conv("b", question="no tag")])
    with pytest.raises(UserError, match="no usable sample in 2 read"):
        load(path, proc, root, on_bad_sample="skip", report_dir=root / "r")
    assert len((root / "r" / "skipped.jsonl").read_text().splitlines()) == 2


def test_teacher_whose_rendering_cuts_the_answer_is_a_problem(root, proc, tok_dir):
    spec = tiny_spec(tok_dir, vision_type="clip")
    spec.vision.patch_size = 8  # 16 image tokens instead of 4: the teacher's sequence is 12 tokens longer
    teacher = build_vlm(spec)[1]
    path = write_jsonl(root / "c.jsonl", [conv("fits"), conv("long", answer="a red circle and a blue square " * 4)])
    full = load(path, proc, root, max_length=None, teacher_processor=teacher)
    student_len = full.renderer.render_conversation(full.dataset[1]).input_ids
    # Room for the student's whole sample, not for the teacher's.
    with pytest.raises(UserError) as err:
        load(path, proc, root, max_length=len(student_len) + 2, teacher_processor=teacher)
    assert str(err.value).startswith(f"{path}:2: sample long: {TEACHER_MISMATCH}")


# ---------------------------------------------------------------- line numbers


JSON_LIST = """[
  {"id": "first", "image": "red.png",
   "conversations": [{"from": "human", "value": "<image>\\nwhat colour?"},
                     {"from": "gpt", "value": "red."}]},

  {"id": "second", "conversations": [
      {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes."}]},
  {"id": "bad", "image": "nowhere.png",
   "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "no."}]}, 7,
  {"id": "last", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes."}]}
]
"""


@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_json_list_records_carry_their_start_line(root, chunk, monkeypatch):
    monkeypatch.setattr(validate, "_CHUNK", chunk)  # a tiny chunk cuts every element across reads
    path = root / "c.json"
    path.write_text(JSON_LIST)
    recs = list(iter_records(path))
    assert [(r.line, r.sample_id()) for r in recs] == [
        (2, "first"),
        (6, "second"),
        (8, "bad"),
        (9, "c.json#3"),
        (10, "last"),
    ]
    assert recs[3].data == 7 and recs[4].data["conversations"][1]["value"] == "yes."


def test_json_list_problem_reports_the_line(root, proc):
    path = root / "c.json"
    path.write_text(JSON_LIST)
    with pytest.raises(UserError, match=rf"^{path}:8: sample bad \(item 2 of the list\): {BAD_IMAGE}"):
        load(path, proc, root)
    data = load(path, proc, root, on_bad_sample="skip", verbose=False)
    assert [(p.line, p.sample_id, p.reason) for p in data.problems] == [
        (8, "bad", BAD_IMAGE),
        (9, "c.json#3", MALFORMED_SAMPLE),
    ]


def test_jsonl_lines_count_blank_lines(root, proc):
    path = root / "c.jsonl"
    path.write_text(json.dumps(conv("a")) + "\n\n\n" + json.dumps(conv("b", image="nowhere.png")) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:4: sample b: "):
        load(path, proc, root)


def test_malformed_json_list_is_an_error_with_its_line(root, proc):
    path = root / "c.json"
    path.write_text('[\n  {"id": "a"},\n  {"id": "b" "c"}\n]\n')
    with pytest.raises(UserError, match=rf"^{path}:3: malformed JSON list"):  # not skippable: the rest is lost
        load(path, proc, root, on_bad_sample="skip")


# ---------------------------------------------------------------- several files, image root, cache


def test_several_files_and_one_image_root(root, proc, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("elsewhere")
    a = write_jsonl(data_dir / "a.jsonl", [conv("a1"), conv("a2", image="big.png")])
    b = write_jsonl(data_dir / "b.jsonl", [conv("b1", image=str(root / "red.png"))])
    with pytest.raises(UserError, match="red.png not found"):  # default root: the data file's directory
        load([a, b], proc, root)
    data = load([a, b], proc, root, image_root=root)
    assert data.dataset["id"] == ["a1", "a2", "b1"]
    assert data.dataset["images"] == [[str(root / "red.png")], [str(root / "big.png")], [str(root / "red.png")]]
    assert data.dataset["source"] == [f"{a}:1", f"{a}:2", f"{b}:1"]
    s = data.stats
    assert (s.samples, s.images, s.tokens_per_image, s.image_tokens_total) == (3, 3, 4, 12)


def test_cached_load_replays_its_validation(root, proc, capsys):
    path = write_jsonl(root / "c.jsonl", [conv("ok"), conv("m", image="nowhere.png")])
    first = load(path, proc, root, on_bad_sample="skip", report_dir=root / "r1")
    (root / "nowhere.png").write_bytes(b"")  # the data file is unchanged: the cached outcome holds
    second = load(path, proc, root, on_bad_sample="skip", report_dir=root / "r2")
    assert second.stats == first.stats and second.problems == first.problems
    assert (root / "r2" / "skipped.jsonl").read_text() == (root / "r1" / "skipped.jsonl").read_text()
    with pytest.raises(UserError, match=f"sample m: {BAD_IMAGE}"):
        load(path, proc, root)  # error mode on the same cache still refuses
    red_image().save(root / "nowhere.png")  # the missing image now exists: the cached outcome is stale
    assert load(path, proc, root).dataset["id"] == ["ok", "m"]
    write_jsonl(path, [conv("ok"), conv("ok2")])  # a changed data file is read again
    assert load(path, proc, root).dataset["id"] == ["ok", "ok2"]


def test_cache_is_shared_by_equal_tokenizers_from_other_directories(root, proc, tmp_path):
    """Stages load the tokenizer from their own model directory; equal content is one cache entry."""
    path = write_jsonl(root / "c.jsonl", [conv("ok"), conv("ok2")])
    copies = []
    for name in ("stage_a", "stage_b"):
        proc.save_pretrained(tmp_path / name)
        copies.append(AutoProcessor.from_pretrained(tmp_path / name))
    for p in copies:
        load(path, p, root)
    assert len(list((root / "cache" / "modistill").glob("*.json"))) == 1
    other = AutoProcessor.from_pretrained(tmp_path / "stage_b")
    other.tokenizer.add_tokens(["<extra>"])  # another vocabulary renders differently: its own entry
    load(path, other, root)
    assert len(list((root / "cache" / "modistill").glob("*.json"))) == 2


def test_rows_are_normalised_messages(root, proc):
    path = write_jsonl(
        root / "c.jsonl",
        [
            {
                "id": 7,
                "image": ["red.png", "big.png"],
                "conversations": [
                    {"from": "system", "value": "be brief."},
                    {"role": "user", "content": "<image><image> same?"},
                    {"role": "assistant", "content": "no."},
                ],
            }
        ],
    )
    row = load(path, proc, root).dataset[0]
    assert row["id"] == "7"
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]


def test_length_column_is_the_rendered_length_and_drives_group_by_length(root, proc, tmp_path):
    # Answers of 1..40 words: rendered lengths differ, so a length-grouped sampler has something to sort.
    rows = [conv(f"s{i}", answer=" ".join(["red"] * (1 + (i * 7) % 40))) for i in range(256)]
    data = load(write_jsonl(root / "c.jsonl", rows), proc, root)
    rendered = [len(data.renderer.render_conversation(data.dataset[i]).input_ids) for i in range(len(data))]
    assert data.dataset["length"] == rendered

    def padded_tokens(strategy):
        args = training_arguments(
            tmp_path / strategy, TrainArgs(per_device_train_batch_size=8, train_sampling_strategy=strategy)
        )
        trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data.dataset)
        sampler = trainer._get_train_sampler()
        order = list(sampler)
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sampler, sum(8 * max(rendered[j] for j in b) for b in batches)

    grouped, grouped_tokens = padded_tokens("group_by_length")
    assert isinstance(grouped, LengthGroupedSampler) and grouped.lengths == rendered
    _, random_tokens = padded_tokens("random")
    # The sampler sorts within mega-batches of 64 here (256 samples / (8 x 4)): far less padding.
    assert grouped_tokens < 0.8 * random_tokens


def test_group_by_length_without_a_length_column_is_a_one_line_error(tmp_path):
    pairs = Dataset.from_dict({"id": ["p0"], "prompt": ["q"], "chosen": ["a"], "rejected": ["b"]})
    args = training_arguments(tmp_path, TrainArgs(train_sampling_strategy="group_by_length"))
    trainer = StageTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=pairs)
    with pytest.raises(UserError, match="group_by_length needs a 'length' column.*use random"):
        trainer._get_train_sampler()


# ---------------------------------------------------------------- preferences


def load_prefs(path, proc, tmp_path, **kw):
    kw.setdefault("max_length", 256)
    return load_preferences(path, processor=proc, cache_dir=tmp_path / "cache", **kw)


def test_rlaif_v_pairs_get_the_image_tag_first(root, proc):
    path = write_jsonl(
        root / "p.jsonl",
        [
            {"id": "p1", "image": "red.png", "question": "what colour is it?", "chosen": "red.", "rejected": "blue."},
            {"idx": 5, "question": "text only?", "chosen": "yes.", "rejected": "no."},
        ],
    )
    data = load_prefs(path, proc, root)
    row = data.dataset[0]
    assert row["prompt"] == [{"role": "user", "content": "<image>\nwhat colour is it?"}]
    assert data.dataset[1]["id"] == "5" and data.dataset[1]["images"] == []
    chosen, rejected = data.renderer.render_preference(row)
    tok = proc.tokenizer
    assert tok.decode(chosen.response_tokens()) == "red.<|im_end|>"
    assert tok.decode(rejected.response_tokens()) == "blue.<|im_end|>"
    assert data.stats.sequences == 4


def test_conversation_form_pairs_share_their_prompt(root, proc):
    turns = [
        {"from": "human", "value": "<image> colour?"},
        {"from": "gpt", "value": "red."},
        {"from": "human", "value": "shape?"},
    ]
    path = write_jsonl(
        root / "p.jsonl",
        [
            {
                "id": "c",
                "image": "red.png",
                "chosen": turns + [{"from": "gpt", "value": "a square."}],
                "rejected": turns + [{"from": "gpt", "value": "a circle."}],
            }
        ],
    )
    row = load_prefs(path, proc, root).dataset[0]
    assert len(row["prompt"]) == 3 and row["chosen"] == [{"role": "assistant", "content": "a square."}]
    chosen, _ = Renderer_of(proc).render_preference(row)
    assert proc.tokenizer.decode(chosen.response_tokens()) == "a square.<|im_end|>"  # the prompt's answer is not


def Renderer_of(proc):
    from modistill.data.render import Renderer

    return Renderer(proc, 256)


def test_bad_pairs(root, proc):
    long_q = "describe the image. " * 60
    rows = [
        {"id": "ok", "image": "red.png", "question": "q?", "chosen": "a.", "rejected": "b."},
        {"id": "nochosen", "question": "q?", "rejected": "b."},
        {"id": "noq", "chosen": "a.", "rejected": "b."},
        {"id": "img-cut", "image": "red.png", "question": long_q + "<image>", "chosen": "a.", "rejected": "b."},
        {
            "id": "same",
            "chosen": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "rejected": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        },
    ]
    path = write_jsonl(root / "p.jsonl", rows)
    data = load_prefs(path, proc, root, on_bad_sample="skip", verbose=False)
    assert data.dataset["id"] == ["ok"]
    got = {p.sample_id: (p.line, p.reason, p.detail) for p in data.problems}
    assert got["nochosen"][:2] == (2, MISSING_KEY) and "'chosen'" in got["nochosen"][2]
    assert got["noq"][:2] == (3, MISSING_KEY) and "'question'" in got["noq"][2]
    assert got["img-cut"][:2] == (4, IMAGE_TRUNCATED) and got["img-cut"][2].startswith("chosen: ")
    assert got["same"][1] == MALFORMED_SAMPLE


def test_pair_whose_rejected_answer_is_cut_keeps_its_labels(root, proc):
    rows = [
        {
            "id": "r",
            "image": "red.png",
            "question": "what?",
            "chosen": "red.",
            "rejected": "a red circle and a blue square on the left " * 10,
        }
    ]
    data = load_prefs(write_jsonl(root / "p.jsonl", rows), proc, root, max_length=40)
    chosen, rejected = data.renderer.render_preference(data.dataset[0])
    assert rejected.truncated and len(rejected.input_ids) == 40 and not chosen.truncated
    assert rejected.num_response_tokens > 0 and IGNORE_INDEX in rejected.labels


def test_byte_order_mark_is_accepted(root):
    lst, lines = root / "l.json", root / "l.jsonl"
    lst.write_bytes(b"\xef\xbb\xbf" + JSON_LIST.encode())
    lines.write_bytes(b"\xef\xbb\xbf" + json.dumps(conv("a")).encode() + b"\n")
    assert [r.sample_id() for r in iter_records(lst)] == ["first", "second", "bad", "l.json#3", "last"]
    assert [(r.line, r.error, r.sample_id()) for r in iter_records(lines)] == [(1, None, "a")]


def test_skip_report_is_rewritten_when_nothing_is_skipped(root, proc):
    (root / "report").mkdir()
    (root / "report" / "skipped.jsonl").write_text('{"id": "old"}\n')
    data = load(
        write_jsonl(root / "c.jsonl", [conv("a")]), proc, root, on_bad_sample="skip", report_dir=root / "report"
    )
    assert data.problems == [] and (root / "report" / "skipped.jsonl").read_text() == ""


def test_training_load_says_how_many_answers_it_truncated(root, proc, capsys):
    path = write_jsonl(root / "c.jsonl", [conv("short"), conv("long", answer="red. " * 200)])
    data = load(path, proc, root)
    assert data.stats.truncated == 1
    assert "truncated 1 of 2 sequences to max_length 256 (their answers are cut" in capsys.readouterr().out
