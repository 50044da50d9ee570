"""Benchmarks + XLA flag helper: CPU smoke test of benchmarks/bench_diffaug.py --tiny, the profile summary,
and diffaug_jax.perf.

Runtime: ~1 s for the fast tests; the two end-to-end smoke runs compile tiny UNet/classifier programs
(~20-40 s each on a busy 2-core machine) and are marked slow.
"""
import json
import os
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
  c = bench_diffaug.Case.parse("train:bf16:cudnn:128")
  assert (c.program, c.dtype, c.attention, c.batch) == ("train", "bf16", "cudnn", 128)
  for bad in ("train:bf16:128", "fit:bf16:xla:8", "train:fp8:xla:8", "train:bf16:xla:0", "train:bf16:xla:x"):
    with pytest.raises(ValueError, match="case"):
      bench_diffaug.Case.parse(bad)
  plan = bench_diffaug.default_plan(bench_diffaug.FULL)
  names = [p.name for p in plan]
  assert names[:3] == ["denoise:bf16:xla:128", "train:bf16:xla:128", "denoise:f32hi:xla:128"]
  assert {"ensemble:bf16:xla:128", "train:bf16:best:64", "train:bf16:best:256"} <= set(names)
  assert len(set(names)) == len(names)


def test_attention_switch_field_or_shim():
  from diffaug_jax.models import unet as unet_mod
  switch = bench_diffaug.attention_switch()
  if switch.startswith("field:"):  # the UNet's own switch: the benchmark sets it by cloning
    field = switch.split(":", 1)[1]
    module = unet_mod.unet_from_preset("digits")
    assert getattr(bench_diffaug._with_attention(module, "cudnn"), field) == "cudnn"
    assert getattr(bench_diffaug._with_attention(module, "xla"), field) is None
    return
  assert switch == "shim"
  orig = unet_mod._attention
  with bench_diffaug.attention_impl("cudnn"):
    assert unet_mod._attention is not orig
  assert unet_mod._attention is orig
  with bench_diffaug.attention_impl("xla"):
    assert unet_mod._attention is orig


def test_time_budget_skips_cases(tmp_path):
  res = bench_diffaug.main(FAST + ["--no-peak", "--time-budget", "0", "--out", str(tmp_path),
                                   "--cases", "denoise:bf16:xla:2,train:bf16:xla:2"])
  assert [r["status"] for r in res["cases"]] == ["skipped", "skipped"]
  assert "time budget" in res["cases"][0]["reason"]
  assert json.loads((tmp_path / "results.json").read_text())["meta"]["mode"] == "tiny"


# ---------------------------------------------------------------- end-to-end (tiny, CPU)


@pytest.mark.slow
def test_denoise_correctness_and_table(tmp_path):
  res = bench_diffaug.main(FAST + ["--out", str(tmp_path), "--cases",
                                   "denoise:bf16:xla:2,denoise:f32hi:xla:2,denoise:bf16:cudnn:2"])
  rows = {r["case"]: r for r in res["cases"]}
  for name in ("denoise:bf16:xla:2", "denoise:f32hi:xla:2"):
    r = rows[name]
    assert r["status"] == "ok" and r["finite"], r
    assert r["images_per_s"] > 0 and r["s_per_call"] > 0
    assert r["model_flops"] > 1e6 and r["tflops_per_s"] > 0 and 0 < r["roofline"] < 10
  assert rows["denoise:bf16:cudnn:2"]["status"] == "skipped"  # CPU: no cuDNN attention
  assert res["peak"]["bf16_tflops"] > 0
  (corr,) = res["correctness"]
  assert corr["variant"] == "bf16:xla:2" and corr["finite"]
  # bf16 really differs from the float32 reference, but stays a bf16-sized error.
  assert 1e-4 < corr["eps_rel_l2"] < 0.1 and 1e-4 < corr["x0_hat_rel_l2"] < 0.1, corr
  md = (tmp_path / "results.md").read_text()
  assert "| denoise:bf16:xla:2 | ok |" in md and "correctness" in md
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["case"] for r in saved["cases"]] == list(rows)


@pytest.mark.slow
def test_train_and_ensemble_with_profile(tmp_path):
  prof = tmp_path / "trace"
  res = bench_diffaug.main(FAST + ["--no-peak", "--peak-tflops", "1.0", "--members", "2", "--out",
                                   str(tmp_path), "--profile", str(prof), "--profile-cases", "train",
                                   "--profile-steps", "1", "--cases", "train:bf16:xla:2,ensemble:bf16:xla:2"])
  rows = {r["case"]: r for r in res["cases"]}
  tr, en = rows["train:bf16:xla:2"], rows["ensemble:bf16:xla:2"]
  assert tr["status"] == "ok" and np.isfinite(tr["loss"]) and tr["images_per_s"] > 0, tr
  assert en["status"] == "ok" and en["ms_per_image"] > 0, en
  # Ensemble FLOPs are summed from its parts: 1 UNet call (t=50) + 2 classifier calls per image.
  assert en["model_flops"] > 0
  assert res["profile"]["train"]["num_kernels"] > 0, res["profile"]
  assert (tmp_path / "profile_train.md").exists()


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
