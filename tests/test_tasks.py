import json

import pytest

import anchor_lens as al
from anchor_lens.tasks import Example


def test_paper_tasks_are_registered_with_their_templates_and_label_words():
    assert al.get_task("sst2").label_words == ("Negative", "Positive")
    assert al.get_task("TREC").label_words == (
        "Abbreviation",
        "Entity",
        "Description",
        "Person",
        "Location",
        "Number",
    )
    assert al.get_task("ag_news").template == "Article: {text}\nAnswer: {label}"
    assert al.get_task("emoc").label_words == ("Others", "Happy", "Sad", "Angry")
    assert al.get_task("sst2").hub_id == "stanfordnlp/sst2"


def test_unknown_task_error_lists_known_tasks():
    with pytest.raises(KeyError, match="Known tasks: agnews, emoc"):
        al.get_task("imdb")


@pytest.mark.parametrize(
    "template, words, match",
    [
        ("Review: {text}", ("a", "b"), "{label}"),
        ("{label} {text}", ("a", "b"), "before"),
        ("{text} {label}", ("a",), "two label words"),
        ("{text} {label}", ("a", "a"), "distinct"),
        ("{text} {label}", (" a", "b"), "whitespace"),
    ],
)
def test_task_validation(template, words, match):
    with pytest.raises(ValueError, match=match):
        al.Task("bad", template, words)


def test_format_demo_and_query():
    task = al.get_task("sst2")
    assert task.format_demo(Example("great", 1)) == "Review: great\nSentiment: Positive"
    assert task.format_query("great") == "Review: great\nSentiment:"
    custom = al.Task("nli", "{text} Question: true or false? Answer: {label}.", ("false", "true"))
    assert custom.format_demo(Example("x", 0)) == "x Question: true or false? Answer: false."
    assert custom.format_query("x") == "x Question: true or false? Answer:"


@pytest.mark.parametrize(
    "task, folder, split, n",
    [
        ("sst2", "sst2", "validation", 872),
        ("trec", "trec", "train", 5452),
        ("agnews", "ag_news", "validation", 2000),
        ("emoc", "emo", "validation", 2755),
    ],
)
def test_load_shared_data_in_hub_schema(data_dir, task, folder, split, n):
    examples = al.load_examples(task, data_dir / folder, split=split)
    assert len(examples) == n
    assert {e.label for e in examples} == set(range(al.get_task(task).n_classes))
    assert all(isinstance(e.text, str) and e.text for e in examples[:50])


def test_file_formats_give_the_same_examples(tmp_path):
    import datasets

    rows = [{"sentence": f"text {i}", "label": i % 2} for i in range(6)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(tmp_path / "d.jsonl")
    ds.to_csv(tmp_path / "d.csv", index=False)
    ds.to_parquet(tmp_path / "d.parquet")
    loaded = [
        al.load_examples("sst2", tmp_path / f"d.{ext}") for ext in ("jsonl", "csv", "parquet")
    ]
    assert loaded[0] == loaded[1] == loaded[2] == [Example(r["sentence"], r["label"]) for r in rows]
    assert al.load_examples("sst2", tmp_path / "d.jsonl", limit=2) == loaded[0][:2]


def test_user_task_with_own_columns(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"r{i}", "stars": i % 3}) for i in range(9)))
    task = al.Task(
        "stars",
        "Text: {text}\nStars: {label}",
        ("one", "two", "three"),
        text_column="body",
        label_column="stars",
    )
    assert al.load_examples(task, path)[4] == Example("r4", 1)


def test_bad_data_errors_name_the_fix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(KeyError, match="text_column="):
        al.load_examples("sst2", path)
    path.write_text(json.dumps({"sentence": "x", "label": 5}) + "\n")
    with pytest.raises(ValueError, match="outside 0..1"):
        al.load_examples("sst2", path)
    with pytest.raises(FileNotFoundError):
        al.load_examples("sst2", tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="validation"):
        al.load_examples("sst2", tmp_path)  # folder without validation.jsonl


def test_embedded_demo_set_is_balanced():
    examples = al.load_examples("sentiment-demo")
    assert len(examples) >= 40
    assert sum(e.label for e in examples) * 2 == len(examples)


def test_sample_demonstrations_k_per_class_seeded_shuffled_disjoint():
    task = al.get_task("trec")
    pool = [Example(f"q{i}", i % 6) for i in range(60)]
    queries = pool[:12]
    demos = al.sample_demonstrations(pool, task, 2, seed=42, exclude=queries)
    assert sorted(e.label for e in demos) == [c for c in range(6) for _ in range(2)]
    assert not {e.text for e in demos} & {e.text for e in queries}
    assert demos == al.sample_demonstrations(pool, task, 2, seed=42, exclude=queries)
    assert demos != al.sample_demonstrations(pool, task, 2, seed=43, exclude=queries)
    orders = {
        tuple(e.label for e in al.sample_demonstrations(pool, task, 1, seed=s)) for s in range(10)
    }
    assert len(orders) > 1  # the order is shuffled, not class-sorted


def test_sample_demonstrations_too_few_candidates():
    pool = [Example("a", 0), Example("b", 1)]
    with pytest.raises(ValueError, match="fewer shots"):
        al.sample_demonstrations(pool, "sst2", 1, seed=0, exclude=[Example("a", 0)])
