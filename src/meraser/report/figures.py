"""The report's figures, each a base64 PNG (so a page is one file): FSR per stage and per epoch, the strict checks per
epoch, accuracy per task, ablations over a bench's grid, and the leaderboard."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from meraser.report.data import STAGES, WIN_UTILITY, last_row, run_label, strongest, task_accs, utility


def fsr_curve_png(runs: list[dict]) -> str | None:
    """FSR vs epoch across erase then recover, one line per run; None when no run recorded probes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    drawn = False
    boundary = 0
    for run in runs:
        st = run["stages"]
        start = st.get("fingerprinted", {}).get("fsr")
        erase = [p["fsr"] for p in st.get("erased", {}).get("fsr_per_epoch", [])]
        rec = [p["fsr"] for p in st.get("recovered", {}).get("fsr_per_epoch", [])]
        if not erase and not rec:
            continue
        ys = ([start] if start is not None else []) + erase + rec
        xs = list(range(len(ys))) if start is not None else list(range(1, len(ys) + 1))
        line = ax.plot(xs, ys, marker="o", label=f"{run['name']} ({run['method']}): paper FSR")[0]
        # the strict curve: the target's head forced; a fingerprint that only hides stays up here
        forced = [p.get("forced") for p in st.get("erased", {}).get("fsr_per_epoch", []) +
                  st.get("recovered", {}).get("fsr_per_epoch", [])]
        if forced and None not in forced:
            f0 = st.get("fingerprinted", {}).get("strict", {}).get("forced")
            fys = ([f0] if f0 is not None and start is not None else []) + forced
            ax.plot(xs[len(xs) - len(fys):], fys, marker="x", linestyle=":", color=line.get_color(),
                    label=f"{run['name']}: forced prefix (strict)")
        boundary = max(boundary, len(erase))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
    ax.text(boundary + 0.6, 1.02, "recover →", fontsize=8, color="grey")
    ax.text(0.1, 1.02, "erase →", fontsize=8, color="grey")
    ax.set_xlabel("epoch (0 = fingerprinted model)")
    ax.set_ylabel("FSR (dotted: strict, target prefix forced)")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _png(fig) -> str:
    """A finished matplotlib figure as base64 PNG (closed), to embed in the page."""
    import matplotlib.pyplot as plt
    from matplotlib.legend import Legend

    fig.tight_layout()
    buf = io.BytesIO()
    # legends placed outside the axes stay in the picture, a second legend (added as an artist) included
    legends = [c for ax in fig.axes for c in ax.get_children() if isinstance(c, Legend)]
    fig.savefig(buf, format="png", bbox_inches="tight", bbox_extra_artists=legends)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_fsr_png(runs: list[dict]) -> str | None:
    """FSR at every stage, one group of bars per erase-and-recover run (the paper's Table 1 as a figure); a cross
    marks the strict forced-prefix check where it was measured."""
    shown = [r for r in runs if "erased" in r["stages"] or "recovered" in r["stages"]][:16]
    if not shown:
        return None
    plt = _pyplot()
    stages = [s for s in STAGES[:4] if any(s in r["stages"] for r in shown)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(shown) + 2), 3.6), dpi=110)
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(shown))]
        ax.bar(xs, [r["stages"].get(stage, {}).get("fsr") or 0.0 for r in shown], width, label=stage)
        forced = [(x, r["stages"][stage]["strict"]["forced"]) for x, r in zip(xs, shown)
                  if "forced" in r["stages"].get(stage, {}).get("strict", {})]
        if forced:
            ax.scatter(*zip(*forced), marker="x", color="black", s=25,
                       label="strict: target prefix forced" if i == 0 else None)
    ax.set_xticks(range(len(shown)), [run_label(r) for r in shown], fontsize=7, rotation=15)
    ax.set_ylabel("FSR")
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=len(stages) + 1, loc="upper right")
    return _png(fig)


