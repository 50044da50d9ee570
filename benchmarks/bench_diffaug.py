"""DiffAug throughput benchmark: fused train step, one-step denoise, DiffAug-Ensemble (issue 7).

Builds the real presets with random weights (ADM-256 unconditional UNet run at 224x224 + ResNet-50, 1000
classes) on synthetic uint8 data, jits each program once, times it after warm-up with `block_until_ready`,
and prints ONE table: images/s (ms/image for the ensemble), model FLOPs, achieved TFLOP/s and the fraction of
the card's measured bf16 matmul peak (the "roofline" of these conv-dominated programs), compile time and
memory. Also a correctness check (every denoise variant vs float32-HIGHEST x0_hat / eps, same inputs).

    python benchmarks/bench_diffaug.py                       # GPU: default plan, batch 128 main, sweep 256/64
    python benchmarks/bench_diffaug.py --tiny                # CPU smoke test (tiny presets, minutes)
    python benchmarks/bench_diffaug.py --cases denoise:bf16:cudnn:128,denoise:bf16:auto:128:up=transposed
    python benchmarks/bench_diffaug.py --time-budget 300 --profile /tmp/trace --out $OUT

Case syntax `program:dtype:attention:batch[:opts]`:
- program in {train, denoise, ensemble};
- dtype in {bf16, f32 (float32, XLA default precision = TF32 on Hopper), f32hi (float32, HIGHEST precision:
  the correctness reference)};
- attention = `UNet.attention_impl` in {auto (the library default: cuDNN fused attention on an NVIDIA GPU in
  bf16/fp16, else XLA), xla, cudnn}; each row records what ran (the lowered program's cuDNN custom call);
- opts, '+'-separated key=value (defaults left out of the case name): `up=phases|nearest|transposed`
  (`UNet.upsample_impl`), `gn=auto|two_pass|one_pass|channel|pallas` (`UNet.norm_stats`), `skip=concat|split|fused`
  (`UNet.skip_impl`), `edge=conv|gemm` (`UNet.edge_impl`), `cast=1|0` (1: the frozen score
  params are cast to the case dtype once, outside the jitted function, with
  `score.frozen_params_for_compute`, as train.py / evaluate.py hold them; 0: float32 params, cast inside every
  call), `tune=0|1` (1: the Pallas GroupNorm kernels traced with the launch parameters of `--pallas-tuning
  FILE`, which `benchmarks/bench_pallas_norm.py` writes; 0: `pallas_norm`'s defaults),
  `fuse=all|none|nopool|noup` (which of the resampling blocks' GroupNorm kernels that also pool / up-sample
  the skip path run: the pooled apply of the down-sampling blocks, the up-sampling blocks' apply; off = the
  rows apply kernel, then XLA resamples; for their A/B).
Variants are `module.clone(...)` of the same UNet: the params are identical for every value.

Programs (each one jitted function, weights are arguments, never constants):
- train: `steps.train_step` (DiffAug view from ONE UNet call + ResNet-50 fwd/bwd on the 2B concatenation +
  SGD momentum), state donated, as the trainer jits it. images/s counts the B input images.
- denoise: uint8 batch -> `augment.diffaug` (t ~ U{0..999}, fresh noise, one UNet call, clipped x0_hat).
- ensemble: `augment.diffaug_ensemble` with the 10 default members (t = 0, 50, ..., 450; 9 UNet calls + 10
  classifier calls per image), reported as ms/image.

FLOPs: "model FLOPs" are XLA's cost analysis of the lowered (device-independent) program with XLA attention
and nearest up-sampling (the case's own lowering when it is that program, else the float32 one), cached per
(program, batch), so that every variant is divided by the same work; the ensemble's are summed from its parts
(XLA's count of a `lax.scan` body is not multiplied by the trip count; the compiled program's own count is
kept as `xla_flops`). roofline = model FLOP/s / measured bf16 matmul peak.

Nothing here imports tensorflow_datasets or grain. Flags: `diffaug_jax.perf.set_xla_gpu_flags()` runs before
JAX initialises (disable with --no-xla-flags).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from diffaug_jax import perf

# Reference figures quoted from issue 7 (one NVIDIA H200, batch 128, 224x224, 2026-11-26) and the goals.
REFERENCE = {
    "train": {"unit": "img/s", "goal": 300.0, "torch_official": 100.0, "torch_tuned": 219.0},
    "denoise": {"unit": "img/s", "goal": 330.0, "torch_official": 111.0, "torch_tuned": 240.0},
    "ensemble": {"unit": "ms/img", "goal": 25.0, "torch_official": 82.8, "torch_tuned": None},
}
PROGRAMS = ("train", "denoise", "ensemble")
DTYPES = ("bf16", "f32", "f32hi")
ATTENTIONS = ("auto", "xla", "cudnn")  # UNet.attention_impl
# Case options (Case fields): key -> (allowed values, default). Values are the UNet field values, except cast
# (1 = score params pre-cast with frozen_params_for_compute, as the programs hold them; 0 = float32 params).
OPTIONS = {
    "up": (("phases", "nearest", "transposed"), "phases"),  # UNet.upsample_impl
    "gn": (("auto", "two_pass", "one_pass", "channel", "pallas"), "auto"),  # UNet.norm_stats
    "skip": (("concat", "split", "fused"), "split"),  # UNet.skip_impl
    "edge": (("conv", "gemm"), "gemm"),  # UNet.edge_impl
    "cast": (("1", "0"), "1"),
    # 1: trace with the Pallas GroupNorm launch parameters of --pallas-tuning (a JSON file that
    # benchmarks/bench_pallas_norm.py writes) instead of pallas_norm's defaults.
    "tune": (("0", "1"), "0"),
    # The resampling blocks' GroupNorm kernels that also pool / up-sample the skip path (gn=pallas), refused
    # while tracing for their A/B (the GroupNorm then applies with its rows kernel and resamples in XLA, as for
    # shapes those kernels do not tile): all = the library; none = both off; nopool / noup = the pooled apply
    # (`affine_act_pool`) / the up-sampling apply (`affine_act_up`) off. The phase apply is not affected.
    "fuse": (("all", "none", "nopool", "noup"), "all"),
}
# fuse value -> the pallas_norm predicates refused while tracing
FUSED_KERNELS = {"pool": "pool_supported", "up": "up_supported"}
FUSE_OFF = {"all": (), "none": tuple(FUSED_KERNELS), "nopool": ("pool",), "noup": ("up",)}


@dataclasses.dataclass(frozen=True)
class Size:
  """Model/data sizes of one benchmark mode."""
  unet_preset: str
  unet_overrides: tuple
  image: int
  classifier: str
  num_classes: int
  main_batch: int
  sweep_batches: tuple
  peak_n: int


FULL = Size("adm_256_uncond", (), 224, "resnet50", 1000, 128, (64, 256), 8192)
# Tiny: every code path of the real programs (learn_sigma, scale-shift norm, resblock up/down, attention,
# BatchNorm classifier) at sizes that compile and run on 2 CPU cores in seconds.
TINY = Size("digits", (("in_channels", 3), ("learn_sigma", True), ("channel_mult", "1,2"),
                      ("resblock_updown", True), ("attention_resolutions", "16")), 16, "cnn_small", 10, 4, (2,),
            256)


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark case; `name` is its canonical spec (`Case.parse(c.name) == c`)."""
  program: str
  dtype: str
  attention: str
  batch: int
  up: str = "phases"
  gn: str = "auto"
  skip: str = "split"
  edge: str = "gemm"
  cast: str = "1"
  tune: str = "0"
  fuse: str = "all"

  @property
  def opts(self) -> str:
    """The non-default options, in OPTIONS order ('' when all are defaults)."""
    return "+".join(f"{k}={getattr(self, k)}" for k, (_, d) in OPTIONS.items() if getattr(self, k) != d)

  @property
  def variant(self) -> str:
    """The name without the program (the correctness table's row label)."""
    return self.name.split(":", 1)[1]

  @property
  def name(self) -> str:
    base = f"{self.program}:{self.dtype}:{self.attention}:{self.batch}"
    return f"{base}:{self.opts}" if self.opts else base

  @classmethod
  def parse(cls, spec: str) -> Case:
    parts = spec.strip().split(":")
    if len(parts) not in (4, 5):
      raise ValueError(f"case {spec!r}: expected program:dtype:attention:batch[:key=value+...]")
    prog, dt, attn, b = parts[:4]
    if prog not in PROGRAMS or dt not in DTYPES or attn not in ATTENTIONS or not b.isdigit() or int(b) < 1:
      raise ValueError(f"case {spec!r}: program in {PROGRAMS}, dtype in {DTYPES}, attention in {ATTENTIONS}, "
                       f"batch a positive int")
    opts = {}
    for item in (parts[4].split("+") if len(parts) == 5 else []):
      key, eq, value = item.partition("=")
      if key not in OPTIONS or not eq:
        raise ValueError(f"case {spec!r}: option {item!r} is not key=value with key in {sorted(OPTIONS)}")
      if value not in OPTIONS[key][0]:
        raise ValueError(f"case {spec!r}: option {key}={value!r}, expected one of {OPTIONS[key][0]}")
      if key in opts:
        raise ValueError(f"case {spec!r}: option {key} given twice")
      opts[key] = value
    return cls(prog, dt, attn, int(b), **opts)


