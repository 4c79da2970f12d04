"""Turn the records of ``reproduce.py`` into ``RESULTS.md`` and one Pareto figure per data set.

Called as ``python benchmarks/reproduce.py report``. Every number in the output comes from a record; rows
are aggregated over seeds (mean and sample standard deviation, or the single value). AutoAttack accuracy is shown
per implementation, never averaged across them: torchattacks' port (the records from before the reference code was
the default) and the reference code, from a record's own test or from the re-measurement of its row on the same
weights (``remeasure.py``, records under ``<records>/<suite>/reference/``). Cost columns are
relative to the ``robust`` row of the same suite: FLOPs from the records, wall time from the suite's timing
record (``<records>/<suite>/timing.json``, written by ``timing.py`` on an idle machine) when there is one.
The speed results of ``speed.py --json`` kept under ``<records>/speed/`` end the report (the newest of each kind).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

ROW_ORDER = ("standard", "robust", "ds", "ds_adaptive", "ds_p1", "random", "stability", "selective_margin",
             "selective_gradmatch", "selective_ds")


def row_order(row: str) -> tuple[int, str]:
    """Sort key of a row name: the matrix's order, then unknown rows by name."""
    return (ROW_ORDER.index(row) if row in ROW_ORDER else len(ROW_ORDER), row)


