"""Few-shot prompt templates (SPEC §7), one per task kind, overridable from the config.

A template is the text of ONE in-context example with `{field}` placeholders, e.g. the
captioning default `<image>Output: {caption}<EOC>`. Exactly one field is the *target*,
what the model produces for the query (`caption`, `answer` or `class_name`); it must be
the last field. A prompt is `<BOS>`, the support examples filled in completely, then the
query's example cut just before its target (trailing spaces dropped):

    <BOS><image>Output: a red circle.<EOC><image>Output: a blue square.<EOC><image>Output:

Zero-shot prompts use two support examples with their `<image>` removed (text only), as
the paper does. The paper names prompt sensitivity as a limitation, so every template is
a config value: `config.eval.prompts.<kind>`, or `prompt` in one task's config.
"""

import collections
import dataclasses
import string
from typing import Sequence

from data_pipelines.tokenizer import EOC_TOKEN, IMAGE_TOKEN
from flamingo_jax.evaluation.datasets import EvalExample

DEFAULT_TEMPLATES = {
    "captioning": f"{IMAGE_TOKEN}Output: {{caption}}{EOC_TOKEN}",
    "vqa": f"{IMAGE_TOKEN}Question: {{question}} Answer: {{answer}}{EOC_TOKEN}",
    "classification": f"{IMAGE_TOKEN}Output: {{class_name}}{EOC_TOKEN}",
    "hateful_memes": (f"{IMAGE_TOKEN}is an image with: '{{text}}' written on it. "
                      f"Is it hateful? Answer: {{answer}}{EOC_TOKEN}"),
    "video_captioning": f"{IMAGE_TOKEN}Output: {{caption}}{EOC_TOKEN}",
    "video_qa": f"{IMAGE_TOKEN}Question: {{question}} Answer: {{answer}}{EOC_TOKEN}",
}
KINDS = tuple(DEFAULT_TEMPLATES)
# kind -> (target field, the other fields a template may use)
FIELDS = {
    "captioning": ("caption", ()),
    "vqa": ("answer", ("question",)),
    "classification": ("class_name", ()),
    "hateful_memes": ("answer", ("text",)),
    "video_captioning": ("caption", ()),
    "video_qa": ("answer", ("question",)),
}
# HatefulMemes answers by label (0 = not hateful, 1 = hateful).
HATEFUL_ANSWERS = ("no", "yes")


def example_fields(kind: str, example: EvalExample, class_names: Sequence[str] = (),
                   hateful_answers: Sequence[str] = HATEFUL_ANSWERS) -> dict[str, str]:
    """The template fields of a support example, its target filled with the reference:
    the first caption, the most common human answer (first seen on ties), the class name."""
    if kind in ("captioning", "video_captioning"):
        return {"caption": example.references[0]}
    if kind in ("vqa", "video_qa"):
        answer = collections.Counter(example.references).most_common(1)[0][0]
        return {"question": example.question, "answer": answer}
    if kind == "classification":
        return {"class_name": class_names[example.label]}
    if kind == "hateful_memes":
        return {"text": example.text, "answer": hateful_answers[example.label]}
    raise ValueError(f"task kind {kind!r}; allowed: {KINDS}")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    template: str
    target: str  # the field the model produces

    @classmethod
    def for_kind(cls, kind: str, template: str = "", where: str = "prompt") -> "PromptTemplate":
        """The kind's template (its default when `template` is empty), checked."""
        if kind not in FIELDS:
            raise ValueError(f"{where}: task kind {kind!r}; allowed: {KINDS}")
        target, others = FIELDS[kind]
        text = template or DEFAULT_TEMPLATES[kind]
        try:
            used = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            raise ValueError(f"{where}: template {text!r} does not parse ({e}); write literal "
                             "braces as {{ and }}") from None
        allowed = (target,) + others
        if text.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"{where}: template {text!r} must hold {IMAGE_TOKEN} exactly once "
                             "(where the example's media goes)")
        if used.count(target) != 1 or used[-1] != target or not set(used) <= set(allowed):
            raise ValueError(f"{where}: template {text!r} for kind {kind!r} must use the "
                             f"fields {list(allowed)}, with {{{target}}} exactly once and last")
        return cls(text, target)

    def _split(self) -> tuple[str, str]:
        """(text before the target, text from the target on)."""
        at = self.template.index("{" + self.target + "}")
        return self.template[:at], self.template[at:]

    def example(self, fields: dict[str, str], with_image: bool = True) -> str:
        """One support example, filled in completely."""
        text = self.template.format(**fields)
        return text if with_image else text.replace(IMAGE_TOKEN, "")

    def query(self, fields: dict[str, str]) -> str:
        """The query's example up to (not including) the target, trailing spaces dropped."""
        before, _ = self._split()
        return before.format(**{k: v for k, v in fields.items() if k != self.target}).rstrip()

    def continuation(self, target_value: str) -> str:
        """What follows `query(...)` when the target is `target_value` (for scoring)."""
        before, after = self._split()
        gap = before[len(before.rstrip()):]
        return gap + after.format(**{self.target: target_value})
