"""Chat-answer scores: repeated n-grams, teacher-forced answer NLL, and the scores of a model against itself."""

import math

import torch

from cmpq.eval.chat_answers import (
    answer_nll,
    chat_prompts,
    greedy_answers,
    plain_prompts,
    repeated_ngram_share,
    score_answers,
)
from cmpq.models.load import load_model


def test_repeated_ngram_share_counts_later_copies():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_share([1, 2, 3, 4]) == 0.0                    # a single 4-gram
    assert repeated_ngram_share([7, 7, 7, 7, 7, 7]) == 2 / 3            # 3 grams, the last two repeat the first
    assert repeated_ngram_share([1, 2, 1, 2, 1, 2], n=2) == 3 / 5


def test_answer_nll_matches_step_by_step_log_probs(tiny_llama):
    prompt, answer = torch.tensor([[3, 9, 4]]), torch.tensor([11, 5, 8])
    nll, tokens = answer_nll(tiny_llama, prompt, answer)
    expected = 0.0
    with torch.no_grad():
        for i in range(3):
            context = torch.cat([prompt[0], answer[:i]])[None]
            expected -= torch.log_softmax(tiny_llama(context).logits[0, -1], -1)[answer[i]].item()
    assert tokens == 3 and math.isclose(nll, expected, rel_tol=1e-4)
    assert answer_nll(tiny_llama, prompt, torch.tensor([], dtype=torch.long)) == (0.0, 0)


def test_a_model_scored_against_itself(tiny_dir):
    loaded = load_model(str(tiny_dir))
    loaded.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{% endfor %} <a>"
    prompts = chat_prompts(loaded, ["what is one", "say two"])
    answers = greedy_answers(loaded, prompts, 6)
    scores = score_answers(loaded, loaded, prompts, answers, 6)
    assert scores.prompts == 2 and scores.mean_tokens == sum(a.numel() for a in answers) / 2
    assert math.isclose(scores.teacher_ppl, scores.judge_ppl, rel_tol=1e-5)  # its own answers either way
    assert 0.0 <= scores.repeat4 <= 1.0 and 0.0 <= scores.ended <= 1.0


def test_plain_prompts_are_the_texts_first_tokens(tiny_dir):
    loaded = load_model(str(tiny_dir))
    texts = ["one two three four five six seven eight nine ten", "a b"]
    prompts = plain_prompts(loaded, texts, 4)
    full = [loaded.tokenizer(t, return_tensors="pt").input_ids for t in texts]
    assert torch.equal(prompts[0], full[0][:, :4]) and prompts[0].shape[1] == 4
    assert torch.equal(prompts[1], full[1])  # shorter texts are kept whole
