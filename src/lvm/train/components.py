"""A run's components, built in one place: first everything that can be wrong with the inputs is checked
(`plan`: data, model config, the checkpoint to resume, batch arithmetic, schedule, run identity; nothing
written, no process group), then the process group, the logger and the run's files, the engine, the loader,
the checkpointer with the resumed `TrainState`, the metrics, the validator (`build`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lvm.data.mixture import DistributedLoader
from lvm.launch_env import export_torch_env, launch_env, local_device
from lvm.model.presets import count_parameters
from lvm.train import checkpoint as ckpt
from lvm.train import elastic, init_from, optimizers
from lvm.train.bad_steps import BadSteps
from lvm.train.checkpointer import Checkpointer, StopRequest
from lvm.train.data_setup import build_windows, describe, open_data
from lvm.train.ds_config import load_ds_config, zero_stage
from lvm.train.engine import build_engine, precision_dtype
from lvm.train.metrics import MetricsLogger, TrainMetrics
from lvm.train.options import RunOptions
from lvm.train.schedule import run_schedule
from lvm.train.state import TrainState
from lvm.train.validation import Validator


def finished_line(tag_dir: Path, step: int, max_steps: int) -> str:
    return (f"run already finished: {tag_dir} is at step {step} of --max-steps {max_steps}; nothing to train, "
            "nothing written (raise --max-steps to train on)")


@dataclass
class Plan:
    """What the run is, decided and checked before any compute."""

    env: object
    device: torch.device
    sources: list
    windows: object
    tok_info: dict
    data_seconds: float
    cfg: object
    ds: dict
    sched: object
    resume: elastic.Resume | None
    identity: dict
    run_dir: Path
    ckpt_dir: Path


def plan(opts: RunOptions, given: set[str]) -> Plan | None:
    """None for a run that already reached --max-steps (one line from rank 0; nothing written)."""
    env = launch_env()
    export_torch_env(env)
    device = local_device(env)  # cuda:LOCAL_RANK, or cuda:0 where the cluster shows each task one GPU
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    t = time.perf_counter()
    sources, tok_info = open_data(opts.data, opts.val_data, opts.verify_data, env.rank, env.world_size)
    windows = build_windows(sources, opts.seq_len, opts.packing, opts.seed, opts.data_weights)
    t = time.perf_counter() - t
    cfg = init_from.model_config(opts, given)  # --model, or the --init-from folder's architecture
    run_dir = Path(opts.run_dir())
    ckpt_dir = run_dir / "checkpoints"
    resume = elastic.find_resume(opts.resume, ckpt_dir)  # from any world size (lvm.train.elastic)
    given = elastic.keep_global_batch(opts, given, resume)
    ds_raw = load_ds_config(opts.ds_config)
    if opts.gpu_mem_gib is not None:
        from lvm.plan.apply import fill_from_plan

        ds_raw = fill_from_plan(ds_raw, opts, env.world_size, given=given, device=device)
    ds = elastic.resolve_keeping_batch(ds_raw, opts, given, env.world_size, device, resume)
    optimizers.check(opts.optimizer, ds, device)  # e.g. 8-bit AdamW where bitsandbytes cannot run: one line, now
    sched = run_schedule(opts, given, resume.schedule if resume else None, resume.step if resume else 0)
    identity = {"zero_stage": zero_stage(ds), "model": cfg.to_diff_dict(), "seq_len": opts.seq_len, "packing": opts.packing}
    ckpt.check_run_identity(ckpt_dir, identity, write=False)
    if resume and resume.ckpt_dir != ckpt_dir:
        ckpt.check_run_identity(resume.ckpt_dir, identity, write=False)
    if resume and resume.step >= opts.max_steps:  # before anything is written: a finished run's files stay as they are
        if env.rank == 0:
            print(finished_line(resume.ckpt_dir / resume.tag, resume.step, opts.max_steps), flush=True)
        return None
    elastic.check_data(resume, windows, opts.data_changed)  # data that changed since the checkpoint: refused now
    return Plan(env, device, sources, windows, tok_info, t, cfg, ds, sched, resume, identity, run_dir, ckpt_dir)


@dataclass
class Components:
    opts: RunOptions
    device: torch.device
    engine: object
    optimizer: object
    attention: str
    dtype: torch.dtype
    loader: DistributedLoader
    state: TrainState
    checkpointer: Checkpointer
    metrics: TrainMetrics
    validate: Validator
    bad_steps: BadSteps
    sched: object
    log: MetricsLogger
    keepalive: object  # ZeRO-3's HfDeepSpeedConfig: alive as long as the engine


def introduce(log: MetricsLogger, opts: RunOptions, p: Plan) -> None:
    """The run's first console lines, and its files (rank 0): model_config, options, ds_config, tokenizer."""
    cfg, ds, env = p.cfg, p.ds, p.env
    log.console(f"model {opts.model}: {count_parameters(cfg) / 1e6:.2f}M parameters; {cfg.num_hidden_layers} layers, hidden "
                f"{cfg.hidden_size}; vocab {cfg.vocab_size}; seq {opts.seq_len}; ZeRO-{zero_stage(ds)}, {opts.precision}, "
                f"world {env.world_size}, micro batch {opts.micro_batch} x accumulation {opts.grad_accum}")
    log.console(f"data: {len(p.sources)} source{'s' if len(p.sources) > 1 else ''} opened in {p.data_seconds:.3f}s"
                + (" (every token verified)" if opts.verify_data else " (counts from index.json / shard metadata)"))
    for s, stream, w in zip(p.sources, p.windows.sources, p.windows.weights, strict=True):
        share = f"weight {w:.4f}, " if len(p.sources) > 1 else ""
        log.console(f"train {s.name} ({s.train_dir}): {describe(s.train)}; {share}{stream.per_epoch} windows/epoch ({opts.packing})")
        if s.val is not None:
            log.console(f"val {s.name} ({s.val_dir}): {describe(s.val)}")
    if env.rank == 0:
        p.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(str(p.run_dir / "model_config.json"))
        (p.run_dir / "options.json").write_text(json.dumps(asdict(opts), indent=2))
        (p.run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
        (p.run_dir / "tokenizer.json").write_text(json.dumps(p.tok_info, indent=2))
    log.console(f"schedule {p.sched.describe()}")


def build(opts: RunOptions, given: set[str], stop: StopRequest) -> Components | None:
    """Every component of the run, the checkpoint it resumes from loaded; None where there is nothing to train."""
    import deepspeed

    p = plan(opts, given)
    if p is None:
        return None
    env, resume = p.env, p.resume
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False)
    log = MetricsLogger(p.run_dir, env.rank == 0)
    introduce(log, opts, p)
    where = elastic.prepare_load(resume, env.world_size, env.rank, p.ds)  # converted once if the world size changed
    names = p.windows.names
    engine, optimizer, attn, keepalive = build_engine(opts, p.cfg, p.ds, p.device, env.rank, resume is None, len(names) > 1, log)
    bad = BadSteps(optimizer, opts.max_bad_steps, opts.precision, log)  # a non-finite loss: engine.step() without an update
    # the next micro-batches are assembled (and pinned, on CUDA) by a background thread while this one trains
    loader = DistributedLoader(p.windows, opts.micro_batch, env.rank, env.world_size, prefetch=2, pin=torch.cuda.is_available())
    state = TrainState(loader, env.rank)
    checkpointer = Checkpointer(p.ckpt_dir, engine, opts, p.ds, p.sched, p.identity, env.world_size, env.rank, stop, log)
    if resume:
        checkpointer.load(where, state, optimizer)
        if state.step >= opts.max_steps:  # a tag without run_state.json (older versions): its step is known only now
            log.console(finished_line(where[0] / resume.tag, state.step, opts.max_steps))
            log.close()
            return None
        log.console(elastic.describe(resume, state.step, env.world_size, opts, universal=where[1] != resume.tag))
    if env.rank == 0:
        ckpt.check_run_identity(p.ckpt_dir, p.identity, write=True)
    metrics = TrainMetrics(names, p.cfg, p.device, env.world_size, opts.precision, opts.max_steps, log)
    val_sets = [(s.name, s.val) for s in p.sources if s.val is not None]
    validate = Validator(val_sets, opts, env.rank, env.world_size, log)
    return Components(opts, p.device, engine, optimizer, attn, precision_dtype(opts.precision), loader, state, checkpointer,
                      metrics, validate, bad, p.sched, log, keepalive)
