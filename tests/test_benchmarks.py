"""Benchmarks + XLA flag helper: CPU smoke test of benchmarks/bench_diffaug.py --tiny, the profile summary,
and diffaug_jax.perf.

Runtime: ~10 s for the fast tests (one lowers six tiny programs); the two end-to-end smoke runs compile tiny
UNet/classifier programs (~10-40 s each on a busy 2-core machine) and are marked slow.
"""
import json
import os
import re
import sys

import numpy as np
import pytest

from diffaug_jax import perf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_diffaug
import profile_summary

FAST = ["--tiny", "--warmup", "1", "--repeats", "1", "--max-iters", "1", "--target-s", "0.01",
        "--no-xla-flags"]


# ---------------------------------------------------------------- perf.set_xla_gpu_flags


def test_flags_appended_once_and_user_value_wins():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  added = perf.set_xla_gpu_flags(env=env)
  assert added == ["--xla_gpu_enable_latency_hiding_scheduler=true"]
  assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
  assert perf.set_xla_gpu_flags(env=env) == []  # idempotent
  env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
  assert perf.set_xla_gpu_flags(env=env, extra=perf.CUBLAS_GEMMS) == ["--xla_gpu_enable_triton_gemm=false"]
  assert "--xla_gpu_enable_latency_hiding_scheduler=false" in env["XLA_FLAGS"]
  assert "latency_hiding_scheduler=true" not in env["XLA_FLAGS"]


def test_flags_opt_out_and_bad_names():
  env = {"DIFFAUG_XLA_FLAGS": "0"}
  assert perf.set_xla_gpu_flags(env=env) == [] and "XLA_FLAGS" not in env
  env = {}
  perf.set_xla_gpu_flags(env=env)
  assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
  with pytest.raises(ValueError, match="not an XLA flag"):
    perf.set_xla_gpu_flags(env={}, extra={"--xla_gpu_foo": "1"})
  with pytest.raises(ValueError, match="not an XLA flag"):
    perf.set_xla_gpu_flags(env={}, extra={"gpu_foo": "1"})
  assert perf.flag_names("--a=1  --b --c=x=y") == {"a", "b", "c"}


def test_flags_refused_after_backend_init():
  import jax
  jax.devices()  # the test process has initialised its backend
  assert perf.backend_initialized()
  before = os.environ.get("XLA_FLAGS")
  with pytest.warns(RuntimeWarning, match="after JAX initialised"):
    assert perf.set_xla_gpu_flags() == []
  assert os.environ.get("XLA_FLAGS") == before


# ---------------------------------------------------------------- plan / parsing