def ablation_pngs(runs: list[dict]) -> list[tuple[str, str]]:
    """For every numeric grid setting with two or more values (the mismatched-set size, erase epochs...): the final
    FSR (and the strict forced-prefix check) against it, one line per fingerprint and attack."""
    keys = sorted({k for r in runs for k, v in r.get("grid", {}).items() if isinstance(v, (int, float))})
    figures = []
    for key in keys:
        lines: dict[tuple, list] = {}
        for r in runs:
            v, last = r.get("grid", {}).get(key), last_row(r)
            if isinstance(v, (int, float)) and last.get("fsr") is not None:
                lines.setdefault((r["method"], r.get("attack", "")), []).append(
                    (v, last["fsr"], last.get("strict", {}).get("forced")))
        if not any(len({p[0] for p in pts}) > 1 for pts in lines.values()):
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
        for (method, attack), pts in sorted(lines.items()):
            pts.sort()
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} / {attack}")[0]
            if all(p[2] is not None for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", linestyle=":",
                        color=line.get_color(), label=f"{method}: forced prefix (strict)")
        ax.set_xlabel(key)
        ax.set_ylabel("FSR after the attack")
        ax.set_ylim(-0.05, 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.append((key, _png(fig)))
    return figures


def tasks_png(runs: list[dict]) -> str | None:
    """Accuracy per task before and after: for every run, a line from the fingerprinted model's accuracy (grey dot)
    to the final model's (coloured dot), with the base model's as a dashed line; one panel per task."""
    shown = [r for r in runs if task_accs(last_row(r))][:40]
    tasks = list(dict.fromkeys(t for r in shown for t in task_accs(last_row(r))))
    if not tasks:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 2.5, 0.28 * len(shown) + 1.4), dpi=110,
                             sharey=True, squeeze=False)
    labels = [run_label(r) for r in shown]
    for ax, task in zip(axes[0], tasks):
        for y, r in enumerate(shown):
            before = task_accs(r["stages"].get("fingerprinted", {})).get(task)
            after = task_accs(last_row(r)).get(task)
            if before is not None and after is not None:
                ax.plot([before, after], [y, y], color="lightgrey", zorder=1)
            if before is not None:
                ax.scatter(before, y, color="grey", s=18, zorder=2, label="fingerprinted" if y == 0 else None)
            if after is not None:
                ax.scatter(after, y, color="tab:red", s=22, zorder=3, label="after erase / attack" if y == 0 else None)
        base = [a for r in shown for a in [task_accs(r["stages"].get("base", {})).get(task)] if a is not None]
        if base:
            ax.axvline(sum(base) / len(base), color="tab:blue", linestyle="--", linewidth=1, label="base model")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("accuracy")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(shown)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def strict_curve_png(runs: list[dict]) -> str | None:
    """The per-epoch strict probes through erase and recovery, one panel per fingerprint: the forced-prefix rate and
    the target's log-likelihood (dashed: the base model's), so a curve shows whether the fingerprint dies or hides."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        st = run["stages"]
        probes = st.get("erased", {}).get("fsr_per_epoch", []) + st.get("recovered", {}).get("fsr_per_epoch", [])
        if probes and all("loglik" in p for p in probes):
            by_method.setdefault(run["method"], []).append(run)
    if not by_method:
        return None
    plt = _pyplot()
    cols = len(by_method)
    fig, axes = plt.subplots(2, cols, figsize=(max(6.0, 4.2 * cols), 6), dpi=100, squeeze=False, sharex="col")
    for j, (method, shown) in enumerate(sorted(by_method.items())):
        top, bottom = axes[0][j], axes[1][j]
        n_erase = 0
        for run in shown:
            st = run["stages"]
            erase, rec = st["erased"].get("fsr_per_epoch", []), st.get("recovered", {}).get("fsr_per_epoch", [])
            n_erase = max(n_erase, len(erase))
            fp = st.get("fingerprinted", {}).get("strict", {})
            points = ([fp] if fp else []) + erase + rec
            xs = list(range(len(points))) if fp else list(range(1, len(points) + 1))
            label = run_label(run).removeprefix(method).strip() or run.get("attack") or run["name"]
            line = top.plot(xs, [p.get("forced") for p in points], marker="x", label=label)[0]
            bottom.plot(xs, [p.get("loglik") for p in points], marker="o", color=line.get_color())
        base = next((r["stages"]["base"]["strict"]["loglik"] for r in shown
                     if r["stages"].get("base", {}).get("strict", {}).get("loglik") is not None), None)
        if base is not None:
            bottom.axhline(base, color="black", linestyle="--", linewidth=1, label="base model")
            bottom.legend(fontsize=7)
        for ax in (top, bottom):
            ax.axvline(n_erase + 0.5, color="grey", linestyle="--", linewidth=1)
            ax.grid(alpha=0.3)
        top.set_title(method, fontsize=10)
        top.set_ylim(-0.05, 1.1)
        top.legend(fontsize=6)
        top.text(n_erase + 0.6, 1.02, "recover →", fontsize=7, color="grey")
        bottom.set_xlabel("epoch (0 = fingerprinted)")
    axes[0][0].set_ylabel("forced prefix (strict)")
    axes[1][0].set_ylabel("target log-likelihood / token")
    fig.tight_layout()
    return _png(fig)


LABEL_POINTS = 12  # up to this many cells each point is labelled; beyond, labels only cover each other (the table
                  # beside the figure names every cell)


def leaderboard_png(runs: list[dict], verification: str = "paper") -> str | None:
    """What a verification still shows after the attack (the paper's FSR by default; `Verification.score`) against
    the attacked model's relative utility, one point per cell: the colour is the attack, the marker the
    fingerprint, and the region where the attack wins (below the verification's claim, at >= WIN_UTILITY utility)
    is shaded; the strongest attack on each fingerprint (`strongest`) is ringed. Cells with the same score and utility on different fingerprints are drawn a little apart, so that
    none hides another."""
    from meraser.evaluation.verifications import REGISTRY

    v = REGISTRY[verification]
    points = [(utility(r), v.score(last_row(r)), r) for r in runs]
    points = [(u, f, r) for u, f, r in points if u is not None and f is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=110)
    top = max(1.0, max(f for _, f, _ in points))
    ax.fill_between([WIN_UTILITY, max(1.3, max(u for u, _, _ in points) + 0.05)], -0.05 * top, v.owned_from,
                    color="tab:green", alpha=0.2, lw=0)
    methods = sorted({r["method"] for _, _, r in points})
    shapes = "osD^vP*Xhp<>d"  # cycled: the survival report reads all ten schemes' stores as one matrix
    markers = {m: shapes[i % len(shapes)] for i, m in enumerate(methods)}
    colors = _leaderboard_points(ax, points, methods, markers, top)
    best = {id(r) for r in strongest(runs, verification).values()}
    ringed = [(u, f + _nudge(r, methods, top)) for u, f, r in points if id(r) in best]
    if ringed:
        ax.scatter(*zip(*ringed), s=190, facecolors="none", edgecolors="black", linewidths=1.3, zorder=3)
    _leaderboard_legends(ax, markers, colors, f"attack wins:\nnot owned by the {v.title}\nat >= "
                                                   f"{WIN_UTILITY:.0%} utility")
    ax.set_xlabel("utility after the attack, relative to the fingerprinted model (PPL and accuracy)")
    ax.set_ylabel(v.axis)
    ax.set_ylim(-0.05 * top, 1.1 * top)
    ax.grid(alpha=0.3)
    return _png(fig)


def _leaderboard_points(ax, points, methods, markers, top: float) -> dict:
    """Draw the cells (labelled where few enough); returns each attack's colour."""
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for _, _, r in points))
    palette = plt.get_cmap("tab20" if len(attacks) > 10 else "tab10")
    colors = {a: palette(i % palette.N) for i, a in enumerate(attacks)}
    for u, f, r in points:
        ax.scatter(u, f + _nudge(r, methods, top), marker=markers[r["method"]], color=colors[r["attack"]], s=45, alpha=0.85,
                   edgecolors="black", linewidths=0.3)
    if len(points) <= LABEL_POINTS:
        placed: list[tuple[float, float]] = []
        for u, f, r in sorted(points, key=lambda p: (p[1], p[0])):
            near = sum(abs(u - pu) < 0.06 and abs(f - pf) < 0.04 * top for pu, pf in placed)  # stack close labels
            placed.append((u, f))
            ax.annotate(run_label(r, fingerprint=False), (u, f), fontsize=6, xytext=(4, 3 + 8 * near),
                        textcoords="offset points")
    return colors


