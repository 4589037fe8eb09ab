"""lm-evaluation-harness integration: the wrapper's log-likelihoods, the built-in prompts on local files,
task evaluation end to end on a tiny model, and the CLI's task / KLD options."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from cmpq.cli import main  # noqa: E402
from cmpq.compare import Extras  # noqa: E402
from cmpq.errors import ConfigError  # noqa: E402
from cmpq.eval import task_data  # noqa: E402
from cmpq.eval.harness import (  # noqa: E402
    ZERO_SHOT_TASKS,
    TaskConfig,
    evaluate_tasks,
    local_mmlu_config,
    local_task_config,
    wrap_model,
)
from cmpq.eval.records import read_records  # noqa: E402
from cmpq.models.tiny import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402


def _build(config):
    from lm_eval.tasks import TaskManager

    return next(iter(TaskManager(include_defaults=False).load([config])["tasks"].values()))


def test_wrapper_loglikelihood_equals_a_direct_computation():
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    pairs = [("Question: Is the sky blue?\nAnswer:", " yes"), ("The cat sat on the", " mat."), ("abc", " d")]
    lm = wrap_model(model, tokenizer, batch_size=2)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    scored = lm.loglikelihood(requests)
    for (context, continuation), (loglik, greedy) in zip(pairs, scored):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        targets = whole[len(ctx):]
        positions = range(len(ctx) - 1, len(whole) - 1)
        direct = sum(float(logprobs[p, t]) for p, t in zip(positions, targets))
        assert loglik == pytest.approx(direct, abs=1e-4)
        assert greedy == all(int(logprobs[p].argmax()) == t for p, t in zip(positions, targets))


def test_local_tasks_render_the_builtin_prompts():
    """The first document of each task, rendered by our task objects, equals the built-in YAML's template
    written out by hand (the prompts everybody compares with)."""
    expected = {}
    arc = task_data.load_task_docs("arc_easy")[0]
    expected["arc_easy"] = (f"Question: {arc['question']}\nAnswer:", arc["choices"]["text"])
    piqa = task_data.load_task_docs("piqa")[0]
    expected["piqa"] = (f"Question: {piqa['goal']}\nAnswer:", [piqa["sol1"], piqa["sol2"]])
    boolq = task_data.load_task_docs("boolq")[0]
    expected["boolq"] = (f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:", ["no", "yes"])
    hella = task_data.load_task_docs("hellaswag")[0]
    expected["hellaswag"] = (hella["query"], hella["choices"])
    text = task_data.load_task_docs("lambada_openai")[0]["text"]
    expected["lambada_openai"] = (" ".join(text.split(" ")[:-1]), None)
    for task, (prompt, choices) in expected.items():
        built = _build(local_task_config(task))
        doc = next(iter(built.eval_docs))
        assert built.doc_to_text(doc) == prompt, task
        if choices is not None:
            assert built.doc_to_choice(doc) == choices, task
    lambada = _build(local_task_config("lambada_openai"))
    assert lambada.doc_to_target(next(iter(lambada.eval_docs))) == " " + text.split(" ")[-1]
    wino = _build(local_task_config("winogrande"))
    doc = next(iter(wino.eval_docs))
    blank = doc["sentence"].index("_")
    assert wino.doc_to_choice(doc) == [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]


def test_mmlu_is_five_shot_from_dev_with_the_standard_prompt():
    task = _build(local_mmlu_config("anatomy"))
    doc = next(iter(task.eval_docs))
    context = task.fewshot_context(doc, num_fewshot=5)
    dev = task_data.load_mmlu("anatomy", "dev")
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert context.count("\nAnswer:") == 6 and dev[0]["question"].strip() in context
    assert context.endswith(f"{doc['question'].strip()}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
                            f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")


def test_evaluate_tasks_on_a_tiny_model():
    result = evaluate_tasks(tiny_model("llama"), tiny_tokenizer(), TaskConfig(tasks=("arc_challenge", "winogrande",
                                                                                      "mmlu"), limit=2),
                            progress=False)
    assert result["protocol"] == "limit 2"
    assert result["arc_challenge"]["items"] == 2 and set(result["arc_challenge"]) >= {"acc", "acc_norm"}
    assert 0 <= result["winogrande"]["acc"] <= 1
    mmlu = result["mmlu"]
    assert mmlu["items"] == 2 * 57 and mmlu["shots"] == 5
    assert set(mmlu) >= {"stem", "humanities", "social_sciences", "other", "average"}


def test_task_config_protocols_and_errors():
    assert TaskConfig(protocol="quick").items("piqa") == 200 and TaskConfig(protocol="quick").items("mmlu") == 5
    assert TaskConfig(protocol="full").items("piqa") is None
    assert "first 200" in TaskConfig().label()
    with pytest.raises(ConfigError, match="unknown"):
        TaskConfig(tasks=("arc",))
    with pytest.raises(ConfigError, match="limit"):
        TaskConfig(limit=0)
    assert set(ZERO_SHOT_TASKS) == set(task_data.TASKS)


def test_cli_fails_clearly_on_a_malformed_task_file_before_loading_the_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "dev.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{not json\n')
    (tmp_path / "piqa" / "dev-labels.lst").write_text("0\n1\n")
    monkeypatch.setenv("CMPQ_DATA_DIR", str(tmp_path))
    task_data.clear_cache()
    try:
        assert main(["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "piqa", "--ppl", "none"]) == 2
    finally:
        task_data.clear_cache()
    err = capsys.readouterr().err
    assert "dev.jsonl:2" in err


def test_cli_eval_records_tasks_and_kld(tmp_path, monkeypatch):
    monkeypatch.setenv("CMPQ_CACHE_DIR", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--model", str(model), "--ppl", "none", "--tasks", "piqa", "--limit", "2", "--kld",
                 "--kld-windows", "1", "--json", str(out), "--no-progress"]) == 0
    record = read_records(out)[0]
    assert record["kld"]["mean_kld"] == pytest.approx(0.0, abs=1e-6) and record["kld"]["top1_agreement"] == 1.0
    assert record["tasks"]["piqa"]["items"] == 2
    extras = Extras(tasks=("piqa",), limit=2, kld_windows=1)
    assert not extras.satisfied(record)  # a compare cell also needs both perplexities
    record["ppl"] = {"wikitext2": {"ppl": 1.0}, "c4": {"ppl": 1.0}}
    assert extras.satisfied(record) and not Extras(kld_windows=2).satisfied(record)
    assert not Extras(tasks=("piqa", "boolq"), limit=2).satisfied(record)
    assert json.dumps(record)  # JSON-serialisable
