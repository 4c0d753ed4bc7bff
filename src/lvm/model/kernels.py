"""Optional speed-ups of a built LlamaForCausalLM: Liger-Kernel's fused kernels and torch.compile.

Each is asked for by a flag (`--kernels liger`, `--compile`) and each, when it cannot run here, leaves the
model as it was and returns one line saying why (the trainer logs it); nothing is half applied.

- `--kernels liger` (needs the liger-kernel package, Triton and a CUDA device): Liger's RMSNorm, SwiGLU MLP
  and RoPE Triton kernels patched into this model instance, and its fused linear cross-entropy (the output
  head and the loss computed chunk by chunk, never materialising the b x s x vocab logits) unless the caller
  needs the logits of a training forward (a mixture's per-source loss reads them) or the model is partitioned by
  ZeRO-3 (the fused loss reads the output weight outside the head's forward, where ZeRO-3 never gathers it).
- `--compile`: `torch.compile` of every decoder layer (one graph serves all layers; PyTorch inlines the
  modules, so their parameters are inputs, not constants). The whole model is not compiled: the loss, the
  embedding and DeepSpeed's hooks stay eager. Not under ZeRO-3, whose parameter gathering hooks fire inside
  each layer. Compilation happens at the first forward, and that forward says in one line what happened: the
  layers compiled (graphs and seconds), or torch.compile failed (the error's first line) or captured nothing,
  and every layer runs eagerly from then on. Errors are not suppressed globally (no
  `torch._dynamo.config.suppress_errors`): a compilation error is caught around each compiled layer call,
  where it is told apart from an error of the layer's own computation, which is raised as it is.
"""

from __future__ import annotations

import importlib.util
import time

import torch

KERNEL_CHOICES = ("none", "liger")


def liger_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed"
    if device.type != "cuda":
        return f"its Triton kernels need a CUDA device (this run is on {device.type})"
    return None


def apply_kernels(model, choice: str, device: torch.device, need_logits: bool = False) -> str:
    """Patch `model` with the fused kernels of `choice`; returns the one line to log."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"--kernels {choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "none":
        return "kernels: transformers' own modules"
    why = liger_unavailable(device)
    if why is not None:
        return f"--kernels liger: {why}; using transformers' own modules"
    no_flce = fused_loss_unavailable(model, need_logits)
    flce = no_flce is None
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=flce, model=model)
    except Exception as e:  # a liger release that does not know this transformers version, say
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"--kernels liger: liger-kernel could not patch this model ({type(e).__name__}: {first}); using transformers' own modules"
    head = "fused linear cross-entropy" if flce else f"the plain output head and loss ({no_flce})"
    return f"kernels: Liger RMSNorm, SwiGLU, RoPE and {head}"


def zero3_partitioned(model) -> bool:
    """Whether `model` was built inside deepspeed.zero.Init (its parameters carry ZeRO-3's partitioning state)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fused_loss_unavailable(model, need_logits: bool) -> str | None:
    """Why Liger's fused linear cross-entropy cannot replace the output head and loss of `model`, or None.

    Under ZeRO-3 it cannot: the fused loss reads `lm_head.weight` directly instead of calling the head module,
    and ZeRO-3 gathers a partitioned parameter only around its own module's forward, so the kernel would get
    the empty local shard (a size mismatch at the first step; trl issues #3368, #5891)."""
    if need_logits:
        return "the per-source loss needs the logits"
    if zero3_partitioned(model):
        return "under ZeRO-3 the fused loss would read lm_head.weight ungathered"
    return None


def compile_unavailable(zero_stage: int) -> str | None:
    if not hasattr(torch, "compile"):
        return f"this PyTorch ({torch.__version__}) has no torch.compile"
    if zero_stage == 3:
        return "ZeRO-3 gathers parameters with hooks inside every layer, which torch.compile does not trace"
    return None


def describe_error(e: BaseException) -> str:
    """`Type: first line` of an error, and of what caused it (a backend's own error inside BackendCompilerFailed)."""
    parts = []
    while e is not None and len(parts) < 3:
        first = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
        parts.append(f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__)
        e = getattr(e, "inner_exception", None) or e.__cause__
    return " <- ".join(parts)


class CompiledLayers:
    """The decoder layers of one model under torch.compile, and what became of their compilation.

    Every layer calls its compiled forward through `call`: the first call compiles (through `backend`, which
    counts the graphs it is handed) and reports one line; a compilation error (a TorchDynamoException: the
    backend failed, or dynamo itself) at any call switches every layer to eager, says so in one line, and the
    call is answered eagerly. A call that compiled nothing (dynamo skipped the frame) counts as a fallback too."""

    def __init__(self, n_layers: int, backend, report):
        import torch._dynamo

        self.n, self.report = n_layers, report
        self.inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.name = backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
        self.graphs, self.eager, self.said = 0, False, False

        def counted(gm, example_inputs):  # one object for every layer: they share the compiled graph
            self.graphs += 1
            return self.inner(gm, example_inputs)

        counted.__name__ = self.name  # as dynamo's messages name the backend
        self.backend = counted

    def fall_back(self, why: str) -> None:
        self.eager = True
        self.report(f"--compile: {why}; the {self.n} decoder layers run eagerly")

    def call(self, layer, compiled, *args, **kwargs):
        if self.eager:
            return layer._call_impl(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            out = compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # compilation failed; the layer's own errors are not these
            self.fall_back(f"torch.compile failed {'at the first forward' if not self.said else 'on a later forward'} "
                           f"({describe_error(e)})")
            self.said = True
            return layer._call_impl(*args, **kwargs)
        if not self.said:
            self.said = True
            if self.graphs == 0:
                self.fall_back("torch.compile captured no graph of the decoder layers at the first forward")
            else:
                self.report(f"compile: the {self.n} decoder layers compiled at the first forward ({self.graphs} "
                            f"graph{'s' if self.graphs > 1 else ''}, {self.name}, {time.perf_counter() - t0:.1f} s)")
        return out


def compile_layers(model, zero_stage: int, report=None, backend="inductor") -> str:
    """Set every decoder layer of `model` for torch.compile (through `backend`) in place; returns the one line to log
    now. The first forward compiles and hands `report` (default: print) one line: compiled, or fell back to eager."""
    why = compile_unavailable(zero_stage)
    if why is not None:
        return f"--compile: {why}; running eagerly"
    import torch._dynamo

    layers = list(model.model.layers)
    watch = CompiledLayers(len(layers), backend, report or (lambda line: print(line, flush=True)))
    for layer in layers:
        compiled = torch.compile(layer._call_impl, backend=watch.backend)

        def call(*args, _layer=layer, _compiled=compiled, **kwargs):
            return watch.call(_layer, _compiled, *args, **kwargs)

        layer._compiled_call_impl = call  # what nn.Module.compile sets: __call__ goes through it
    return (f"compile: {len(layers)} decoder layers set for torch.compile ({watch.name}); they compile at the first "
            "forward, which says whether they did")
