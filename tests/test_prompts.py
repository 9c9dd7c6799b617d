import warnings

import pytest
import torch

import anchor_lens as al
from anchor_lens import Example, TokenRole

# Hand-checked SmolLM2 tokenisations: two demonstrations (classes 1 then 0) and a query.
# Roles: F = formatting, T = text, L = label word.
HAND_CHECKED = {
    "sst2": (
        ("a gripping film", "dull and slow", "what a ride"),
        "Review : Ġa Ġgripping Ġfilm Ċ Sent iment : ĠPositive Ċ Review : Ġdull Ġand Ġslow Ċ "
        "Sent iment : ĠNegative Ċ Review : Ġwhat Ġa Ġride Ċ Sent iment :",
        "FFTTTFFFFLFFFTTTFFFFLFFFTTTFFFF",
    ),
    "trec": (
        ("What is NASA ?", "Who wrote Hamlet ?", "Where is Rome ?"),
        "Question : ĠWhat Ġis ĠNASA Ġ? Ċ Answer ĠType : ĠEntity Ċ Question : ĠWho Ġwrote "
        "ĠHamlet Ġ? Ċ Answer ĠType : ĠAb brev iation Ċ Question : ĠWhere Ġis ĠRome Ġ? Ċ Answer "
        "ĠType :",
        "FFTTTTFFFFLFFFTTTTFFFFLLLFFFTTTTFFFF",
    ),
    "agnews": (
        ("Stocks fell today.", "Team wins cup.", "New chip unveiled."),
        "Article : ĠSt ocks Ġfell Ġtoday . Ċ Answer : ĠSports Ċ Article : ĠTeam Ġwins Ġcup . "
        "Ċ Answer : ĠWorld Ċ Article : ĠNew Ġchip Ġunveiled . Ċ Answer :",
        "FFTTTTTFFFLFFFTTTTFFFLFFFTTTTFFF",
    ),
    "emoc": (
        ("i am so glad", "leave me alone", "ok see you"),
        "D ial ogue : Ġi Ġam Ġso Ġglad Ċ Em otion : ĠHappy Ċ D ial ogue : Ġleave Ġme Ġalone Ċ "
        "Em otion : ĠOthers Ċ D ial ogue : Ġok Ġsee Ġyou Ċ Em otion :",
        "FFFFTTTTFFFFLFFFFFTTTFFFFLFFFFFTTTFFFF",
    ),
}
ROLE = {"F": TokenRole.FORMAT, "T": TokenRole.TEXT, "L": TokenRole.LABEL}


@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("task_name", sorted(HAND_CHECKED))
def test_positions_match_hand_checked_prompts(smol_tokenizer, task_name, padding_side):
    (a, b, q), tokens, roles = HAND_CHECKED[task_name]
    tokens = tokens.split()
    task = al.get_task(task_name)
    demos = [Example(a, 1), Example(b, 0)]
    # A longer second query forces padding of the first row.
    batch = al.build_icl_batch(
        smol_tokenizer,
        task,
        demos,
        [Example(q, 1), Example(q + " " + q, 0)],
        padding_side=padding_side,
        prepend_bos=False,
    )
    row_ids = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert smol_tokenizer.convert_ids_to_tokens(row_ids) == tokens
    shift = batch.input_ids.shape[1] - len(tokens) if padding_side == "left" else 0
    assert shift > 0 or padding_side == "right"
    real_roles = batch.roles[0, shift : shift + len(tokens)].tolist()
    assert real_roles == [ROLE[r] for r in roles]
    assert (batch.roles[0][~batch.attention_mask[0].bool()] == TokenRole.PAD).all()
    # p_k: the first token of each demonstration's label word.
    first_label = [i for i, r in enumerate(roles) if r == "L" and (i == 0 or roles[i - 1] != "L")]
    assert batch.label_positions[0].tolist() == [p + shift for p in first_label]
    assert batch.demo_labels[0].tolist() == [1, 0]
    # q: the last token, the ":" that ends the label prefix.
    assert batch.target_positions[0] == shift + len(tokens) - 1
    assert tokens[-1] == ":"
    # Positions count real tokens only.
    assert batch.position_ids[0, shift : shift + len(tokens)].tolist() == list(range(len(tokens)))
    # Demonstration index: separator belongs to the demonstration before it, query is K.
    demo_index = batch.demo_index[0, shift : shift + len(tokens)].tolist()
    assert demo_index[0] == 0 and demo_index[-1] == 2
    assert demo_index[first_label[1] + 1] == 1  # the "\n" after the second label word


@pytest.mark.slow
def test_label_token_ids_use_the_leading_space(smol_tokenizer):
    lt = al.label_tokens(smol_tokenizer, al.get_task("sst2"))
    assert smol_tokenizer.convert_ids_to_tokens(list(lt.first)) == ["ĠNegative", "ĠPositive"]
    trec = al.label_tokens(smol_tokenizer, al.get_task("trec"))
    assert smol_tokenizer.convert_ids_to_tokens(list(trec.words[0])) == ["ĠAb", "brev", "iation"]