def _nudge(run: dict, methods: list[str], top: float) -> float:
    """How far a cell is drawn off its score, by fingerprint, so that equal cells on different fingerprints show."""
    return 0.015 * top * (methods.index(run["method"]) - (len(methods) - 1) / 2)


def _leaderboard_legends(ax, markers: dict, colors: dict, win: str) -> None:
    from matplotlib.patches import Patch

    shapes = [ax.scatter([], [], marker=mk, color="grey", label=m) for m, mk in markers.items()]
    ring = ax.scatter([], [], s=90, facecolors="none", edgecolors="black", linewidths=1.3,
                      label="strongest attack on\nthe fingerprint")
    first = ax.legend(handles=[Patch(color="tab:green", alpha=0.2, label=win), ring, *shapes], fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), title="fingerprint", title_fontsize=7)
    ax.add_artist(first)
    ax.legend(handles=[Patch(color=c, label=a) for a, c in colors.items()], fontsize=7, loc="lower left",
              bbox_to_anchor=(1.01, 0.0), title="attack", title_fontsize=7)


def leaderboard_pngs(runs: list[dict]) -> list[tuple[str, str, str]]:
    """(verification, title, PNG) of every registered verification some cell has a score for: the leaderboard drawn
    per verification."""
    from meraser.evaluation.verifications import REGISTRY

    made = [(name, v.title, leaderboard_png(runs, name)) for name, v in REGISTRY.items()]
    return [(name, title, png) for name, title, png in made if png]


def figure_pngs(runs: list[dict], bench: bool = False) -> dict[str, str]:
    """Every figure of the page as {file name: base64 PNG}, for a README or a paper (`meraser report --figures`)."""
    made = {"fsr_per_stage.png": stage_fsr_png(runs), "fsr_per_epoch.png": fsr_curve_png(runs),
            "strict_per_epoch.png": strict_curve_png(runs), "tasks.png": tasks_png(runs)}
    if bench:
        made.update({"leaderboard.png" if name == "paper" else f"leaderboard_{name}.png": png
                     for name, _, png in leaderboard_pngs(runs)})
        made.update({f"fsr_against_{key}.png": png for key, png in ablation_pngs(runs)})
    return {name: png for name, png in made.items() if png}


def write_figures(pngs: dict[str, str], folder: str | Path) -> list[Path]:
    """The page's figures ({name: base64 PNG}, `figure_pngs`) as PNG files in `folder`, each written atomically."""
    from meraser.utils import atomic_write_bytes

    written = []
    for name, png in pngs.items():
        atomic_write_bytes(Path(folder) / name, base64.b64decode(png))
        written.append(Path(folder) / name)
    return written