def load(records: Path) -> dict[str, dict[str, list[dict]]]:
    """``{suite: {row: [record, ...]}}`` from every ``*.json`` record under ``records`` (timing files aside)."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(records.glob("*/*.json")):
        if path.name == "timing.json" or path.parent.name == SPEED:
            continue
        rec = json.loads(path.read_text())
        out[rec["suite"]][rec["row"]].append(rec)
    return out


SPEED = "speed"  # <records>/speed/*.json: lists of speed.py's results, not runs of a suite
REMEASURED = "reference"  # <records>/<suite>/reference/<run>.json: remeasure.py's rows
IMPLEMENTATIONS = ("torchattacks", "reference")  # the order of their columns
# The re-measured evaluations shown for a refit that differs from its record, in this order.
REFIT_KEYS = ("torchattacks/apgd", "reference/apgd", "torchattacks/standard", "reference/standard")


def load_remeasured(records: Path) -> dict[tuple[str, str, int], dict]:
    """``{(suite, row, seed): record}`` of every row ``remeasure.py`` re-measured under ``records``."""
    out = {}
    for path in sorted(records.glob(f"*/{REMEASURED}/*.json")):
        rec = json.loads(path.read_text())
        out[rec["suite"], rec["row"], rec["seed"]] = rec
    return out


def autoattack_results(rec: dict, remeasured: dict | None) -> dict[tuple[str, str], dict]:
    """``{(version, implementation): result}`` of one run: its own AutoAttack tests (a record that names no
    implementation is torchattacks'), then the re-measurement of its row on the same weights, which wins. A refit
    that did not reproduce the record's weights measured other weights: its numbers stay out of the record's row
    (the clean and PGD columns are the record's) and :func:`remeasure_note` gives them apart."""
    out = {(key.removeprefix("aa_"), result.get("implementation", "torchattacks")): result
           for key, result in rec["test"].items() if key.startswith("aa_")}
    if remeasured is not None and remeasured.get("reproduces_original") is False:
        return out
    for key, result in (remeasured or {}).get("evaluations", {}).items():
        implementation, version = key.split("/")
        out[version, implementation] = result
    return out


def _aa(rec: dict) -> dict[tuple[str, str], dict]:
    """A run's AutoAttack results as :func:`write_report` attached them (with the re-measurement), else its own."""
    return rec["autoattack"] if "autoattack" in rec else autoattack_results(rec, None)


def _implementations(rows: dict[str, list[dict]], version: str) -> list[str]:
    return [i for i in IMPLEMENTATIONS if any((version, i) in _aa(r) for recs in rows.values() for r in recs)]


def _aa_cell(recs: list[dict], version: str, implementation: str) -> tuple[str, tuple[float, float | None] | None]:
    """A row's accuracy under one implementation, over the seeds it has; ``(text, (mean, spread))``, the seeds
    named when fewer than the row's."""
    found = sorted((r["seed"], _aa(r)[version, implementation]["robust"]) for r in recs
                   if (version, implementation) in _aa(r))
    if not found:
        return "", None
    stat = _stat([value for _, value in found])
    seeds = "" if len(found) == len(recs) else f" (seed{'s' if len(found) > 1 else ''} " \
        f"{', '.join(str(seed) for seed, _ in found)})"
    return _fmt(*stat) + seeds, stat


def _aa_header(rows: dict[str, list[dict]], version: str, implementation: str) -> str:
    images = sorted({_aa(r)[version, implementation]["images"] for recs in rows.values() for r in recs
                     if (version, implementation) in _aa(r)})
    return f"AutoAttack {version} % ({implementation}, {', '.join(map(str, images))} images)"


def speed_section(folder: Path, top: int = 5) -> list[str]:
    """The newest full (not ``--quick``) result of each kind that ``speed.py`` writes under ``folder``: the
    epoch comparisons, the step pairs and the profile with its top operators, as markdown."""
    from speed import format_profile, format_step_pairs, format_tables

    results = [r for r in full_speed_results(folder) if "peak_flops" not in r]  # gpu_speed.py's: gpu_speed_section
    newest = {kind: max((r for r in results if kind in r), key=lambda r: r.get("date", ""), default=None)
              for kind in ("comparisons", "step_pairs", "profile")}
    if not any(newest.values()):
        return []
    lines = ["## Speed", "", "From `benchmarks/speed.py` (commands, machine and analysis in "
             "[SPEED.md](SPEED.md)); the newest result of each kind under "
             f"`{folder.parent.name}/{folder.name}/`.", ""]

    def described(r: dict) -> str:
        return f"{r['data']}, batch {r['batch_size']}, {r['attack']}; {r['machine']}; {r.get('date', 'undated')}"

    if newest["comparisons"]:
        r = newest["comparisons"]
        lines += [f"Epochs ({r['batches']} batches, {r['repeats']} repeats; {described(r)}):", "",
                  format_tables(r["rows"], r["comparisons"]), ""]
    if newest["step_pairs"]:
        r = newest["step_pairs"]
        lines += [f"Steps back to back ({described(r)}):", "", format_step_pairs(r["step_pairs"]), ""]
    if newest["profile"]:
        r = newest["profile"]
        lines += [f"Where a step's time goes ({r['batches']} profiled steps per recipe; {described(r)}):", "",
                  format_profile(r["profile"]), "", f"Top {top} operators by self time, per recipe:", "",
                  "| recipe | operator | ms / step | share of the step's operator time |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| {row['variant']} | `{op['operator']}` | {op['ms_per_step']:.1f} | {op['share']:.0%} |"
                  for row in r["profile"] for op in row.get("top", [])[:top]]
        lines.append("")
    return lines


def full_speed_results(folder: Path) -> list[dict]:
    """Every result ``speed.py`` and ``gpu_speed.py`` appended to the JSON files under ``folder``, in the order
    written, without their ``--quick`` checks."""
    return [r for path in sorted(folder.glob("*.json")) for r in json.loads(path.read_text()) if not r.get("quick")]


def gpu_speed_section(folder: Path, top: int = 3) -> list[str]:
    """Every full (not ``--quick``) result that ``gpu_speed.py`` wrote under ``folder``, in the order written:
    images per second and share of the bf16 peak per recipe, the module against the plain loop, and the
    profiles' busy share, launches and top operators, as markdown."""
    from gpu_speed import format_tables

    # compiled_speed.py's results (the step with its attack compiled) have a table of their own: SPEED.md.
    results = [r for r in full_speed_results(folder) if "peak_flops" in r and not r.get("compiled_attack")]
    if not results:
        return []
    lines = ["## Speed on a GPU", "", "From `benchmarks/gpu_speed.py` (ResNet-18, PGD-10, random CIFAR-10-shaped "
             "images; commands and analysis in [SPEED.md](SPEED.md)), every result under "
             f"`{folder.parent.name}/{folder.name}/`.", ""]
    for r in results:
        rounds = r.get("rounds", 1)
        lines += [f"{r['machine']}; {r.get('date', 'undated')}; {r['precision']}, batch {r['batch_size']}, "
                  f"channels_last {r['channels_last']}, compile {r.get('compile_mode') or r['compile']}, "
                  f"{r['steps']} timed steps x "
                  f"{rounds} round(s); bf16 matmul peak {r['peak_flops'] / 1e12:.1f} TFLOP/s:", "",
                  format_tables(r["rows"], r["comparisons"]), ""]
        if r["profile"]:
            lines += [f"| profiled recipe | GPU busy | kernel launches / step | top {top} operators (ms / step) |",
                      "| --- | ---: | ---: | --- |"]
            lines += [f"| {p['recipe']} | {p['busy_share']:.0%} | {p['launches_per_step']:.0f} | "
                      + ", ".join(f"`{op['operator']}` {op['ms_per_step']:.1f}" for op in p["top"][:top]) + " |"
                      for p in r["profile"]]
            lines.append("")
    return lines


def _stat(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean: float, spread: float | None, pct: bool = True) -> str:
    if pct:
        return f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")
    return f"{mean:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")


def _row_cost(recs: list[dict]) -> float:
    """Training FLOPs of a row; the stability row adds the profiling run it read its subset from."""
    return statistics.fmean(r["train_flops"] + r.get("profile_flops", 0) for r in recs)


def _row_time(row: str, recs: list[dict], rows: dict[str, list[dict]], timing: dict | None) -> float | None:
    """Training wall time relative to robust: median seconds per step (idle timing run) times the row's steps.

    A row with a profiling run (stability) is timed as robust steps: both of its runs train the robust recipe.
    """
    per_step = timing["seconds_per_step"] if timing else {}
    if "robust" not in per_step or "robust" not in rows:
        return None
    step = per_step.get(row, per_step["robust"] if any(r.get("profile_steps") for r in recs) else None)
    if step is None:
        return None
    steps = statistics.fmean(r["steps"] + r.get("profile_steps", 0) for r in recs)
    return step * steps / (per_step["robust"] * statistics.fmean(r["steps"] for r in rows["robust"]))


def run_figures(rows: dict[str, list[dict]]) -> list[str]:
    """The PNG figures the runs drew (the DS paper's Figs. 7 and 8 on the runs with the dashboards)."""
    lines = []
    for row, recs in rows.items():
        for r in recs:
            for name in r.get("figures", []):
                lines += [f"![{row}, seed {r['seed']}: {name}](figures/{name})", ""]
    return lines


def suite_table(suite: str, rows: dict[str, list[dict]], timing: dict | None) -> tuple[list[str], list[dict]]:
    """Markdown lines of one suite's table, and the per-row numbers used by the figure (the AutoAttack ``apgd``
    accuracy of the implementation every run has: the reference where it does)."""
    robust_flops = _row_cost(rows["robust"]) if "robust" in rows else None
    implementations = _implementations(rows, "apgd")
    plotted = next((i for i in reversed(IMPLEMENTATIONS)
                    if all(("apgd", i) in _aa(r) for recs in rows.values() for r in recs)), None)
    lines = ["| recipe | seeds | clean % | PGD-20 % | "
             + "".join(f"{_aa_header(rows, 'apgd', i)} | " for i in implementations)
             + "FLOPs / robust | time / robust |",
             "| --- | ---: | ---: | ---: | " + "---: | " * len(implementations) + "---: | ---: |"]
    points = []
    for row in sorted(rows, key=row_order):
        recs = rows[row]
        clean = _stat([r["test"]["pgd20"]["clean"] for r in recs])
        pgd = _stat([r["test"]["pgd20"]["robust"] for r in recs])
        cells = {i: _aa_cell(recs, "apgd", i) for i in implementations}
        flops = _row_cost(recs) / robust_flops if robust_flops else None
        t = _row_time(row, recs, rows, timing)
        lines.append(f"| {row} | {len(recs)} | {_fmt(*clean)} | {_fmt(*pgd)} | "
                     + "".join(f"{cells[i][0]} | " for i in implementations)
                     + f"{'' if flops is None else f'{flops:.3f}'} | {'' if t is None else f'{t:.3f}'} |")
        if plotted is not None:
            points.append({"row": row, "aa": cells[plotted][1], "implementation": plotted, "flops": flops,
                           "time": t})
    return lines, points


def seed_table(rows: dict[str, list[dict]]) -> list[str]:
    """Each seed of the rows run at more than one: a mean and spread hide two kinds of outcome (a seed that
    trained and one that stayed at chance), so the report shows them apart."""
    implementations = _implementations(rows, "apgd")

    def aa(r: dict, implementation: str) -> str:
        result = _aa(r).get(("apgd", implementation))
        return "" if result is None else f"{100 * result['robust']:.1f}"

    lines = [f"| {row} | {r['seed']} | {100 * r['test']['pgd20']['clean']:.1f} | "
             f"{100 * r['test']['pgd20']['robust']:.1f} | " + "".join(f"{aa(r, i)} | " for i in implementations)
             for row in sorted(rows, key=row_order)
             if len(rows[row]) > 1 for r in sorted(rows[row], key=lambda r: r["seed"])]
    if lines:
        lines = ["| recipe | seed | clean % | PGD-20 % | " + "".join(f"AutoAttack apgd % ({i}) | "
                                                              for i in implementations),
                 "| --- | ---: | ---: | ---: | " + "---: | " * len(implementations), *lines]
    return [line.rstrip() for line in lines]


def standard_gap(rows: dict[str, list[dict]]) -> list[str]:
    """AutoAttack's standard version, per implementation, on the runs where it ran."""
    implementations = _implementations(rows, "standard")
    lines = []
    for row in sorted(rows, key=row_order):
        for r in sorted(rows[row], key=lambda r: r["seed"]):
            found = {i: _aa(r)["standard", i] for i in implementations if ("standard", i) in _aa(r)}
            if found:
                images = "/".join(sorted({str(v["images"]) for v in found.values()}))
                lines.append(f"| {row} | {r['seed']} | {images} | " + "".join(
                    f"{100 * found[i]['robust']:.1f} | " if i in found else " | " for i in implementations))
    if lines:
        lines = ["| recipe | seed | images | " + "".join(f"AutoAttack standard % ({i}) | " for i in implementations),
                 "| --- | ---: | ---: | " + "---: | " * len(implementations), *lines]
    return [line.rstrip() for line in lines]


def attacks_used(rows: dict[str, list[dict]]) -> list[str]:
    """Each AutoAttack description the suite's results name, labelled by implementation, in a stable order."""
    seen = {(version, i): result["attack"] for recs in rows.values() for r in recs
            for (version, i), result in sorted(_aa(r).items())}
    return [f"{i}: {attack}" if not attack.split("(", 1)[-1].startswith(i) else attack
            for (_, i), attack in sorted(seen.items())]


def remeasure_note(rows: dict[str, list[dict]], remeasured: dict[tuple[str, str, int], dict], suite: str) -> list[str]:
    """Which runs were re-measured on refitted weights, and whether each refit reproduced the record's."""
    runs = [(row, r["seed"]) for row in sorted(rows, key=row_order) for r in sorted(rows[row], key=lambda r: r["seed"])
            if (suite, row, r["seed"]) in remeasured]
    if not runs:
        return []
    differ = [f"{row}-s{seed}" for row, seed in runs
              if remeasured[suite, row, seed].get("reproduces_original") is False]
    lines = [f"Re-measured on refitted weights (`benchmarks/remeasure.py`, records in `{suite}/{REMEASURED}/`): "
             f"{len(runs)} runs; the refit reproduced the tested weights of the record (the same clean and AutoAttack "
             f"accuracy of the record's implementation on the same images) for "
             f"{len(runs) - len(differ)} of them" + (f"; not for {', '.join(differ)}." if differ else "."), ""]
    if differ:  # their numbers are on other weights than the row's, so they are given here, not in the table
        lines += ["AutoAttack on the refitted weights of the runs whose refit differs (not in the tables above):", "",
                  "| run | clean % | " + " | ".join(f"{key} %" for key in REFIT_KEYS) + " |",
                  "| --- | ---: | " + "---: | " * len(REFIT_KEYS)]
        for row, seed in runs:
            rec = remeasured[suite, row, seed]
            if rec.get("reproduces_original") is not False:
                continue
            evaluations = rec.get("evaluations", {})
            clean = next(iter(evaluations.values()), {}).get("clean")
            cells = [f"{100 * evaluations[key]['robust']:.1f}" if key in evaluations else "" for key in REFIT_KEYS]
            lines.append(f"| {row}-s{seed} | {'' if clean is None else f'{100 * clean:.1f}'} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return lines


def figure(suite: str, points: list[dict], out: Path) -> Path | None:
    """AutoAttack accuracy against cost (wall time when timed, else FLOPs), relative to robust."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_time = all(p["time"] is not None for p in points)
    key = "time" if use_time else "flops"
    pts = [p for p in points if p[key] is not None and p["aa"] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4))
    markers = "os^Dv<>Ph*X"
    label = f"AutoAttack (apgd, {pts[0]['implementation']}) accuracy, %"
    for i, p in enumerate(pts):  # a legend, not labels at the points: close points would overprint them
        mean, spread = p["aa"]
        ax.errorbar(p[key], 100 * mean, yerr=None if spread is None else 100 * spread, fmt=markers[i % len(markers)],
                    capsize=3, label=p["row"])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(f"training {'wall time' if use_time else 'FLOPs'} relative to robust")
    ax.set_ylabel(label)
    ax.set_title(f"{suite}: robustness against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _definition(suite: str):  # a reproduce.Suite; imported here, as reproduce imports this module in main()
    """The suite as ``reproduce.py`` defines it, or ``None`` for a suite it no longer holds."""
    from reproduce import suites

    return suites("data").get(suite)


def timing_suite(suite: str) -> str:
    """The suite whose ``timing.json`` times ``suite``: its own, or the one its definition names."""
    defined = _definition(suite)
    return (defined.timing_from if defined is not None else None) or suite


def not_run(suite: str, rows: dict[str, list[dict]]) -> list[str]:
    """The runs that ``reproduce.py`` defines for ``suite`` and that have no record (in the matrix's order)."""
    defined = _definition(suite)
    done = {f"{r['row']}-s{r['seed']}" for recs in rows.values() for r in recs}
    return [] if defined is None else [run.run_id for run in defined.rows if run.run_id not in done]


def write_report(records: Path, out: Path) -> None:
    data = load(records)
    remeasured = load_remeasured(records)
    lines = ["# Results", "",
             "Generated by `python benchmarks/reproduce.py report` from the records in "
             f"`{records.relative_to(out.parent.parent) if records.is_relative_to(out.parent.parent) else records}`;"
             " do not edit by hand.", ""]
    for suite in sorted(data):
        rows = data[suite]
        for recs in rows.values():
            for r in recs:
                r["autoattack"] = autoattack_results(r, remeasured.get((suite, r["row"], r["seed"])))
        timed_as = timing_suite(suite)
        timing_path = records / timed_as / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
        table, points = suite_table(suite, rows, timing)
        any_rec = next(iter(next(iter(rows.values()))))
        lines += [f"## {suite}", "",
                  f"Test images: {any_rec['test']['pgd20']['images']}; AutoAttack: "
                  + "; ".join(attacks_used(rows)) + ". "
                  f"Machine: {any_rec['machine']['processor']}, {any_rec['machine']['cpus']} CPUs, "
                  f"torch {any_rec['machine']['torch']}. Commits: "
                  + ", ".join(sorted({r['commit'][:10] for recs in rows.values() for r in recs})) + ".", "",
                  "Each run is tested at the epoch with its best validation robust accuracy (the checkpoint the "
                  "suite's config keeps against robust overfitting; the last epoch where the config keeps none), "
                  "the standard row too.", "",
                  *table, "", *remeasure_note(rows, remeasured, suite)]
        missing = not_run(suite, rows)
        if missing:
            lines += [f"Runs of the matrix without a record (not run): {', '.join(missing)}.", ""]
        per_seed = seed_table(rows)
        if per_seed:
            lines += ["Each seed of the rows run at several:", "", *per_seed, ""]
        gap = standard_gap(rows)
        if gap:
            lines += ["AutoAttack's standard version on a subset of the same test images:", "", *gap, "",
                      "The standard version runs on the first images of the apgd columns' set, so the tables are not "
                      "comparable row for row: on the same images, standard (which starts with APGD-CE and APGD-T) "
                      "can only be lower or equal.", ""]
        fig = figure(suite, points, out.parent / "figures" / f"{suite}_pareto.png")
        if fig is not None:
            lines += [f"![{suite}: AutoAttack accuracy against cost](figures/{fig.name})", ""]
        if timing:
            borrowed = "" if timed_as == suite else f"the {timed_as} suite's timing (the same work per step), "
            lines += [f"Wall time: {borrowed}{timing['command']} on {timing['machine']}: the median time of a "
                      "training step of each row, interleaved, times the row's steps in its record, relative to "
                      "robust (steps of the first epoch: ds_adaptive is timed at its starting P_up; the stability "
                      "row as its two robust runs).", ""]
        shown = run_figures(rows)
        if shown:
            lines += ["Figures drawn by the runs' `PaperFigures` callback (selection make-up, minimum "
                      "perturbation, P_up, accuracy):", "", *shown]
    lines += speed_section(records / SPEED)
    lines += gpu_speed_section(records / SPEED)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    readme = out.parent.parent / "README.md"
    if readme.exists() and HEADLINE_START in readme.read_text():
        write_headline(records, readme)
        print(f"wrote the headline of {readme}")


# The README's headline table: the recipes the two papers compare, on the suites whose every row has three seeds.
HEADLINE_SUITES = {"mnist": ("MNIST", "MNIST at eps 0.1"),
                   "cifar10_bn": ("CIFAR-10", "CIFAR-10 (JPEG copy) at eps 8/255, SmallCNN with BatchNorm")}
IMPLEMENTATION_NAMES = {"torchattacks": "torchattacks' port", "reference": "the reference code"}
HEADLINE_ROWS = {"robust": "robust training (Madry)", "selective_margin": "selective, margin, half attacked",
                 "ds": "DS, P_up 0.5", "random": "random half of the DS pool"}
HEADLINE_START = "<!-- headline: written by `python benchmarks/reproduce.py report` from the records -->"
HEADLINE_END = "<!-- /headline -->"


def headline(records: Path) -> list[str]:
    """The README's headline table (between :data:`HEADLINE_START` and :data:`HEADLINE_END`): AutoAttack (apgd)
    accuracy and cost against robust training of :data:`HEADLINE_ROWS` on :data:`HEADLINE_SUITES`, from the same
    records, aggregation and implementation as the suites' tables in ``RESULTS.md``."""
    data, remeasured = load(records), load_remeasured(records)
    columns, cells, notes = [], {row: [] for row in HEADLINE_ROWS}, []
    for suite, (label, described) in HEADLINE_SUITES.items():
        rows = {row: data[suite][row] for row in HEADLINE_ROWS}
        for recs in rows.values():
            for r in recs:
                r["autoattack"] = autoattack_results(r, remeasured.get((suite, r["row"], r["seed"])))
        timing_path = records / timing_suite(suite) / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
        _, points = suite_table(suite, rows, timing)
        timed = all(p["time"] is not None for p in points)
        implementation = points[0]["implementation"]
        images = sorted({_aa(r)["apgd", implementation]["images"] for recs in rows.values() for r in recs})
        columns += [f"{label}: AutoAttack %", f"{label}: {'time' if timed else 'FLOPs'} / robust"]
        for p in points:
            cost = p["time"] if timed else p["flops"]
            cells[p["row"]] += [_fmt(*p["aa"]), f"{cost:.2f}"]
        seeds = sorted({len(recs) for recs in rows.values()})
        notes.append(f"{described}: {', '.join(map(str, images))} test images, AutoAttack (apgd) by "
                     f"{IMPLEMENTATION_NAMES.get(implementation, implementation)}, {'/'.join(map(str, seeds))} seeds "
                     f"per row, cost in {'training wall time' if timed else 'training FLOPs (not timed)'}")
    return [HEADLINE_START,
            "| recipe | " + " | ".join(columns) + " |",
            "| --- |" + " ---: |" * len(columns),
            *(f"| {HEADLINE_ROWS[row]} | " + " | ".join(values) + " |" for row, values in cells.items()),
            "",
            "Mean ± standard deviation over seeds; " + "; ".join(notes) + ". Generated from the records of "
            "`benchmarks/RESULTS.md`.",
            HEADLINE_END]


def write_headline(records: Path, readme: Path) -> None:
    """Replace the headline table of ``readme`` with :func:`headline`'s."""
    text = readme.read_text()
    before, rest = text.split(HEADLINE_START, 1)
    after = rest.split(HEADLINE_END, 1)[1]
    readme.write_text(before + "\n".join(headline(records)) + after)