def test_bos_policy(tiny_llama, tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    demos = [Example("good", 1)]
    # load_model keeps the native tokenizer's convention: this one adds no BOS.
    assert not al.tokenizer_adds_bos(tiny_tokenizer)
    assert tiny_llama.cfg.default_prepend_bos is False
    native = al.build_icl_batch(tiny_llama, "sst2", demos, ["bad"])
    assert bos not in native.input_ids[0].tolist()
    assert torch.equal(native.input_ids[0], tiny_llama.to_tokens(native.prompts[0])[0])
    forced = al.build_icl_batch(tiny_llama, "sst2", demos, ["bad"], prepend_bos=True)
    assert forced.input_ids[0, 0] == bos and forced.roles[0, 0] == TokenRole.SPECIAL
    assert torch.equal(forced.input_ids[0, 1:], native.input_ids[0])
    assert torch.equal(forced.label_positions, native.label_positions + 1)
    assert bos not in al.build_icl_batch(tiny_tokenizer, "sst2", demos, ["bad"]).input_ids[0]


def test_load_model_prepend_bos_sets_the_tl_switch(tiny_tokenizer):
    from .conftest import tiny_hf_model

    bridge = al.load_model(
        tiny_hf_model("gpt2", tiny_tokenizer), tokenizer=tiny_tokenizer, prepend_bos=True
    )
    batch = al.build_icl_batch(bridge, "sst2", [], ["bad"])
    assert batch.input_ids[0, 0] == tiny_tokenizer.bos_token_id
    assert torch.equal(batch.input_ids[0], bridge.to_tokens(batch.prompts[0])[0])


def test_masks_and_per_query_demonstrations(tiny_tokenizer):
    demos_a = [Example("good fun", 1), Example("bad", 0)]
    demos_b = [Example("awful", 0), Example("lovely", 1)]
    batch = al.build_icl_batch(tiny_tokenizer, "sst2", [demos_a, demos_b], ["ok", "meh"])
    assert batch.demo_labels.tolist() == [[1, 0], [0, 1]]
    assert batch.label_mask.sum(-1).tolist() == [2, 2]
    for b in range(2):
        labels = batch.input_ids[b, batch.label_positions[b]]
        assert labels.tolist() == batch.label_token_ids[batch.demo_labels[b]].tolist()
        assert batch.format_mask[b].sum() > 0
    assert batch.labels.tolist() == [-1, -1]
    assert len(batch[1:]) == 1 and batch[1:].prompts == batch.prompts[1:]


def test_zero_shot_batch(tiny_tokenizer):
    batch = al.build_icl_batch(tiny_tokenizer, "sst2", [], [Example("fine", 1)])
    assert batch.n_demos == 0 and batch.prompts == ["Review: fine\nSentiment:"]


@pytest.mark.slow
def test_label_word_merging_with_template_is_refused(smol_tokenizer):
    # SmolLM2 splits "Positives" as "ĠPos" "itives": the anchor token is not "ĠPositive".
    task = al.Task("merge", "Review: {text}\nSentiment: {label}s", ("Negative", "Positive"))
    with pytest.raises(al.LabelWordError, match="merges"):
        al.build_icl_batch(smol_tokenizer, task, [Example("good", 1)], ["bad"])


def test_label_words_sharing_a_first_token_are_refused(tiny_tokenizer):
    task = al.Task("clash", "Review: {text}\nSentiment: {label}", ("Positive", "Positivexyz"))
    first = al.label_tokens(tiny_tokenizer, task).first
    assert first[0] == first[1]
    with pytest.raises(al.LabelWordError, match="full_word"):
        al.build_icl_batch(tiny_tokenizer, task, [Example("good", 0)], ["bad"])
    batch = al.build_icl_batch(
        tiny_tokenizer, task, [Example("good", 0)], ["bad"], check_label_collisions=False
    )
    assert len(batch.label_word_ids[1]) > 1


def test_prompt_longer_than_context_is_refused(tiny_llama):
    with pytest.raises(al.PromptTooLongError, match="fewer demonstrations"):
        al.build_icl_batch(tiny_llama, "sst2", [Example("word " * 600, 1)], ["bad"])
    with pytest.raises(al.PromptTooLongError):
        al.build_icl_batch(tiny_llama.tokenizer, "sst2", [], ["x y z"], max_length=3)


def test_unknown_task_in_batch(tiny_tokenizer):
    with pytest.raises(KeyError, match="Unknown task"):
        al.build_icl_batch(tiny_tokenizer, "nope", [], ["x"])


def test_multi_token_label_word_warns_which_token_is_scored(tiny_tokenizer):
    task = al.Task("split", "Review: {text}\nSentiment: {label}", ("Negative", "Positivexyz"))
    assert len(al.label_tokens(tiny_tokenizer, task).words[1]) > 1
    with pytest.warns(al.LabelWordWarning, match=r"'Positivexyz' -> .*scored: "):
        al.build_icl_batch(tiny_tokenizer, task, [al.Example("good", 1)], ["bad"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole-word scoring scores every token: no warning
        al.build_icl_batch(
            tiny_tokenizer, task, [al.Example("good", 1)], ["bad"], check_label_collisions=False
        )
