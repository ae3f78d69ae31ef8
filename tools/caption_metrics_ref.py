#!/usr/bin/env python3
"""Reference values for mitune's captioning metrics (src/eval/metrics.rs), from pycocoevalcap itself.

Run by hand (CI never runs Python; it only reads the committed output):

    /work/venv/bin/pip install pycocoevalcap==1.2        # made with pycocoevalcap 1.2 (numpy 2.4, Python 3.11)
    /work/venv/bin/python tools/caption_metrics_ref.py   # writes tests/fixtures/caption_metrics.{txt,json}

What it does:
  - A hand-made corpus of 6 "images" of coloured shapes, each with 3-5 reference captions and one hypothesis chosen
    to cover the interesting cases: exact copy of a reference, partial overlap, wrong colours, too short (no 3- or
    4-grams at all), too long (length penalty), unrelated.
  - Tokenizes every caption with `caption_tokens` below, a line-for-line mirror of the Rust `caption_tokens` (an
    approximation of the Stanford PTBTokenizer + PUNCTUATIONS filter that pycocoevalcap's eval pipeline runs).
  - If `java` is on PATH, also runs pycocoevalcap's real PTBTokenizer (stanford-corenlp 3.4.1, shipped in the pip
    package) on the same captions plus some harder strings, and stops if the approximation disagrees anywhere; those
    pairs become `tok` lines so the Rust test checks its tokenizer against real PTB output. Without java the check
    is skipped (with a warning) and the `tok` lines come from the mirror alone.
  - Scores with `Bleu(4).compute_score` and `Cider().compute_score` called directly on the {id: [str]} dicts.

tests/fixtures/caption_metrics.txt (tab-separated, parsed by the Rust test with plain string splitting):
    tok     <raw caption>    <tokens joined by one space>
    gts     <image index>    <tokenized reference caption>
    res     <image index>    <tokenized hypothesis>
    bleu    <b1> <b2> <b3> <b4>          (tab-separated)
    cider   <corpus CIDEr-D>
    cider_i <image index>    <per-image CIDEr-D>
tests/fixtures/caption_metrics.json holds the same data for people and other tools.
"""
import json
import shutil
import sys
from pathlib import Path

from importlib.metadata import version

from pycocoevalcap.bleu import bleu as bleu_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"

# (references, hypothesis) per image
IMAGES = [
    (  # hypothesis copies the first reference exactly
        [
            "A red circle at the top left and a blue square.",
            "A red circle in the top left corner next to a blue square.",
            "There is a blue square and a red circle at the top left.",
            "Red circle top left, blue square.",
        ],
        "A red circle at the top left and a blue square.",
    ),
    (  # partial overlap
        [
            "A green triangle in the center of the image.",
            "A green triangle sits in the middle.",
            "One green triangle in the center.",
        ],
        "A green triangle in the middle of the picture.",
    ),
    (  # right shapes and layout, wrong colours
        [
            "A yellow star below a purple circle.",
            "A purple circle above a yellow star.",
            "A yellow star under a purple circle on a white background.",
            "Two shapes: a purple circle and a yellow star.",
        ],
        "A red star below a blue circle.",
    ),
    (  # much shorter: two words, so no 3-grams or 4-grams
        [
            "Three small orange squares in a row at the bottom.",
            "A row of three orange squares along the bottom edge.",
            "Three orange squares lined up at the bottom of the image.",
        ],
        "Orange squares.",
    ),
    (  # much longer than every reference
        [
            "A blue circle on the right.",
            "A single blue circle at the right side.",
            "One blue circle on the right side of the image.",
            "It's a blue circle on the right.",
        ],
        "A large blue circle on the right side of the image next to a small blue circle and some empty white "
        "space around it.",
    ),
    (  # unrelated
        [
            "A black square and a white triangle.",
            "A white triangle next to a black square.",
            "A black square beside a white triangle.",
            "Two shapes, a black square and a white triangle.",
            "A black square on the left and a white triangle on the right.",
        ],
        "Cats sleeping on a sofa.",
    ),
]

