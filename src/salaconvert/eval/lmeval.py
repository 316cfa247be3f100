"""lm-evaluation-harness adapter: runs lm-eval tasks on an already loaded model (hybrid or teacher).

The hybrid is a `PreTrainedModel`, so lm-eval's own `HFLM` wraps the loaded instance directly; no
registration is needed. lm-eval is an optional extra (`pip install 'salaconvert[eval]'`) and its
tasks read their data through `datasets`, which offline only finds what is in the local cache.
When either is missing the result says why and the rest of the report goes on.
"""
import importlib.util

DEFAULT_TASKS = ("arc_easy", "hellaswag")


def lmeval_available() -> str | None:
    """None when lm-eval can run; otherwise the reason it cannot."""
    if importlib.util.find_spec("lm_eval") is None:
        return "lm-eval is not installed (pip install 'salaconvert[eval]')"
    return None


def run_lmeval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1) -> dict:
    """{"status": "ok", "results": {task: {metric: value}}} or {"status": "skipped", "reason": ...}."""
    reason = lmeval_available()
    if reason:
        return {"status": "skipped", "reason": reason, "tasks": list(tasks)}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        # backend="causal": lm-eval does not know the sala_hybrid model type and would guess (and warn).
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except ModuleNotFoundError as e:  # lm-eval imports most of its dependencies lazily, task by task
        return {"status": "skipped", "tasks": list(tasks),
                "reason": f"lm-eval is installed but its dependency {e.name!r} is not (pip install 'salaconvert[eval]')"}
    # lm-eval fails in many ways when a task's data is not in the local cache (datasets' own
    # connection errors, FileNotFoundError, ValueError for unknown tasks): all mean "cannot run here".
    except Exception as e:  # noqa: BLE001
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return {"status": "skipped", "tasks": list(tasks),
                "reason": f"lm-eval could not run {','.join(tasks)}: {type(e).__name__}: {text} "
                          "(offline, a task's data must already be in the local Hugging Face datasets cache)"}
    results = {}
    for task, metrics in (raw or {}).get("results", {}).items():
        results[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"status": "ok", "tasks": list(tasks), "limit": limit, "results": results}
