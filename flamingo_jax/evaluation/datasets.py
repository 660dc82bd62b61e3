"""Readers of the evaluation benchmarks in their public file layouts (SPEC §7).

Users point `config.eval.tasks.<name>.support` / `.query` at their own copies; each
reader turns one layout into an `EvalSet` of `EvalExample`s:

    karpathy       COCO / Flickr30K Karpathy split: dataset_coco.json-style
                   {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}],
                   "cocoid"? | "imgid"?}]}; images at images_dir/filepath/filename
    vqav2          VQAv2 and OK-VQA: questions json {"data_subtype", "questions": [{
                   "question_id", "image_id", "question"}]} + annotations json
                   {"annotations": [{"question_id", "answers": [{"answer"}] * 10}]};
                   images at images_dir/image_name.format(image_id=, data_subtype=)
    textvqa        TextVQA_0.5.1_<split>.json: {"data": [{"question_id", "image_id",
                   "question", "answers": [str] * 10}]}; images at images_dir/<image_id>.jpg
    vizwiz         VizWiz <split>.json: [{"image", "question", "answers": [{"answer"}]}];
                   images at images_dir/<image>
    hateful_memes  <split>.jsonl lines {"id", "img", "label", "text"}; img relative to
                   images_dir (default: the jsonl's folder)
    image_folder   ImageNet style: root/<class_dir>/<image>, classes in sorted folder order;
                   optional class_names file: "<class_dir> <name>" lines, or one name per
                   line in sorted folder order
    video_captions VATEX style [{"videoID", "enCap": [str]}]; frames (image files, name
                   order) in frames_dir/clip_name.format(**entry)
    video_qa       MSRVTT-QA / MSVD-QA style [{"id"?, "video_id" | "video", "question",
                   "answer": str | [str]}]; frames as for video_captions

Records that cannot be evaluated (a missing image or frame folder, an entry without the
fields its layout requires, empty text, no answers, no label) are skipped and counted per
reason in `EvalSet.skipped`; a file that is missing or does not parse is an error.
"""

import collections
import dataclasses
import inspect
import json
import os
from typing import Any, Callable, Iterable, Sequence

from data_pipelines import bad_input

# Skip reasons (the data pipeline's where they mean the same).
MISSING_FILE = bad_input.MISSING_FILE
MALFORMED_RECORD = bad_input.MALFORMED_RECORD
EMPTY_TEXT = bad_input.EMPTY_TEXT
NO_MEDIA = bad_input.NO_MEDIA
NO_ANSWERS = "no_answers"  # a question without human answers (e.g. a test split)
NO_LABEL = "no_label"
UNSUPPORTED_FILE = "unsupported_file"  # a non-image file inside a class or frame folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class EvalExample:
    id: str
    media: tuple[str, ...]  # one image path, or a clip's frame paths in time order
    question: str = ""  # VQA / video QA
    text: str = ""  # the text written on a meme (HatefulMemes)
    references: tuple[str, ...] = ()  # reference captions, or the human answers
    label: int = -1  # class index (classification); 1 = hateful (HatefulMemes)


@dataclasses.dataclass
class EvalSet:
    examples: list[EvalExample]
    skipped: dict[str, int]  # reason -> number of records skipped
    class_names: tuple[str, ...] = ()  # classification only, index = label

    def __len__(self) -> int:
        return len(self.examples)


class _Collector:
    """Examples kept and records skipped, per reason."""

    def __init__(self):
        self.examples: list[EvalExample] = []
        self.skipped: collections.Counter = collections.Counter()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def add_image_example(self, image_path: str, **fields) -> None:
        if not os.path.isfile(image_path):
            self.skip(MISSING_FILE)
            return
        self.examples.append(EvalExample(media=(image_path,), **fields))

    def result(self, class_names: Sequence[str] = ()) -> EvalSet:
        return EvalSet(self.examples, dict(self.skipped), tuple(class_names))


def _load_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist; check the paths in "
                                "config.eval.tasks")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {path} is not valid JSON ({e}); re-download or "
                         "regenerate it") from None


