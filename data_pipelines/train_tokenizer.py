"""Trains a SentencePiece model on a text corpus (used for the synthetic data).

    python -m data_pipelines.train_tokenizer --corpus corpus.txt --model_prefix out/spm \
        --vocab_size 1000

Ids follow seqio's convention, plus a BOS: pad 0, eos 1, unk 2, bos 3. `<image>` and
`<EOC>` are deliberately NOT trained into the model: `FlamingoVocabulary` appends them
after the trained pieces exactly as it does for a pretrained model, so the same code
path (and the same `base_vocab_size` + 2 layout) serves both.
"""

import argparse
import io
import os
import sys
from typing import Iterable, Sequence

import sentencepiece as spm

from data_pipelines import tokenizer as tokenizer_lib


def train_sentencepiece(
    corpus_files: Sequence[str],
    model_prefix: str,
    vocab_size: int = 1000,
    model_type: str = "unigram",
    max_sentences: int = 1_000_000,
) -> str:
    """Trains a SentencePiece model and returns the path of the written `.model` file.

    `vocab_size` is an upper bound: on a small corpus SentencePiece stops earlier
    (hard_vocab_limit=False) instead of failing.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}.")
    for path in corpus_files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Corpus file {path} does not exist.")
    sentences = _read_sentences(corpus_files)
    if not sentences:
        raise ValueError(f"Corpus {list(corpus_files)} contains no non-empty lines.")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences[:max_sentences]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=3,
        # The special tokens are appended later; never let training learn pieces of them.
        control_symbols=[],
        minloglevel=2,
    )
    path = model_prefix + ".model"
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _read_sentences(corpus_files: Iterable[str]) -> list[str]:
    out = []
    for path in corpus_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                for token in tokenizer_lib.SPECIAL_TOKENS:
                    line = line.replace(token, " ")
                if line:
                    out.append(line)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", required=True,
                        help="UTF-8 text files, one sentence a line.")
    parser.add_argument("--model_prefix", required=True, help="Writes <prefix>.model.")
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    args = parser.parse_args(argv)
    path = train_sentencepiece(args.corpus, args.model_prefix, args.vocab_size, args.model_type)
    vocab = tokenizer_lib.FlamingoVocabulary(path)
    print(
        f"wrote {path}: base_vocab_size={vocab.base_vocab_size} "
        f"image_id={vocab.image_id} eoc_id={vocab.eoc_id} bos_id={vocab.bos_id} "
        f"eos_id={vocab.eos_id} pad_id={vocab.pad_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
