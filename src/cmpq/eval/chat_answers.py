"""Numbers for chat answers and plain-text continuations, so "fluent" is measured rather than read off three
samples.

For a set of prompts (chat turns, or openings of documents continued as plain text), every model answers
greedily; then
- `repeat4`: the share of an answer's token 4-grams already seen earlier in it (greedy loops score high);
- `ended`: the share of answers that stop with the end-of-sequence token within the budget;
- `teacher_ppl`: the model's perplexity of the float model's own answers (teacher-forced after the same
  prompt): how closely it follows what the float model would say, in the format it is used in;
- `judge_ppl`: the float model's perplexity of this model's answers: how plausible they read to the float model
  (low for loops too, hence `repeat4` beside it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from cmpq.generate import generate_ids, prompt_ids
from cmpq.models.loaded import LoadedModel


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of `tokens` that already occurred earlier in `tokens` (0 for fewer than n + 1)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def answer_nll(model, prompt: torch.Tensor, answer: torch.Tensor) -> tuple[float, int]:
    """(summed NLL, tokens) of `answer` (n,) after `prompt` (1, t), teacher-forced in one forward pass."""
    if answer.numel() == 0:
        return 0.0, 0
    ids = torch.cat([prompt, answer[None]], dim=1)
    with torch.inference_mode():
        logits = model(ids).logits[0, prompt.shape[1] - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, answer, reduction="sum")
    return float(nll), answer.numel()


@dataclass(frozen=True)
class ChatAnswerScores:
    prompts: int
    max_new_tokens: int
    repeat4: float      # mean over answers
    ended: float        # share of answers that stop within the budget
    teacher_ppl: float  # this model on the float model's answers
    judge_ppl: float    # the float model on this model's answers
    mean_tokens: float

    def as_dict(self) -> dict:
        return asdict(self)


def greedy_answers(loaded: LoadedModel, prompts: list[torch.Tensor], max_new_tokens: int) -> list[torch.Tensor]:
    """Answer ids (n,) per chat prompt (1, t), greedy, through `cmpq generate`'s loop (stops at end-of-sequence)."""
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    return [generate_ids(loaded.model, ids, max_new_tokens, eos_token_id=eos)[0] for ids in prompts]


def chat_prompts(loaded: LoadedModel, questions: list[str]) -> list[torch.Tensor]:
    """Each question as a user turn of the model's chat template, ready for the assistant's answer."""
    return [prompt_ids(loaded.tokenizer, q, chat=True) for q in questions]


def plain_prompts(loaded: LoadedModel, texts: list[str], tokens: int) -> list[torch.Tensor]:
    """The first `tokens` tokens of each text (1, t), to be continued as plain text (`cmpq generate` without
    --chat)."""
    return [prompt_ids(loaded.tokenizer, text, chat=False)[:, :tokens] for text in texts]


def perplexity_of(model, prompts: list[torch.Tensor], answers: list[torch.Tensor]) -> float:
    """exp(mean NLL) of all `answers` tokens, each after its prompt."""
    scored = [answer_nll(model, p, a) for p, a in zip(prompts, answers)]
    return math.exp(sum(n for n, _ in scored) / max(1, sum(t for _, t in scored)))


def score_answers(model: LoadedModel, reference: LoadedModel, prompts: list[torch.Tensor],
                  reference_answers: list[torch.Tensor], max_new_tokens: int) -> ChatAnswerScores:
    """Scores of `model` against the float `reference` and its greedy `reference_answers` to `prompts` (the two
    models share a tokenizer)."""
    own = greedy_answers(model, prompts, max_new_tokens)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    return ChatAnswerScores(
        prompts=len(prompts), max_new_tokens=max_new_tokens,
        repeat4=sum(repeated_ngram_share(a.tolist()) for a in own) / len(own),
        ended=sum(eos is not None and a.numel() > 0 and int(a[-1]) == eos for a in own) / len(own),
        teacher_ppl=perplexity_of(model.model, prompts, reference_answers),
        judge_ppl=perplexity_of(reference.model, prompts, own),
        mean_tokens=sum(a.numel() for a in own) / len(own))