def default_plan(size: Size, tuned=False) -> list[Case]:
  """Priority order (a time budget cuts the tail): denoise and train step, both with the candidate
  `skip=fused`, the correctness reference, the ensemble without and with it; with `tuned` (True, or which
  launch parameters --pallas-tuning changes, `_changes_tuning`): for "skip", denoise and train with
  `skip=fused` and the tuned parameters; for "norm" (apply / sums), the three programs with them;
  then the latest choices one at a time (nearest up-sampling for both programs, the fused GroupNorm kernels
  off); then the defaults of the first H200 runs (before the A/Bs of 2026-11-26 made "pallas" / "split" /
  "gemm" / "phases" the defaults), together and one at a time; then the execution choices already decided on
  an H200 (attention, transposed up-sampling), params cast inside the call, float32 (TF32) speed, the batch
  sweep, the GroupNorm default before "channel", transposed up-sampling in the train step."""
  b = size.main_batch
  before = dict(gn="channel", skip="concat", edge="conv", up="nearest")  # the defaults of the first H200 runs
  # The candidate not yet measured on a GPU (the skip convs computed by the GroupNorm kernel) right after the
  # defaults it is compared with.
  plan = [Case("denoise", "bf16", "auto", b), Case("train", "bf16", "auto", b),
          Case("denoise", "bf16", "auto", b, skip="fused"), Case("train", "bf16", "auto", b, skip="fused"),
          Case("denoise", "f32hi", "xla", b),  # the reference of the correctness check
          Case("ensemble", "bf16", "auto", b), Case("ensemble", "bf16", "auto", b, skip="fused")]
  tuned = {"skip", "norm"} if tuned is True else set(tuned or ())
  if "skip" in tuned:  # the fused skip kernel's parameters won: only skip=fused programs change
    plan += [Case(p, "bf16", "auto", b, skip="fused", tune="1") for p in ("denoise", "train")]
  if "norm" in tuned:  # the apply / sums parameters won: every program changes
    plan += [Case(p, "bf16", "auto", b, tune="1") for p in ("denoise", "train", "ensemble")]
  plan += [Case("denoise", "bf16", "auto", b, up="nearest"), Case("train", "bf16", "auto", b, up="nearest"),
           Case("denoise", "bf16", "auto", b, fuse="none")]
  plan += [Case("denoise", "bf16", "auto", b, **before), Case("train", "bf16", "auto", b, **before),
           Case("denoise", "bf16", "auto", b, gn="channel"), Case("denoise", "bf16", "auto", b, skip="concat"),
           Case("denoise", "bf16", "auto", b, edge="conv"),
           Case("denoise", "bf16", "xla", b),  # attention A/B (auto = cuDNN on an NVIDIA GPU)
           Case("denoise", "bf16", "auto", b, up="transposed"),
           Case("denoise", "bf16", "auto", b, cast="0"), Case("denoise", "f32", "xla", b)]
  plan += [Case("train", "bf16", "auto", s) for s in size.sweep_batches]
  plan += [Case("denoise", "bf16", "auto", b, gn="one_pass"),  # the GroupNorm default before "channel"
           Case("train", "bf16", "auto", b, up="transposed")]
  return plan


# --------------------------------------------------------------------------------------------------------
# Everything below imports jax; `main` sets the XLA flags first.


def _jax():
  import jax
  return jax


def _dtype(name: str):
  import jax.numpy as jnp
  return {"bf16": jnp.bfloat16, "f32": jnp.float32, "f32hi": jnp.float32}[name]


def _precision_ctx(dtype_name: str):
  jax = _jax()
  return jax.default_matmul_precision("highest") if dtype_name == "f32hi" else contextlib.nullcontext()


