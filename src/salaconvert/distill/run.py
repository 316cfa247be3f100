"""`salaconvert distill` as a library function: checkpoint + teacher + text → distilled checkpoint.

Layout of a run writing OUT:
    OUT.run/recipe.yaml      the resolved recipe (checked again on --resume)
    OUT.run/metrics.jsonl    one line per logged step, per stage
    OUT.run/state/           the resumable checkpoint (replaced atomically; removed on success)
    OUT/                     the distilled checkpoint, written atomically at the end, with copies
                             of recipe.yaml, metrics.jsonl and distill_report.json beside it
"""
import json
import shutil
import time
from pathlib import Path

import torch

from salaconvert.distill import train
from salaconvert.distill.data import read_documents, split_documents, tokenize, pack
from salaconvert.distill.pair import share_frozen, shared_storage
from salaconvert.distill.recipe import Recipe, load_recipe
from salaconvert.errors import InputError
from salaconvert.io.checkpoint import check_output_dir, read_sidecar, save_checkpoint

REPORT = "distill_report.json"


def make_accelerator(recipe: Recipe, cpu: bool | None = None):
    from accelerate import Accelerator

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    precision = recipe.runtime.precision
    bf16 = precision == "bf16" or (precision == "auto" and not cpu)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no")


def load_pair(checkpoint: str | Path, teacher: str, step=lambda what: None):
    """(teacher, student, tokenizer, shared bytes): both in fp32, frozen tensors shared."""
    from transformers import AutoModelForCausalLM

    from salaconvert.io.load import load_model, load_tokenizer, resolve_source

    ckpt = Path(checkpoint)
    config = ckpt / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "sala_hybrid":
        raise InputError(f"{checkpoint}: not a salaconvert hybrid checkpoint (run `salaconvert convert` first)")
    source = resolve_source(teacher)
    step("loading teacher")
    t = load_model(source, "float32")
    step("loading student")
    s = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    if s.config.num_hidden_layers != t.config.num_hidden_layers or s.config.vocab_size != t.config.vocab_size:
        raise InputError(f"{teacher}: does not match {checkpoint} (layers or vocabulary differ); "
                         "pass the model the checkpoint was converted from")
    # convert saved the teacher's tokenizer in the checkpoint: reading it there is much faster than
    # parsing a GGUF's vocabulary again. The teacher's own is the fallback.
    tok = None
    if any((ckpt / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt))
    tok = tok or load_tokenizer(source)
    t.requires_grad_(False)
    s.requires_grad_(False)
    return t, s, tok, share_frozen(s, t)


def distill(checkpoint, teacher: str, data: list, out, recipe: str | Recipe | None = None, overrides=(),
            stages: str = "all", resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
            run_dir=None, progress=None, step=lambda what: None, pair=None, cpu: bool | None = None) -> dict:
    """Distil the hybrid at `checkpoint` from `teacher` on `data`; write it to `out`. Returns the report.

    `stages`: "1", "2", "3" or "all" (the stages the recipe enables). `stop_after`: checkpoint and
    return after that many optimizer steps (the report then has "stopped": True); `resume`
    continues such a run. `pair`: an already loaded (teacher, student, tokenizer) (tests, notebooks).
    """
    t0 = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    if stages not in ("all", "1", "2", "3"):
        raise InputError(f"--stage {stages}: expected 1, 2, 3 or all")
    stage_list = [n for n in (1, 2, 3) if recipe.stage(n).enabled] if stages == "all" else [int(stages)]
    out = Path(out)
    if not resume:
        check_output_dir(out, overwrite)
    run_dir = Path(run_dir) if run_dir else out.parent / f"{out.name}.run"
    if train.has_state(run_dir) and not resume and not overwrite:
        raise InputError(f"{run_dir}: holds an unfinished run (pass --resume to continue it, --overwrite to start over)")
    if resume and not train.has_state(run_dir):
        raise InputError(f"{run_dir}: nothing to resume (no saved state)")
    resolved = recipe.to_yaml()
    if resume and (run_dir / "recipe.yaml").read_text() != resolved:
        raise InputError(f"{run_dir}/recipe.yaml: the recipe differs from the one the run started with")
    step("reading data")
    docs = read_documents(data, recipe.data.text_field)
    train_docs, heldout_docs = split_documents(docs, recipe.data.heldout_fraction)

    accelerator = make_accelerator(recipe, cpu)
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu" and recipe.runtime.cpu_threads:
        torch.set_num_threads(recipe.runtime.cpu_threads)
    try:
        return _run(checkpoint, teacher, data, out, recipe, stage_list, stages, resume, overwrite, stop_after, run_dir,
                    progress, step, pair, accelerator, train_docs, heldout_docs, t0)
    finally:
        torch.set_num_threads(threads)