def test_case_parse_and_plan():
  Case = bench_diffaug.Case
  c = Case.parse("train:bf16:cudnn:128")
  assert (c.program, c.dtype, c.attention, c.batch) == ("train", "bf16", "cudnn", 128)
  assert (c.up, c.gn, c.cast, c.fuse, c.opts) == ("phases", "auto", "1", "all", "")
  c = Case.parse("denoise:bf16:auto:4:cast=0+up=transposed+gn=two_pass")
  assert (c.up, c.gn, c.cast) == ("transposed", "two_pass", "0")
  # Canonical name: options in a fixed order, defaults left out; it parses back to the same case.
  assert c.name == "denoise:bf16:auto:4:up=transposed+gn=two_pass+cast=0" and c.variant == c.name[8:]
  assert Case.parse("denoise:bf16:auto:4:up=phases+gn=auto+cast=1+fuse=all").name == "denoise:bf16:auto:4"
  assert Case.parse("denoise:f32:xla:2:gn=one_pass").name == "denoise:f32:xla:2:gn=one_pass"
  for bad, msg in (("train:bf16:128", "expected program"), ("fit:bf16:xla:8", "program in"),
                   ("train:fp8:xla:8", "dtype in"), ("train:bf16:best:8", "attention in"),
                   ("train:bf16:xla:0", "positive int"), ("train:bf16:xla:x", "positive int"),
                   ("train:bf16:xla:8:", "key=value"), ("train:bf16:xla:8:up", "key=value"),
                   ("train:bf16:xla:8:attn=cudnn", "key=value"), ("train:bf16:xla:8:up=bilinear", "up='bilinear'"),
                   ("train:bf16:xla:8:gn=onepass", "gn='onepass'"), ("train:bf16:xla:8:cast=yes", "cast='yes'"),
                   ("train:bf16:xla:8:up=nearest+up=transposed", "given twice"),
                   ("train:bf16:xla:8:up=transposed:gn=one_pass", "expected program")):
    with pytest.raises(ValueError, match=re.escape(f"case {bad!r}") + ".*" + re.escape(msg)):
      Case.parse(bad)
  plan = bench_diffaug.default_plan(bench_diffaug.FULL)
  names = [p.name for p in plan]
  before = "up=nearest+gn=channel+skip=concat+edge=conv"
  assert names == ["denoise:bf16:auto:128", "train:bf16:auto:128", "denoise:bf16:auto:128:skip=fused",
                   "train:bf16:auto:128:skip=fused", "denoise:f32hi:xla:128", "ensemble:bf16:auto:128",
                   "ensemble:bf16:auto:128:skip=fused", "denoise:bf16:auto:128:up=nearest",
                   "train:bf16:auto:128:up=nearest",
                   "denoise:bf16:auto:128:fuse=none",
                   f"denoise:bf16:auto:128:{before}", f"train:bf16:auto:128:{before}",
                   "denoise:bf16:auto:128:gn=channel", "denoise:bf16:auto:128:skip=concat",
                   "denoise:bf16:auto:128:edge=conv", "denoise:bf16:xla:128", "denoise:bf16:auto:128:up=transposed",
                   "denoise:bf16:auto:128:cast=0", "denoise:f32:xla:128", "train:bf16:auto:64", "train:bf16:auto:256",
                   "denoise:bf16:auto:128:gn=one_pass", "train:bf16:auto:128:up=transposed"]
  assert all(Case.parse(n) == p for n, p in zip(names, plan))
  tuned = [p.name for p in bench_diffaug.default_plan(bench_diffaug.FULL, tuned=True)]
  assert tuned == names[:7] + [f"{p}:bf16:auto:128:skip=fused+tune=1" for p in ("denoise", "train")] + [
      f"{p}:bf16:auto:128:tune=1" for p in ("denoise", "train", "ensemble")] + names[7:]
  tiny = [p.name for p in bench_diffaug.default_plan(bench_diffaug.TINY)]
  assert tiny[:5] == ["denoise:bf16:auto:4", "train:bf16:auto:4", "denoise:bf16:auto:4:skip=fused",
                      "train:bf16:auto:4:skip=fused", "denoise:f32hi:xla:4"]
  assert "train:bf16:auto:2" in tiny and len(tiny) == len(names) - 1  # one sweep batch


def test_ab_comparisons_against_the_library_default():
  ok = lambda case, ips, attn="xla": {"case": case, "program": case.split(":")[0], "status": "ok",
                                      "images_per_s": ips, "ms_per_image": 1e3 / ips, "s_per_call": 8 / ips,
                                      "attention_ran": attn}
  result = {"cases": [ok("denoise:bf16:auto:8", 100.0, "cudnn"), ok("denoise:bf16:xla:8", 80.0),
                      ok("denoise:bf16:auto:8:up=transposed", 110.0, "cudnn"),
                      ok("denoise:bf16:auto:8:gn=two_pass", 101.0, "cudnn"),
                      ok("train:bf16:auto:8:up=transposed", 50.0),  # its baseline did not run: no row
                      {"case": "denoise:bf16:auto:8:cast=0", "status": "skipped"},
                      ok("denoise:f32hi:xla:8", 10.0)]}
  ab = {a["variant"]: a for a in bench_diffaug.ab_comparisons(result)}
  assert set(ab) == {"denoise:bf16:xla:8", "denoise:bf16:auto:8:up=transposed", "denoise:bf16:auto:8:gn=two_pass"}
  assert ab["denoise:bf16:xla:8"]["speed_ratio"] == pytest.approx(0.8)
  assert [ab[k]["verdict"] for k in sorted(ab)] == ["same", "faster", "slower"]
  assert ab["denoise:bf16:xla:8"]["attention_ran"] == ("xla", "cudnn")
  result["meta"] = {k: "" for k in ("device", "platform", "jax", "jaxlib", "flax", "mode", "time_utc",
                                    "xla_flags", "auto_attention")}
  md = bench_diffaug.table_markdown(result)
  assert "| denoise:bf16:auto:8:up=transposed | denoise:bf16:auto:8 | 1.100 | faster | cudnn vs cudnn |" in md