def _expect(data: Any, kind: type, key: str | None, path: str, layout: str) -> Any:
    """data[key] (or data) checked to be of `kind`, else an error describing the layout."""
    value = data.get(key) if key is not None and isinstance(data, dict) else data
    if not isinstance(value, kind):
        where = f"its '{key}' field" if key else "its top level"
        raise ValueError(f"{path}: {where} is not a {kind.__name__}; expected the {layout} "
                         "layout (see flamingo_jax/evaluation/datasets.py)")
    return value


def _clean(text: Any) -> str:
    return text.strip() if isinstance(text, str) else ""


def _texts(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(t for t in (_clean(v) for v in values) if t)


# ------------------------------------------------------------------------------ images


def read_karpathy(path: str, images_dir: str, split: str | Sequence[str] = "test") -> EvalSet:
    """COCO / Flickr30K captions in the Karpathy-split json; `split` one name or several
    (e.g. ("train", "restval") for a COCO support set)."""
    splits = {split} if isinstance(split, str) else set(split)
    data = _load_json(path, "Karpathy-split captions")
    out = _Collector()
    for entry in _expect(data, list, "images", path, "Karpathy-split"):
        if not isinstance(entry, dict) or "split" not in entry:
            out.skip(MALFORMED_RECORD)
            continue
        if entry["split"] not in splits:
            continue
        filename = entry.get("filename")
        sentences = entry.get("sentences")
        if not isinstance(filename, str) or not isinstance(sentences, list):
            out.skip(MALFORMED_RECORD)
            continue
        captions = _texts(s.get("raw") for s in sentences if isinstance(s, dict))
        if not captions:
            out.skip(EMPTY_TEXT)
            continue
        image_id = entry.get("cocoid", entry.get("imgid", filename))
        image_path = os.path.join(images_dir, entry.get("filepath", ""), filename)
        out.add_image_example(image_path, id=str(image_id), references=captions)
    return out.result()


def read_vqav2(questions: str, annotations: str, images_dir: str,
               image_name: str = "COCO_{data_subtype}_{image_id:012d}.jpg") -> EvalSet:
    """VQAv2 or OK-VQA: the questions json and the annotations json (10 answers each)."""
    q_data = _load_json(questions, "VQA questions")
    a_data = _load_json(annotations, "VQA annotations")
    answers_of = {}
    for ann in _expect(a_data, list, "annotations", annotations, "VQAv2 annotations"):
        if isinstance(ann, dict) and "question_id" in ann:
            answers_of[ann["question_id"]] = ann.get("answers")
    subtype = q_data.get("data_subtype", "") if isinstance(q_data, dict) else ""
    out = _Collector()
    for q in _expect(q_data, list, "questions", questions, "VQAv2 questions"):
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            out.skip(MALFORMED_RECORD)
            continue
        question = _clean(q["question"])
        if not question:
            out.skip(EMPTY_TEXT)
            continue
        answers = answers_of.get(q["question_id"])
        if not isinstance(answers, list):
            out.skip(NO_ANSWERS)
            continue
        answers = _texts(a.get("answer") for a in answers if isinstance(a, dict))
        if not answers:
            out.skip(NO_ANSWERS)
            continue
        try:
            name = image_name.format(image_id=q["image_id"], data_subtype=subtype)
        except (ValueError, KeyError, IndexError) as e:
            raise ValueError(f"image_name {image_name!r} does not format with image_id="
                             f"{q['image_id']!r}, data_subtype={subtype!r} ({e}); it may use "
                             "only {image_id} and {data_subtype}") from None
        out.add_image_example(os.path.join(images_dir, name), id=str(q["question_id"]),
                              question=question, references=answers)
    return out.result()


def read_textvqa(path: str, images_dir: str) -> EvalSet:
    """TextVQA's json: {"data": [{"question_id", "image_id", "question", "answers"}]}."""
    data = _load_json(path, "TextVQA")
    out = _Collector()
    for q in _expect(data, list, "data", path, "TextVQA"):
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            out.skip(MALFORMED_RECORD)
            continue
        question = _clean(q["question"])
        if not question:
            out.skip(EMPTY_TEXT)
            continue
        answers = _texts(q.get("answers") or ())
        if not answers:
            out.skip(NO_ANSWERS)
            continue
        out.add_image_example(os.path.join(images_dir, f"{q['image_id']}.jpg"),
                              id=str(q["question_id"]), question=question, references=answers)
    return out.result()


def read_vizwiz(path: str, images_dir: str) -> EvalSet:
    """VizWiz's json: [{"image", "question", "answers": [{"answer"}]}] (one per image)."""
    data = _load_json(path, "VizWiz")
    out = _Collector()
    for q in _expect(data, list, None, path, "VizWiz"):
        if not isinstance(q, dict) or not isinstance(q.get("image"), str) or "question" not in q:
            out.skip(MALFORMED_RECORD)
            continue
        question = _clean(q["question"])
        if not question:
            out.skip(EMPTY_TEXT)
            continue
        answers = _texts(a.get("answer") for a in q.get("answers") or () if isinstance(a, dict))
        if not answers:
            out.skip(NO_ANSWERS)
            continue
        out.add_image_example(os.path.join(images_dir, q["image"]), id=q["image"],
                              question=question, references=answers)
    return out.result()


def read_hateful_memes(path: str, images_dir: str | None = None) -> EvalSet:
    """HatefulMemes jsonl: {"id", "img", "label", "text"} per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HatefulMemes file {path} does not exist; check the paths in "
                                "config.eval.tasks")
    images_dir = os.path.dirname(path) if images_dir is None else images_dir
    out = _Collector()
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                out.skip(MALFORMED_RECORD)
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("img"), str):
                out.skip(MALFORMED_RECORD)
                continue
            if entry.get("label") not in (0, 1):
                out.skip(NO_LABEL)
                continue
            text = _clean(entry.get("text"))
            if not text:
                out.skip(EMPTY_TEXT)
                continue
            out.add_image_example(os.path.join(images_dir, entry["img"]),
                                  id=str(entry.get("id", entry["img"])), text=text,
                                  label=int(entry["label"]))
    return out.result()


def _read_class_names(path: str, class_dirs: list[str]) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    keyed = dict(line.split(maxsplit=1) for line in lines if len(line.split(maxsplit=1)) == 2)
    if set(class_dirs) <= set(keyed):
        return [keyed[d] for d in class_dirs]
    if len(lines) == len(class_dirs):
        return lines
    missing = sorted(set(class_dirs) - set(keyed))[:5]
    raise ValueError(f"class names file {path} neither names every class folder "
                     f"('<folder> <name>' lines; missing e.g. {missing}) nor has one line per "
                     f"folder ({len(lines)} lines for {len(class_dirs)} folders)")


def read_image_folder(root: str, class_names: str | None = None) -> EvalSet:
    """ImageNet style: one folder of images per class, classes in sorted folder order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist; check the paths in "
                                "config.eval.tasks")
    class_dirs = sorted(d for d in os.listdir(root)
                        if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not class_dirs:
        raise ValueError(f"image folder {root} has no class folders; expected "
                         "root/<class>/<image> (ImageNet layout)")
    names = class_dirs if class_names is None else _read_class_names(class_names, class_dirs)
    out = _Collector()
    for label, class_dir in enumerate(class_dirs):
        folder = os.path.join(root, class_dir)
        for name in sorted(os.listdir(folder)):
            if name.startswith("."):
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                out.skip(UNSUPPORTED_FILE)
                continue
            out.add_image_example(os.path.join(folder, name), id=f"{class_dir}/{name}",
                                  label=label)
    return out.result(names)


# ------------------------------------------------------------------------------ videos


def _frames(frames_dir: str, clip_name: str, entry: dict,
            out: _Collector) -> tuple[str, ...] | None:
    """The clip's frame paths in name order, or None (skip counted)."""
    try:
        folder = os.path.join(frames_dir, clip_name.format(**entry))
    except (KeyError, IndexError, ValueError):
        out.skip(MALFORMED_RECORD)
        return None
    if not os.path.isdir(folder):
        out.skip(MISSING_FILE)
        return None
    frames = tuple(os.path.join(folder, n) for n in sorted(os.listdir(folder))
                   if n.lower().endswith(IMAGE_EXTENSIONS))
    if not frames:
        out.skip(NO_MEDIA)
        return None
    return frames


def read_video_captions(path: str, frames_dir: str, clip_name: str = "{videoID}") -> EvalSet:
    """VATEX-style captions json: [{"videoID", "enCap": [str]}], frames per clip folder."""
    data = _load_json(path, "video captions")
    out = _Collector()
    for entry in _expect(data, list, None, path, "video captions (VATEX)"):
        if not isinstance(entry, dict) or not isinstance(entry.get("enCap"), list):
            out.skip(MALFORMED_RECORD)
            continue
        captions = _texts(entry["enCap"])
        if not captions:
            out.skip(EMPTY_TEXT)
            continue
        frames = _frames(frames_dir, clip_name, entry, out)
        if frames is not None:
            clip_id = entry.get("videoID", clip_name.format(**entry))
            out.examples.append(EvalExample(id=str(clip_id), media=frames, references=captions))
    return out.result()


def read_video_qa(path: str, frames_dir: str, clip_name: str = "{video_id}") -> EvalSet:
    """MSRVTT-QA / MSVD-QA-style json: [{"id", "video_id", "question", "answer"}], the
    answer one string or a list (several annotators); frames per clip folder."""
    data = _load_json(path, "video QA")
    out = _Collector()
    for index, entry in enumerate(_expect(data, list, None, path, "video QA (MSRVTT-QA)")):
        if not isinstance(entry, dict) or "question" not in entry or "answer" not in entry:
            out.skip(MALFORMED_RECORD)
            continue
        question = _clean(entry["question"])
        if not question:
            out.skip(EMPTY_TEXT)
            continue
        answer = entry["answer"]
        answers = _texts([answer] if isinstance(answer, str) else answer or ())
        if not answers:
            out.skip(NO_ANSWERS)
            continue
        frames = _frames(frames_dir, clip_name, entry, out)
        if frames is not None:
            out.examples.append(EvalExample(id=str(entry.get("id", index)), media=frames,
                                            question=question, references=answers))
    return out.result()


# ------------------------------------------------------------------------------ registry

FORMATS: dict[str, Callable[..., EvalSet]] = {
    "karpathy": read_karpathy,
    "vqav2": read_vqav2,
    "textvqa": read_textvqa,
    "vizwiz": read_vizwiz,
    "hateful_memes": read_hateful_memes,
    "image_folder": read_image_folder,
    "video_captions": read_video_captions,
    "video_qa": read_video_qa,
}
# The layouts each task kind can read.
KIND_FORMATS = {
    "captioning": ("karpathy",),
    "vqa": ("vqav2", "textvqa", "vizwiz"),
    "classification": ("image_folder",),
    "hateful_memes": ("hateful_memes",),
    "video_captioning": ("video_captions",),
    "video_qa": ("video_qa",),
}


def check_reader_args(format_name: str, kwargs: dict, where: str) -> None:
    """Fails (before anything is read or compiled) on an unknown format or argument."""
    if format_name not in FORMATS:
        raise ValueError(f"{where}: format={format_name!r}; allowed: {sorted(FORMATS)}")
    params = inspect.signature(FORMATS[format_name]).parameters
    unknown = sorted(set(kwargs) - set(params))
    required = sorted(n for n, p in params.items()
                      if p.default is inspect.Parameter.empty and n not in kwargs)
    if unknown or required:
        raise ValueError(f"{where}: format {format_name!r} takes {list(params)}; "
                         f"unknown: {unknown}, missing: {required}")


def read(format_name: str, **kwargs) -> EvalSet:
    """The EvalSet of one dataset split: `format_name` from FORMATS, the reader's arguments."""
    check_reader_args(format_name, kwargs, "read")
    return FORMATS[format_name](**kwargs)