def load_pallas_tuning(path: str) -> dict:
  """--pallas-tuning FILE -> `pallas_norm.Tuning` overrides: the file's "tuning" object (as
  bench_pallas_norm.py writes it) or a flat object of Tuning fields; unknown or bad fields raise here."""
  from diffaug_jax.models import pallas_norm
  with open(path) as f:
    data = json.load(f)
  overrides = data.get("tuning", data)
  pallas_norm.Tuning(**overrides)  # validates names and values now, not after the first compiles
  return overrides


def _changes_tuning(overrides: dict) -> tuple:
  """Which kernels' launch parameters `overrides` changes: () or a subset of ("skip", "norm") (the fused skip
  kernel's `skip_*` fields; the apply and sums fields)."""
  from diffaug_jax.models import pallas_norm
  new, old = pallas_norm.Tuning(**overrides), pallas_norm.Tuning()
  changed = [f.name for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(old, f.name)]
  return tuple(kind for kind, hit in (("skip", any(f.startswith("skip_") for f in changed)),
                                      ("norm", any(not f.startswith("skip_") for f in changed))) if hit)


@contextlib.contextmanager
def _kernel_ctx(case: Case, args):
  """While tracing: the Pallas launch parameters of --pallas-tuning (tune=1), and the fused GroupNorm kernels
  the case's `fuse` turns off (their `pallas_norm.*_supported` predicate refuses every shape, so GroupNorm32
  does that part in XLA)."""
  from diffaug_jax.models import pallas_norm
  with contextlib.ExitStack() as stack:
    if case.tune == "1":
      stack.enter_context(pallas_norm.tuning(**args.pallas_tuning_overrides))
    for kernel in FUSE_OFF[case.fuse]:
      name = FUSED_KERNELS[kernel]
      stack.callback(setattr, pallas_norm, name, getattr(pallas_norm, name))
      setattr(pallas_norm, name, lambda *shape: False)
    yield


def unet_for(module, case: Case):
  """The case's UNet: `module` cloned with its compute dtype and execution choices (same params)."""
  return module.clone(dtype=_dtype(case.dtype), attention_impl=case.attention, norm_stats=case.gn,
                      upsample_impl=case.up, skip_impl=case.skip, edge_impl=case.edge)


CUDNN_ATTENTION_CALL = "__cudnn$fmha"  # prefix of jax's cuDNN fused-attention custom-call targets


def attention_ran(lowered_text: str) -> str:
  """Which attention a lowered program runs: 'cudnn' if it holds a cuDNN fused-attention call, else 'xla'."""
  return "cudnn" if CUDNN_ATTENTION_CALL in lowered_text else "xla"


def auto_attention_here() -> str:
  """What attention_impl="auto" picks on this device for the UNet's bf16 (B, 784, 8, 64) attention, as the
  library decides it (its rule and its compile probe; the rows record what really ran in each program)."""
  import jax.numpy as jnp

  from diffaug_jax.models import attention
  q = jnp.zeros((1, 784, 8, 64), jnp.bfloat16)
  ok = attention.cudnn_candidate(q) and attention.cudnn_compiles(q.shape, q.shape, "bfloat16")
  return "cudnn" if ok else "xla"


def random_like(seed: int, tree, *, kind: str = "params"):
  """Random non-zero host values for a tree of ShapeDtypeStructs: weights ~ N(0, 1/fan_in), norm scales ~
  1 + 0.1 N, biases ~ 0.1 N; BatchNorm mean ~ 0.1 N, var ~ 1 + 0.1 |N|. numpy on the host (no compile; a
  jitted generator over ~700 leaves takes minutes to compile on CPU), then one device_put."""
  jax = _jax()
  import numpy as np
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  vals = []
  for path, s in leaves:
    name = str(path[-1]).lower()
    z = rng.standard_normal(s.shape, dtype=np.float32)
    if kind == "batch_stats":
      v = (1.0 + 0.1 * np.abs(z)) if "var" in name else 0.1 * z
    elif len(s.shape) >= 2:
      v = z * np.float32(1.0 / math.sqrt(max(1, math.prod(s.shape[:-1]))))
    elif "scale" in name:
      v = 1.0 + 0.1 * z
    else:
      v = 0.1 * z
    vals.append(np.asarray(v, dtype=s.dtype))
  return jax.device_put(jax.tree_util.tree_unflatten(treedef, vals), jax.devices()[0])