def test_attention_ran_and_static_skip():
  assert bench_diffaug.attention_ran('%0 = stablehlo.custom_call @"__cudnn$fmhaSoftmax"(%q, %k, %v)') == "cudnn"
  assert bench_diffaug.attention_ran("%0 = stablehlo.dot_general %q, %k") == "xla"
  assert bench_diffaug.auto_attention_here() == "xla"  # CPU: "auto" is the XLA path
  skip = bench_diffaug.static_skip
  assert "GPU" in skip(bench_diffaug.Case.parse("denoise:bf16:cudnn:2"), "cpu")
  assert "bf16" in skip(bench_diffaug.Case.parse("denoise:f32:cudnn:2"), "gpu")
  assert skip(bench_diffaug.Case.parse("denoise:bf16:auto:2:up=transposed"), "cpu") == ""


def test_variants_reach_the_module_and_the_program():
  """Options are UNet fields set by clone (same params), and the lowered programs differ accordingly."""
  import jax
  import jax.numpy as jnp
  Case = bench_diffaug.Case
  bench = bench_diffaug.Bench(bench_diffaug.TINY, bench_diffaug.parse_args(FAST))
  case = Case.parse("train:bf16:cudnn:2:up=transposed+gn=one_pass+edge=conv+skip=concat+cast=0")
  assert case.name == "train:bf16:cudnn:2:up=transposed+gn=one_pass+skip=concat+edge=conv+cast=0"
  m = bench.eps_factory(case).module
  assert (m.dtype, m.attention_impl, m.norm_stats, m.upsample_impl, m.skip_impl, m.edge_impl) == (
      jnp.bfloat16, "cudnn", "one_pass", "transposed", "concat", "conv")
  m = bench.eps_factory(Case.parse("denoise:f32hi:auto:2")).module
  assert (m.dtype, m.attention_impl, m.norm_stats, m.upsample_impl, m.skip_impl, m.edge_impl) == (
      jnp.float32, "auto", "auto", "phases", "split", "gemm")  # the UNet's defaults
  assert m.clone(dtype=bench.unet.dtype, attention_impl="auto") == bench.unet  # only the case's fields differ

  def lowered(spec):
    fn, args_for, _ = bench.build(Case.parse(spec))
    args = args_for(0)
    score_params = args[3] if spec.startswith("train") else args[0]
    return fn.lower(*args).as_text(), {str(l.dtype) for l in jax.tree.leaves(score_params)}

  base, base_dtypes = lowered("denoise:bf16:auto:2")
  up, _ = lowered("denoise:bf16:auto:2:up=transposed")
  two, _ = lowered("denoise:bf16:auto:2:gn=two_pass")
  nocast, nocast_dtypes = lowered("denoise:bf16:auto:2:cast=0")
  concat, _ = lowered("denoise:bf16:auto:2:skip=concat+edge=conv")
  _, train_dtypes = lowered("train:bf16:auto:2")
  assert "lhs_dilate = [2, 2]" in up and "lhs_dilate = [2, 2]" not in base  # stride-2 transposed convs
  # one-pass statistics subtract the group's pivot (bf16 "auto"); two-pass has fewer subtractions
  assert two.count("stablehlo.subtract") < base.count("stablehlo.subtract")
  # cast=1 (default): the score params enter the programs (train step too) already in bf16 (GroupNorm and the
  # float32 layers stay float32); cast=0: all float32, converted inside the program.
  assert base_dtypes == train_dtypes == {"bfloat16", "float32"} and nocast_dtypes == {"float32"}
  assert nocast.count("stablehlo.convert") > base.count("stablehlo.convert")
  assert bench_diffaug.attention_ran(base) == "xla"
  # split skips (default): one 1x1 conv more in each of the 4 decoder blocks; edge=gemm (default): the input
  # and output convs are GEMMs (dot_general)
  assert base.count("stablehlo.convolution") == concat.count("stablehlo.convolution") + 4 - 2


