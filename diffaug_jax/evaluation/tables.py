"""Markdown tables shaped like the paper's Table 1/2: rows = models, columns = suite x mode, averages.

Accuracies are top-1 %, two decimals; corruption suites add their mCE (ImageNet-C, AlexNet-normalised) or
unnormalised mean CE (CIFAR-10-C, our corruptions) in a second table. A missing cell reads "-".
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from diffaug_jax.evaluation import suites as suites_lib

MODE_LABELS = {"default": "Def", "de": "DE", "dda": "DDA", "dda_se": "DDA-SE"}
SUITE_LABELS = {"clean": "Clean", "cifar10_c": "C10-C", "imagenet_c": "IN-C", "imagenet_r": "IN-R",
                "imagenet_a": "IN-A", "imagenet_sketch": "IN-S", "imagenet_v2": "IN-V2",
                "corrupted": "Corrupted"}


def _fmt(x) -> str:
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"


def _row(cells):
  return "| " + " | ".join(cells) + " |"


def results_table(results: Mapping[str, Any], *, average_exclude: tuple[str, ...] = ("clean",)) -> str:
  """results (from `robustness.evaluate_models`) -> markdown.

  Columns: every suite x mode (top-1 %), then "Avg <mode>" over the suites not in `average_exclude`
  (the paper averages the distribution-shift sets, not the clean test set).
  """
  modes = list(results["modes"])
  if "dda" in modes and "dda_se" not in modes:
    modes.append("dda_se")
  if "dda_se" in modes and "dda" not in modes:
    modes.insert(modes.index("dda_se"), "dda")
  suites = list(results["suites"])
  models = results["models"]
  header = ["Model"] + [f"{SUITE_LABELS.get(s, s)} {MODE_LABELS.get(m, m)}" for s in suites for m in modes]
  avg_suites = [s for s in suites if s not in average_exclude] or suites
  header += [f"Avg {MODE_LABELS.get(m, m)}" for m in modes]
  lines = ["Top-1 accuracy (%)", "", _row(header), _row(["---"] * len(header))]
  for name, res in models.items():
    cells = [name]
    for s in suites:
      for m in modes:
        acc = res.get(s, {}).get("summary", {}).get(m, {}).get("accuracy")
        cells.append(_fmt(None if acc is None else 100 * acc))
    for m in modes:
      accs = [res.get(s, {}).get("summary", {}).get(m, {}).get("accuracy") for s in avg_suites]
      cells.append(_fmt(100 * float(np.mean(accs)) if accs and None not in accs else None))
    lines.append(_row(cells))
  corr = [s for s in suites if s in ("imagenet_c", "cifar10_c", "corrupted")]
  if corr:
    header = ["Model"] + [f"{SUITE_LABELS.get(s, s)} {'mCE' if s == 'imagenet_c' else 'CE'} "
                          f"{MODE_LABELS.get(m, m)}" for s in corr for m in modes]
    note = "IN-C: mCE normalised by AlexNet"
    if "imagenet_c" in corr:
      sevs = sorted({s for r in models.values() for e in r.get("imagenet_c", {}).get("summary", {}).values()
                     for s in e.get("severities", [])})
      if sevs and sevs != [1, 2, 3, 4, 5]:  # the published mCE averages all five
        note += f" over severities {', '.join(map(str, sevs))} only, not comparable with the 1-5 mCE"
    lines += ["", f"Corruption error (%, lower is better; {note})", "", _row(header), _row(["---"] * len(header))]
    for name, res in models.items():
      cells = [name]
      for s in corr:
        for m in modes:
          cells.append(_fmt(res.get(s, {}).get("summary", {}).get(m, {}).get("mCE")))
      lines.append(_row(cells))
  de_rows = [(n, s, r[s]["sets"]) for n, r in models.items() for s in suites if s in r]
  if "de" in modes and de_rows:
    lines += ["", "DiffAug-Ensemble members (accuracy % of each t alone; suite mean)", ""]
    ts = None
    for n, s, sets in de_rows:
      mem = [sets[k]["de"]["members"] for k in suites_lib.summary_sets(s, sets) if "de" in sets[k]]
      if not mem:
        continue
      if ts is None:
        ts = next(v["de"]["ts"] for v in sets.values() if "de" in v)
        lines += [_row(["Model", "Suite"] + [f"t={t}" for t in ts]), _row(["---"] * (len(ts) + 2))]
      lines.append(_row([n, SUITE_LABELS.get(s, s)] + [_fmt(100 * x) for x in np.mean(mem, axis=0)]))
  return "\n".join(lines) + "\n"
