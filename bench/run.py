"""Run the benchmarks: `python -m bench.run [--only NAME] [--quick]` (`make bench`).

Every module `bench/bench_*.py` is a benchmark. Its contract:

    NAME = "spine"                          # what --only selects; the section in RESULTS.md
    DESCRIPTION = "one line"                # optional
    def add_arguments(parser): ...          # optional; prefix its options with --NAME-
    def run(args) -> list[dict]: ...        # the result rows, made with bench.common.result()

`args.quick` asks for small sizes (a smoke run). Rows are printed as they are measured (by
`result()`); when a run finishes, each benchmark that ran gets its section of bench/RESULTS.md
rewritten (other sections are kept), with the date, machine, command line and a table.
--quick runs print only, unless --write is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import re
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import (
    BenchError,
    fmt_number,
    load_average,
    machine_info,
    ratio_text,
    value_text,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
SECTION = re.compile(r"<!-- bench:(?P<name>[\w.-]+) -->\n.*?<!-- /bench:(?P=name) -->\n", re.S)
# Hand-written notes on what the figures mean (the README keeps only a short table); a run
# keeps them as they are.
NOTES = re.compile(r"<!-- notes -->\n.*?<!-- /notes -->\n?", re.S)
SUMMARY = re.compile(r"<!-- summary -->\n.*?<!-- /summary -->\n?", re.S)
# One figure a line, for scripts: `figure device_event_cpu_ms = 1.3`. A benchmark module offers
# its figures in a module-level dict FIGURES that run() fills; figures of benchmarks that did
# not run this time are kept from the file, with the run they came from.
FIGURE_LINE = re.compile(r"^figure (?P<name>\w+) = (?P<value>\S+)$", re.M)
SOURCE_LINE = re.compile(r"^- `(?P<name>\w+)`: (?P<source>.+)$", re.M)


def discover() -> tuple[list[ModuleType], dict[str, str]]:
    """The benchmark modules, and {name: traceback} of those that failed to import."""
    modules, broken = [], {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        try:
            module = importlib.import_module(f"bench.{path.stem}")
        except Exception:  # noqa: BLE001 - a benchmark in progress must not stop the others
            broken[path.stem.removeprefix("bench_")] = traceback.format_exc()
            continue
        if not isinstance(getattr(module, "NAME", None), str) or not callable(
            getattr(module, "run", None)
        ):
            broken[path.stem.removeprefix("bench_")] = f"{path.name}: needs NAME and run(args)"
            continue
        modules.append(module)
    names = [m.NAME for m in modules]
    if len(set(names)) != len(names):
        raise SystemExit(f"two benchmarks share a NAME: {names}")
    return modules, broken


def build_parser(modules: list[ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Run the benchmarks under bench/ and record them in bench/RESULTS.md.",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this benchmark (repeat, or separate names with commas); "
        f"one of: {', '.join(m.NAME for m in modules)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run of ~20 s per benchmark"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the results file (default: yes, except with --quick)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="default: bench/RESULTS.md")
    for module in modules:
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    return parser


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- RESULTS.md


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> str:
    standard = ("figure", "value", "unit", "ratio", "vs", "detail")
    extra = [k for row in rows for k in row if k not in standard]
    extra = list(dict.fromkeys(extra))
    head = ["Figure", "Value", "Ratio", "Detail", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row.get("figure", ""),
            value_text(row),
            ratio_text(row),
            row.get("detail", ""),
            *(fmt_number(row.get(k, "")) for k in extra),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def section(module: ModuleType, outcome: dict[str, Any], when: str, command: str, commit: str):
    name = module.NAME
    title = f"## {name}" + (
        f" — {module.DESCRIPTION}" if getattr(module, "DESCRIPTION", "") else ""
    )
    lines = [
        f"<!-- bench:{name} -->",
        title,
        "",
        f"Measured {when} with `{command}` at commit {commit}, "
        f"{outcome['seconds']:.0f} s{', quick sizes' if outcome['quick'] else ''}; "
        f"1-minute load average {outcome['load'][0]} before it (other work on the machine), "
        f"{outcome['load'][1]} at the end (its own processes included).",
        "",
    ]
    if outcome.get("error"):
        lines += ["**Failed:**", "", "```", outcome["error"].strip()[-3000:], "```"]
    else:
        lines.append(table(outcome["rows"]))
    doc = (module.__doc__ or "").strip()
    if doc:
        lines += ["", "<details><summary>What is measured</summary>", "", doc, "", "</details>"]
    lines += [f"<!-- /bench:{name} -->", ""]
    return "\n".join(lines)


def write_results(
    path: Path,
    outcomes: dict[str, dict[str, Any]],
    modules: dict[str, ModuleType],
    machine: dict[str, str],
    when: str,
    command: str,
) -> None:
    old = path.read_text() if path.exists() else ""
    kept = {m.group("name"): m.group(0) for m in SECTION.finditer(old)}
    summary = SUMMARY.search(old)
    figures = {m["name"]: m["value"] for m in FIGURE_LINE.finditer(summary[0])} if summary else {}
    sources = {m["name"]: m["source"] for m in SOURCE_LINE.finditer(summary[0])} if summary else {}
    for name, outcome in outcomes.items():
        if outcome.get("figures"):
            # The benchmark's figures of an earlier run go: a figure it no longer reports
            # (the newest held-out split moved on) would otherwise stay as if current.
            for figure in [f for f, source in sources.items() if source.startswith(f"{name} ")]:
                figures.pop(figure, None)
                sources.pop(figure, None)
        for figure, value in (outcome.get("figures") or {}).items():
            figures[figure] = _figure_text(value)
            sources[figure] = (
                f"{name} benchmark, {when}, commit {machine['git commit']}, "
                f"{machine.get('CPU', '?')} × {machine.get('cores', '?')} cores"
                + (", quick sizes" if outcome["quick"] else "")
            )
    for name, outcome in outcomes.items():
        kept[name] = section(modules[name], outcome, when, command, machine["git commit"])
    order = [n for n in modules if n in kept] + sorted(n for n in kept if n not in modules)
    header = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench.run`, see bench/run.py); a run rewrites the "
        "sections of the benchmarks it ran and keeps the others. Ratios compare figures "
        "measured side by side in the same run.",
        "",
        f"Last run: {when}, `{command}`.",
        "",
        "| Machine | |",
        "|---|---|",
        *(f"| {_cell(k)} | {_cell(v)} |" for k, v in machine.items()),
        "",
    ]
    notes = NOTES.search(old)
    body = "\n".join(header) + "\n" + (notes[0] + "\n" if notes else "")
    body += "\n".join(kept[n] for n in order)
    path.write_text(body + summary_block(figures, sources))


def _figure_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def summary_block(figures: dict[str, str], sources: dict[str, str]) -> str:
    if not figures:
        return ""
    lines = [
        "<!-- summary -->",
        "## Summary",
        "",
        "The latest value of each headline figure (issue 23), and the run it comes from:",
        "",
        *(f"- `{name}`: {sources.get(name, 'unknown run')}" for name in figures),
        "",
        "```text",
        *(f"figure {name} = {value}" for name, value in figures.items()),
        "```",
        "<!-- /summary -->",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    modules, broken = discover()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    by_name = {m.NAME: m for m in modules}
    if args.list:
        for m in modules:
            print(f"{m.NAME:12} {getattr(m, 'DESCRIPTION', '')}")
        for name in broken:
            print(f"{name:12} (does not import)")
        return 0
    wanted = [n.strip() for item in args.only or [] for n in item.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name and n not in broken]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(by_name)}")
    broken_wanted = {n: tb for n, tb in broken.items() if not wanted or n in wanted}
    for name, tb in broken_wanted.items():
        print(f"!! bench_{name}.py does not import; skipped:\n{tb}", file=sys.stderr)
    selected = [m for m in modules if not wanted or m.NAME in wanted]
    write = args.write if args.write is not None else not args.quick

    # Both stop a run cleanly (a shell starts background jobs with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    command = "python -m bench.run" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = machine_info()
    print(f"{command}  ({when})")
    for key, value in machine.items():
        print(f"  {key + ':':12} {value}")

    outcomes: dict[str, dict[str, Any]] = {}
    try:
        for module in selected:
            print(f"\n== {module.NAME}: {getattr(module, 'DESCRIPTION', '')}", flush=True)
            start = time.perf_counter()
            load_before = load_average()
            outcome: dict[str, Any] = {"rows": [], "quick": args.quick}
            try:
                outcome["rows"] = list(module.run(args))
                outcome["figures"] = dict(getattr(module, "FIGURES", None) or {})
            except BenchError as exc:
                outcome["error"] = str(exc)
                print(f"  !! {module.NAME} failed: {exc}", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - one failed benchmark must not stop the others
                outcome["error"] = traceback.format_exc()
                print(f"  !! {module.NAME} failed:\n{outcome['error']}", file=sys.stderr)
            outcome["seconds"] = time.perf_counter() - start
            outcome["load"] = (load_before, load_average())
            print(
                f"  ({module.NAME}: {outcome['seconds']:.1f} s; 1-minute load average "
                f"{outcome['load'][0]} before, {outcome['load'][1]} after)",
                flush=True,
            )
            outcomes[module.NAME] = outcome
    except KeyboardInterrupt:
        print("\ninterrupted: everything started was stopped; results not written", flush=True)
        return 130

    headline = {k: v for o in outcomes.values() for k, v in (o.get("figures") or {}).items()}
    if headline:
        print("\nsummary:")
        for name, value in headline.items():
            print(f"figure {name} = {_figure_text(value)}")
    if write:
        write_results(args.output, outcomes, by_name, machine, when, command)
        print(f"\nwrote {args.output}")
    else:
        print(f"\n{args.output} not written (--quick; add --write to write it)")
    failed = broken_wanted or any(o.get("error") for o in outcomes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
