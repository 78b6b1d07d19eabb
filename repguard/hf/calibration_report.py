"""The calibration report: a Markdown card next to the map, with PNG figures (matplotlib, Agg backend).

Figures follow the paper: the layer distribution of the selected neurons (Fig. 3), the mean activation
of the top neurons around the onset next to a random set (Fig. 1), and the deactivation test (§1.6).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..calibration import CalibrationSettings
from ..neuron_map import map_sibling
from .calibrate import CalibrationResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(result: CalibrationResult, path: Path) -> Path:
    plt = _plt()
    sel = result.map.selected()
    counts = sel.counts_per_layer()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(counts)), counts, color="#c0392b")
    ax.set_xlabel("layer")
    ax.set_ylabel("selected neurons")
    ax.set_title(f"{result.map.meta.model_name}: top {len(sel)} repetition neurons by layer")
    ax.set_xticks(range(0, len(counts), max(1, len(counts) // 15)))
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=FIGURE_MARK)
    plt.close(fig)
    return path


def plot_onset(result: CalibrationResult, path: Path) -> Path:
    plt = _plt()
    c = result.stats.context
    x = list(range(-c, c + 1))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if result.profile_top is not None:
        ax.plot(x, result.profile_top.tolist(), color="#c0392b", label=f"top {len(result.map.selected())} (mean)")
    if result.profile_best is not None:
        ax.plot(x, result.profile_best.tolist(), color="#c0392b", ls=":", lw=1,
                label=f"best: L{int(result.map.layer[0])} #{int(result.map.neuron[0])}")
    if result.profile_random is not None:
        ax.plot(x, result.profile_random.tolist(), color="#7f8c8d", label="random set (mean)")
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("position relative to onset s = p2 - 1")
    ax.set_ylabel("mean activation")
    ax.set_title("activation around the start of the repetition")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=FIGURE_MARK)
    plt.close(fig)
    return path


def plot_deactivation(result: CalibrationResult, path: Path) -> Path:
    plt = _plt()
    rows = result.deactivation
    none = next(r["loop_rate"] for r in rows if r["setting"] == "none")
    ks = sorted({r["k"] for r in rows if r["k"]})
    top = [next(r["loop_rate"] for r in rows if r["setting"] == "top" and r["k"] == k) for k in ks]
    rnd = [next(r["loop_rate"] for r in rows if r["setting"] == "random" and r["k"] == k) for k in ks]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = range(len(ks))
    ax.bar([i - 0.2 for i in xs], [100 * v for v in top], 0.4, color="#c0392b", label="top-K zeroed")
    ax.bar([i + 0.2 for i in xs], [100 * v for v in rnd], 0.4, color="#7f8c8d", label="random-K zeroed")
    ax.axhline(100 * none, color="k", ls="--", lw=1, label="none zeroed")
    ax.set_xticks(list(xs), [f"K={k}" for k in ks])
    ax.set_ylabel("still repetitive (%)")
    ax.set_ylim(0, 105)
    ax.set_title("deactivation test: held-out texts cut at p2, greedy continuation")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=FIGURE_MARK)
    plt.close(fig)
    return path


REPORT_TITLE = "# Repetition neurons of "  # a report's first line begins so
FIGURE_MARK = {"Title": "repguard calibration report"}  # a PNG text chunk: a report's figures carry it


def is_report_file(path: str | Path) -> bool:
    """Whether ``path`` is a calibration report (its first line is a report's title) or one of its figures (a PNG
    whose text chunks carry ``FIGURE_MARK``): only such a file is replaced by a new report."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4096)  # a PNG's text chunks come before its image data
    except OSError:
        return False
    if path.suffix.lower() == ".png":
        return head.startswith(b"\x89PNG") and FIGURE_MARK["Title"].encode() in head
    return head.startswith(REPORT_TITLE.encode())


