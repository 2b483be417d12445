"""Render stored results: markdown tables, PNG plots, and the README's generated sections.

Nothing here is written by hand: `bigkern bench report` regenerates the README between the
`<!-- results:start -->`/`<!-- results:end -->` and `<!-- verification:start -->`/`...end -->`
markers from the JSON under bench/results/.
"""

import json
from collections import defaultdict
from pathlib import Path


class ResultsError(ValueError):
    """A results directory or file the report cannot use (the message names it)."""


# what each kind of stored document must hold for the report to read it
_BENCHMARK_FIELDS = {"environment": ("device",), "ceilings": ("matmul_tflops", "copy_gbps"),
                     "rows": ("family", "case", "dtype", "mode", "provider", "status")}
VERIFICATION_FIELDS = {"environment": ("device", "timestamp"), "rows": ("op", "backend", "dtype", "status")}


def load_document(path: Path, fields: dict) -> dict:
    """A stored JSON document, checked for the fields the report reads; ResultsError naming the
    file and what is wrong otherwise."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsError(f"{path}: not a readable results file ({error})") from None
    if not isinstance(document, dict):
        raise ResultsError(f"{path}: not a results file (a JSON {type(document).__name__}, not an object)")
    for key, needed in fields.items():
        value = document.get(key)
        items = value if isinstance(value, list) else [value]
        if value is None or not all(isinstance(item, dict) for item in items):
            raise ResultsError(f"{path}: not a results file (no '{key}' {'list' if key == 'rows' else 'object'})")
        for i, item in enumerate(items):
            missing = [name for name in needed if name not in item]
            if missing:
                where = f"rows[{i}]" if key == "rows" else key
                raise ResultsError(f"{path}: {where} lacks {', '.join(missing)}")
    if "ceilings" in fields:  # a benchmark: every timing it calls ok is one
        for i, row in enumerate(document["rows"]):
            median = row.get("median_ms")
            if row["status"] == "ok" and not (isinstance(median, (int, float)) and median > 0):
                raise ResultsError(f"{path}: rows[{i}] is 'ok' without a positive median_ms ({median!r})")
    return document


def _directory(results_dir: Path) -> Path:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsError(f"{results_dir}: no such results directory")
    return results_dir


def newest_results(results_dir: Path):
    """{device directory name: its results, each case as its newest run measured it}.

    Runs differ in what they cover (a full run, a quick gpu-check sample, one family, a run cut
    short), so the newest file alone would hide every case it did not repeat. Each case keeps all
    of its providers from one run (its speedups are same-run ratios); `sources` lists the runs
    the rows came from, newest first, and each row names its run by index into it."""
    found = {}
    for directory in sorted(_directory(results_dir).iterdir()):
        if not directory.is_dir() or directory.name == "verification":
            continue
        files = sorted(directory.glob("*.json"), reverse=True)  # named <UTC timestamp>-<git>: newest first
        documents = [load_document(path, _BENCHMARK_FIELDS) | {"_path": str(path)} for path in files]
        if documents:
            found[directory.name] = _merge(documents)
    return found


def _merge(documents):
    """One document of the newest group of rows per case from `documents` (newest first)."""
    groups = [grouped(document) for document in documents]
    chosen, sources, newest = {}, [], None
    for document, document_groups in zip(documents, groups):
        fresh = {key: group for key, group in document_groups.items() if key not in chosen}
        if not fresh:
            continue
        index = len(sources)
        newest = newest or document  # the newest run that holds rows describes the whole
        sources.append(dict(path=document["_path"], environment=document["environment"],
                            ceilings=document["ceilings"], timer=document.get("timer"),
                            quick=document.get("quick", False), partial=document.get("partial")))
        chosen.update({key: (index, group) for key, group in fresh.items()})
    # cases in the order the runs ran them, the oldest run's order first
    order = list(dict.fromkeys(key for document_groups in reversed(groups) for key in document_groups))
    rows = [row | {"source": chosen[key][0]} for key in order for row in chosen[key][1].values()]
    merged = dict(newest or documents[0], rows=rows, sources=sources)
    if len(sources) > 1:
        merged.pop("partial", None)  # said per run in the sources instead
    return merged


def _fmt(value, spec=".3g"):
    return "—" if value is None else format(value, spec)


def grouped(document):
    """{(family, case, dtype, mode): {provider: row}} in the order the cases ran."""
    groups = defaultdict(dict)
    for row in document["rows"]:
        groups[(row["family"], row["case"], row["dtype"], row["mode"])][row["provider"]] = row
    return groups


def is_variant(name):
    """bigkern-<backend>-<switch>: a kernel switch timed beside its backend's default (e.g.
    bigkern-triton-tma), reported as a ratio to that default, never as bigkern's best. Other
    bigkern providers with more parts (bigkern-patched-compile: a whole model) are not switches."""
    from bigkern.dispatch import BACKENDS

    parts = name.split("-")
    return len(parts) > 2 and parts[0] == "bigkern" and parts[1] in BACKENDS


def best_bigkern(providers):
    ok = {name: row for name, row in providers.items()
          if name.startswith("bigkern-") and not is_variant(name) and row["status"] == "ok"}
    if not ok:
        return None, None
    name = min(ok, key=lambda n: ok[n]["median_ms"])
    return name, ok[name]


def markdown(document) -> str:
    """One table per family: each case's best bigkern backend, the baselines, speedups, and the
    fraction of the machine's ceiling achieved."""
    sources = document.get("sources") or []
    several = len(sources) > 1
    if several:
        lines = [f"Measured on **{document['environment']['device']}** in {len(sources)} runs; each case as its "
                 "newest run measured it (every figure in a row from one run, the run column says which):", ""]
        lines += [f"{i}. {_describe_run(source)}" for i, source in enumerate(sources, 1)] + [""]
    else:
        lines = [f"Measured on **{document['environment']['device']}** " + _describe_run(document), ""]
    by_family = defaultdict(list)
    for key, providers in grouped(document).items():
        by_family[key[0]].append((key, providers))
    for family, entries in by_family.items():
        baselines = []
        for _, providers in entries:
            for name in providers:
                if not name.startswith("bigkern-") and name not in baselines:
                    baselines.append(name)
        throughput = any("samples_per_s" in row for _, providers in entries for row in providers.values())
        header = ["case", "dtype", "mode", "bigkern (best)", "ms"] + [f"{b} ms" for b in baselines] + \
                 [f"vs {b}" for b in baselines] + (["samples/s"] if throughput else ["of ceiling"]) + \
                 (["run"] if several else [])
        lines += [f"### {family}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (fam, case, dtype, mode), providers in entries:
            name, best = best_bigkern(providers)
            cells = [case, dtype, mode, name.removeprefix("bigkern-") if name else "none ran",
                     _fmt(best["median_ms"]) if best else "—"]
            for b in baselines:
                row = providers.get(b)
                cells.append(_fmt(row["median_ms"]) if row and row["status"] == "ok" else "—")
            for b in baselines:
                row = providers.get(b)
                ok = best and row and row["status"] == "ok"
                cells.append(f"{row['median_ms'] / best['median_ms']:.2f}x" if ok else "—")
            if throughput:
                cells.append(_fmt(best.get("samples_per_s") if best else None, ".4g"))
            else:
                fraction = best.get("fraction_of_ceiling") if best else None
                cells.append(f"{fraction:.0%}{' (' + best['bound'] + ')' if best.get('bound') else ''}"
                             if fraction is not None else "—")
            if several:
                cells.append(str(next(iter(providers.values())).get("source", 0) + 1))
            lines.append("| " + " | ".join(cells) + " |")
        variants = []
        for (fam, case, dtype, mode), providers in entries:
            for name, row in providers.items():
                default = providers.get(name.rsplit("-", 1)[0])
                if is_variant(name) and row["status"] == "ok" and default and default["status"] == "ok":
                    variants.append(f"| {case} | {dtype} | {mode} | {name.removeprefix('bigkern-')} | "
                                    f"{_fmt(row['median_ms'])} | {default['median_ms'] / row['median_ms']:.2f}x |")
        if variants:
            lines += ["", "Kernel switches timed in the same run (speedup over the backend's default):", "",
                      "| case | dtype | mode | variant | ms | vs default |", "|---|---|---|---|---|---|", *variants]
        wrong = [(case, dtype, mode, p, r.get("reason", "")) for (_, case, dtype, mode), ps in entries
                 for p, r in ps.items() if r["status"] == "wrong"]
        if wrong:
            lines += ["", "**Wrong results, not timed** (checked against a baseline before timing): "
                      + "; ".join(f"{p} on {c} {d} {m}: {r}" for c, d, m, p, r in wrong)]
        unchecked = [(case, dtype, mode, p) for (_, case, dtype, mode), ps in entries for p, r in ps.items()
                     if r["status"] == "ok" and "check" in r and r["check"]["against"] is None]
        if unchecked:
            lines += ["", "Timed without a check (no reference baseline ran): "
                      + "; ".join(f"{p} on {c} {d} {m}" for c, d, m, p in unchecked)]
        failed = [(case, p, r.get("reason", "")) for (_, case, _, _), ps in entries for p, r in ps.items()
                  if r["status"] == "error"]
        if failed:
            lines += ["", "Providers that failed: " + "; ".join(f"{p} on {c}: {' '.join(r.split())[:120]}"
                                                              for c, p, r in failed)]
        lines.append("")
    return "\n".join(lines)


def _describe_run(run):
    """A run's environment, timer and ceilings (and whether it was quick or cut short), in words."""
    env, ceilings = run["environment"], run["ceilings"]
    text = (f"({env.get('timestamp', '?')}, git {env.get('git', '?')}; torch {env.get('torch')}, triton "
            f"{env.get('triton')}, CUDA {env.get('cuda')}), timer {run.get('timer')}"
            f"{', quick run' if run.get('quick') else ''}. Ceilings measured in the same run: matmul "
            f"{ceilings['matmul_tflops']:.0f} TFLOP/s"
            + "".join(f" ({dtype}: {tflops:.0f})"
                      for dtype, tflops in ceilings.get("matmul_tflops_by_dtype", {}).items())
            + f", copy {ceilings['copy_gbps']:.0f} GB/s.")
    from bigkern.benchmark import run_settings

    switches = run_settings(env.get("bigkern_environment") or {})
    if switches:
        text += " **Settings not the defaults**: " + ", ".join(f"`{k}={v}`" for k, v in switches.items()) + "."
    if run.get("partial"):
        partial = run["partial"]
        text += (f" **Partial run**: {partial['cases_done']} of {partial['cases']} cases before it was cut "
                 "short; the rest were not measured.")
    return text


def plot(document, directory: Path):
    """PNG per family and dtype: speedup of the best bigkern backend over each baseline, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # (family, dtype) -> the cases' labels, in order, and baseline -> {case index: speedup}: every
    # series is drawn at its own cases' positions (a baseline that could not run a case has a gap)
    labels = defaultdict(list)
    series = defaultdict(lambda: defaultdict(dict))
    for (family, case, dtype, mode), providers in grouped(document).items():
        _, best = best_bigkern(providers)
        if not best:
            continue
        index = len(labels[(family, dtype)])
        labels[(family, dtype)].append(f"{case}\n{mode}")
        for name, row in providers.items():
            if not name.startswith("bigkern-") and row["status"] == "ok":
                series[(family, dtype)][name][index] = row["median_ms"] / best["median_ms"]
    for (family, dtype), by_baseline in series.items():
        cases = labels[(family, dtype)]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cases)), 4))
        for baseline, points in by_baseline.items():
            ax.plot(range(len(cases)), [points.get(i, float("nan")) for i in range(len(cases))], marker="o",
                    label=f"vs {baseline}")
        ax.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=6)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylabel("speedup of bigkern (best backend)")
        ax.set_title(f"{family}, {dtype}, {document['environment']['device']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(directory) / f"{family}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Verification status: which op x backend x dtype is verified where.

def verification_documents(results_dir: Path):
    directory = _directory(results_dir) / "verification"
    return [load_document(p, VERIFICATION_FIELDS) for p in sorted(directory.glob("*.json"))]


def verification_markdown(documents, benchmarked) -> str:
    """A table of op x backend x dtype: where it was verified (and when), and whether it is benchmarked."""
    if not documents:
        return "No verification results stored yet (`bigkern verify --save bench/results`)."
    cells = defaultdict(list)
    skipped = defaultdict(list)  # (op, backend) -> why each machine could not run it
    for document in documents:
        where = document["environment"]["device"]
        for row in document["rows"]:
            when = row.get("timestamp", document["environment"]["timestamp"])[:10]  # rows merged from runs
            if row["status"] == "skipped":
                skipped[(row["op"], row["backend"])].append(f"not yet: skipped on {where} ({row['detail']})")
                continue
            mark = "✓" if row["status"] == "ok" else "✗"
            cells[(row["op"], row["backend"], row["dtype"])].append(f"{mark} {where} ({when}, {row['passed']})")
    # an op x backend no machine could run still gets a row, so the table never hides a gap
    for (op, backend), reasons in skipped.items():
        if not any(key[:2] == (op, backend) for key in cells):
            cells[(op, backend, "-")] = sorted(set(reasons))
    lines = ["| op | backend | dtype | verified | benchmarked |", "|---|---|---|---|---|"]
    for (op, backend, dtype), places in sorted(cells.items()):
        bench = ", ".join(sorted(benchmarked.get((op, backend, dtype), []))) or "not yet"
        lines.append(f"| {op} | {backend} | {dtype} | {'<br>'.join(places)} | {bench} |")
    return "\n".join(lines)


def _replace_between(text, start, end, body):
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_readme(readme: Path, results_dir: Path):
    documents = newest_results(results_dir)
    benchmarked = defaultdict(set)
    sections = []
    for device, document in documents.items():
        for row in document["rows"]:
            if row["status"] == "ok" and row["provider"].startswith("bigkern-") and not is_variant(row["provider"]):
                benchmarked[(row["family"], row["provider"].removeprefix("bigkern-"), row["dtype"])].add(
                    document["environment"]["device"])
        sections.append(f"#### {document['environment']['device']}\n\n" + markdown(document))
    results_body = "\n".join(sections) if sections else "No GPU results stored yet: timings need a GPU (`make gpu-check`)."
    text = readme.read_text()
    text = _replace_between(text, "<!-- results:start -->", "<!-- results:end -->", results_body)
    text = _replace_between(text, "<!-- verification:start -->", "<!-- verification:end -->",
                            verification_markdown(verification_documents(results_dir), benchmarked))
    readme.write_text(text)


def main(results_dir: Path, readme: Path = None):
    """Write each device's REPORT.md and plots, and regenerate the README's sections; a missing
    directory or README, or a file that is not a results file, is an error that names it (rather
    than a README whose tables quietly went blank)."""
    if readme is not None and not Path(readme).is_file():
        raise ResultsError(f"{readme}: no such README to update")
    for device, document in newest_results(results_dir).items():
        directory = Path(document["_path"]).parent
        (directory / "REPORT.md").write_text(markdown(document) + "\n")
        for path in plot(document, directory):
            print(f"wrote {path}")
        print(f"wrote {directory / 'REPORT.md'}")
    if readme is not None:
        update_readme(Path(readme), results_dir)
        print(f"updated {readme}")
    return 0
