"""Dataset readers on fixtures in the real field layouts (local and S3), malformed rows, prompts."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipeline.datasets.prompts import CLOSED_SUFFIX, OPEN_SUFFIX, REPORT_PROMPT, build_prompt
from pipeline.datasets.records import (
    DATASET_FORMATS,
    DatasetError,
    Record,
    read_records,
    write_jsonl,
)
from pipeline.io import storage as st
from pipeline.io.volumes import load_volume
from pipeline.synthetic.datasets import make_dataset

# records per phantom: jsonl/hulu: closed (2-3) + open + report; m3d: 2 per closed question;
# 3drad: 3 per phantom; amos: report + closed (2-3)
EXPECTED_TASKS = {"jsonl": {"closed", "open", "report"}, "hulu": {"closed", "open", "report"},
                  "m3d": {"closed", "open"}, "3drad": {"closed", "open"},
                  "amos": {"closed", "report"}}


@pytest.mark.parametrize("fmt", DATASET_FORMATS)
def test_each_format_reads_back_with_resolved_volumes(tmp_path, fmt):
    uri = make_dataset(str(tmp_path / fmt), fmt, n=2, seed=7, depth=8, size=32)
    records = read_records(uri, fmt)
    assert {r.task for r in records} == EXPECTED_TASKS[fmt]
    assert len({r.id for r in records}) == len(records)
    for record in records:
        assert st.exists(record.volume_uri), record.volume_uri
        if record.task == "closed":
            assert record.choices and record.answer[0] in record.choices
    vol = load_volume(records[0].volume_uri, format=records[0].volume_format)
    assert vol.array.shape[0] == 8


@pytest.mark.s3
@pytest.mark.parametrize("fmt", DATASET_FORMATS)
def test_each_format_from_s3(s3_storage, s3_prefix, fmt):
    uri = make_dataset(f"{s3_prefix}/{fmt}", fmt, n=1, seed=3, depth=4, size=32, storage=s3_storage)
    assert uri.startswith("s3://")
    records = read_records(uri, fmt, storage=s3_storage)
    assert records and all(r.volume_uri.startswith(s3_prefix) for r in records)
    vol = load_volume(records[0].volume_uri, format=records[0].volume_format, storage=s3_storage)
    assert vol.array.shape[0] == 4


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def _hulu_item(video, question, gold, qtype=None, **extra):
    item = {"video": [video], "conversations": [{"from": "human", "value": question},
                                                {"from": "gpt", "value": gold}]}
    if qtype is not None:
        item["Question_Type"] = qtype
    return item | extra


def test_hulu_fields_and_quirks(tmp_path):
    items = [
        _hulu_item("vol/1", "<video>\nWhich organ?\nA. Liver\nB. Spleen", "A. Liver", "CLOSE",
                   type=3),
        _hulu_item("vol/1", "<image>\nWhat is abnormal?", "a cyst", "open", type=4),
        _hulu_item("vol/2", "<video>\nIs it enhanced?", "yes", type=2),  # missing -> open
        _hulu_item("vol/2", "<video>\nWhich plane?\n(A) Axial\n(B) Coronal", "A", "closed", type=1),
    ]
    records = read_records(_write_json(tmp_path / "m3d_test.json", items), "hulu", dataset="m3d")
    assert [r.task for r in records] == ["closed", "open", "open", "closed"]
    assert (records[0].question.startswith("Which organ?")
            and records[0].choices == {"A": "Liver", "B": "Spleen"})
    assert records[3].choices == {"A": "Axial", "B": "Coronal"}
    assert [r.category for r in records] == ["Organ", "Abnormality", "Phase", "Plane"]
    assert records[0].volume_uri == str(tmp_path / "vol" / "1")
    assert records[0].volume_format == "slices" and records[0].dataset == "m3d"
    # the prompt keeps the inline options once and adds the paper's instruction
    assert build_prompt(records[0]) == "Which organ?\nA. Liver\nB. Spleen" + CLOSED_SUFFIX
    amos = [_hulu_item("amos/3", "<video>\nWrite a report", "Findings: x. Impression: y.")]
    report = read_records(_write_json(tmp_path / "amos.json", amos), "hulu", dataset="amos")[0]
    assert report.task == "report" and build_prompt(report) == REPORT_PROMPT
    elsewhere = read_records(str(tmp_path / "m3d_test.json"), "hulu", root="s3://bucket/data")
    assert elsewhere[0].volume_uri == "s3://bucket/data/vol/1"


def test_hulu_malformed_items_are_all_reported(tmp_path):
    items = [
        _hulu_item("vol/1", "q", "a", "OPEN"),
        {"conversations": []},
        _hulu_item("vol/1", "q", "a", "MAYBE"),
        "not an object",
    ]
    path = _write_json(tmp_path / "bad.json", items)
    with pytest.raises(DatasetError) as err:
        read_records(path, "hulu")
    text = str(err.value)
    assert "3 malformed" in text and path in text
    assert "item 1" in text and "item 2" in text and "item 3" in text and "MAYBE" in text
    assert len(err.value.problems) == 3


M3D_HEADER = ("Image Path,Text,Question Type,Question,Choice A,Choice B,Choice C,Choice D,"
              "Answer,Answer Choice\n")


def test_m3d_rows_give_closed_and_open_items(tmp_path):
    (tmp_path / "M3D_VQA_test.csv").write_text(
        M3D_HEADER + 'ct/0001/axial.npy,"report, text",3,Which organ?,'
        'Liver,Spleen,Kidney,Lung,Liver,A\n')
    closed, open_ = read_records(str(tmp_path / "M3D_VQA_test.csv"), "m3d")
    assert (closed.task, closed.answer, closed.category) == ("closed", "A", "Organ")
    assert closed.choices == {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Lung"}
    assert (open_.task, open_.answer, open_.choices) == ("open", "Liver", None)
    assert (closed.volume_uri == str(tmp_path / "ct/0001/axial.npy")
            and closed.volume_format == "npy")
    assert build_prompt(closed).endswith("D. Lung" + CLOSED_SUFFIX)
    assert build_prompt(open_) == "Which organ?" + OPEN_SUFFIX


def test_m3d_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "M3D_VQA_val.csv"
    path.write_text(M3D_HEADER
                    + "a.npy,t,1,Q?,A1,B1,C1,D1,A1,A\n"
                    + "a.npy,t,9,Q?,A1,B1,C1,D1,A1,A\n"      # line 3: bad type
                    + "a.npy,t,1,Q?,A1,B1,C1,D1,A1,E\n"      # line 4: bad letter
                    + "a.npy,t,1,Q?\n")                       # line 5: too few fields
    with pytest.raises(DatasetError) as err:
        read_records(str(path), "m3d")
    text = str(err.value)
    assert str(path) in text
    assert "line 3" in text and "Question Type" in text and "line 4" in text and "line 5" in text
    (tmp_path / "nocol.csv").write_text("Image Path,Question\nx.npy,q\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_records(str(tmp_path / "nocol.csv"), "m3d")


def test_3drad_folder_and_bad_answer_choice(tmp_path):
    header = ("Task,Subtask,VolumeName,Question,Answer,QuestionType,AnswerChoice,"
              "Choice A,Choice B,Choice C,Choice D\n")
    folder = tmp_path / "3DRAD" / "test"
    (folder / "Task4_existence").mkdir(parents=True)
    (folder / "Task4_existence" / "e.csv").write_text(
        header + "Task4,nodule,test_1_a_1.nii.gz,Is there a nodule?,yes,Close,A,yes,no,-,-\n")
    (folder / "Task2_anomaly").mkdir()
    (folder / "Task2_anomaly" / "a.csv").write_text(
        header + "Task2,anomaly,test_1_a_1.nii.gz,Anything abnormal?,pleural effusion,"
        "Open,-,-,-,-,-\n")
    records = read_records(str(folder), "3drad", root="/data/ct-rate")
    by_task = {r.task: r for r in records}
    assert by_task["closed"].choices == {"A": "yes", "B": "no"} and by_task["closed"].answer == "A"
    assert by_task["closed"].category == "Existence Detection"
    assert (by_task["open"].category == "Anomaly Detection"
            and by_task["open"].answer == "pleural effusion")
    assert by_task["open"].volume_uri == "/data/ct-rate/test_1_a_1.nii.gz"
    (folder / "Task4_existence" / "bad.csv").write_text(
        header + "Task4,nodule,v.nii.gz,Q?,yes,Close,C,yes,no,-,-\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 2.*AnswerChoice"):
        read_records(str(folder), "3drad")


def test_amos_reports_and_qa(tmp_path):
    doc = {"training": [], "validation": [{
        "image": "imagesVa/amos_0034.nii.gz", "meta": {"spacing": [0.7, 0.7, 5.0]},
        "labels": {"report": {"findings": {"chest": "Clear lungs.", "abdomen": "Normal liver.",
                                           "pelvis": ""}, "impression": "No acute findings."},
                   "qa": [{"question": "Is the liver enlarged?", "options": {"A": "Yes", "B": "No"},
                           "answer": "B", "type": "size"}]}}]}
    records = read_records(_write_json(tmp_path / "dataset.json", doc), "amos")
    report, qa = records
    assert report.answer == "Clear lungs. Normal liver. No acute findings."
    assert (report.volume_uri == str(tmp_path / "imagesVa/amos_0034.nii.gz")
            and report.id == "amos_0034-report")
    assert (qa.task, qa.answer, qa.category, qa.choices) == ("closed", "B", "size",
                                                             {"A": "Yes", "B": "No"})
    with pytest.raises(DatasetError, match="'test' list"):
        read_records(str(tmp_path / "dataset.json"), "amos", split="test")


def test_jsonl_canonical_records_and_bad_lines(tmp_path):
    good = Record(id="1", dataset="d", volume_uri="v/1.npy", volume_format="npy", question="Q?",
                  task="open", answer="x")
    uri = write_jsonl([good], str(tmp_path / "r.jsonl"))
    assert read_records(uri, "jsonl")[0].volume_uri == str(tmp_path / "v/1.npy")
    lines = [good.model_dump_json(), "{not json", json.dumps(good.model_dump() | {"task": "quiz"}),
             json.dumps(good.model_dump() | {"colour": "red"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        read_records(str(tmp_path / "bad.jsonl"), "jsonl")
    text = str(err.value)
    assert ("line 2" in text and "line 3" in text and "task" in text and "line 4" in text
            and "colour" in text)


def test_record_validation_and_unknown_format():
    with pytest.raises(ValidationError, match="closed questions only"):
        Record(id="1", dataset="d", volume_uri="v", question="q", task="open", answer="a",
               choices={"A": "x"})
    with pytest.raises(ValueError, match="valid: hulu, m3d, 3drad, amos, jsonl"):
        read_records("x.json", "llava")
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt("q", "multiple")
    assert (build_prompt("Which?", "closed", {"B": "two", "A": "one"})
            == "Which?\nA. one\nB. two" + CLOSED_SUFFIX)