def test_time_budget_skips_cases(tmp_path):
  res = bench_diffaug.main(FAST + ["--no-peak", "--time-budget", "0", "--out", str(tmp_path),
                                   "--profile", str(tmp_path / "trace"), "--profile-cases", "denoise",
                                   "--cases", "denoise:bf16:auto:2,train:bf16:auto:2:up=transposed"])
  assert res["meta"]["profile_missed"] == ["denoise"]  # nothing ran: the missing trace is reported
  assert [r["status"] for r in res["cases"]] == ["skipped", "skipped"]
  assert "time budget" in res["cases"][0]["reason"]
  assert json.loads((tmp_path / "results.json").read_text())["meta"]["mode"] == "tiny"


def test_cudnn_failure_reruns_auto_cases_on_xla_and_budget_scales_by_program(tmp_path, monkeypatch):
  """An "auto" case whose cuDNN attention fails (past the library's probe) is rerun once with XLA attention
  and reported under its own name with the error; other errors are not retried. An unseen program's time
  estimate is the known programs' costs scaled by its relative cost (train ~2x denoise)."""
  seen = []

  def fake_run_case(bench, case, args, log):
    seen.append(case.name)
    if case.program == "denoise" and case.attention == "auto":
      raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED in __cudnn$fmhaSoftmax")
    if case.program == "ensemble":
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return {"case": case.name, "program": case.program, "attention": case.attention, "status": "ok",
            "attention_ran": case.attention, "images_per_s": 1.0, "ms_per_image": 1.0, "s_per_call": 1.0,
            "compile_s": 0.0}

  monkeypatch.setattr(bench_diffaug, "run_case", fake_run_case)
  monkeypatch.setattr(bench_diffaug, "Bench", lambda size, args: type("B", (), dict(
      num_params={}, platform="cpu", outputs={}, programs={}))())
  clock = iter(range(0, 10_000, 10))  # every perf_counter() call advances 10 s: each case "costs" ~20 s
  monkeypatch.setattr(bench_diffaug.time, "perf_counter", lambda: float(next(clock)))
  res = bench_diffaug.main(FAST + ["--no-peak", "--out", str(tmp_path), "--time-budget", "95",
                                   "--cases", "denoise:bf16:auto:2,ensemble:bf16:auto:2,train:bf16:auto:2"])
  rows = {r["case"]: r for r in res["cases"]}
  assert seen[:3] == ["denoise:bf16:auto:2", "denoise:bf16:xla:2", "ensemble:bf16:auto:2"]
  d = rows["denoise:bf16:auto:2"]
  assert d["status"] == "ok" and d["attention"] == "auto" and d["attention_ran"] == "xla"
  assert "CUDNN_STATUS_NOT_SUPPORTED" in d["cudnn_error"]
  assert rows["ensemble:bf16:auto:2"]["status"] == "error"  # not a cuDNN error: no rerun
  # train: not seen yet, so ~2x the denoise case's cost is needed; the budget no longer has it.
  assert rows["train:bf16:auto:2"]["status"] == "skipped", rows["train:bf16:auto:2"]
  assert "~20s needed" in rows["train:bf16:auto:2"]["reason"]  # 2 x the denoise case's 10 s


# ---------------------------------------------------------------- end-to-end (tiny, CPU)


@pytest.mark.slow
def test_denoise_correctness_and_table(tmp_path):
  variants = ["bf16:auto:2", "bf16:auto:2:up=transposed+gn=two_pass", "bf16:auto:2:cast=0"]
  cases = ["denoise:" + v for v in ["f32hi:xla:2", "bf16:cudnn:2"] + variants]
  res = bench_diffaug.main(FAST + ["--out", str(tmp_path), "--cases", ",".join(cases)])
  rows = {r["case"]: r for r in res["cases"]}
  assert list(rows) == cases
  for name in ["denoise:f32hi:xla:2"] + ["denoise:" + v for v in variants]:
    r = rows[name]
    assert r["status"] == "ok" and r["finite"] and r["attention_ran"] == "xla", r  # CPU: "auto" = XLA
    assert r["images_per_s"] > 0 and r["s_per_call"] > 0
    assert r["model_flops"] > 1e6 and r["tflops_per_s"] > 0 and 0 < r["roofline"] < 10
  # One FLOP count per (program, batch) whatever the variant: throughputs compare the same work.
  assert len({rows["denoise:" + v]["model_flops"] for v in variants}) == 1
  assert rows["denoise:bf16:cudnn:2"]["status"] == "skipped"  # CPU: no cuDNN attention
  assert res["peak"]["bf16_tflops"] > 0 and res["meta"]["auto_attention"] == "xla"
  corr = {c["variant"]: c for c in res["correctness"]}
  assert list(corr) == variants  # every denoise variant, options included, vs the f32hi reference
  for c in corr.values():
    assert c["reference"] == "f32hi:xla:2" and c["finite"] and c["attention_ran"] == "xla", c
    # bf16 really differs from the float32 reference, but stays a bf16-sized error.
    assert 1e-4 < c["eps_rel_l2"] < 0.1 and 1e-4 < c["x0_hat_rel_l2"] < 0.1, c
  # Pre-cast params give the same outputs as the per-call cast (the same rounding, done earlier).
  assert np.isclose(corr["bf16:auto:2:cast=0"]["eps_rel_l2"], corr["bf16:auto:2"]["eps_rel_l2"], rtol=1e-3)
  md = (tmp_path / "results.md").read_text()
  assert "| denoise:bf16:auto:2:up=transposed+gn=two_pass | ok | xla |" in md
  assert "| bf16:auto:2:cast=0 | f32hi:xla:2 | xla |" in md
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["case"] for r in saved["cases"]] == list(rows)


