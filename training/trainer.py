"""The training loop: a plain loop you can read whole (AdamW, linear schedule with warm-up,
gradient accumulation, dev loss each epoch with early stopping and the best state kept,
resumable checkpoints, Ctrl-C that leaves one behind), data-parallel under `accelerate launch`.

Determinism is what makes resuming exact: the backbone runs without dropout, each epoch's
order comes from (seed, epoch), and a checkpoint holds everything else (trainable weights,
optimizer, schedule, counters, the best state so far). A run resumed from step s therefore
ends with the same prefix as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from prefixkit.exporter.backbones import Backbone
from prefixkit.exporter.reference import kv_of_text
from prefixkit.runtime.files import atomic_write, replace_folder
from prefixkit.runtime.manifest import FINETUNE_RECORD
from prefixkit.runtime.prefix import Prefix, make_meta, save_prefix
from prefixkit.runtime.progress import EVERY_S, Progress
from prefixkit.runtime.template import apply_template, check_template

from .data import Example
from .modules import (IGNORE, PrefixEncoder, PrefixLM, PrefixSeq2SeqLM, PromptEncoder, Seq2SeqPrefixEncoder,
                      count_parameters)

CHECKPOINT_FORMAT = "prefixkit-checkpoint-1"
# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_MUST_MATCH = (
    "method", "prefix_len", "init_text", "mid_dim", "reparam", "template", "batch_size",
    "grad_accum", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "epochs", "max_steps",
)


class TrainingError(RuntimeError):
    """A training run that cannot start or continue; the message says what to do."""


@dataclasses.dataclass
class TrainSettings:
    method: str = "prefix"
    prefix_len: int = 10  # ignored with init_text: the prefix is then as long as its tokens
    init_text: str | None = None
    mid_dim: int = 512  # k, the width of P' and of the MLP's hidden layer
    reparam: bool = True
    template: str = "{input}\n"
    stop: list[str] = dataclasses.field(default_factory=list)
    epochs: int = 5
    batch_size: int = 5
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR of the method
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    patience: int = 2  # epochs without a better dev loss before stopping
    max_steps: int | None = None
    seed: int = 0
    save_every: int = 50  # optimizer steps between checkpoints (and one at every epoch end)

    def check(self) -> "TrainSettings":
        from .modules import METHODS

        if self.method not in METHODS:
            raise TrainingError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}.")
        check_template(self.template)
        for name in ("prefix_len", "mid_dim", "epochs", "batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"--max-steps must be at least 1, not {self.max_steps}.")
        if self.init_text is not None and not self.init_text.strip():
            raise TrainingError("--init-text is empty; give real words, e.g. 'table-to-text:'.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainingError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}.")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


# Measured on smollm2-135m (benchmarks/results/history-train-export-serve.md): the paper's 5e-5 is for GPT-2 medium
# fine-tuning-sized updates; a 10-token prefix on a 135M model needs a larger step.
DEFAULT_LR = {"prefix": 5e-4, "prompt": 5e-4, "finetune": 5e-5}


@dataclasses.dataclass
class Tokenised:
    ids: list[int]  # prompt + output + eos
    n_prompt: int


@dataclasses.dataclass
class TrainResult:
    output: Path | None  # None when interrupted
    interrupted: bool
    step: int
    total_steps: int
    history: list[dict[str, Any]]
    meta: dict[str, Any] | None
    checkpoint: Path
    prefix: Prefix | None = None  # what was written, on every process (None for finetune)
    model: PrefixLM | None = None  # the trained model in memory, best state loaded
    # tokens this run trained on per optimizer step, all processes (benchmarks/train_speed.py)
    step_tokens: list[int] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.step_tokens)


def tokenise(backbone: Backbone, examples: Sequence[Example], template: str, limit: int) -> tuple[list[Tokenised], int]:
    """Prompt (the template applied to the input) and output tokenised apart, as the runtime sees
    them: it encodes the prompt and generates the output after it; the eos token ends each output.
    Examples longer than `limit` positions are left out; returns (kept, dropped count)."""
    tokenizer = backbone.tokenizer.backend_tokenizer  # the tokenizer.json the export ships
    eos = _eos_id(backbone)
    kept, dropped = [], 0
    for example in examples:
        prompt = tokenizer.encode(apply_template(template, example.input)).ids
        output = tokenizer.encode(example.output, add_special_tokens=False).ids + [eos]
        if len(prompt) + len(output) > limit:
            dropped += 1
            continue
        kept.append(Tokenised(prompt + output, len(prompt)))
    return kept, dropped


def _eos_id(backbone: Backbone) -> int:
    if not backbone.eos_token_ids:
        raise TrainingError(f"{backbone.path}: the tokenizer names no eos token, so an output cannot end.")
    return backbone.eos_token_ids[0]


def collate(rows: Sequence[Tokenised], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels [B, T]; labels are IGNORE on the prompt
    and the padding, so the loss is on output tokens only (paper, eq. 2)."""
    T = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.ids)
        input_ids[i, :n] = torch.tensor(row.ids)
        mask[i, :n] = 1
        labels[i, row.n_prompt:n] = input_ids[i, row.n_prompt:n]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def build_model(backbone: Backbone, settings: TrainSettings) -> PrefixLM:
    """The backbone with the method's trainable part, initialised from `settings.seed`."""
    torch.manual_seed(settings.seed)
    model = backbone.model
    if backbone.architecture.is_encoder_decoder:
        if settings.method != "prefix" or settings.init_text is not None:
            raise TrainingError(
                f"{backbone.architecture.model_type} is an encoder-decoder backbone: prefixkit trains "
                "`prefix` on it, randomly initialised (no --init-text, prompt or finetune yet)."
            )
        trainable = Seq2SeqPrefixEncoder(backbone.architecture, settings.prefix_len, settings.mid_dim, settings.reparam)
        return PrefixSeq2SeqLM(model, trainable)
    init_ids = None
    if settings.init_text is not None:
        init_ids = backbone.tokenizer.backend_tokenizer.encode(settings.init_text, add_special_tokens=False).ids
        if not init_ids:
            raise TrainingError(f"--init-text {settings.init_text!r} has no tokens.")
    if settings.method == "prefix":
        init_kv = tuple(map(torch.from_numpy, kv_of_text(model, torch.tensor([init_ids])))) if init_ids else None
        length = len(init_ids) if init_ids else settings.prefix_len
        trainable = PrefixEncoder(backbone.architecture, length, settings.mid_dim, settings.reparam, init_kv)
    elif settings.method == "prompt":
        embeddings = model.get_input_embeddings().weight
        if init_ids is None:
            generator = torch.Generator().manual_seed(settings.seed)
            init_ids = torch.randint(0, embeddings.shape[0], (settings.prefix_len,), generator=generator).tolist()
        trainable = PromptEncoder(embeddings[init_ids])
    else:
        trainable = None
    return PrefixLM(model, settings.method, trainable)


