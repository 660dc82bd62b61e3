"""CIDEr-D as the COCO caption evaluation (pycocoevalcap's `Cider`) computes it.

For a candidate c with references R, over a corpus of N images:
- each sentence becomes n-gram counts for n = 1..4; an n-gram's weight is
  tf × (log N − log max(1, df)), where df counts the images whose *references* contain it;
- per order n, the similarity to one reference r is
  Σ_g min(w_c(g), w_r(g)) · w_r(g) / (‖w_c‖ ‖w_r‖)   (clipped cosine; 0 if a norm is 0)
  times the length penalty exp(−(ℓ_c − ℓ_r)² / (2σ²)), σ = 6;
- score(c) = 10 · mean over n of (Σ_r sim / |R|); the corpus score is the mean over images.

ℓ is the length in words. (The reference code counts bigrams, words − 1, instead: the
difference ℓ_c − ℓ_r is the same unless a sentence is empty, and an empty sentence scores 0
either way, so the results are identical.)

Inputs are tokenized strings (words split on whitespace). pycocoevalcap tokenizes with the
Stanford PTBTokenizer (Java); `ptb_tokenize` is our Java-free approximation of it,
applied by `cider()` unless told otherwise.
"""

import math
import re
from collections import Counter
from typing import Hashable, Mapping, Sequence

import numpy as np

# Tokens the COCO tokenizer wrapper deletes after PTB tokenization (lower-cased, since we
# lower-case first).
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC_SPLIT = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_ABBREVIATION = re.compile(r"^([a-z]\.)+$")  # u.s. / e.g.: PTB keeps the periods
_CURLY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _split_word(word: str) -> list[str]:
    """PTB-style pieces of one whitespace-free, lower-cased chunk (punctuation dropped)."""
    # Brackets and double quotes always become tokens of their own, which are deleted.
    word = re.sub(r"[()\[\]{}\"`]", " ", word)
    # ? ! ; always split off; commas and colons too, except between digits (1,000 / 10:30).
    word = re.sub(r"[?!;]", " ", word)
    word = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", " ", word)
    # Currency and percent signs are tokens of their own and are kept.
    word = re.sub(r"([$%#])", r" \1 ", word)
    pieces = []
    for tok in word.split():
        if not _ABBREVIATION.match(tok):
            tok = tok.strip(".")  # sentence-final "." and "..." are separate, deleted tokens
        tok = tok.strip("-")
        if tok in _CLITICS:
            pieces.append(tok)
            continue
        tok = tok.strip("'")  # single quotes around a word
        m = _CLITIC_SPLIT.match(tok)
        pieces.extend([m.group(1), m.group(2)] if m else [tok])
    return [p for p in pieces if p and p not in _PTB_PUNCTUATION]


def ptb_tokenize(text: str) -> str:
    """Lower-case, PTB-split and strip punctuation the way pycocoevalcap's tokenizer does.

    'The dog's ball, isn't it?' -> "the dog 's ball is n't it". Matches the Stanford
    tokenizer on ordinary caption text (clitics, sentence punctuation, quotes, brackets,
    digits with commas or colons, abbreviations such as "u.s."); rarer PTB rules
    (e.g. "cannot" -> "can not", escaping "/") are not reproduced. Idempotent.
    """
    words = text.lower().translate(_CURLY).split()
    return " ".join(p for w in words for p in _split_word(w))


def _ngrams(sentence: str, n: int) -> Counter:
    """Counts of every k-gram, k = 1..n, of a tokenized sentence."""
    words = sentence.split()
    return Counter(
        tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )


class CiderD:
    """CIDEr-D scorer with pycocoevalcap's `Cider().compute_score(gts, res)` interface."""

    def __init__(self, n: int = 4, sigma: float = 6.0):
        self.n = n
        self.sigma = sigma

    def compute_score(
        self, gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]
    ) -> tuple[float, np.ndarray]:
        """(corpus score, per-image scores in gts' key order).

        gts: image_id -> list of tokenized references; res: image_id -> [one tokenized candidate].
        """
        if set(gts) != set(res):
            raise ValueError("gts and res must have the same image ids; "
                             f"only in gts: {sorted(set(gts) - set(res), key=str)[:5]}, "
                             f"only in res: {sorted(set(res) - set(gts), key=str)[:5]}")
        ids = list(gts)
        for i in ids:
            if len(res[i]) != 1:
                raise ValueError(f"res[{i!r}] must hold exactly one candidate, got {len(res[i])}")
            if len(gts[i]) == 0:
                raise ValueError(f"gts[{i!r}] has no references")
        cand = [_ngrams(res[i][0], self.n) for i in ids]
        refs = [[_ngrams(r, self.n) for r in gts[i]] for i in ids]

        doc_freq = Counter(g for rs in refs for g in set().union(*rs))
        log_n = math.log(float(len(ids)))

        def weights(counts: Counter):
            """Per-order tf-idf vectors, their norms, and the length in words."""
            vec = [{} for _ in range(self.n)]
            for g, tf in counts.items():
                vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, doc_freq[g])))
            norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
            length = sum(tf for g, tf in counts.items() if len(g) == 1)
            return vec, norms, length

        scores = np.zeros(len(ids))
        for j, (c, rs) in enumerate(zip(cand, refs)):
            vc, nc, lc = weights(c)
            total = np.zeros(self.n)
            for r in rs:
                vr, nr, lr = weights(r)
                penalty = math.exp(-((lc - lr) ** 2) / (2 * self.sigma ** 2))
                for k in range(self.n):
                    if nc[k] == 0 or nr[k] == 0:
                        continue  # the clipped dot product is 0 too: every weight is >= 0
                    ref_k = vr[k]
                    dot = sum(min(w, ref_k.get(g, 0.0)) * ref_k.get(g, 0.0)
                              for g, w in vc[k].items())
                    total[k] += dot / (nc[k] * nr[k]) * penalty
            scores[j] = 10.0 * total.mean() / len(rs)
        return float(scores.mean()), scores


def cider(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenize: bool = True,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, np.ndarray]:
    """CIDEr-D of candidates[i] against references[i]: (corpus score, per-item scores [N]).

    Document frequencies come from these references, so the score depends on the whole set
    evaluated together (as in COCO). tokenize=True runs `ptb_tokenize` on every string first;
    pass False for strings that are already tokenized.
    """
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists; "
                         "pass one list of references per candidate")
    prep = ptb_tokenize if tokenize else (lambda s: s)
    gts = {i: [prep(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [prep(c)] for i, c in enumerate(candidates)}
    return CiderD(n=n, sigma=sigma).compute_score(gts, res)
