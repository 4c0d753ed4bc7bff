"""The pretraining run: validate inputs, build the DeepSpeed engine, train, evaluate, checkpoint."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lvm.data.mixture import DistributedLoader
from lvm.data.packing import causal_lm_loss
from lvm.data.shards import ShardError
from lvm.launch_env import export_torch_env, launch_env, local_device
from lvm.model.attention import packed_attention_kwargs, resolve_attention
from lvm.model.kernels import apply_kernels, compile_layers
from lvm.model.presets import count_parameters
from lvm.model.vocab import IGNORE_INDEX, PAD_ID
from lvm.train import bad_steps, elastic, init_from, optimizers
from lvm.train import checkpoint as ckpt
from lvm.train.data_setup import build_windows, describe, open_data
from lvm.train.ds_config import ConfigError, load_ds_config, zero_stage
from lvm.train.metrics import (
    MetricsLogger,
    Throughput,
    device_memory_gib,
    device_peak_flops,
    device_reserved_gib,
    window_flops,
    window_work,
)
from lvm.train.options import RunOptions
from lvm.train.schedule import run_schedule
from lvm.train.validation import evaluate

USER_ERRORS = (ShardError, ConfigError, ckpt.CheckpointError, ValueError, FileNotFoundError)


class StopRequest:
    """SIGTERM / SIGUSR1 (cluster pre-emption): finish the step, save, exit cleanly."""

    def __init__(self):
        self.signal = None
        self.since = None  # time.monotonic() of the first request
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signal is None:
            self.since = time.monotonic()
        self.signal = signum


def no_decay(name: str) -> bool:
    return "norm" in name or name.endswith(".bias")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for n, p in model.named_parameters():
        (plain if no_decay(n) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_model(cfg, ds: dict, grad_ckpt: bool, attention: str = "sdpa", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, init: bool = True):
    """LlamaForCausalLM with `attention` (an implementation `lvm.model.attention.resolve_attention` chose).

    Under ZeRO-3 it is created inside deepspeed.zero.Init (never whole on one rank). Otherwise it is built on
    the meta device and materialised once, on `device` with its parameters in `dtype` (buffers such as RoPE's
    inv_freq stay fp32, as DeepSpeed keeps them): no fp32 host copy of the whole model, no init on the host.
    The weights are then drawn by the model's own init (`init`; normal(0, initializer_range), norms 1) with
    the current RNG, or left unset for `--init-from` to fill; the buffers are always computed from `cfg`."""
    from transformers import LlamaForCausalLM

    keepalive = None
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds)  # makes transformers build and init the model under zero.Init
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=attention)
    else:
        model = materialise(cfg, attention, device, dtype, init)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive


def materialise(cfg, attention: str, device: torch.device | str, dtype: torch.dtype, init: bool):
    """The model built on the meta device, then allocated once on `device` (see `build_model`)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=attention)
    for p in model.parameters():
        p.data = p.data.to(dtype)  # still meta: no memory
    model.to_empty(device=device)  # uninitialised memory, buffers included
    with torch.no_grad():
        if init:
            model.initialize_weights()  # every module's _init_weights, RoPE's buffers among them
        else:
            for m in model.modules():
                if "RotaryEmbedding" in type(m).__name__:
                    model._init_weights(m)  # inv_freq / original_inv_freq from the config
    model.tie_weights()
    return model


@torch.no_grad()
def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL sum and target count of each window (float64), one window at a time (bounded memory).

    `targets` are already shifted (`lvm.data.packing.Batch.targets`): logits[b, t] is scored against
    targets[b, t], every position, as the model's own loss does with `shift_labels`."""
    sums, counts = [], []
    for b in range(logits.shape[0]):
        target = targets[b]
        sums.append(F.cross_entropy(logits[b].float(), target, ignore_index=IGNORE_INDEX, reduction="sum"))
        counts.append((target != IGNORE_INDEX).sum())
    return torch.stack(sums).double(), torch.stack(counts).double()