class Bench:
  """Holds the models, random weights and synthetic data of one mode; builds and runs cases."""

  def __init__(self, size: Size, args):
    jax = _jax()
    import jax.numpy as jnp
    import numpy as np

    from diffaug_jax import diffusion
    from diffaug_jax.models.classifiers import get_classifier
    from diffaug_jax.models.unet import unet_from_preset

    self.size, self.args = size, args
    self.device = jax.devices()[0]
    self.platform = self.device.platform
    self.unet = unet_from_preset(size.unet_preset, **dict(size.unet_overrides))
    self.clf_name = size.classifier
    self.get_classifier = get_classifier
    self.schedule = diffusion.linear_schedule(1000)
    s = size.image
    x = jnp.zeros((1, s, s, self.unet.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    ushape = jax.eval_shape(lambda: self.unet.init(jax.random.key(0), x, t))
    self.score_params = random_like(args.seed + 1, ushape["params"])
    clf = get_classifier(self.clf_name, size.num_classes)
    cshape = jax.eval_shape(lambda: clf.init(jax.random.key(0), x, train=False))
    self.clf_vars = {"params": random_like(args.seed + 2, cshape["params"])}
    if "batch_stats" in cshape:
      self.clf_vars["batch_stats"] = random_like(args.seed + 3, cshape["batch_stats"], kind="batch_stats")
    self.num_params = {"unet": sum(int(np.prod(l.shape)) for l in jax.tree.leaves(ushape["params"])),
                       "classifier": sum(int(np.prod(l.shape)) for l in jax.tree.leaves(cshape["params"]))}
    self._data: dict[int, dict] = {}
    self.outputs: dict[Case, dict] = {}  # host copies of denoise outputs, for the correctness check
    self.model_flops: dict[tuple, float] = {}
    self.last_good: tuple | None = None  # (case, call(i)) of the last case with finite outputs, to profile
    self._cast_params: dict[str, Any] = {}

  # ---- data
  def batch(self, b: int) -> dict:
    if b not in self._data:
      jax = _jax()
      import numpy as np
      rng = np.random.default_rng(1234 + b)
      s, c = self.size.image, self.unet.in_channels
      host = {"image": rng.integers(0, 256, (b, s, s, c), dtype=np.uint8),
              "image_da": rng.integers(0, 256, (b, s, s, c), dtype=np.uint8),
              "label": rng.integers(0, self.size.num_classes, (b,), dtype=np.int32)}
      self._data[b] = jax.device_put(host, self.device)
    return self._data[b]

  # ---- score params and program builders
  def score_params_for(self, case: Case):
    """The frozen score params a case's program takes: cast to the case dtype once, here, outside the jitted
    function (cast=1, as the programs do; a no-op for float32), or the float32 master copy (cast=0)."""
    if case.cast == "0":
      return self.score_params
    if case.dtype not in self._cast_params:
      from diffaug_jax.models.score import frozen_params_for_compute
      self._cast_params[case.dtype] = _jax().block_until_ready(
          frozen_params_for_compute(self.unet, self.score_params, _dtype(case.dtype)))
    return self._cast_params[case.dtype]

  def eps_factory(self, case: Case):
    """`score_params -> eps_fn` (the train step's `score_eps_fn`) over the case's UNet (`unet_for`)."""
    from diffaug_jax.models.score import make_eps_fn
    module = unet_for(self.unet, case)

    def factory(score_params):
      return make_eps_fn(module, {"params": score_params}, dtype=module.dtype)

    factory.module = module  # for inspection (tests)
    return factory

  def build(self, case: Case):
    """-> (jitted fn, args_for(i) = the i-th call's arguments, holder of the donated train state or None)."""
    jax = _jax()
    import jax.numpy as jnp
    import optax

    from diffaug_jax import augment, steps
    from diffaug_jax.state import TrainState

    eps_factory = self.eps_factory(case)
    score_params = self.score_params_for(case)
    sched = self.schedule
    data = self.batch(case.batch)
    base_key = jax.random.key(self.args.seed + 7)
    keys = [jax.random.fold_in(base_key, i) for i in range(8)]

    if case.program == "denoise":
      def denoise(score_params, image, key):
        x0 = image.astype(jnp.float32) / 127.5 - 1.0
        eps_fn = eps_factory(jax.lax.stop_gradient(score_params))
        eps_box = []

        def eps_capture(x_t, t):
          e = eps_fn(x_t, t)
          eps_box.append(e)
          return e
        x0_hat, t = augment.diffaug(key, x0, eps_capture, sched)
        return x0_hat, eps_box[0], t

      fn = jax.jit(denoise)
      return fn, (lambda i: (score_params, data["image"], keys[i % len(keys)])), None

    if case.program == "ensemble":
      clf = self.get_classifier(self.clf_name, self.size.num_classes, dtype=_dtype(case.dtype))
      members = tuple(range(0, 50 * self.args.members, 50))

      def ensemble(score_params, clf_vars, image, key):
        x = image.astype(jnp.float32) / 127.5 - 1.0
        eps_fn = eps_factory(score_params)
        classify = lambda im: clf.apply(clf_vars, im, train=False)
        mean_probs, _ = augment.diffaug_ensemble(key, x, classify, eps_fn, sched, ts=members)
        return mean_probs

      fn = jax.jit(ensemble)
      return fn, (lambda i: (score_params, self.clf_vars, data["image"], keys[i % len(keys)])), None

    # train
    clf = self.get_classifier(self.clf_name, self.size.num_classes, dtype=_dtype(case.dtype))
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    cfg = steps.StepConfig(schedule=sched, diffaug=True, lr_schedule=optax.constant_schedule(0.1))
    step = functools.partial(steps.train_step, apply_fn=clf.apply, score_eps_fn=eps_factory, tx=tx, cfg=cfg)
    fn = jax.jit(step, donate_argnums=(0,))
    # Own copies of the weights: the state is donated (consumed) by every call.
    state0 = TrainState.create(jax.tree.map(jnp.array, self.clf_vars), tx)
    holder = {"state": state0}

    def args_for(i):
      return (holder["state"], data, keys[i % len(keys)], score_params)

    return fn, args_for, holder

  # ---- FLOPs
  def model_flops_for(self, case: Case, lowered=None, attention: str = "") -> float | None:
    """Device-independent FLOPs of one call, cached per (program, batch): the cost analysis of the program
    with XLA attention, nearest up-sampling and the other options at their defaults, i.e. `lowered` itself
    when it is that program (`attention` = what it ran), else the lowered float32 XLA program: cuDNN calls
    count 0 FLOPs and the folded up-sampling variants (transposed, phases) do less arithmetic (4 taps per
    output instead of 9 in the up-sampling convs); every variant of a (program, batch) is measured against
    the same work."""
    k = (case.program, case.batch)
    # The work as guided-diffusion defines it (nearest up-sampling, 9 taps per up-sampled pixel), whatever the
    # library's default: the folded up-sampling variants do less arithmetic for the same function.
    reference = Case(case.program, "f32", "xla", case.batch, up="nearest")
    if k in self.model_flops:
      return self.model_flops[k]
    jax = _jax()
    import jax.numpy as jnp
    flops = None
    try:
      if case.program == "ensemble":
        b, s, c = case.batch, self.size.image, self.unet.in_channels
        xs = jax.ShapeDtypeStruct((b, s, s, c), jnp.float32)
        ts = jax.ShapeDtypeStruct((b,), jnp.int32)
        clf = self.get_classifier(self.clf_name, self.size.num_classes, dtype=jnp.float32)
        unet = unet_for(self.unet, Case("denoise", "f32", "xla", b, up="nearest"))
        u = _flops_of(_lower_for_flops(jax.jit(lambda p, x, t: unet.apply({"params": p}, x, t)),
                                       self.score_params, xs, ts))
        cl = _flops_of(_lower_for_flops(jax.jit(lambda v, x: clf.apply(v, x, train=False)), self.clf_vars, xs))
        n = self.args.members
        n_noisy = n - 1  # member t = 0 classifies the raw image (no UNet call)
        flops = n_noisy * u + n * cl
      elif (lowered is not None and attention == "xla"
            and dataclasses.replace(case, dtype="f32", attention="xla") == reference
            and math.isfinite(_flops_of(lowered))):
        flops = _flops_of(lowered)
      else:
        fn, args_for, _ = self.build(reference)
        flops = _flops_of(_lower_for_flops(fn, *args_for(0)))
    except Exception as e:  # noqa: BLE001 - FLOPs are informative; keep the timing
      print(f"  [flops] {case.name}: {type(e).__name__}: {e}", flush=True)
    self.model_flops[k] = flops
    return flops


def _lower_for_flops(fn, *args):
  """`fn.lower(*args)` for the host CPU. XLA's cost analysis of a LOWERED program is not available through the
  PJRT C API (the CUDA plugin: jax answers None, jax issue #22713), and the count of a lowered program does not
  depend on the device. Abstract arguments: nothing is copied."""
  jax = _jax()
  import numpy as np
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU: lower where the arguments live
    return fn.lower(*args)
  sh = jax.sharding.SingleDeviceSharding(cpu)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sh) if hasattr(a, "dtype") else a, args)
  return fn.lower(*abstract)