def _run(checkpoint, teacher, data, out, recipe, stage_list, stages, resume, overwrite, stop_after, run_dir, progress,
         step, pair, accelerator, train_docs, heldout_docs, t0) -> dict:
    resolved = recipe.to_yaml()
    for n in stage_list:
        if recipe.stage(n).batch_size % accelerator.num_processes:
            raise InputError(f"recipe: stage{n}.batch_size={recipe.stage(n).batch_size} does not split evenly "
                             f"over {accelerator.num_processes} processes")
    if pair is None:
        teacher_m, student, tokenizer, shared_bytes = load_pair(checkpoint, teacher, step)
    else:
        teacher_m, student, tokenizer = pair
        shared_bytes = share_frozen(student, teacher_m)
    step("tokenising")
    # Tokenise what the longest stage reads (later epochs reuse it); the same stream whichever
    # stages this invocation runs, so `--stage 2` sees the batches a full run's stage 2 sees.
    sized = [recipe.stage(n) for n in sorted(set(stage_list) | {n for n in (1, 2, 3) if recipe.stage(n).enabled})]
    need = max(s.num_steps() * s.batch_size * s.seq_len + s.seq_len for s in sized)
    stream = tokenize(train_docs, tokenizer, max_tokens=need)
    ev = recipe.data
    heldout = pack(tokenize(heldout_docs, tokenizer, max_tokens=ev.eval_tokens), ev.eval_seq_len)

    if accelerator.is_main_process:
        if overwrite and not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(resolved)
    accelerator.wait_for_everyone()

    state, resumed = (train.load_state(run_dir, student, teacher_m) if resume else (train.RunState(), None))
    if resume and accelerator.is_main_process:
        _truncate_metrics(run_dir / "metrics.jsonl", state)
    if accelerator.mixed_precision == "bf16":
        # Frozen weights in bf16, in place and before the move, so the student's shared ones follow
        # and the device never holds an fp32 copy; trainable ones get fp32 copies per stage.
        # Parameters only: buffers such as the rotary inv_freq stay fp32.
        for p in teacher_m.parameters():
            p.data = p.data.to(torch.bfloat16)
    student.to(accelerator.device)
    teacher_m.to(accelerator.device)
    if not accelerator.is_main_process:
        progress = None  # one set of bars under `accelerate launch`
    session = train.Session(teacher_m, student, recipe, accelerator, stream, run_dir, state, progress=progress,
                            stop_after=stop_after, metrics_path=run_dir / "metrics.jsonl")
    if recipe.runtime.eval and "teacher" not in state.perplexity:
        step("held-out perplexity (teacher, student before)")
        state.perplexity["teacher"] = train.perplexity(teacher_m, heldout, accelerator)
        state.perplexity["student_before"] = train.perplexity(student, heldout, accelerator)

    report = {
        "checkpoint": str(checkpoint), "teacher": teacher, "data": [str(d) for d in data], "out": str(out),
        "recipe": recipe.name, "stages": stage_list, "run_dir": str(run_dir),
        "documents": {"train": len(train_docs), "heldout": len(heldout_docs),
                      "heldout_rule": f"sha1(text)[:8] < {ev.heldout_fraction} of 2^64",
                      "heldout_tokens": heldout.numel(), "train_tokens_available": stream.numel(),
                      "heldout_sources": [d.source for d in heldout_docs[:100]]},
        "shared_frozen_bytes": shared_bytes, "device": str(accelerator.device),
        "precision": accelerator.mixed_precision, "processes": accelerator.num_processes,
        "main_process": accelerator.is_main_process,
    }
    step("training")
    with (progress if progress is not None else _null()):
        for n in stage_list:
            if n in state.stages_done and stages == "all":
                continue
            done = train.run_stage(session, n, resumed if resume and state.stage == n else None)
            resumed = None
            if not done:
                report.update(_fill(report, state), stopped=True, seconds=time.perf_counter() - t0)
                return report
    if recipe.runtime.eval:
        step("held-out perplexity (student after)")
        state.perplexity["student_after"] = train.perplexity(student, heldout, accelerator)
    report.update(_fill(report, state), stopped=False)
    if torch.cuda.is_available():
        report["peak_memory_bytes"] = torch.cuda.max_memory_allocated()

    step("writing checkpoint")
    if accelerator.is_main_process:
        sidecar = read_sidecar(checkpoint) if checkpoint else {}
        before = sidecar.get("distillation") or {}
        sidecar["recipe"] = recipe.to_dict()
        sidecar["distillation"] = {
            "stages_done": sorted(set(before.get("stages_done", [])) | set(state.stages_done)),
            "teacher": teacher, "data": report["data"], "tokens": state.tokens, "losses": state.losses,
            "perplexity": state.perplexity, "heldout": report["documents"], "previous": before or None,
        }
        report["seconds"] = time.perf_counter() - t0

        def extra(folder: Path) -> None:
            (folder / "recipe.yaml").write_text(resolved)
            if (run_dir / "metrics.jsonl").exists():
                shutil.copy(run_dir / "metrics.jsonl", folder / "metrics.jsonl")
            (folder / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")

        student.to("cpu")
        dtype = _stored_dtype(checkpoint)
        for p in student.parameters():  # parameters only: fp32 buffers (decays, inv_freq) stay fp32
            p.data = p.data.to(dtype)
        save_checkpoint(student, tokenizer, out, sidecar, overwrite=out.exists(), extra=extra)
        shutil.rmtree(run_dir / train.STATE, ignore_errors=True)
    accelerator.wait_for_everyone()
    report["seconds"] = time.perf_counter() - t0
    return report


def _truncate_metrics(path: Path, state) -> None:
    """Drop lines logged after the checkpoint being resumed: those steps run again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and (json.loads(line)["stage"] in state.stages_done
                                 or (json.loads(line)["stage"] == state.stage and json.loads(line)["step"] <= state.step))]
    path.write_text("".join(line + "\n" for line in keep))


def _stored_dtype(checkpoint) -> torch.dtype:
    """The dtype the input checkpoint was stored in: the output keeps it."""
    config = Path(checkpoint) / "config.json" if checkpoint else None
    name = json.loads(config.read_text()).get("dtype") if config and config.is_file() else None
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else torch.float32


def _fill(report: dict, state) -> dict:
    return {"stages_done": list(state.stages_done), "tokens": dict(state.tokens), "losses": dict(state.losses),
            "perplexity": dict(state.perplexity), "train_seconds": dict(state.seconds),
            "peak_memory_bytes_per_stage": dict(state.peak_memory)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["distill", "load_pair", "make_accelerator", "shared_storage"]