# Harder strings, only for the tokenizer comparison (PTB quirks the Rust approximation reproduces).
TOKENIZER_EXTRAS = [
    "It's a cat's toy; don't (really) move!",
    "can't won't I'm they're we've you'll he'd",
    'Two shapes: a "purple" circle -- and a yellow-green star...',
    "The U.S. flag costs $3.50 or 1,000 yen?",
    "cats' toys 'quoted' `back`",
    "{Braces} [brackets]",
    "50% off #1 @home",
    "A  big   gap and   spaces",
]

# --- mirror of `caption_tokens` in src/eval/metrics.rs; keep the two in step ---
LEAD = set("\"'`([{$#")
TRAIL = set(".,?!:;\"'`)]}%")
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
CLITICS = ["n't", "'s", "'m", "'re", "'ve", "'ll", "'d"]


def caption_tokens(s):
    out = []
    for word in s.lower().split():
        lead = []
        while word and word[0] in LEAD:
            lead.append(word[0])
            word = word[1:]
        trail = []
        while word and word[-1] in TRAIL:
            if word[-1] == ".":
                core = word.rstrip(".")
                run = len(word) - len(core)
                if run == 1 and "." in core:
                    break  # abbreviation such as u.s.
                trail[:0] = ["."] * run
                word = core
            else:
                trail.insert(0, word[-1])
                word = word[:-1]
        core = [word] if word else []
        for c in CLITICS:
            if len(word) > len(c) and word.endswith(c):
                core = [word[: -len(c)], c]
                break
        for t in lead + core + trail:
            t = BRACKETS.get(t, t)
            if t not in DROP:
                out.append(t)
    return out


def ptb_tokenize(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


def main():
    raw = [c for refs, hyp in IMAGES for c in refs + [hyp]] + TOKENIZER_EXTRAS
    mine = [" ".join(caption_tokens(c)) for c in raw]
    if shutil.which("java"):
        ptb = ptb_tokenize(raw)
        bad = [(r, m, p) for r, m, p in zip(raw, mine, ptb) if m != p]
        for r, m, p in bad:
            print(f"tokenizer mismatch: {r!r}\n  mirror: {m!r}\n  PTB:    {p!r}", file=sys.stderr)
        if bad:
            sys.exit(1)
        print(f"caption_tokens agrees with PTBTokenizer on all {len(raw)} strings")
    else:
        print("WARNING: java not found; caption_tokens was not compared with PTBTokenizer", file=sys.stderr)

    gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, (refs, _) in enumerate(IMAGES)}
    res = {i: [" ".join(caption_tokens(hyp))] for i, (_, hyp) in enumerate(IMAGES)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_i = Cider().compute_score(gts, res)
    bleu = [float(b) for b in bleu]
    cider = float(cider)
    cider_i = [float(c) for c in cider_i]

    # repr() round-trips f64 exactly, so the Rust side parses the very same doubles
    lines = [f"tok\t{r}\t{m}" for r, m in zip(raw, mine)]
    lines += [f"gts\t{i}\t{c}" for i in gts for c in gts[i]]
    lines += [f"res\t{i}\t{res[i][0]}" for i in res]
    lines.append("bleu\t" + "\t".join(repr(b) for b in bleu))
    lines.append(f"cider\t{cider!r}")
    lines += [f"cider_i\t{i}\t{c!r}" for i, c in enumerate(cider_i)]
    (FIX / "caption_metrics.txt").write_text("\n".join(lines) + "\n")

    doc = {
        "made_by": "tools/caption_metrics_ref.py",
        "pycocoevalcap": version("pycocoevalcap"),
        "images": [
            {"id": i, "refs_raw": refs, "hyp_raw": hyp, "refs": gts[i], "hyp": res[i][0]}
            for i, (refs, hyp) in enumerate(IMAGES)
        ],
        "bleu": bleu,
        "cider": cider,
        "cider_per_image": cider_i,
    }
    (FIX / "caption_metrics.json").write_text(json.dumps(doc, indent=1) + "\n")

    print(f"pycocoevalcap {version('pycocoevalcap')} ({Path(bleu_module.__file__).parent.parent})")
    print("BLEU-1..4:", " ".join(f"{b:.6f}" for b in bleu))
    print(f"CIDEr-D:   {cider:.6f}")
    print("per image: ", " ".join(f"{c:.6f}" for c in cider_i))


if __name__ == "__main__":
    main()
