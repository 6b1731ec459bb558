"""Optional: run lm-evaluation-harness tasks on a loaded model through its Python API.

``pip install 'kdforge[lmeval]'``. Two kinds of task names are accepted:

- ``kdforge_qa`` and ``kdforge_code``: kdforge's own task set (``tasks.jsonl``) as local lm-eval
  tasks, built in memory (no dataset download, so they run offline). ``generate_until`` with the
  model's chat template (``apply_chat_template=True``: one user turn and the generation prompt,
  the rendering kdforge uses), greedy decoding, stop at the end-of-turn token, and a
  ``process_results`` that calls kdforge's own scorer. Same prompts, same decoding, same scorer:
  the scores equal kdforge's, which is what this path is checked for.
- any other name: a task from lm-eval's registry (``hellaswag``, ``gsm8k``, ...). These read
  their datasets through ``datasets``; they work where those datasets are cached or reachable.

The model is wrapped in lm-eval's ``HFLM`` as a live object (no reloading), with the report's
tokenizer, no BOS added (kdforge renders prompts with the chat template and adds no special
tokens), and the batch size of kdforge's own task generation, so both paths batch alike.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from kdforge.errors import UserError
from kdforge.eval.tasks import TaskItem, score_item

LOCAL_TASKS = {"kdforge_qa": ("short", "exact_match"), "kdforge_code": ("code", "pass_at_1")}


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def require() -> None:
    if not available():
        raise UserError("lm_eval_tasks needs lm-evaluation-harness: pip install 'kdforge[lmeval]' "
                        "(or pip install lm_eval==0.4.13)")


def local_task(name: str, items: list[TaskItem], stop: list[str], max_gen_toks: int,
               timeout_s: float = 5.0, memory_mb: int = 512) -> dict[str, Any]:
    """An lm-eval task config (a dict, as ``TaskManager.load`` accepts) for kdforge's items."""
    import datasets

    kind, metric = LOCAL_TASKS[name]
    docs = [asdict(it) for it in items if it.type == kind]
    if not docs:
        raise UserError(f"lm-eval task {name}: the task set has no '{kind}' items")

    def dataset(**_: Any) -> datasets.DatasetDict:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})

    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        # results[0]: the generated text after lm-eval cut it at a stop sequence.
        return {metric: score_item(TaskItem(**doc), results[0], timeout_s, memory_mb)["score"]}

    return {
        "task": name,
        "custom_dataset": dataset,
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 0,
        "generation_kwargs": {"until": stop, "do_sample": False, "max_gen_toks": max_gen_toks},
        "process_results": process_results,
        "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def run_lm_eval(model, tokenizer, task_names: list[str], items: list[TaskItem], batch_size: int,
                short_tokens: int, code_tokens: int, limit: int | None = None, timeout_s: float = 5.0,
                memory_mb: int = 512) -> dict[str, Any]:
    """Run ``task_names`` on ``model``: {task: {"metrics": {...}, "samples": [{doc_id, id, response, score}]}}."""
    require()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from kdforge.models.loading import end_of_turn_ids

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    stop = [tokenizer.decode([i], skip_special_tokens=False) for i in end_of_turn_ids(tokenizer, model)]
    tasks: list[Any] = []
    for name in task_names:
        if name in LOCAL_TASKS:
            max_toks = code_tokens if LOCAL_TASKS[name][0] == "code" else short_tokens
            tasks.append(local_task(name, items, stop, max_toks, timeout_s, memory_mb))
        else:
            tasks.append(name)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)
    out = simple_evaluate(model=lm, tasks=tasks, apply_chat_template=True, fewshot_as_multiturn=False,
                          limit=limit, bootstrap_iters=0, log_samples=True,
                          # Indexing lm-eval's bundled task YAMLs takes ~20 s: only for registry tasks.
                          task_manager=TaskManager(include_defaults=any(isinstance(t, str) for t in tasks)),
                          confirm_run_unsafe_code=True)
    if out is None:
        raise RuntimeError("lm_eval returned no results")
    report: dict[str, Any] = {}
    for name in task_names:
        metrics = {k.split(",")[0]: v for k, v in out["results"].get(name, {}).items()
                   if isinstance(v, int | float) and not k.startswith("alias") and "stderr" not in k}
        samples = []
        for s in out.get("samples", {}).get(name, []):
            doc = s.get("doc", {})
            resp = s.get("filtered_resps") or s.get("resps")
            text = resp[0] if resp and isinstance(resp[0], str) else (resp[0][0] if resp and resp[0] else "")
            score = next((s[k] for k in (LOCAL_TASKS.get(name, ("", ""))[1],) if k in s), None)
            args = s.get("arguments") or [[None]]
            context = args[0][0] if isinstance(args[0], list | tuple) else None
            samples.append({"doc_id": s.get("doc_id"), "id": doc.get("id"), "prompt": doc.get("prompt"),
                            "context": context, "response": text, "score": score})
        report[name] = {"metrics": metrics, "samples": samples}
    return report