def evaluate(model: PrefixLM, rows: Sequence[Tokenised], batch_size: int, pad_id: int, device) -> float:
    """Mean negative log-likelihood per output token (nats) over rows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad_id).items()}
            nll, n = model(**batch)
            total += float(nll)
            count += int(n)
    return total / max(count, 1)


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step; a second Ctrl-C
    stops at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __call__(self, signum=None, frame=None):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if signum is not None:
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)…",
                  file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def train(
    backbone: Backbone,
    train_examples: Sequence[Example],
    dev_examples: Sequence[Example],
    output: str | Path,
    settings: TrainSettings,
    *,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    data_summary: dict[str, Any] | None = None,
    backbone_name: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, "_StopRequest"], None] | None = None,
    progress_every: float = EVERY_S,
) -> TrainResult:
    """Train and write the prefix file (or, for `finetune`, a model folder) to `output`.

    `progress`: a bar on a terminal, else a line every `progress_every` seconds
    (runtime/progress.py). `on_step(step, stop)` is called after each optimizer step (tests use
    it to interrupt)."""
    settings.check()
    output = Path(output)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output.with_name(output.name + ".checkpoint")
    run = _Run(backbone, train_examples, dev_examples, settings, checkpoint_dir / "last.pt", resume)
    interrupted = run.loop(progress, on_step, progress_every)
    if interrupted:
        run.save_checkpoint()
        _say(run.main, f"interrupted at step {run.state['step']} of {run.total}; checkpoint saved to "
                       f"{run.checkpoint}. Run the same command with --resume to continue.")
        result = TrainResult(None, True, run.state["step"], run.total, run.state["history"], None, run.checkpoint)
    else:
        result = run.write(output, checkpoint_dir, backbone_name, data_summary)
    result.step_tokens = run.step_tokens
    return result


class _Run:
    """One training run: the model, data, optimizer and schedule, and the state a checkpoint
    keeps (step, epochs, dev losses, the best trainable state, seconds)."""

    def __init__(self, backbone: Backbone, train_examples: Sequence[Example], dev_examples: Sequence[Example],
                 settings: TrainSettings, checkpoint: Path, resume: bool):
        from accelerate import Accelerator

        self.backbone, self.settings, self.checkpoint = backbone, settings, checkpoint
        self.accelerator = Accelerator()
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.main = self.accelerator.is_main_process
        if checkpoint.exists() and not resume:
            raise TrainingError(
                f"{checkpoint} holds an earlier run's checkpoint; pass --resume to continue it, "
                "or delete that folder to start over."
            )
        if resume and not checkpoint.exists():
            raise TrainingError(f"--resume: there is no checkpoint at {checkpoint}.")
        model = build_model(backbone, settings)
        self._tokenise(model.prefix_len, train_examples, dev_examples)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._schedule()
        self.state: dict[str, Any] = {"step": 0, "epochs_done": 0, "best_dev": None, "bad_epochs": 0,
                                      "history": [], "best": None, "seconds": 0.0}
        self.identity = _identity(backbone, settings, self.train_rows, self.world)
        if resume:
            self.state = _load_checkpoint(checkpoint, self.identity, model, self.optimizer, self.schedule)
            _say(self.main, f"resuming from {checkpoint} at step {self.state['step']} of {self.total}.")
        self.model = self.accelerator.prepare(model)
        self.core: PrefixLM = self.accelerator.unwrap_model(self.model)
        self.device = self.accelerator.device
        self.stop = _StopRequest()

    def _tokenise(self, P: int, train_examples, dev_examples) -> None:
        limit = self.backbone.architecture.max_positions - P
        self.train_rows, dropped = tokenise(self.backbone, train_examples, self.settings.template, limit)
        self.dev_rows, dev_dropped = tokenise(self.backbone, dev_examples, self.settings.template, limit)
        if dropped or dev_dropped:
            _say(self.main, f"left out {dropped} training and {dev_dropped} dev example(s) longer than the "
                            f"{limit} positions the backbone has after a prefix of {P}.")
        if not self.train_rows:
            raise TrainingError("no training example fits the backbone's context.")
        self.pad_id = _eos_id(self.backbone)

    def _schedule(self) -> None:
        """AdamW and a linear schedule with warm-up over the run's optimizer steps."""
        s = self.settings
        self.optimizer = torch.optim.AdamW(self.params, lr=s.learning_rate, weight_decay=s.weight_decay)
        self.per_micro = s.batch_size * self.world
        self.micro_per_epoch = math.ceil(len(self.train_rows) / self.per_micro)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / s.grad_accum)
        total = self.steps_per_epoch * s.epochs
        self.total = total if s.max_steps is None else min(total, s.max_steps)
        warmup = round(s.warmup_ratio * self.total)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda k: (k + 1) / (warmup + 1) if k < warmup else max(0.0, (self.total - k) / max(1, self.total - warmup)),
        )

    def save_checkpoint(self) -> None:
        if self.main:
            _save_checkpoint(self.checkpoint, self.identity, self.core, self.optimizer, self.schedule, self.state)
        self.accelerator.wait_for_everyone()

    def loop(self, progress: bool, on_step, progress_every: float = EVERY_S) -> bool:
        """Epochs until done, stopped early or interrupted; True when interrupted."""
        state, s = self.state, self.settings
        if state["step"] == 0 and not state["history"] and self.dev_rows:
            before = evaluate(self.core, self.dev_rows, s.batch_size, self.pad_id, self.device)
            state["history"].append({"epoch": 0, "step": 0, "dev_loss": before})
            _say(self.main, f"dev loss before training: {before:.4f} ({len(self.dev_rows)} examples)")
        self.bar = Progress(self.total, "step", s.method, initial=state["step"], every_s=progress_every,
                            enabled=progress and self.main)
        self.progress, self.on_step = progress, on_step
        self.started, self.seconds_before = time.perf_counter(), state["seconds"]
        self.tokens_seen, self.step_tokens = 0, []
        interrupted = False
        with self.stop.installed():
            while state["epochs_done"] < s.epochs and state["step"] < self.total:
                losses, interrupted = self._epoch(state["epochs_done"])
                if interrupted or self._end_epoch(losses):
                    break
        self.bar.close()
        state["seconds"] = self.seconds_before + time.perf_counter() - self.started
        return interrupted

    def _epoch(self, epoch: int) -> tuple[list[float], bool]:
        """The optimizer steps left in this epoch: their losses, and whether interrupted."""
        order = list(range(len(self.train_rows)))
        random.Random(self.settings.seed * 100_003 + epoch).shuffle(order)
        if len(order) % self.per_micro and self.world > 1:  # every rank gets a full batch, as DistributedSampler
            order += order[: self.per_micro - len(order) % self.per_micro]
        losses = []
        for index in range(self.state["step"] - epoch * self.steps_per_epoch, self.steps_per_epoch):
            if self.state["step"] >= self.total:
                break
            seen = self.tokens_seen
            losses.append(self._step(order, index))
            self.step_tokens.append((self.tokens_seen - seen) * self.world)
            self.bar.update(1, tokens=self.step_tokens[-1], loss=f"{losses[-1]:.3f}", epoch=epoch + 1)
            if self.on_step is not None:
                self.on_step(self.state["step"], self.stop)
            if _any_rank(self.accelerator, self.stop.requested):
                return losses, True
            if self.state["step"] % self.settings.save_every == 0:
                self.state["seconds"] = self.seconds_before + time.perf_counter() - self.started
                self.save_checkpoint()
        return losses, False

    def _step(self, order: list[int], index: int) -> float:
        """One optimizer step over its micro-batches (gradients synced on the last); its loss."""
        s = self.settings
        micros = range(index * s.grad_accum, min((index + 1) * s.grad_accum, self.micro_per_epoch))
        step_nll = step_count = 0.0
        for m, micro in enumerate(micros):
            batch_ids = order[micro * self.per_micro + self.rank * s.batch_size:][: s.batch_size]
            batch = {k: v.to(self.device) for k, v in collate([self.train_rows[i] for i in batch_ids],
                                                              self.pad_id).items()}
            sync = m == len(micros) - 1
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                nll, count = self.model(**batch)
                self.accelerator.backward(nll / count.clamp(min=1) / len(micros))
            step_nll += float(nll.detach())
            step_count += float(count)
            self.tokens_seen += int(batch["attention_mask"].sum())
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        return step_nll / max(step_count, 1)

    def _end_epoch(self, losses: list[float]) -> bool:
        """Record the epoch (dev loss, best state), checkpoint; True to stop early."""
        state, s = self.state, self.settings
        record: dict[str, Any] = {"epoch": state["epochs_done"] + 1, "step": state["step"]}
        if losses:
            record["train_loss"] = sum(losses) / len(losses)
        if self.dev_rows:
            record["dev_loss"] = evaluate(self.core, self.dev_rows, s.batch_size, self.pad_id, self.device)
            if state["best_dev"] is None or record["dev_loss"] < state["best_dev"]:
                state["best_dev"], state["bad_epochs"] = record["dev_loss"], 0
                state["best"] = _trainable_state(self.core, clone=True)
            else:
                state["bad_epochs"] += 1
        state["history"].append(record)
        state["epochs_done"] += 1
        if self.main:
            if self.progress:
                self.bar.write(_describe_epoch(record))
            else:
                _say(self.main, _describe_epoch(record))
        state["seconds"] = self.seconds_before + time.perf_counter() - self.started
        self.save_checkpoint()
        if self.dev_rows and state["bad_epochs"] >= s.patience:
            _say(self.main, f"dev loss has not improved for {s.patience} epoch(s): stopping early.")
            return True
        return False

    def write(self, output: Path, checkpoint_dir: Path, backbone_name, data_summary) -> TrainResult:
        """The best state's prefix file (or fine-tuned model folder); the checkpoint goes."""
        state, core = self.state, self.core
        if state["best"] is not None:
            _load_trainable_state(core, state["best"])
        meta = _meta(self.backbone, backbone_name, core, self.settings, state, self.total, data_summary,
                     len(self.train_rows), self.world)
        prefix = None
        if self.settings.method != "finetune":
            key, value = core.prefix_arrays()
            prefix = Prefix(key=key, value=value, meta=meta, **core.extra_arrays())
        if self.main:
            if prefix is None:
                save_finetuned(self.backbone, output, meta)
            else:
                save_prefix(output, prefix)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the output is complete: nothing to resume
        self.accelerator.wait_for_everyone()
        return TrainResult(output, False, state["step"], self.total, state["history"], meta, self.checkpoint,
                           prefix, core)


