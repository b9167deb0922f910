"""experiments.bench_speed's numbers: the summary of its raw timings, the speed targets
measured against them, and the printed report (the JSON's schema is in docs/benchmarks.md).
"""

from __future__ import annotations

import statistics


def step_summary(raw: dict[str, dict], t_in: float | None, batch_size: int) -> dict:
    """The JSON's ``results`` and ``pass_costs`` from the raw timings.

    Args:
      raw: per method, ``times`` (seconds of each timed step), ``compile_s``, ``passes``
        (forward+backward passes per step) and ``flops`` (XLA's count per step, or None).
      t_in: seconds of one input-gradient pass (None: not timed, no floors).
      batch_size: images per step.
    """
    results = {}
    for name, r in raw.items():
        step_s = statistics.median(r["times"])
        results[name] = {
            "step_s": step_s,
            "step_s_min": min(r["times"]),
            "step_s_max": max(r["times"]),
            "images_per_s": batch_size / step_s,
            "compile_s": r["compile_s"],
            "passes": r["passes"],
            "flops_per_step": r["flops"],
        }
    for r in results.values():
        for reference in ("pgd10", "clean"):
            if reference in results:
                r[f"ratio_to_{reference}"] = r["step_s"] / results[reference]["step_s"]
    pass_costs = {"t_in": t_in}
    if t_in is not None and "clean" in results:
        t_train = results["clean"]["step_s"]
        pass_costs.update(
            t_train=t_train,
            t_in_over_t_train=t_in / t_train,
            apart_floor_s=t_in + t_train,
            pgd10_floor_s=10 * t_in + t_train,
            floor_ratio_apart_to_pgd10=(t_in + t_train) / (10 * t_in + t_train),
        )
    return {"results": results, "pass_costs": pass_costs}


def targets(summary: dict) -> list[tuple[str, float, float]]:
    """(target, measured, bound) for every target of the speed issue that was measured."""
    r, costs = summary["results"], summary["pass_costs"]
    checks = []
    if "apart" in r and "apart_floor_s" in costs:
        checks.append(
            ("apart / (t_in + t_train)", r["apart"]["step_s"] / costs["apart_floor_s"], 1.1)
        )
    if "pgd10" in r and "pgd10_floor_s" in costs:
        checks.append(
            ("pgd10 / (10 t_in + t_train)", r["pgd10"]["step_s"] / costs["pgd10_floor_s"], 1.1)
        )
    if "apart" in r and "pgd10" in r:
        checks.append(("apart / pgd10", r["apart"]["ratio_to_pgd10"], 0.25))
    if costs.get("t_train"):
        checks.append(("t_train / t_in", costs["t_train"] / costs["t_in"], 2.0))
    if "reference" in summary:
        ratio = summary["reference"]["t_train_over_torch"]
        checks.append(("t_train / torch train step", ratio, 1.5))
    if "release" in summary:
        checks.append(
            ("apart / release's apart step", summary["release"]["apart_over_release"], 1.0)
        )
    if "apart" in r and "clean" in r:
        checks.append(("apart / clean", r["apart"]["ratio_to_clean"], 1.8))
    if "fgsm_plus" in r and "fgsm_rs" in r:
        checks.append(
            ("fgsm_plus / fgsm_rs", r["fgsm_plus"]["step_s"] / r["fgsm_rs"]["step_s"], 1.1)
        )
    for name, epoch in summary.get("epochs", {}).items():
        checks.append((f"{name} epoch / sum of its steps", epoch["ratio_to_steps"], 1.1))
    return checks


def print_report(summary: dict) -> None:
    """Prints the summary (experiments.bench_speed's JSON) as tables, then each target of
    :func:`targets` with whether it is met."""
    results = summary["results"]
    header = (
        f"{'method':<10}{'passes':>7}{'compile s':>10}{'step ms':>9}{'min':>8}{'max':>8}"
        f"{'img/s':>9}{'/pgd10':>8}{'/clean':>8}{'TFLOP/s':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        tflops = "" if r["tflops_per_s"] is None else f"{r['tflops_per_s']:.2f}"
        print(
            f"{name:<10}{r['passes']:>7}{r['compile_s']:>10.1f}{r['step_s'] * 1e3:>9.1f}"
            f"{r['step_s_min'] * 1e3:>8.1f}{r['step_s_max'] * 1e3:>8.1f}"
            f"{r['images_per_s']:>9.0f}{r.get('ratio_to_pgd10', float('nan')):>8.3f}"
            f"{r.get('ratio_to_clean', float('nan')):>8.3f}{tflops:>9}"
        )
    costs = summary["pass_costs"]
    if costs.get("t_train"):
        print(
            f"\nt_in {costs['t_in'] * 1e3:.1f} ms, t_train {costs['t_train'] * 1e3:.1f} ms, "
            f"t_in / t_train {costs['t_in_over_t_train']:.3f}; floors: apart "
            f"{costs['apart_floor_s'] * 1e3:.1f} ms, pgd10 {costs['pgd10_floor_s'] * 1e3:.1f} ms, "
            f"apart / pgd10 {costs['floor_ratio_apart_to_pgd10']:.3f}"
        )
    if "reference" in summary:
        ref = summary["reference"]
        print(
            f"{ref['framework']} eager ({ref['threads']} threads): train step "
            f"{ref['train_step_s'] * 1e3:.1f} ms, input-gradient pass "
            f"{ref['input_gradient_s'] * 1e3:.1f} ms; ours / torch: t_train "
            f"{ref['t_train_over_torch']:.2f}x, t_in {ref['t_in_over_torch']:.2f}x"
        )
    if "release" in summary:
        rel = summary["release"]
        print(
            f"the authors' release ({rel['commit'][:7]}, {rel['framework']} eager, "
            f"{rel['threads']} threads): APART step {rel['step_s'] * 1e3:.1f} ms "
            f"(min {rel['step_s_min'] * 1e3:.1f}, max {rel['step_s_max'] * 1e3:.1f}); "
            f"ours / release {rel['apart_over_release']:.2f}x"
        )
    for name, e in summary.get("epochs", {}).items():
        print(
            f"{name} epoch: {e['epoch_s']:.2f} s for {e['steps']} steps ({e['examples']} images), "
            f"sum of steps {e['sum_of_steps_s']:.2f} s, ratio {e['ratio_to_steps']:.3f}"
        )
    if "evaluation" in summary:
        e = summary["evaluation"]
        print(
            f"PGD-20 evaluation: {e['points']} points in {e['seconds']:.2f} s "
            f"({e['points'] / e['seconds']:.0f} points/s)"
        )
    print("\ntarget                              measured   bound  met")
    for name, measured, bound in targets(summary):
        print(f"{name:<34}{measured:>10.3f}{bound:>8.2f}  {'yes' if measured <= bound else 'NO'}")
