"""Rebuild the README's performance table from benchmarks/results/*.json (the full runs).

python benchmarks/readme_table.py
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def rows() -> list[str]:
    out = ["| figure | value | target | platform | baseline | command |", "| --- | --- | --- | --- | --- | --- |"]
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        if path.stem.endswith("_quick"):
            continue
        result = json.loads(path.read_text())
        for f in result["figures"]:
            target = f"{f['target']} ({'met' if f['met'] else 'not met'})" if f.get("target") else "—"
            extra = f" (MFU {f['platform_mfu']:.1%})" if "platform_mfu" in f else ""
            base_extra = f" (MFU {f['baseline_mfu']:.1%})" if "baseline_mfu" in f else ""
            out.append(
                f"| {f['name']} | {f['value']} {f['unit']} | {target} | {f['platform']} {f.get('baseline_unit', '')}{extra} "
                f"| {f['baseline']} {f.get('baseline_unit', '')}{base_extra} | `{result['command']}` ({result['date']}) |"
            )
    return out


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(head + START + "\n" + "\n".join(rows()) + "\n" + END + tail)


if __name__ == "__main__":
    main()