def _say(main: bool, message: str) -> None:
    if main:
        print(message, file=sys.stderr, flush=True)


def _describe_epoch(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']} (step {record['step']})"]
    if "train_loss" in record:
        parts.append(f"train loss {record['train_loss']:.4f}")
    if "dev_loss" in record:
        parts.append(f"dev loss {record['dev_loss']:.4f}")
    return ", ".join(parts)


def _any_rank(accelerator, flag: bool) -> bool:
    """Every rank stops at the same step, or the next gradient all-reduce would wait forever."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def _trainable_state(model: PrefixLM, clone: bool = False) -> dict[str, torch.Tensor]:
    part = model.backbone if model.method == "finetune" else model.trainable
    return {k: (v.detach().clone() if clone else v) for k, v in part.state_dict().items()}


def _load_trainable_state(model: PrefixLM, state: dict[str, torch.Tensor]) -> None:
    part = model.backbone if model.method == "finetune" else model.trainable
    part.load_state_dict(state)


def _identity(backbone: Backbone, settings: TrainSettings, rows: Sequence[Tokenised], world: int) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: backbone, settings, data, processes."""
    import hashlib

    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.n_prompt}:{','.join(map(str, row.ids))};".encode())
    return {
        "backbone_fingerprint": backbone.fingerprint,
        "settings": {k: getattr(settings, k) for k in _RESUME_MUST_MATCH},
        "data_sha256": digest.hexdigest(),
        "processes": world,
    }