def _flops_of(lowered_or_compiled) -> float:
  ca = lowered_or_compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


def _mem_analysis(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return {}
  if m is None:
    return {}
  out = {}
  for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes"):
    v = getattr(m, k, None)
    if v is not None:
      out[k] = int(v)
  return out


def _memory_shortfall(mem: dict, device) -> str:
  """'' when the compiled program's new buffers (temporaries + non-aliased outputs; its arguments are
  already allocated) fit the device's free memory, else why not."""
  try:
    st = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - CPU: no limit to check
    return ""
  limit, used = st.get("bytes_limit"), st.get("bytes_in_use", 0)
  if not limit or not mem:
    return ""
  need = mem.get("temp_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0) - mem.get("alias_size_in_bytes", 0)
  free = limit - used
  if need > 0.98 * free:
    return f"out of memory: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free of {limit / 2**30:.1f}"
  return ""


def _peak_bytes(device) -> int | None:
  try:
    st = device.memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not st:
    return None
  return int(st.get("peak_bytes_in_use", st.get("bytes_in_use", 0)))


def measure_peak(device, n: int, iters: int = 10) -> dict:
  """Measured matmul rate of this card: n x n x n products on random data (bf16 and f32 default precision)."""
  jax = _jax()
  import jax.numpy as jnp
  out = {"n": n}
  for name, dt in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
    ks = jax.random.split(jax.random.key(0), 4)
    mats = [jax.device_put(jax.random.normal(k, (n, n), dt), device) for k in ks]
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(mats[0], mats[1]))
    for _ in range(2):
      jax.block_until_ready(f(mats[2], mats[3]))
    times = []
    for r in range(3):
      t0 = time.perf_counter()
      for i in range(iters):
        o = f(mats[(i % 2) * 2], mats[(i % 2) * 2 + 1])  # two input sets, alternated
      jax.block_until_ready(o)
      times.append((time.perf_counter() - t0) / iters)
    t = statistics.median(times)
    out[f"{name}_tflops"] = 2.0 * n ** 3 / t / 1e12
    out[f"{name}_ms"] = t * 1e3
    del mats
  return out


def time_calls(call: Callable[[int], Any], *, warmup: int, target_s: float, repeats: int,
               max_iters: int) -> dict:
  """Median seconds per call over `repeats` runs of `iters` back-to-back calls, synchronised at the end."""
  jax = _jax()
  first_out = None
  done = 0
  t_first = 0.0
  for i in range(max(1, warmup)):
    t0 = time.perf_counter()
    out = call(i)
    jax.block_until_ready(out)
    t_first = time.perf_counter() - t0
    done += 1
    if i == 0:
      first_out = out  # call(0): the same key/inputs for every dtype (the correctness check uses it)
    if t_first > target_s / 3:  # an expensive call: one warm-up is enough
      break
  iters = int(max(1, min(max_iters, round(target_s / max(repeats, 1) / max(t_first, 1e-6)))))
  times = []
  k = done
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = call(k)
      k += 1
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters)
  return {"s_per_call": statistics.median(times), "times_s": times, "iters": iters, "warmup_calls": done,
          "last_warmup_s": t_first, "last": out, "first": first_out}


# Relative wall cost of a program's first case (compile + timing), for the budget estimate of a program not
# seen yet in this run (CPU compile: denoise 12 s, train 26 s at full size).
_REL_COST = {"denoise": 1.0, "train": 2.0, "ensemble": 1.5}


def static_skip(case: Case, platform_name: str) -> str:
  """Why `case` cannot run here at all ('' when it can)."""
  if case.attention == "cudnn" and case.dtype != "bf16":
    return "cuDNN attention needs bf16/fp16"
  if case.attention == "cudnn" and platform_name != "gpu":
    return f"cuDNN attention needs a GPU (platform {platform_name})"
  return ""


def run_case(bench: Bench, case: Case, args, log) -> dict:
  """Compile, time and account one case -> result row (status 'ok' / 'skipped' / 'error')."""
  jax = _jax()
  import numpy as np
  bench.last_good = None  # frees the previous case's program; set again only when this case runs well
  row = {"case": case.name, "program": case.program, "dtype": case.dtype, "attention": case.attention,
         "batch": case.batch, "up": case.up, "gn": case.gn, "skip": case.skip, "edge": case.edge,
         "cast": case.cast, "tune": case.tune, "fuse": case.fuse}
  reason = static_skip(case, bench.platform)
  if reason:
    return {**row, "status": "skipped", "reason": reason}
  fn, args_for, holder = bench.build(case)
  t0 = time.perf_counter()
  with _precision_ctx(case.dtype), _kernel_ctx(case, args):  # both are read while tracing
    lowered = fn.lower(*args_for(0))
  row["trace_s"] = time.perf_counter() - t0
  # What "auto" resolved to, from the program itself (the library may fall back to XLA while tracing).
  text = lowered.as_text()
  row["attention_ran"] = attention_ran(text)
  row["triton_calls"] = text.count("__gpu$xla.gpu.triton")  # Pallas kernels (gn=pallas) in the program
  t0 = time.perf_counter()
  compiled = lowered.compile()
  row["compile_s"] = time.perf_counter() - t0
  row["xla_flops"] = _flops_of(compiled)
  row["memory"] = _mem_analysis(compiled)
  short = _memory_shortfall(row["memory"], bench.device)
  if short:  # skip now rather than fail (or thrash) at the first call
    return {**row, "status": "skipped", "reason": short}
  row["model_flops"] = bench.model_flops_for(case, lowered, row["attention_ran"])
  row["flops_source"] = "model (lowered, XLA attention, nearest up-sampling, default options)"
  if not row["model_flops"] or not math.isfinite(row["model_flops"]):
    # Fallback: the compiled program's own count (undercounts a scan body, and cuDNN custom calls may count 0).
    row["model_flops"], row["flops_source"] = row["xla_flops"], "compiled program (fallback)"

  if holder is not None:  # train: thread the donated state through the compiled step
    def call(i):
      state, metrics = compiled(*args_for(i))
      holder["state"] = state
      return metrics, state  # blocking on both: the parameter update is part of the step
  else:
    def call(i):
      return compiled(*args_for(i))

  if case.dtype == "f32hi":  # the reference: its speed is informative only, keep its calls few
    res = time_calls(call, warmup=1, target_s=0.0, repeats=1, max_iters=1)
  else:
    res = time_calls(call, warmup=args.warmup, target_s=args.target_s, repeats=args.repeats,
                     max_iters=args.max_iters)
  s = res.pop("last")
  first = res.pop("first")
  if holder is not None:
    s = s[0]  # train: (metrics, state) -> metrics
  row.update({k: v for k, v in res.items()})
  sec = row["s_per_call"]
  row["images_per_s"] = case.batch / sec
  row["ms_per_image"] = 1e3 * sec / case.batch
  if row["model_flops"] and math.isfinite(row["model_flops"]):
    row["tflops_per_s"] = row["model_flops"] / sec / 1e12
    if args.peak_tflops:
      row["roofline"] = row["tflops_per_s"] / args.peak_tflops
  row["peak_bytes_in_use"] = _peak_bytes(bench.device)
  # Sanity of the outputs (NaN never passes).
  leaves = [np.asarray(jax.device_get(l), np.float32) for l in jax.tree.leaves(s)
            if hasattr(l, "dtype") and np.issubdtype(np.dtype(l.dtype), np.floating)]
  row["finite"] = bool(all(np.isfinite(l).all() for l in leaves))
  if case.program == "train":
    row["loss"] = float(jax.device_get(s["loss"]))
  if case.program == "denoise":
    # Same inputs and key (call 0's arguments) for every variant: the correctness check compares these.
    x0_hat, eps, t = first
    bench.outputs[case] = {"attention_ran": row["attention_ran"],
        "x0_hat": np.asarray(jax.device_get(x0_hat), np.float32), "eps": np.asarray(jax.device_get(eps), np.float32),
        "t": np.asarray(jax.device_get(t))}
  row["status"] = "ok" if row["finite"] else "error"
  if not row["finite"]:
    row["reason"] = "non-finite output"
  # Kept (replacing the previous one) so that a profile of this case needs no second compile.
  bench.last_good = (case, call) if row["finite"] else None
  del lowered
  return row


