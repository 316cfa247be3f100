"""The training loop of one stage, with resumable checkpoints, metrics and progress.

A checkpoint (`<run>/state/`, replaced atomically) holds the student's own parameters (never the
teacher's shared tensors), the optimizer and scheduler, the stage and step (which is the whole data
position: batch k is a pure function of the seed and k, see data.Batches) and the RNG states. A
run stopped at any checkpoint and resumed takes exactly the steps the uninterrupted run takes.
"""
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from salaconvert.distill.data import Batches
from salaconvert.distill.losses import AttentionAlignment, chunked_ce, chunked_kl
from salaconvert.distill.pair import attention_modules, converted_layers, load_owned, owned_state, set_trainable, trainable_names
from salaconvert.distill.recipe import Recipe, Stage
from salaconvert.io.checkpoint import write_atomically
from salaconvert.surgery.registry import resolve_arch

STATE = "state"


@dataclass
class RunState:
    stage: int = 0  # the stage in progress (0: none)
    step: int = 0  # steps done in that stage
    stages_done: list[int] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # trained tokens per stage
    losses: dict[str, dict] = field(default_factory=dict)  # per stage: first, last, mean of the last 10
    recent: list[float] = field(default_factory=list)  # the stage's last losses, for `mean_last`
    perplexity: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage wall time, summed over resumes
    peak_memory: dict[str, int] = field(default_factory=dict)  # per stage peak GPU bytes allocated (CUDA only)