@pytest.mark.slow
def test_train_and_ensemble_with_profile(tmp_path):
  prof = tmp_path / "trace"
  named = "ensemble:bf16:auto:2:skip=concat+up=phases"  # a non-canonical spelling of the third case
  res = bench_diffaug.main(FAST + ["--no-peak", "--peak-tflops", "1.0", "--members", "2", "--out",
                                   str(tmp_path), "--profile", str(prof), "--profile-cases", f"train,{named}",
                                   "--profile-steps", "1", "--cases",
                                   "train:bf16:auto:2,ensemble:bf16:auto:2,ensemble:bf16:auto:2:skip=concat"])
  rows = {r["case"]: r for r in res["cases"]}
  tr, en = rows["train:bf16:auto:2"], rows["ensemble:bf16:auto:2"]
  assert tr["status"] == "ok" and np.isfinite(tr["loss"]) and tr["images_per_s"] > 0, tr
  assert en["status"] == "ok" and en["ms_per_image"] > 0, en
  # Ensemble FLOPs are summed from its parts: 1 UNet call (t=50) + 2 classifier calls per image.
  assert en["model_flops"] > 0
  assert res["profile"]["train"]["num_kernels"] > 0, res["profile"]
  assert (tmp_path / "profile_train.md").exists()
  # A case named in --profile-cases (in any spelling) is traced (its program's first case, not named, is not).
  assert set(res["profile"]) == {"train", "ensemble:bf16:auto:2:skip=concat"}
  assert res["profile"]["ensemble:bf16:auto:2:skip=concat"]["case"] == "ensemble:bf16:auto:2:skip=concat"
  assert (tmp_path / "profile_ensemble_bf16_auto_2_skip_concat.md").exists()


def test_profile_specs_and_keys():
  """--profile-cases: programs and case specs (canonicalised); a case answers its own name and, as its
  program's first good bf16 case, the program too (one trace for both); a typo is an error."""
  Case = bench_diffaug.Case
  specs = bench_diffaug.parse_profile_specs("denoise, denoise:bf16:auto:4:edge=conv+skip=concat,")
  assert specs == {"denoise", "denoise:bf16:auto:4:skip=concat+edge=conv"}
  keys = bench_diffaug.profile_keys
  assert keys(Case.parse("denoise:bf16:auto:4:skip=concat+edge=conv"), specs, {}) == [
      "denoise:bf16:auto:4:skip=concat+edge=conv", "denoise"]
  assert keys(Case.parse("denoise:bf16:auto:4"), specs, {"denoise": {}}) == []
  assert keys(Case.parse("denoise:f32hi:xla:4"), specs, {}) == []  # the program key wants a bf16 case
  assert keys(Case.parse("train:bf16:auto:4"), specs, {}) == []
  for bad in ("denoize", "denoise:bf16:auto:4:skip=sideways"):
    with pytest.raises(ValueError):
      bench_diffaug.parse_profile_specs(bad)