def correctness(bench: Bench) -> list[dict]:
  """Relative L2 error of every denoise variant's x0_hat / eps (options included) against the float32-HIGHEST
  reference of the same batch (`f32hi:xla:B`, else the first f32hi case of that batch), same inputs and key."""
  import numpy as np
  refs: dict[int, Case] = {}
  for c in bench.outputs:
    if c.dtype == "f32hi" and (c.batch not in refs or (refs[c.batch].opts and not c.opts)):
      refs[c.batch] = c
  rows = []
  for case, out in bench.outputs.items():
    ref_case = refs.get(case.batch)
    if ref_case is None or ref_case == case:
      continue
    ref = bench.outputs[ref_case]
    r = {"variant": case.variant, "reference": ref_case.variant, "attention_ran": out["attention_ran"]}
    if not np.array_equal(ref["t"], out["t"]):
      rows.append({**r, "error": "different t draws (inputs differ)"})
      continue
    for k in ("x0_hat", "eps"):
      d = out[k] - ref[k]
      r[f"{k}_rel_l2"] = float(np.linalg.norm(d) / max(np.linalg.norm(ref[k]), 1e-30))
      r[f"{k}_max_abs"] = float(np.abs(d).max())
    # x0_hat error grows with t (eps error scaled by sqrt(1/abar - 1)); report the low-t half separately.
    low = ref["t"] < 500
    if low.any():
      d = out["x0_hat"][low] - ref["x0_hat"][low]
      r["x0_hat_rel_l2_t_lt_500"] = float(np.linalg.norm(d) / max(np.linalg.norm(ref["x0_hat"][low]), 1e-30))
    r["finite"] = bool(np.isfinite(out["x0_hat"]).all() and np.isfinite(out["eps"]).all())
    rows.append(r)
  return rows


def _fmt(v, spec: str, none: str = "-") -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return none
  return format(v, spec)


AB_TOLERANCE = 0.02  # speed ratios within 2% of 1 are reported as "same" (run-to-run noise on a GPU)


def ab_comparisons(result: dict) -> list[dict]:
  """Each ok variant against the library-default case of its program, dtype and batch (attention "auto",
  default options), when both ran: the speed ratio that decides whether a default should change."""
  rows = {r["case"]: r for r in result["cases"] if r.get("status") == "ok"}
  out = []
  for name, r in rows.items():
    case = Case.parse(name)
    base = Case(case.program, case.dtype, "auto", case.batch)
    if case == base or base.name not in rows:
      continue
    ratio = r["images_per_s"] / rows[base.name]["images_per_s"]
    verdict = ("same" if abs(ratio - 1.0) <= AB_TOLERANCE else "faster" if ratio > 1.0 else "slower")
    out.append({"variant": name, "baseline": base.name, "speed_ratio": ratio, "verdict": verdict,
                "attention_ran": (r.get("attention_ran"), rows[base.name].get("attention_ran"))})
  return out


