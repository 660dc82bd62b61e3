"""Evaluation metrics against their references (SPEC §7): CIDEr vs pycocoevalcap, VQA
accuracy vs the official script's rules, ROC-AUC vs a pairwise count, top-1."""

import importlib.util
import itertools
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from flamingo_jax.evaluation.cider import CiderD, cider, ptb_tokenize
from flamingo_jax.evaluation.classification_metrics import roc_auc, top1_accuracy
from flamingo_jax.evaluation.vqa_accuracy import mean_vqa_accuracy, normalize_answer, vqa_accuracy

# Pre-tokenized (candidate, references): 10 images, 3-5 references each.
CAPTIONS = [
    ("a man riding a horse on a beach",
     ["a man rides a horse along the beach", "a person on a horse at the beach",
      "man riding a brown horse near the ocean"]),
    ("a dog dog dog dog running",  # repeated words: clipping
     ["a dog runs across the grass", "a brown dog running in a field", "the dog is running fast",
      "a small dog playing outside"]),
    ("two people sitting at a table with food",
     ["two people eating at a table", "a couple sitting at a dinner table with plates of food",
      "two friends share a meal", "people at a table in a restaurant", "a man and a woman eating"]),
    ("purple elephant juggling spoons",  # no overlap with its references
     ["a cat sleeping on a couch", "a kitten curled up on the sofa", "a grey cat napping"]),
    ("bus",  # one word
     ["a red bus on the street", "a double decker bus", "a bus parked by the road"]),
    ("",  # empty
     ["a plate with a sandwich and chips", "a sandwich cut in half", "lunch on a white plate",
      "a sandwich on a plate"]),
    ("a red stop sign on the corner of a street",
     ["a stop sign on a street corner", "a red stop sign next to a road", "the stop sign is red",
      "a street sign at an intersection"]),
    ("a plate of food with broccoli and rice and chicken and carrots on a wooden table "
     "in a kitchen",  # long: length penalty
     ["a plate of broccoli and rice", "food on a plate", "a plate with chicken broccoli and rice"]),
    ("a man man man man man man",
     ["a man standing in a kitchen", "a man cooking", "a man in an apron at the stove",
      "a chef preparing food", "a man making dinner"]),
    ("a cat sleeping on a couch",  # matches the references of the "purple elephant" image
     ["a cat lying on a couch", "a cat asleep on the sofa", "a sleeping cat on a couch"]),
]


def _dicts(items):
    gts = {f"img{i}": refs for i, (_, refs) in enumerate(items)}
    res = {f"img{i}": [cand] for i, (cand, _) in enumerate(items)}
    return gts, res


def test_cider_matches_pycocoevalcap():
    gts, res = _dicts(CAPTIONS)
    ref_score, ref_items = Cider().compute_score(gts, res)
    score, items = CiderD().compute_score(gts, res)
    np.testing.assert_allclose(items, ref_items, rtol=0, atol=1e-6)
    assert abs(score - ref_score) < 1e-6
    # The list API on the same (already tokenized) strings.
    score2, items2 = cider([c for c, _ in CAPTIONS], [r for _, r in CAPTIONS], tokenize=False)
    np.testing.assert_allclose(items2, ref_items, rtol=0, atol=1e-6)
    # Not a degenerate set: a good caption scores well, the unrelated and empty ones 0.
    assert ref_items[0] > 0.5 and ref_items[3] == 0.0 and ref_items[5] == 0.0
    assert 0.1 < ref_score < 3.0


def test_cider_matches_pycocoevalcap_random_corpus():
    rng = random.Random(0)
    vocab = "a the man dog on of in red blue sits runs near table with two".split()

    def sentence(lo):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, 14)))

    gts = {i: [sentence(1) for _ in range(rng.randint(1, 6))] for i in range(120)}
    res = {i: [sentence(0)] for i in range(120)}
    ref_score, ref_items = Cider().compute_score(gts, res)
    score, items = CiderD().compute_score(gts, res)
    np.testing.assert_allclose(items, ref_items, rtol=0, atol=1e-6)
    assert abs(score - ref_score) < 1e-6


def test_cider_tokenizes_raw_text_like_pretokenized():
    raw_cands = ["A man riding a horse on a beach.", "A dog, dog, dog running!"]
    raw_refs = [["A man rides a horse along the beach.", "A person on a horse -- at the beach",
                 "Man riding a (brown) horse near the ocean"],
                ["A dog runs across the grass.", "A brown dog running in a field.",
                 '"The dog is running fast"']]
    tok_cands = ["a man riding a horse on a beach", "a dog dog dog running"]
    tok_refs = [["a man rides a horse along the beach", "a person on a horse at the beach",
                 "man riding a brown horse near the ocean"],
                ["a dog runs across the grass", "a brown dog running in a field",
                 "the dog is running fast"]]
    gts = {i: r for i, r in enumerate(tok_refs)}
    res = {i: [c] for i, c in enumerate(tok_cands)}
    ref_score, ref_items = Cider().compute_score(gts, res)
    score, items = cider(raw_cands, raw_refs)
    np.testing.assert_allclose(items, ref_items, rtol=0, atol=1e-6)


@pytest.mark.parametrize("raw, tokens", [
    ("The dog's ball, isn't it?", "the dog 's ball is n't it"),  # clitics split, punctuation gone
    ("Two people -- one in a T-shirt -- stand at 10:30.",
     "two people one in a t-shirt stand at 10:30"),
    ('"Stop" sign in the U.S.', "stop sign in the u.s."),  # quotes gone, abbreviation kept
    ("It costs $5,000 (or 50%).", "it costs $ 5,000 or 50 %"),  # $ and % are tokens
    ("Dogs' toys... I'm here", "dogs toys i 'm here"),
    ("Can't  won't\nshe'll", "ca n't wo n't she 'll"),
])
def test_ptb_tokenize(raw, tokens):
    assert ptb_tokenize(raw) == tokens
    assert ptb_tokenize(tokens) == tokens  # idempotent: pre-tokenized text passes through