def test_profile_summary_on_a_trace(tmp_path):
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((64, 64))
  f(a).block_until_ready()
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(2):
    f(a).block_until_ready()
  jax.profiler.stop_trace()
  s = profile_summary.summarize(str(tmp_path))
  assert s["source"] == "cpu" and s["num_kernels"] > 0 and s["busy_ms"] > 0
  assert abs(sum(s["categories"].values()) - s["busy_ms"]) < 1e-6 * max(1.0, s["busy_ms"])
  assert "| category | ms | share |" in profile_summary.to_markdown(s)
  with pytest.raises(FileNotFoundError):
    profile_summary.summarize(str(tmp_path / "empty"))


def test_categorize():
  c = profile_summary.categorize
  assert c("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32") == "convolution"
  assert c("add_convert_fusion.9") == "elementwise fusion"
  assert c("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
  assert c("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_TNT") == "gemm"
  assert c("loop_transpose_fusion") == "copy/transpose"
  assert c("input_reduce_fusion_3") == "reduction fusion"


def test_memory_precheck_and_flops_from_a_cpu_lowering():
  """A compiled case that cannot fit the device's free memory is skipped (not a RESOURCE_EXHAUSTED at the
  first call); model FLOPs come from a lowering on the host CPU (the CUDA plugin's PJRT C API has no cost
  analysis of a lowered program), typed PRNG keys and donated arguments included."""
  import jax
  import jax.numpy as jnp

  class Gpu:
    def memory_stats(self):
      return {"bytes_limit": 10 * 2**30, "bytes_in_use": 2 * 2**30}

  class Cpu:
    def memory_stats(self):
      return None

  assert bench_diffaug._memory_shortfall({"temp_size_in_bytes": 7 * 2**30}, Gpu()) == ""
  assert "needs 9.0 GiB, 8.0 GiB free of 10.0" in bench_diffaug._memory_shortfall(
      {"temp_size_in_bytes": 8 * 2**30, "output_size_in_bytes": 2**30}, Gpu())
  assert bench_diffaug._memory_shortfall({"temp_size_in_bytes": 2**40}, Cpu()) == ""
  f = jax.jit(lambda x, k: x @ x + jax.random.normal(k, x.shape), donate_argnums=(0,))
  lowered = bench_diffaug._lower_for_flops(f, jnp.ones((64, 64)), jax.random.key(0))
  assert bench_diffaug._flops_of(lowered) >= 2 * 64 ** 3


# ---------------------------------------------------------------- bench_pallas_norm.py + --pallas-tuning


def test_pallas_tuning_sweep_and_the_bench_option(tmp_path, monkeypatch):
  """The launch-parameter sweep runs end to end on CPU (tiny shapes, Pallas interpreter), checks every
  candidate against XLA, writes pallas_tuning.json/.md whose overrides the benchmark loads (validated before
  anything compiles); tune=1 cases need the file; the full shapes refuse a CPU."""
  import bench_pallas_norm
  from diffaug_jax.models import pallas_norm
  res = bench_pallas_norm.main(["--tiny", "--out", str(tmp_path)])
  assert {r["kernel"] for r in res["rows"]} == {"apply", "copy", "stats", "skip"}
  checked = [r for r in res["rows"] if "ok" in r]
  assert len(checked) == (2 * len(bench_pallas_norm.TINY_APPLY_GRID) + len(bench_pallas_norm.TINY_STATS_GRID)
                          + len(bench_pallas_norm.TINY_SKIP_GRID))
  assert all(r["ok"] for r in checked), checked
  assert set(res["best"]) == {"apply", "stats", "skip"}
  saved = json.loads((tmp_path / "pallas_tuning.json").read_text())
  assert saved["tuning"] == res["tuning"] and "| stats |" in (tmp_path / "pallas_tuning.md").read_text()
  assert bench_diffaug.load_pallas_tuning(str(tmp_path / "pallas_tuning.json")) == res["tuning"]
  pallas_norm.Tuning(**res["tuning"])
  flat = tmp_path / "flat.json"
  flat.write_text(json.dumps({"apply_rows": 48}))
  with pytest.raises(ValueError, match="power of two"):
    bench_diffaug.load_pallas_tuning(str(flat))
  with pytest.raises(SystemExit, match="--pallas-tuning"):
    bench_diffaug.main(FAST + ["--no-peak", "--cases", "denoise:bf16:auto:2:tune=1"])
  with pytest.raises(SystemExit, match="need a GPU"):
    bench_pallas_norm.main([])
  # One kernel's sweep; a candidate that fails to compile is a failed row, not the end of the sweep.
  real = pallas_norm.affine_act_skip

  def flaky(*args, **kw):
    if pallas_norm.current_tuning().skip_rows == 64:
      raise RuntimeError("out of registers")
    return real(*args, **kw)

  monkeypatch.setattr(pallas_norm, "affine_act_skip", flaky)
  only = bench_pallas_norm.main(["--tiny", "--kernels", "skip"])
  monkeypatch.setattr(pallas_norm, "affine_act_skip", real)
  assert {r["kernel"] for r in only["rows"]} == {"skip"} and only["best"]["skip"]["config"] == "default"
  failed = [r for r in only["rows"] if "error" in r]
  assert [r["config"] for r in failed] == ["skip_rows=64"] and "out of registers" in failed[0]["error"]
  with pytest.raises(SystemExit, match="--kernels"):
    bench_pallas_norm.main(["--tiny", "--kernels", "apply,matmul"])
  flat.write_text(json.dumps({"apply_rows": 16, "stats_rows": 16}))
  from diffaug_jax.models import unet as unet_lib
  seen, folded = [], unet_lib.GroupNorm32._folded

  def spy(self, *args, **kw):  # the launch parameters in force while the UNet's GroupNorms are traced
    seen.append(pallas_norm.current_tuning())
    return folded(self, *args, **kw)

  monkeypatch.setattr(unet_lib.GroupNorm32, "_folded", spy)
  out = bench_diffaug.main(FAST + ["--no-peak", "--pallas-tuning", str(flat), "--cases",
                                   "denoise:bf16:auto:2:tune=1,denoise:bf16:auto:2"])
  assert [(r["case"], r["status"], r["tune"]) for r in out["cases"]] == [
      ("denoise:bf16:auto:2:tune=1", "ok", "1"), ("denoise:bf16:auto:2", "ok", "0")]
  tuned = pallas_norm.Tuning(apply_rows=16, stats_rows=16)
  assert tuned in seen and pallas_norm.Tuning() in seen  # tune=1 traced with the file's, tune=0 with the defaults'
  assert set(seen) == {tuned, pallas_norm.Tuning()}
  assert out["meta"]["pallas_tuning"] == {"file": str(flat), "overrides": {"apply_rows": 16, "stats_rows": 16}}
  assert pallas_norm.current_tuning() == pallas_norm.Tuning()  # restored after the case
  plan = [c.name for c in bench_diffaug.default_plan(bench_diffaug.TINY, tuned=True)]
  assert plan[9:12] == [f"{p}:bf16:auto:4:tune=1" for p in ("denoise", "train", "ensemble")]
  assert bench_diffaug._changes_tuning({"apply_rows": 16}) == ("norm",)
  assert bench_diffaug._changes_tuning({"apply_rows": 32}) == ()
  assert bench_diffaug._changes_tuning({"skip_rows": 64, "stats_stages": 2}) == ("skip", "norm")
  skip_only = [c.name for c in bench_diffaug.default_plan(bench_diffaug.TINY, tuned=("skip",))]
  assert [n for n in skip_only if "tune=1" in n] == [f"{p}:bf16:auto:4:skip=fused+tune=1" for p in ("denoise", "train")]


@pytest.mark.parametrize("fuse, off", [("none", ("pool", "up")), ("nopool", ("pool",)), ("noup", ("up",)),
                                       ("all", ())])
def test_fuse_option_refuses_fused_kernels_while_tracing(fuse, off):
  """fuse=... (the A/B of the resampling GroupNorm kernels): inside the case's tracing context the named
  kernels' predicates refuse every shape, so a resampling GroupNorm lowered for CUDA applies with the rows
  kernel and resamples in XLA (a reduce_window pool, a 2x2 broadcast); outside it every predicate is back."""
  import argparse

  import jax
  import jax.numpy as jnp
  from jax import export

  from diffaug_jax.models import pallas_norm
  from diffaug_jax.models import unet as unet_lib
  case = bench_diffaug.Case.parse(f"denoise:bf16:auto:2:fuse={fuse}")
  assert case.fuse == fuse and (case.name.endswith(f"fuse={fuse}") or fuse == "all")
  v = {"params": {"scale": jnp.ones(256), "bias": jnp.zeros(256)}}
  x = jax.ShapeDtypeStruct((2, 16, 16, 256), jnp.bfloat16)
  resample = {"pool": "down", "up": "up"}
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])

  def xla_resamples(kernel):  # lowered: is the resampling left to XLA?
    gn = unet_lib.GroupNorm32(stats="pallas")
    fn = jax.jit(lambda v, x: gn.apply(v, x, silu=True, resample=resample[kernel]))
    text = export.export(fn, **opts)(v, x).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the sums + one apply kernel, fused or not
    return "reduce_window" in text or bool(re.search(r"broadcast_in_dim .*-> tensor<2x16x2x16x2x256xbf16>", text))

  with bench_diffaug._kernel_ctx(case, argparse.Namespace(pallas_tuning_overrides={})):
    inside = {k: xla_resamples(k) for k in resample}
  assert inside == {k: k in off for k in resample}
  assert not any(xla_resamples(k) for k in resample)
  assert pallas_norm.pool_supported(16, 16, 256) and pallas_norm.up_supported(16, 16, 256)