def write_report(result: CalibrationResult, map_path: str | Path, settings: CalibrationSettings,
                 command: list[str] | None = None) -> Path:
    """Write ``<map stem>.md`` and ``<map stem>-*.png`` next to the map (the stem: the map's name without
    ``.safetensors``); returns the Markdown path."""
    map_path = Path(map_path)
    nmap, meta = result.map, result.map.meta
    cal = meta.calibration
    figs = {"layers": plot_layers(result, map_sibling(map_path, "-layers.png")),
            "onset": plot_onset(result, map_sibling(map_path, "-onset.png"))}
    if result.deactivation:
        figs["deactivation"] = plot_deactivation(result, map_sibling(map_path, "-deactivation.png"))
    total = meta.num_layers * meta.intermediate_size
    gen = result.generation
    t = result.timings
    lines = [
        f"{REPORT_TITLE}{meta.model_name}",
        "",
        f"Neuron map `{map_path.name}`, made by `repguard calibrate` with the procedure of Hiraoka & Inui (2024), "
        f"\"Repetition Neurons: How Do Language Models Produce Repetitions?\".",
        "",
        "## Data",
        f"- Texts: BOS, then {settings.prompt_tokens} sampled tokens (temperature 1.0, top-k "
        f"{cal.model_extra.get('sampling_top_k')}, top-p {cal.model_extra.get('sampling_top_p')}), then "
        f"{settings.greedy_tokens} greedy tokens; seed {settings.seed}, {cal.dtype}.",
        f"- Kept iff the detector (n={settings.ngram}, r={settings.window}, k={settings.min_count}, equal spacing) "
        f"finds a repeat whose second occurrence p2 > {settings.min_second_occurrence} (BOS is position 0).",
        f"- Generated {gen.generated} texts; {gen.with_repeat} had a repeat; **{gen.kept} kept** "
        f"({100 * gen.kept / max(1, gen.generated):.0f}%).",
        f"- Activations: `{meta.hook_point}` = {meta.quantity}; windows of {settings.context} tokens before and "
        f"after the onset s = p2 - 1, one teacher-forced pass per batch of texts.",
        "",
        "## Result",
        f"- Score: pooled mean after - pooled mean before (`{meta.score_kind}`), one global ranking over "
        f"{meta.num_layers} x {meta.intermediate_size} = {total} neurons.",
        f"- Selected: **{meta.num_selected}** ({100 * meta.num_selected / total:.2f}%); stored candidates: "
        f"{meta.num_stored} (`NeuronMap.top(k)` up to that).",
        f"- Split-half stability: Jaccard **{meta.split_half_jaccard}** between the top-{meta.num_selected} sets of "
        f"two disjoint halves of the kept texts (chance: about {meta.num_selected / (2 * total - meta.num_selected):.4f}).",
        "- Selected per layer: " + ", ".join(f"L{i}: {c}" for i, c in enumerate(nmap.selected().counts_per_layer()) if c),
        "",
        "| rank | layer | neuron | score | mean before | mean after |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i in range(min(10, len(nmap))):
        lines.append(f"| {i + 1} | {int(nmap.layer[i])} | {int(nmap.neuron[i])} | {float(nmap.score[i]):.3f} | "
                     f"{float(nmap.mean_before[i]):.3f} | {float(nmap.mean_after[i]):.3f} |")
    lines += ["", f"![layers]({figs['layers'].name})", "", f"![onset]({figs['onset'].name})", ""]
    if result.deactivation:
        h = result.heldout
        lines += [
            "## Deactivation test (paper §1.6)",
            f"{h.kept} held-out repetitive texts (kept of {h.generated} generated from a random stream disjoint from "
            f"the calibration texts), each cut at p2 so that the prompt holds the first copy; greedy "
            f"{settings.deactivation_tokens} new tokens with the neurons' act output set to 0 at the newest position "
            "of every step (always on, as in the paper). Loop rate = share of texts where the detector fires on "
            "prompt + continuation.",
            "",
            "| neurons zeroed | K | loop rate |",
            "|---|---:|---:|",
        ]
        for r in result.deactivation:
            label = "none" if r["setting"] == "none" else f"{r['setting']} {100 * r['fraction']:.1f}%"
            lines.append(f"| {label} | {r['k']} | {100 * r['loop_rate']:.0f}% |")
        lines += ["", f"![deactivation]({figs['deactivation'].name})", ""]
    lines += [
        "## Time",
        f"- Total {t.get('total', 0):.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total") + ".",
        f"- Generation: {gen.tokens_decoded} tokens decoded for {gen.generated} texts "
        f"({60 * gen.kept / max(1e-9, t.get('generate', 0) + t.get('activations', 0)):.1f} kept texts/min "
        "including the activation pass); batch "
        f"{settings.batch_size}, texts stop as soon as their decision is final.",
    ]
    if command:
        lines += ["", "## Command", "```", " ".join(shlex.quote(c) for c in command), "```"]
    out = map_sibling(map_path, ".md")
    out.write_text("\n".join(lines) + "\n")
    return out