# (prediction, human answers, official accuracy, why). Leave-one-out over 10 answers with
# m of them matching: m subsets keep m-1 matches, 10-m keep m; each scores min(matches/3, 1).
VQA_CASES = [
    # --- the leave-one-out average ---
    ("2", ["2"] * 3 + ["3"] * 7, 0.9, "m=3: (3*2/3 + 7*1)/10"),
    ("2", ["2"] * 2 + ["3"] * 8, 0.6, "m=2: (2*1/3 + 8*2/3)/10"),
    ("2", ["2"] + ["3"] * 9, 0.3, "m=1: (1*0 + 9*1/3)/10"),
    ("2", ["2"] * 4 + ["3"] * 6, 1.0, "m=4: every subset keeps >=3 matches"),
    ("4", ["3"] * 10, 0.0, "no match"),
    ("cat", ["cat", "cat", "dog", "dog", "cat"], 0.8, "5 answers, m=3: (3*2/3 + 2*1)/5"),
    # --- case and whitespace (prediction) ---
    ("YES", ["yes"] * 10, 1.0, "lower-cased"),
    ("  red\tand\n  white ", ["red and white"] * 10, 1.0, "tabs/newlines -> spaces, re-joined"),
    # --- number words ---
    ("Three", ["3"] * 10, 1.0, "three -> 3"),
    ("none", ["0"] * 10, 1.0, "none -> 0"),
    ("eleven", ["11"] * 10, 0.0, "only none..ten are mapped"),
    # --- articles ---
    ("the red car", ["red car"] * 10, 1.0, "'the' dropped"),
    ("an apple", ["apple"] * 3 + ["pear"] * 7, 0.9, "'an' dropped, then m=3"),
    # --- contractions ---
    ("dont know", ["don't know"] * 10, 1.0, "dont -> don't"),
    ("isnt", ["isn't"] * 2 + ["no"] * 8, 0.6, "isnt -> isn't, then m=2"),
    # --- punctuation ---
    ("yes!", ["yes"] * 10, 1.0, "'!' -> space, then stripped by split"),
    ("hot-dog", ["hot dog"] * 10, 1.0, "'-' touching no space -> space"),
    ("t-shirt, blue", ["t shirt blue"] * 10, 1.0, "'-' -> space; ', ' touches a space -> deleted"),
    # --- digit commas ---
    ("1,000", ["1000"] * 10, 1.0, "digit,digit: every mark deleted, not spaced"),
    # --- periods ---
    ("3.5", ["3.5"] * 10, 1.0, "a period before a digit stays"),
    ("yes.", ["yes"] * 10, 1.0, "other periods deleted"),
    # --- the human answers: punctuation only, and only when they differ ---
    ("yes", ["yes."] * 10, 0.0, "identical answers are compared raw"),
    ("yes", ["yes."] * 5 + ["yes"] * 5, 1.0, "differing answers lose their periods: m=10"),
    ("yes", ["Yes"] * 3 + ["no"] * 7, 0.0, "human answers are not lower-cased"),
    ("two", ["two"] * 10, 0.0, "nor number-mapped: the prediction becomes '2'"),
]


@pytest.mark.parametrize("prediction, answers, expected, why", VQA_CASES,
                         ids=[c[3] for c in VQA_CASES])
def test_vqa_accuracy_official_cases(prediction, answers, expected, why):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12), why


@pytest.mark.parametrize("raw, normalized", [
    ("hot-dog", "hot dog"),            # mark touching no space -> space
    ("left - right", "left right"),    # mark touching a space -> deleted
    ("red,blue", "red blue"),
    ("yes, it is", "yes it is"),
    ("(a) cat", "cat"),                # '(' -> space, ') ' deleted, article dropped
    ("1,000-2,000", "10002000"),       # a digit comma deletes every mark, '-' included
    ("a.m.", "am"),                    # periods not before a digit deleted
    (".5 or 5.", ".5 or 5"),
    ("st. louis", "st louis"),
    ("." * 40, "." * 8),               # the official re.sub count of 32 (re.UNICODE)
    ("Im", "im"),                      # the official table's capitalised keys never match
    ("somebody'd", "somebodyd"),       # ... and its typo is kept
    ("The Two  Dogs", "2 dogs"),
    ("whats that", "what's that"),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_mean_vqa_accuracy():
    mean, per_item = mean_vqa_accuracy(
        ["2", "Yes.", "dog"], [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["cat"] * 10]
    )
    np.testing.assert_allclose(per_item, [0.9, 1.0, 0.0])
    assert mean == pytest.approx(1.9 / 3)


def _pairwise_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_count_with_ties():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # 3 of 4 pairs
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    rng = np.random.default_rng(0)
    have_sklearn = importlib.util.find_spec("sklearn") is not None
    for _ in range(20):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 5, n).astype(float)  # few distinct values: many ties
        got = roc_auc(labels, scores)
        assert got == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)
        if have_sklearn:
            from sklearn.metrics import roc_auc_score
            assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


def test_top1_accuracy():
    scores = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 3.0]])
    # argmax (first on ties): 1, 0, 0, 1 -> rows 0 and 1 right.
    assert top1_accuracy(scores, [1, 0, 2, 2]) == pytest.approx(0.5)
    assert top1_accuracy(scores, [1, 0, 0, 1]) == pytest.approx(1.0)