def shutdown(barrier: bool) -> None:
    """Leave the process group cleanly: a gloo/NCCL group left to interpreter exit can abort the process."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def finished_line(tag_dir: Path, step: int, max_steps: int) -> str:
    return (f"run already finished: {tag_dir} is at step {step} of --max-steps {max_steps}; nothing to train, "
            "nothing written (raise --max-steps to train on)")


def train(opts: RunOptions, given: set[str]) -> int:
    try:
        rc = _train(opts, given)
    except BaseException:
        shutdown(barrier=False)  # another rank may not have failed: do not wait for it
        raise
    shutdown(barrier=True)
    return rc


def _train(opts: RunOptions, given: set[str]) -> int:
    import deepspeed

    env = launch_env()
    export_torch_env(env)
    stop = StopRequest()  # from the start: SLURM's SIGTERM may come at any time
    cuda = torch.cuda.is_available()
    device = local_device(env)  # cuda:LOCAL_RANK, or cuda:0 where the cluster shows each task one GPU
    if cuda:
        torch.cuda.set_device(device)

    # Everything that can be wrong with the inputs is checked before any compute.
    t_data = time.perf_counter()
    sources, tok_info = open_data(opts.data, opts.val_data, opts.verify_data, env.rank, env.world_size)
    windows = build_windows(sources, opts.seq_len, opts.packing, opts.seed, opts.data_weights)
    t_data = time.perf_counter() - t_data
    cfg = init_from.model_config(opts, given)  # --model, or the --init-from folder's architecture
    names = windows.names
    val_sets = [(s.name, s.val) for s in sources if s.val is not None]
    run_dir = Path(opts.run_dir())
    ckpt_dir = run_dir / "checkpoints"
    resume = elastic.find_resume(opts.resume, ckpt_dir)  # from any world size (lvm.train.elastic)
    given = elastic.keep_global_batch(opts, given, resume)
    ds_raw = load_ds_config(opts.ds_config)
    if opts.gpu_mem_gib is not None:
        from lvm.plan.planner import fill_from_plan

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
        return 0
    elastic.check_data(resume, windows, opts.data_changed)  # data that changed since the checkpoint: refused now

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    rank0 = env.rank == 0
    log = MetricsLogger(run_dir, rank0)
    n_params = count_parameters(cfg)
    log.console(f"model {opts.model}: {n_params / 1e6:.2f}M parameters; {cfg.num_hidden_layers} layers, hidden "
                f"{cfg.hidden_size}; vocab {cfg.vocab_size}; seq {opts.seq_len}; ZeRO-{zero_stage(ds)}, {opts.precision}, "
                f"world {env.world_size}, micro batch {opts.micro_batch} x accumulation {opts.grad_accum}")
    log.console(f"data: {len(sources)} source{'s' if len(sources) > 1 else ''} opened in {t_data:.3f}s"
                + (" (every token verified)" if opts.verify_data else " (counts from index.json / shard metadata)"))
    for s, stream, w in zip(sources, windows.sources, windows.weights, strict=True):
        share = f"weight {w:.4f}, " if len(sources) > 1 else ""
        log.console(f"train {s.name} ({s.train_dir}): {describe(s.train)}; {share}{stream.per_epoch} windows/epoch ({opts.packing})")
        if s.val is not None:
            log.console(f"val {s.name} ({s.val_dir}): {describe(s.val)}")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(str(run_dir / "model_config.json"))
        (run_dir / "options.json").write_text(json.dumps(asdict(opts), indent=2))
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
        (run_dir / "tokenizer.json").write_text(json.dumps(tok_info, indent=2))

    log.console(f"schedule {sched.describe()}")
    where = elastic.prepare_load(resume, env.world_size, env.rank, ds)  # converted once if the world size changed
    torch.manual_seed(opts.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.precision, torch.float32)
    attn, note = resolve_attention(opts.attention, device, dtype)
    if note:
        log.console(note)
    # on this rank's device in the compute dtype; --init-from fills the weights instead of a random init
    model, _keepalive = build_model(cfg, ds, opts.grad_ckpt, attn, device=device, dtype=dtype,
                                    init=not (opts.init_from and resume is None))
    log.console(f"attention: {attn}" + (" (packed sentences: varlen, cu_seqlens from the packing)" if attn == "flash_attention_2"
                                        and opts.packing == "sentence" else " (packed sentences: block-diagonal causal mask)"
                                        if opts.packing == "sentence" else ""))
    log.console(apply_kernels(model, opts.kernels, device, need_logits=len(names) > 1))
    if opts.compile:
        log.console(compile_layers(model, zero_stage(ds), report=log.console))  # and one line at the first forward
    if opts.init_from and resume is None:
        n = init_from.load_weights(model, opts.init_from, env.rank)
        log.console(f"initialised from {opts.init_from} ({n} tensors); optimizer and schedule start fresh")
    groups = param_groups(model, opts.weight_decay)
    client_opt, ds = optimizers.make_optimizer(opts.optimizer, groups, ds, device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client_opt, model_parameters=groups, config=ds)
    gate = bad_steps.UpdateGate(optimizer)  # a non-finite loss: engine.step() without an update
    # the next micro-batches are assembled (and pinned, on CUDA) by a background thread while this one trains
    loader = DistributedLoader(windows, opts.micro_batch, env.rank, env.world_size, prefetch=2, pin=cuda)
    step, skipped_steps = 0, 0
    if resume:
        client = elastic.load(engine, optimizer, where)
        changed = loader.load_state_dict(client["loader"], opts.data_changed)
        if changed:
            log.console(changed)
        ckpt.set_rng_state(client["rng"], env.rank)
        step, skipped_steps = int(client["step"]), int(client.get("skipped_steps", 0))
        if step >= opts.max_steps:  # a tag without run_state.json (older versions): its step is known only now
            log.console(finished_line(where[0] / resume.tag, step, opts.max_steps))
            log.close()
            return 0
        log.console(elastic.describe(resume, step, env.world_size, opts, universal=where[1] != resume.tag))
    if rank0:
        ckpt.check_run_identity(ckpt_dir, identity, write=True)

    peak = device_peak_flops(opts.precision, device)
    # this rank's work; summed over the ranks at each log step (lvm.train.metrics: PAD is no work)
    throughput = Throughput(torch.cuda.synchronize if cuda else None)
    work = [0.0, 0.0, 0.0]  # this rank's tokens, window tokens and model FLOPs since the last log (host numbers)
    bad_in_row = 0

    save_timer = ckpt.SaveTimer(opts.save_every_minutes)

    def save(reason: str):
        with throughput.paused():  # not training time
            _save(reason)

    def _save(reason: str):
        t_save = time.monotonic()
        tag = ckpt.tag_for(step)
        if rank0:  # before DeepSpeed's files: a tag that 'latest' names always has it
            ckpt.write_run_state(ckpt_dir / tag, elastic.run_state(step, env.world_size, opts, ds, sched, skipped_steps,
                                                                           data=loader.state_dict()))
        client = {"loader": loader.state_dict(), "rng": ckpt.gather_rng_states(), "step": step, "skipped_steps": skipped_steps,
                  "identity": identity, "options": asdict(opts), "schedule": sched.as_dict()}
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
        if dist.is_initialized():
            dist.barrier()
        if rank0:
            ckpt.prune(ckpt_dir, opts.keep_last)
        save_timer.saved()
        log.console(f"saved checkpoint {ckpt_dir / tag} ({reason}) in {time.monotonic() - t_save:.1f}s")

    def validate():
        with throughput.paused():  # not training time
            _validate()

    def _validate():
        if not val_sets or opts.eval_every == 0:
            return
        r = evaluate(engine, val_sets, opts.seq_len, opts.micro_batch, env.rank, env.world_size, opts.eval_max_sentences)
        flat = {"loss": r["loss"], "perplexity": r["perplexity"], **{f"perplexity/{k}": v for k, v in r["perplexity_by_kind"].items()},
                **{f"loss/{k}": v for k, v in r["loss_by_source"].items()}}
        log.log(step, flat, prefix="val")
        kinds = " ".join(f"{k} {v:.1f}" for k, v in r["perplexity_by_kind"].items())
        per_source = " | " + " ".join(f"{k} {v:.4f}" for k, v in r["loss_by_source"].items()) if len(val_sets) > 1 else ""
        log.console(f"step {step} val loss {r['loss']:.4f} ppl {r['perplexity']:.2f} | {kinds}{per_source}")

    early = torch.tensor(1.0 if stop.signal else 0.0, device=device)
    if dist.is_initialized():
        dist.all_reduce(early, op=dist.ReduceOp.MAX)
    if early.item():  # signalled while starting: nothing trained since the checkpoint, nothing to save
        log.console("stopping on request before the first step; nothing new to save")
        log.close()
        return 0
    engine.train()
    # Losses stay on the device; the host syncs once per optimizer step, for one all-reduce that
    # carries the count of non-finite losses and the stop request, just before the update.
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_n = torch.zeros((), dtype=torch.float64, device=device)
    # per source: NLL sums and target tokens of its windows (mixtures only: one extra CE per window)
    src_nll = torch.zeros(len(names), dtype=torch.float64, device=device)
    src_n = torch.zeros(len(names), dtype=torch.float64, device=device)
    while step < opts.max_steps:
        nonfinite = torch.zeros((), device=device)
        for micro in range(opts.grad_accum):
            b = loader.next_batch()
            # work: the seq_len input positions of each window (a concat window's extra token is only a target)
            tokens, sum_sq = window_work(b.input_ids, b.position_ids, PAD_ID)
            work = [work[0] + tokens, work[1] + b.input_ids.numel(), work[2] + window_flops(cfg, tokens, sum_sq)]
            batch = b.model_inputs(device)  # the loss: mean over every position with a target (shift_labels)
            out = engine(**batch, **packed_attention_kwargs(batch.get("position_ids"), attn, dtype), use_cache=False)
            loss = causal_lm_loss(engine, out, batch["shift_labels"])
            ok = torch.isfinite(loss.detach())
            nonfinite += ~ok
            win_loss += torch.where(ok, loss.detach().double(), 0.0)
            win_n += ok
            if len(names) > 1:
                nll, cnt = window_nll(out.logits.detach(), batch["shift_labels"])
                src = b.sources.to(device)
                src_nll.index_add_(0, src, torch.where(ok, nll, 0.0))
                src_n.index_add_(0, src, torch.where(ok, cnt, 0.0))
            del out
            engine.backward(torch.where(ok, loss, loss.nan_to_num(0.0, 0.0, 0.0) * 0.0))
            if micro == opts.grad_accum - 1:
                flags = torch.stack([nonfinite, torch.tensor(1.0 if stop.signal else 0.0, device=device),
                                     torch.tensor(1.0 if save_timer.due() else 0.0, device=device)])
                if dist.is_initialized():
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                bad_loss, stop_now, save_due = (bool(x) for x in flags.tolist())
                bad_steps.set_lr(optimizer, sched.lr_at(step))  # a function of the step number only
                gate.closed = bad_loss  # no update, optimizer state untouched (lvm.train.bad_steps)
            engine.step()
        gate.closed = False
        step += 1
        # DeepSpeed itself skips (and clears) an update whose gradient norm is not finite
        why = bad_steps.classify(bad_loss, engine.was_step_applied(), opts.precision)
        if why == "overflow":
            log.console(f"step {step}: fp16 loss scale overflow, update skipped (loss scale lowered)")
        if why in ("loss", "grad"):
            skipped_steps += 1
            bad_in_row += 1
            log.console(f"step {step}: non-finite {why}, update skipped ({bad_in_row} in a row)")
            if bad_in_row >= opts.max_bad_steps:
                log.close()
                raise SystemExit(f"error: {bad_in_row} consecutive steps had a non-finite loss or gradient norm: lower --lr, "
                                 "check the data and model config, or resume from an earlier checkpoint")
        else:
            bad_in_row = 0
        if step % opts.log_every == 0 or step == opts.max_steps:
            sums = torch.cat([torch.stack([win_loss, win_n]), src_nll, src_n, torch.tensor(work, dtype=torch.float64, device=device)])
            if dist.is_initialized():
                dist.all_reduce(sums)
            total, count, *rest = sums.tolist()
            throughput.add(*rest[-3:])
            rest = rest[:-3]
            rate = throughput.read(peak, env.world_size)
            tps = rate["tokens_per_s"]
            loss_mean = total / count if count else None
            if len(names) > 1:
                by_source = {f"loss/{k}": a / c for k, a, c in zip(names, rest[: len(names)], rest[len(names) :], strict=True) if c}
            else:
                by_source = {f"loss/{names[0]}": loss_mean} if loss_mean is not None else {}
            epochs = loader.epochs_by_source()
            gn = engine.get_global_grad_norm()
            m = {"loss": loss_mean, "lr": sched.lr_at(step - 1),
                 "grad_norm": float(gn) if gn is not None else None, "tokens_per_s": tps,
                 "window_tokens_per_s": rate["window_tokens_per_s"], "tflops_per_s": rate["tflops_per_s"], "mfu": rate["mfu"],
                 "memory_gib": device_memory_gib(), "memory_reserved_gib": device_reserved_gib(), "skipped_steps": skipped_steps,
                 **({"epoch": loader.epoch} if len(names) == 1 else {f"epoch/{k}": v for k, v in epochs.items()}),
                 **by_source, "tokens_by_source": loader.tokens_by_source()}
            log.log(step, {k: v for k, v in m.items() if v is not None})
            mfu = f" mfu {m['mfu']:.1%}" if m["mfu"] is not None else ""
            mem = f" mem {m['memory_gib']:.1f}GiB" if m["memory_gib"] is not None else ""
            shown = f"{loss_mean:.4f}" if loss_mean is not None else "n/a"
            if len(names) == 1:
                ep = f" epoch {loader.epoch:.2f}"
            else:
                ep = " | " + " ".join(f"{k} loss {m.get(f'loss/{k}', float('nan')):.4f} epoch {e:.2f}" for k, e in epochs.items())
            log.console(f"step {step}/{opts.max_steps} loss {shown} lr {m['lr']:.2e} gnorm {m['grad_norm'] or 0:.3f} "
                        f"{tps:,.0f} tok/s{mfu}{mem}{ep}")
            win_loss.zero_()
            win_n.zero_()
            src_nll.zero_()
            src_n.zero_()
            work = [0.0, 0.0, 0.0]
            throughput.reset()
        if opts.eval_every and step % opts.eval_every == 0 and step < opts.max_steps and not stop_now:  # grace time: save first
            validate()
        if stop_now:
            save(f"signal {signal.Signals(stop.signal or signal.SIGTERM).name}")
            # launchers kill workers a fixed time after SIGTERM (torchrun and the deepspeed launcher: 30 s;
            # launch/README.md): this is what the grace must cover
            waited = f" {time.monotonic() - stop.since:.1f}s after the signal" if stop.since is not None else ""
            log.console(f"stopping on request{waited}; resume with --resume auto")
            log.close()
            return 0
        if step % opts.save_every == 0 and step < opts.max_steps:
            save("periodic")
        elif save_due and step < opts.max_steps:
            save(f"{opts.save_every_minutes:g} minutes since the last checkpoint")
    validate()
    save("end of training")
    log.close()
    return 0