def _save_checkpoint(path: Path, identity, model: PrefixLM, optimizer, schedule, state) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "state": state,
    }
    with atomic_write(path) as f:
        torch.save(payload, f)


def _load_checkpoint(path: Path, identity, model: PrefixLM, optimizer, schedule) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise TrainingError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); "
                            "delete it to start over.") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a prefixkit checkpoint of format {CHECKPOINT_FORMAT}.")
    theirs = payload["identity"]
    if theirs["backbone_fingerprint"] != identity["backbone_fingerprint"]:
        raise TrainingError(f"{path}: written for another backbone; resume with the backbone it was trained on.")
    differing = [k for k in identity["settings"] if theirs["settings"].get(k) != identity["settings"][k]]
    if differing:
        changes = ", ".join(f"{k} {theirs['settings'].get(k)!r} -> {identity['settings'][k]!r}" for k in differing)
        raise TrainingError(f"{path}: the checkpoint was written with other settings ({changes}); "
                            "resume with the same options, or delete it to start over.")
    if theirs["data_sha256"] != identity["data_sha256"]:
        raise TrainingError(f"{path}: the training data differ from the checkpoint's (file, --limit, --seed "
                            "or --dev-fraction changed); resume with the same data.")
    if theirs["processes"] != identity["processes"]:
        raise TrainingError(f"{path}: written by {theirs['processes']} process(es), resumed with "
                            f"{identity['processes']}; the data order would change. Use the same number.")
    try:
        _load_trainable_state(model, payload["trainable"])
        optimizer.load_state_dict(payload["optimizer"])
        schedule.load_state_dict(payload["schedule"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainingError(f"{path}: the checkpoint does not fit this model ({e}).") from None
    return payload["state"]


def _meta(backbone, backbone_name, model: PrefixLM, settings: TrainSettings, state, total, data_summary,
          n_train, world) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        prefixkit_version = version("prefixkit")
    except PackageNotFoundError:
        prefixkit_version = None
    a = backbone.architecture
    P = model.prefix_len
    dev = [r["dev_loss"] for r in state["history"] if "dev_loss" in r]
    train_losses = [r["train_loss"] for r in state["history"] if "train_loss" in r]
    return make_meta(
        backbone.fingerprint, max(P, 1),
        template=settings.template,
        stop=list(settings.stop),
        method=settings.method,
        backbone=backbone_name or str(backbone.path),
        settings={**dataclasses.asdict(settings), "lr": settings.learning_rate, "processes": world},
        data={**(data_summary or {}), "train_tokenised": n_train},
        losses={
            "dev_before": dev[0] if dev and state["history"][0].get("step") == 0 else None,
            "dev_best": state["best_dev"],
            "train_last_epoch": train_losses[-1] if train_losses else None,
            "history": state["history"],
        },
        parameters={
            # encoder-decoder: encoder self-attention + decoder self- and cross-attention layers
            "prefix": (a.n_encoder_layers + a.n_layers * (2 if a.is_encoder_decoder else 1)) * 2 * a.n_kv_heads * P * a.head_dim,
            "trained": count_parameters(model),
            "backbone": count_parameters(model.backbone, trainable_only=False),
        },
        steps=state["step"],
        total_steps=total,
        seconds=round(state["seconds"], 1),
        prefixkit_version=prefixkit_version,
    )


def save_finetuned(backbone: Backbone, output: Path, meta: dict[str, Any]) -> None:
    """A fine-tuned model as a Hugging Face folder (pt-export takes it like any backbone), with
    the template and training record beside it; the folder appears whole or not at all."""
    import json

    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.model.save_pretrained(tmp)
    backbone.tokenizer.save_pretrained(tmp)
    record = {k: v for k, v in meta.items() if k not in ("format", "prefix_len", "backbone_fingerprint")}
    record["base_backbone_fingerprint"] = meta["backbone_fingerprint"]
    (tmp / FINETUNE_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    replace_folder(tmp, output)
