"""Zero-shot accuracy (``lm-eval``, lm-evaluation-harness).

``simple_evaluate(HFLM(pretrained=path), tasks, num_fewshot=0)``;
acc_norm for arc_challenge / hellaswag / openbookqa, acc otherwise (the paper does not say which;
this is LLM-Pruner's convention; both are saved); average over the six tasks, TruthfulQA-MC2
apart.
"""

from __future__ import annotations

from typing import Any, Sequence

from .config import ZERO_SHOT_AVERAGE, ZERO_SHOT_METRIC, ZERO_SHOT_TASKS, MetricUnavailable, require


def zero_shot(path: str, tasks: Sequence[str] = ZERO_SHOT_TASKS, *, device: str = "cpu", batch_size="auto",
              dtype: str = "auto", limit: float | None = None, trust_remote_code: bool = False,
              include_path: str | None = None) -> dict:
    """``lm_eval.simple_evaluate`` with ``HFLM(pretrained=path)``, 0-shot; accuracies x100.

    ``include_path``: a folder of extra lm-eval task YAMLs (e.g. local copies of the tasks whose
    datasets are files on disk, for offline machines)."""
    require("lm_eval", "lm-eval", "zero-shot accuracy")
    try:
        from lm_eval import simple_evaluate  # optional (the eval extra): MetricUnavailable without it
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=path, device=device, batch_size=batch_size, dtype=dtype,
                  trust_remote_code=trust_remote_code)
        raw = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, log_samples=False,
                              task_manager=TaskManager(include_path=include_path),
                              random_seed=0, numpy_random_seed=1234, torch_random_seed=1234)
    except Exception as err:  # noqa: BLE001 - offline task data, unknown task names, ...
        raise MetricUnavailable(
            f"zero-shot: lm-eval could not run {list(tasks)} ({type(err).__name__}: {str(err)[:300]}); the task "
            "datasets come from the hub: run once online (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset) to cache them"
        ) from None
    out: dict[str, Any] = {"tasks": {}}
    if raw is None:  # a rank other than lm-eval's rank 0 under several processes
        return out
    for task in tasks:
        res = raw["results"].get(task, {})
        acc, acc_norm = res.get("acc,none"), res.get("acc_norm,none")
        metric = ZERO_SHOT_METRIC.get(task, "acc")
        value = acc_norm if metric == "acc_norm" and acc_norm is not None else acc
        out["tasks"][task] = {"metric": metric, "value": None if value is None else 100 * value,
                              "acc": acc, "acc_norm": acc_norm}
    avg = [out["tasks"][t]["value"] for t in ZERO_SHOT_AVERAGE if t in out["tasks"]]
    if avg and None not in avg and len(avg) == len(ZERO_SHOT_AVERAGE):
        out["average"] = sum(avg) / len(avg)
    if "truthfulqa_mc2" in out["tasks"]:
        out["truthfulqa_mc2"] = out["tasks"]["truthfulqa_mc2"]["value"]
    return out
