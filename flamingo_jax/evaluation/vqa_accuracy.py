"""VQA accuracy with the answer normalization of the official VQAv2 evaluation script.

Reproduces `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (GT-Vision-Lab/VQA), used
unchanged by OK-VQA, TextVQA and VizWiz:
- the prediction: newlines/tabs -> spaces, strip, `process_punctuation`,
  `process_digit_article` (lower-case, number words -> digits, drop articles, restore
  contractions);
- the human answers: `process_punctuation` only, and only when they are not all identical
  (the datasets ship them already normalized; they are not lower-cased);
- accuracy: for each of the n answers left out in turn, min(#other answers equal to the
  prediction / 3, 1); averaged over the n subsets (n = 10 in VQAv2).

Scores are in [0, 1]; the official script reports 100 × the mean, rounded to 2 decimals.
"""

import re
from typing import Sequence

import numpy as np

# The official table, quirks included: the capitalised keys ("Im", "Ive", ...) never match
# (words are lower-cased first) and "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Removed, or replaced by a space, in this order. '.', ':' and "'" are not in the list.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern; its "(?!<=\d)" is a look-ahead that always succeeds, so in effect
# this deletes every '.' not followed by a digit ("3.5" keeps its period, "yes." loses it).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes re.UNICODE (= 32) where re.sub takes `count`: at most 32
# periods are removed.
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """The official processPunctuation.

    Each mark is deleted if it touches a space anywhere in the text, or if the text holds a
    digit-comma-digit ("1,000" -> "1000"); otherwise it becomes a space ("hot-dog" -> "hot dog").
    Then periods not followed by a digit are deleted.
    """
    out = text
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words -> digits, drop articles,
    then restore contractions ("dont" -> "don't"); words re-joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
    """What the official script compares for a predicted answer."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(s))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the human answers (10 in VQAv2).

    Leave-one-out: for each answer left out, min(#remaining answers == prediction / 3, 1);
    the mean over all answers. With 10 answers, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.
    """
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(a == pred for a in gts)
    # Leaving out a matching answer leaves matches-1 matches; any other leaves all of them.
    per_subset = [min(1.0, (matches - (a == pred)) / 3.0) for a in gts]
    return float(sum(per_subset) / len(per_subset))


def mean_vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[Sequence[str]]
) -> tuple[float, np.ndarray]:
    """(mean accuracy, per-question accuracies [N]) over a list of questions."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists; "
                         "pass one list of human answers per prediction")
    if len(predictions) == 0:
        raise ValueError("mean_vqa_accuracy needs at least one question")
    per_item = np.array([vqa_accuracy(p, a) for p, a in zip(predictions, answers)])  # [N]
    return float(per_item.mean()), per_item