def table_markdown(result: dict) -> str:
  meta = result["meta"]
  peak = result.get("peak", {})
  device = (f"Device: {meta['device']} ({meta['platform']}), jax {meta['jax']}, jaxlib {meta['jaxlib']}, "
            f"flax {meta['flax']}; mode {meta['mode']}; {meta['time_utc']}")
  setup = (f"Measured matmul peak: bf16 {_fmt(peak.get('bf16_tflops'), '.4g')} TFLOP/s, f32 (default precision) "
           f"{_fmt(peak.get('f32_tflops'), '.4g')} TFLOP/s (n={peak.get('n')}); roofline = model FLOP/s / bf16 "
           f"peak. XLA_FLAGS: `{meta['xla_flags'] or '(none)'}`. Variants: UNet.clone(attention_impl, "
           f"norm_stats (gn=), upsample_impl (up=), skip_impl (skip=), edge_impl (edge=)); attention \"auto\" on "
           f"this device: {meta['auto_attention']} (library rule; \"attn ran\" = cuDNN call in the lowered "
           f"program or not); score params pre-cast to the case dtype unless cast=0.")
  header = ("| case | status | attn ran | images/s | ms/image | step ms | model TFLOP/step | TFLOP/s | roofline "
            "| compile s | XLA temp GiB | peak GiB (run so far) | goal |")
  lines = [device, setup, "", header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  gib = 1024 ** 3
  for r in result["cases"]:
    if r.get("status") != "ok":
      lines.append(f"| {r['case']} | {r.get('status')}: {r.get('reason', '')[:60]} | | | | | | | | | | | |")
      continue
    ref = REFERENCE[r["program"]]
    if r["program"] == "ensemble":
      goal = f"<= {ref['goal']} ms/img (torch {ref['torch_official']})"
    else:
      goal = f">= {ref['goal']:.0f} img/s (torch {ref['torch_official']:.0f} / tuned {ref['torch_tuned']:.0f})"
    temp = r.get("memory", {}).get("temp_size_in_bytes")
    lines.append(
        f"| {r['case']} | ok | {r.get('attention_ran', '?')} | {_fmt(r['images_per_s'], '.1f')} | "
        f"{_fmt(r['ms_per_image'], '.2f')} | {_fmt(1e3 * r['s_per_call'], '.1f')} | "
        f"{_fmt((r.get('model_flops') or float('nan')) / 1e12, '.4g')} | {_fmt(r.get('tflops_per_s'), '.4g')} | "
        f"{_fmt(r.get('roofline'), '.1%')} | {_fmt(r.get('compile_s'), '.0f')} | "
        f"{_fmt(temp / gib if temp else None, '.3g')} | "
        f"{_fmt(r['peak_bytes_in_use'] / gib if r.get('peak_bytes_in_use') else None, '.3g')} | {goal} |")
  ab = ab_comparisons(result)
  if ab:
    lines += ["", f"| A/B: variant | vs library default | speed ratio | verdict (+-{AB_TOLERANCE:.0%}) | attn ran |",
              "|---|---|---:|---|---|"]
    for a in ab:
      lines.append(f"| {a['variant']} | {a['baseline']} | {a['speed_ratio']:.3f} | {a['verdict']} | "
                   f"{a['attention_ran'][0]} vs {a['attention_ran'][1]} |")
  if result.get("correctness"):
    corr_header = ("| correctness: denoise variant | vs (same inputs) | attn ran | x0_hat rel L2 "
                   "| x0_hat rel L2 (t<500) | x0_hat max abs | eps rel L2 | finite |")
    lines += ["", corr_header, "|---|---|---|---:|---:|---:|---:|---|"]
    for c in result["correctness"]:
      head = f"| {c['variant']} | {c['reference']} | {c['attention_ran']} |"
      if "error" in c:
        lines.append(f"{head} {c['error']} | | | | |")
        continue
      lines.append(f"{head} {c['x0_hat_rel_l2']:.2e} | {_fmt(c.get('x0_hat_rel_l2_t_lt_500'), '.2e')} "
                   f"| {c['x0_hat_max_abs']:.2e} | {c['eps_rel_l2']:.2e} | {c['finite']} |")
  return "\n".join(lines) + "\n"


def parse_args(argv):
  ap = argparse.ArgumentParser(description="DiffAug throughput benchmark (issue 7)",
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--tiny", action="store_true", help="tiny presets and sizes (CPU smoke test)")
  ap.add_argument("--cases", default=None,
                  help="comma list program:dtype:attention:batch[:key=value+...] (default: the plan)")
  ap.add_argument("--batch", default=None, help="override the main batch (and the sweep: '128,256,64')")
  ap.add_argument("--members", type=int, default=10, help="DiffAug-Ensemble members (t = 0, 50, ...)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--target-s", type=float, default=4.0, help="timed seconds per case (sets iters)")
  ap.add_argument("--max-iters", type=int, default=20)
  ap.add_argument("--time-budget", type=float, default=None, help="seconds; later cases are skipped")
  ap.add_argument("--compile-estimate", type=float, default=None,
                  help="assumed seconds per case before one has been measured (default 150 full, 10 tiny)")
  ap.add_argument("--out", default=None, help="dir for results.json / results.md (written after each case)")
  ap.add_argument("--profile", default=None, help="dir: capture a jax.profiler trace of --profile-cases")
  ap.add_argument("--profile-cases", default="train,denoise",
                  help="comma-separated programs (their first good bf16 case, plan order) or case names to "
                       "trace, a few calls each")
  ap.add_argument("--profile-steps", type=int, default=2)
  ap.add_argument("--pallas-tuning", default=None,
                  help="JSON of pallas_norm.Tuning fields (bench_pallas_norm.py's pallas_tuning.json) for tune=1 "
                       "cases; with the default plan it adds the tuned cases")
  ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
  ap.add_argument("--peak-tflops", type=float, default=None, help="use this bf16 peak instead of measuring")
  ap.add_argument("--no-xla-flags", action="store_true", help="do not call perf.set_xla_gpu_flags()")
  ap.add_argument("--seed", type=int, default=0)
  return ap.parse_args(argv)


def _write(out_dir: str | None, result: dict) -> None:
  if not out_dir:
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table_markdown(result))


def parse_profile_specs(text: str) -> set:
  """`--profile-cases`: program names, and case specs in canonical form (any option order); ValueError else."""
  specs = set()
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    if ":" not in item and item not in PROGRAMS:
      raise ValueError(f"--profile-cases: {item!r} is neither a program {PROGRAMS} nor a case spec")
    specs.add(Case.parse(item).name if ":" in item else item)
  return specs


def profile_keys(case: Case, specs: set, done) -> list:
  """The `--profile-cases` entries that `case` answers: its own case name, and its program when it is the
  first good bf16 case of that program (both share one trace)."""
  keys = [case.name] if case.name in specs and case.name not in done else []
  if case.program in specs and case.program not in done and case.dtype == "bf16":
    keys.append(case.program)
  return keys


def profile_program(bench: Bench, keys: list, args, result: dict, log) -> None:
  """Trace `--profile-steps` calls of the last good compiled case (see run_case), store its kernel summary
  under `result["profile"][key]` for each key and write profile_<keys[0]>.md (non-alphanumerics as "_")."""
  jax = _jax()
  if bench.last_good is None or not keys:
    return
  key = keys[0]
  case, call = bench.last_good
  safe = "".join(ch if ch.isalnum() else "_" for ch in key)
  trace_dir = os.path.join(args.profile, safe)
  try:
    jax.block_until_ready(call(0))
    jax.profiler.start_trace(trace_dir)
    try:
      for i in range(args.profile_steps):
        jax.block_until_ready(call(i + 1))  # synchronised calls: isolated, comparable steps
    finally:
      jax.profiler.stop_trace()
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
      sys.path.insert(0, here)
    import profile_summary
    s = profile_summary.summarize(trace_dir)
    s.pop("files", None)
    s.update(case=case.name, steps=args.profile_steps)
    result.setdefault("profile", {}).update({k: s for k in keys})
    md = profile_summary.to_markdown(s)
    log(f"\n## profile {case.name} ({args.profile_steps} calls)\n" + md)
    if args.out:
      with open(os.path.join(args.out, f"profile_{safe}.md"), "w") as f:
        f.write(f"# {case.name}, {args.profile_steps} calls\n\n" + md)
  except Exception as e:  # noqa: BLE001 - the profile is informative; keep the numbers
    log(f"[profile] {key}: {type(e).__name__}: {e}")
    result.setdefault("profile", {}).update({k: {"error": f"{type(e).__name__}: {e}"} for k in keys})


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  added = [] if args.no_xla_flags else perf.set_xla_gpu_flags()
  jax = _jax()
  perf.enable_compilation_cache()
  import flax
  import jaxlib

  size = TINY if args.tiny else FULL
  if args.batch:
    bs = [int(v) for v in args.batch.split(",") if v.strip()]
    size = dataclasses.replace(size, main_batch=bs[0], sweep_batches=tuple(bs[1:]))
  args.pallas_tuning_overrides = load_pallas_tuning(args.pallas_tuning) if args.pallas_tuning else {}
  # The tuned cases only when the tuning changes something (else they would repeat the defaults' cases).
  cases = ([Case.parse(c) for c in args.cases.split(",")] if args.cases
           else default_plan(size, tuned=_changes_tuning(args.pallas_tuning_overrides)))
  if any(c.tune == "1" for c in cases) and not args.pallas_tuning:
    raise SystemExit("cases with tune=1 need --pallas-tuning FILE (benchmarks/bench_pallas_norm.py writes it)")
  profile_specs = parse_profile_specs(args.profile_cases)  # a typo fails here, not after the first compiles
  budget = args.time_budget
  t_start = time.perf_counter()
  log = lambda msg: print(msg, flush=True)

  result = {"meta": {
      "mode": "tiny" if args.tiny else "full", "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "python": platform.python_version(),
      "time_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_flags_added": added,
      "auto_attention": auto_attention_here(), "size": dataclasses.asdict(size), "members": args.members,
      "pallas_tuning": {"file": args.pallas_tuning, "overrides": args.pallas_tuning_overrides}},
      "cases": []}
  device = jax.devices()[0]
  result["meta"]["device"] = getattr(device, "device_kind", str(device))
  result["meta"]["platform"] = device.platform
  result["meta"]["num_devices"] = jax.device_count()
  log(f"[bench] {result['meta']['device']} ({device.platform}); jax {jax.__version__}; "
      f"{len(cases)} cases; budget {budget}")

  if args.peak_tflops:
    result["peak"] = {"bf16_tflops": args.peak_tflops, "source": "--peak-tflops"}
  elif not args.no_peak:
    result["peak"] = measure_peak(device, size.peak_n)
    args.peak_tflops = result["peak"]["bf16_tflops"]
    log(f"[bench] matmul peak: {result['peak']}")
  _write(args.out, result)

  t0 = time.perf_counter()
  bench = Bench(size, args)
  result["meta"]["setup_s"] = time.perf_counter() - t0
  result["meta"]["num_params"] = bench.num_params
  log(f"[bench] models ready in {result['meta']['setup_s']:.1f}s: {bench.num_params}")

  est_default = args.compile_estimate or (10.0 if args.tiny else 150.0)
  case_costs: list[float] = []
  costs_by_program: dict[str, float] = {}
  for case in cases:
    if any(r["case"] == case.name for r in result["cases"]):
      continue  # listed twice (names are canonical: the same options in another order)
    if static_skip(case, bench.platform):
      result["cases"].append({"case": case.name, "program": case.program, "status": "skipped",
                              "reason": static_skip(case, bench.platform)})
      continue
    elapsed = time.perf_counter() - t_start
    # The same program's last cost when known (the first case also paid for first-time setup), else the
    # known programs' costs scaled by the relative cost of this one (the train step compiles the UNet and a
    # ResNet-50 forward + backward: about twice the denoise call on CPU).
    est = costs_by_program.get(case.program) or (
        max(c * _REL_COST.get(case.program, 1.0) / _REL_COST.get(p, 1.0) for p, c in costs_by_program.items())
        if costs_by_program else est_default)
    if budget is not None and elapsed + est > budget:
      result["cases"].append({"case": case.name, "program": case.program, "status": "skipped",
                              "reason": f"time budget ({elapsed:.0f}s used, ~{est:.0f}s needed)"})
      log(f"[bench] skip {case.name}: budget")
      _write(args.out, result)
      continue
    log(f"[bench] {case.name} ...")
    tc = time.perf_counter()
    try:
      try:
        row = run_case(bench, case, args, log)
      except Exception as e:  # noqa: BLE001
        if case.attention != "auto" or not any(w in str(e).lower() for w in ("cudnn", "fmha")):
          raise
        # cuDNN failed past the library's own probe: keep the headline number on XLA attention, and say so.
        log(f"[bench]   {case.name}: cuDNN attention failed ({type(e).__name__}); rerun with XLA attention")
        row = run_case(bench, dataclasses.replace(case, attention="xla"), args, log)
        row.update(case=case.name, attention="auto", cudnn_error=f"{type(e).__name__}: {str(e)[:300]}")
    except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
      row = {"case": case.name, "program": case.program, "status": "error",
             "reason": f"{type(e).__name__}: {str(e)[:300]}"}
      log(traceback.format_exc(limit=3))
    row["wall_s"] = time.perf_counter() - tc
    if row.get("status") == "ok":
      case_costs.append(row["wall_s"])
      costs_by_program[case.program] = row["wall_s"]
      log(f"[bench]   {case.name} (attention {row['attention_ran']}, {row.get('triton_calls', 0)} Triton calls): "
          f"{row['images_per_s']:.2f} img/s, "
          f"{row['ms_per_image']:.2f} ms/img, "
          f"roofline {_fmt(row.get('roofline'), '.1%')}, compile {row['compile_s']:.1f}s, wall {row['wall_s']:.1f}s")
    else:
      log(f"[bench]   {case.name}: {row.get('status')} ({row.get('reason', '')})")
    result["cases"].append(row)
    result["correctness"] = correctness(bench)
    result["ab"] = ab_comparisons(result)
    _write(args.out, result)  # before profiling: a kill there must not lose this row
    near_end = budget is not None and time.perf_counter() - t_start + 30 > budget
    keys = profile_keys(case, profile_specs, result.get("profile", {}))
    if args.profile and row.get("status") == "ok" and keys and not near_end:
      profile_program(bench, keys, args, result, log)
      _write(args.out, result)

  if args.profile:
    missed = sorted(profile_specs - set(result.get("profile", {})))
    if missed:  # said loudly: a device run is too scarce to find out later that the trace is missing
      result["meta"]["profile_missed"] = missed
      log(f"[profile] no trace for {missed}: no such case ran well here (or the budget ended first)")
  result["meta"]["total_s"] = time.perf_counter() - t_start
  _write(args.out, result)
  log("\n" + table_markdown(result))
  return result


if __name__ == "__main__":
  main()