# ---------------------------------------------------------------- triton_resources.py


def _lowered_kernels():
  """A program with two identical apply calls and one fused skip call, lowered for CUDA on this machine."""
  import jax
  import jax.numpy as jnp
  from jax import export

  from diffaug_jax.models import pallas_norm

  def fn(x, a, d, w, bias):
    y1 = pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16)
    y2 = pallas_norm.affine_act(x + 1, a, d, silu=True, out_dtype=jnp.bfloat16)
    return y1, y2, pallas_norm.affine_act_skip(x, a, d, w, bias, silu=False, out_dtype=jnp.bfloat16)

  s = jax.ShapeDtypeStruct
  args = (s((2, 256, 256), jnp.bfloat16), s((2, 256), jnp.float32), s((2, 256), jnp.float32),
          s((256, 256), jnp.bfloat16), s((256,), jnp.bfloat16))
  with pallas_norm.tuning(skip_warps=4, skip_stages=2, skip_block_o=128):
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  return exported.mlir_module()


def test_triton_resources_reads_every_kernel_of_a_cuda_lowering():
  """The offline register census finds each Triton call of a program lowered for CUDA (no GPU here), with
  its launch parameters as Tuning set them and its IR as text; identical kernels make one row."""
  import triton_resources

  calls = triton_resources.triton_calls(_lowered_kernels())
  assert [c["name"] for c in calls] == ["_kernel", "_kernel", "_skip_kernel"]
  skip = calls[2]
  assert (skip["warps"], skip["stages"]) == (4, 2)
  assert skip["grid"] == (2, 2, 2)  # (output tiles of 128, batch, row tiles of 128)
  assert "tt.func public @_skip_kernel" in skip["ttir"] and "tt.dot" in skip["ttir"]
  assert calls[0]["ttir"] == calls[1]["ttir"]
  seen = []
  rows = triton_resources.kernel_rows(_lowered_kernels(), compile_fn=lambda *a: seen.append(a) or {"regs": 1})
  assert [(r["kernel"], r["calls"], r["warps"]) for r in rows] == [("_kernel", 2, 4), ("_skip_kernel", 1, 4)]
  assert len(seen) == 2 and "| _skip_kernel | 1 |" in triton_resources.table(
      [dict(r, stack=0, spill_stores=0, spill_loads=0, shared=0, mma=0) for r in rows])
  assert triton_resources.parse_assignments(["skip_impl=fused", "skip_rows=64"]) == {
      "skip_impl": "fused", "skip_rows": 64}
  with pytest.raises(SystemExit, match="name=value"):
    triton_resources.parse_assignments(["skip_rows"])


def test_triton_resources_compiles_for_sm90_without_a_gpu():
  """With the pip `triton` installed (not a dependency: skipped without it), a kernel compiles for sm_90a
  and its resources are read back: the skip kernel runs on Hopper MMA instructions."""
  pytest.importorskip("triton")
  import triton_resources

  skip = triton_resources.triton_calls(_lowered_kernels())[2]
  res = triton_resources.compile_sm90(skip["ttir"], skip["warps"], skip["stages"])
  assert 0 < res["regs"] <= 255 and res["mma"] > 0 and res["shared"] > 0