class HiddenStates(torch.nn.Module):
    """The student's final hidden states (no logits: the KL makes them in chunks). A module of its
    own so that accelerate/DDP wraps the forward that actually runs."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm.model(input_ids=input_ids, use_cache=False).last_hidden_state


@dataclass
class Session:
    teacher: torch.nn.Module
    student: torch.nn.Module
    recipe: Recipe
    accelerator: object
    stream: torch.Tensor  # training tokens, 1-D
    run_dir: Path
    state: RunState
    progress: object = None  # a rich Progress, or None
    stop_after: int | None = None  # steps of this invocation after which to checkpoint and stop
    steps_taken: int = 0
    metrics_path: Path | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def lr_lambda(cfg: Stage, steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant" or steps <= cfg.warmup_steps:
            return 1.0
        t = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(s: Session, optimizer=None, scheduler=None) -> None:
    """Write the resumable checkpoint atomically (main process only)."""
    s.accelerator.wait_for_everyone()
    if not s.main:
        return

    def fill(tmp: Path) -> None:
        torch.save({n: t.cpu() for n, t in owned_state(s.student, s.teacher).items()}, tmp / "student_own.pt")
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(asdict(s.state), indent=2) + "\n")

    write_atomically(s.run_dir / STATE, fill, overwrite=True)


def load_state(run_dir: Path, student, teacher) -> tuple[RunState, dict | None]:
    """The saved RunState (weights restored into the pair) and the optimizer/scheduler states."""
    folder = run_dir / STATE
    state = RunState(**json.loads((folder / "trainer.json").read_text()))
    load_owned(student, teacher, torch.load(folder / "student_own.pt", weights_only=True))
    _set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    opt = folder / "optimizer.pt"
    return state, (torch.load(opt, weights_only=False) if opt.exists() else None)


def has_state(run_dir: Path) -> bool:
    return (run_dir / STATE / "trainer.json").is_file()


def _log(s: Session, record: dict) -> None:
    if s.main and s.metrics_path is not None:
        with open(s.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _on(s: Session, mode: str) -> bool:
    return mode == "on" or (mode == "auto" and s.accelerator.device.type == "cuda")


def _use_checkpointing(s: Session) -> bool:
    return _on(s, s.recipe.runtime.gradient_checkpointing)


def compile_layers(model) -> None:
    """torch.compile each decoder layer of a teacher or hybrid in place (once; names and weights unchanged).

    Regional compilation: layers of one kind share a graph, so a 30-layer hybrid compiles about
    three. The attention kernels are torch.compiler.disable'd (their Triton launches run as is).
    Not in stage 1, whose forward hooks on the teacher's attention would defeat the graphs.
    """
    for layer in getattr(model.model, resolve_arch(model.model).layers):
        if layer._compiled_call_impl is None:
            layer.compile()


def run_stage(s: Session, n: int, resumed: dict | None = None) -> bool:
    """Train stage `n` from `s.state.step`. Returns False if stopped early by `stop_after`."""
    cfg, acc = s.recipe.stage(n), s.accelerator
    total = cfg.num_steps()
    if s.state.stage != n:
        s.state.stage, s.state.step, s.state.recent = n, 0, []
    params = set_trainable(s.student, s.teacher, trainable_names(s.student, cfg.trainable))
    if not params:
        raise ValueError(f"stage {n}: trainable={cfg.trainable} selects no parameters")
    # fused: one kernel for the whole step on the GPU, faster and without foreach's full-size temporaries
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=acc.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])

    if n == 1:
        layers = converted_layers(s.student)
        align = AttentionAlignment(attention_modules(s.student, layers), attention_modules(s.teacher, layers))
        model = align
    else:
        model = HiddenStates(s.student)
        if _on(s, s.recipe.runtime.compile):
            compile_layers(s.student)
            compile_layers(s.teacher)
        if _use_checkpointing(s):
            s.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    s.student.train()
    model, optimizer = acc.prepare(model, optimizer)
    batches = Batches(_packed(s, cfg.seq_len), cfg.batch_size, seed=s.recipe.seed * 10 + n, shuffle=s.recipe.data.shuffle)
    micro = cfg.micro_batch_size or cfg.batch_size // acc.num_processes
    per_process = cfg.batch_size // acc.num_processes
    head_s, head_t = s.student.lm_head.weight, s.teacher.lm_head.weight

    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    task = s.progress.add_task(f"stage {n}", total=total, completed=s.state.step, tps="–", loss="–") if s.progress else None
    t_start, tokens_start, t_last = time.perf_counter(), s.state.tokens.get(str(n), 0), time.perf_counter()
    key = str(n)
    while s.state.step < total:
        if cfg.max_seconds is not None and s.state.seconds.get(key, 0.0) >= cfg.max_seconds:
            s.state.losses.setdefault(key, {})["ended_by_time_after_steps"] = s.state.step
            break
        if s.stop_after is not None and s.steps_taken >= s.stop_after:
            _note_peak_memory(s, key)
            save_state(s, optimizer, scheduler)
            return False
        batch = batches.batch(s.state.step, acc.process_index, acc.num_processes).to(acc.device)
        loss_sum = 0.0
        chunks = list(batch.split(micro))
        for i, ids in enumerate(chunks):
            sync = contextlib.nullcontext() if i == len(chunks) - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                if n == 1:
                    with torch.no_grad(), align.capture() as records:
                        s.teacher.model(input_ids=ids, use_cache=False)
                    loss = model(records)
                elif n == 2:
                    with torch.no_grad():
                        ht = s.teacher.model(input_ids=ids, use_cache=False).last_hidden_state
                    hs = model(ids)
                    loss = chunked_kl(hs, ht, head_s, head_t, cfg.kl_chunk, cfg.temperature)
                else:
                    ce, count = chunked_ce(model(ids), head_s, ids, cfg.kl_chunk)
                    loss = ce / count
                acc.backward(loss * ids.shape[0] / per_process)
            loss_sum += loss.item() * ids.shape[0] / per_process
        if acc.num_processes > 1:  # each process saw its share: log the global batch's loss
            loss_sum = acc.reduce(torch.tensor(loss_sum, device=acc.device), "mean").item()
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(params, cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        s.state.step += 1
        s.steps_taken += 1
        s.state.tokens[key] = s.state.tokens.get(key, 0) + cfg.batch_size * cfg.seq_len
        s.state.recent = (s.state.recent + [loss_sum])[-10:]
        summary = s.state.losses.setdefault(key, {"first": loss_sum})
        summary.update(last=loss_sum, mean_last=sum(s.state.recent) / len(s.state.recent), steps=s.state.step)
        now = time.perf_counter()
        s.state.seconds[key] = s.state.seconds.get(key, 0.0) + (now - t_last)
        t_last = now
        tps = (s.state.tokens[key] - tokens_start) / max(now - t_start, 1e-9)
        if s.progress:
            s.progress.update(task, advance=1, tps=f"{tps:,.0f}", loss=f"{loss_sum:.4g}")
        if s.state.step % max(1, s.recipe.runtime.log_every) == 0 or s.state.step == total:
            _log(s, {"stage": n, "step": s.state.step, "steps": total, "loss": loss_sum, "lr": lr,
                     "tokens": s.state.tokens[key], "tokens_per_s": tps, "elapsed_s": s.state.seconds[key]})
        every = s.recipe.runtime.checkpoint_every
        if every and s.state.step % every == 0 and s.state.step < total:
            save_state(s, optimizer, scheduler)

    _note_peak_memory(s, key)
    acc.free_memory()  # accelerate keeps every prepared model and optimizer: drop this stage's (its AdamW moments)
    if n != 1 and _use_checkpointing(s):
        s.student.gradient_checkpointing_disable()
    for p in s.student.parameters():
        p.requires_grad_(False)
    s.student.eval()
    s.state.stages_done.append(n)
    s.state.stage, s.state.step, s.state.recent = 0, 0, []
    save_state(s)
    return True


def _note_peak_memory(s: Session, key: str) -> None:
    device = s.accelerator.device
    if device.type == "cuda":
        s.state.peak_memory[key] = max(s.state.peak_memory.get(key, 0), torch.cuda.max_memory_allocated(device))


def _packed(s: Session, seq_len: int) -> torch.Tensor:
    from salaconvert.distill.data import pack

    return pack(s.stream, seq_len)


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, accelerator, micro_batch: int = 4, chunk: int = 512) -> float:
    """exp(mean next-token cross-entropy) of `model` over held-out [N, T] sequences."""
    if sequences.numel() == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    rows = sequences[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for ids in rows.split(micro_batch):
        ids = ids.to(accelerator.device)
        with accelerator.autocast():
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            ce, count = chunked_ce(h, model.lm_head.weight, ids, chunk)
        total += torch.tensor([ce.item(), count], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, "sum") if accelerator.num_processes > 1 else total
    model.train(was_training)
    return math.exp(total[0].item() / max(total[1].item(), 1))
