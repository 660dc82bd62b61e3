"""The Flamingo vocabulary: SentencePiece plus the `<image>` and `<EOC>` tokens (SPEC §3.5).

`<image>` marks where a media item sits in the text and `<EOC>` ends a chunk of text.
Each must encode to exactly one id. When the pretrained SentencePiece model lacks them,
they are appended after its vocabulary as user-defined pieces, so

    image_id = base_vocab_size, eoc_id = base_vocab_size + 1

and the model takes `lm.vocab_size = base_vocab_size, num_extra_tokens = 2`: the
pretrained embedding rows stay frozen, the two appended rows are trained. Because the
pieces live inside the SentencePiece model proto, the Python tokenizer and the
TensorFlow one (tensorflow_text, used by the seqio preprocessors) agree on them.
"""

import functools
import hashlib
import re
import threading

import seqio
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import tensorflow as tf

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<EOC>"
SPECIAL_TOKENS = (IMAGE_TOKEN, EOC_TOKEN)

_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
_SPECIAL_RE = "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")"
_SEP = "\x1f"  # ASCII unit separator: marks special-token boundaries in-graph
_load_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load_with_special_tokens(model_file: str) -> tuple[bytes, int]:
    """Returns (serialized model with <image>/<EOC> present, pretrained piece count)."""
    with tf.io.gfile.GFile(model_file, "rb") as f:
        proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    base_size = len(proto.pieces)
    present = {p.piece for p in proto.pieces}
    for token in SPECIAL_TOKENS:
        if token not in present:
            proto.pieces.add(piece=token, score=0.0, type=_USER_DEFINED)
    return proto.SerializeToString(), base_size


class FlamingoVocabulary(seqio.SentencePieceVocabulary):
    """seqio SentencePiece vocabulary in which `<image>` and `<EOC>` are single ids.

    Attributes exposed to the model config: `image_id`, `eoc_id`, `bos_id`, `eos_id`,
    `pad_id` (always 0, seqio's convention), `base_vocab_size` (pretrained pieces),
    `num_extra_tokens` (how many of the two special tokens were appended) and
    `vocab_size` (= base_vocab_size + num_extra_tokens).
    """

    def __init__(self, sentencepiece_model_file: str):
        super().__init__(sentencepiece_model_file, extra_ids=0)

    def _model_context(self):
        if self._model:
            return self._model
        with _load_lock:
            sp_model, base_size = _load_with_special_tokens(self._sentencepiece_model_file)
            processor = spm.SentencePieceProcessor()
            processor.LoadFromSerializedProto(sp_model)
        self._base_size = base_size
        self._model = seqio.vocabularies._ModelContext(tokenizer=processor, sp_model=sp_model)
        return self._model

    @property
    def base_vocab_size(self) -> int:
        """Number of pieces in the pretrained SentencePiece model (before appending)."""
        self._model_context()
        return self._base_size

    @property
    def num_extra_tokens(self) -> int:
        """How many of `<image>`, `<EOC>` were appended (0 when the model had them)."""
        return self.vocab_size - self.base_vocab_size

    @property
    def image_id(self) -> int:
        return self.tokenizer.PieceToId(IMAGE_TOKEN)

    @property
    def eoc_id(self) -> int:
        return self.tokenizer.PieceToId(EOC_TOKEN)

    @property
    def bos_id(self) -> int:
        bos = self.tokenizer.bos_id()
        if bos < 0:
            raise ValueError(
                f"SentencePiece model {self._sentencepiece_model_file} defines no BOS piece; "
                "Flamingo sequences start with <BOS>. Train it with bos_id >= 0 "
                "(python -m data_pipelines.train_tokenizer does)."
            )
        return bos

    @property
    def tf_tokenizer(self):
        """One tensorflow_text tokenizer per vocabulary (seqio builds one per call, which
        reloads the model every time a pipeline is traced)."""
        if getattr(self, "_tf_tokenizer", None) is None:
            with tf.init_scope():  # created eagerly, so every traced pipeline can capture it
                self._tf_tokenizer = super().tf_tokenizer
        return self._tf_tokenizer

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_tf_tokenizer", None)
        return state

    def _encode(self, s: str) -> list[int]:
        """Text between special tokens is encoded on its own, as the data pipelines encode
        each chunk, so a prompt like '<image>Output:' gets the ids training data has."""
        ids = []
        for part in re.split(_SPECIAL_RE, s):
            if part == IMAGE_TOKEN:
                ids.append(self.image_id)
            elif part == EOC_TOKEN:
                ids.append(self.eoc_id)
            elif part:
                ids.extend(self.tokenizer.EncodeAsIds(part))
        return ids

    def _encode_tf(self, s):
        """In-graph `_encode`: scalar -> [n] int32, [B] -> ragged [B, None] int32."""
        s = tf.convert_to_tensor(s, tf.string)
        flat_in = tf.reshape(s, [-1])
        marked = tf.strings.regex_replace(flat_in, _SPECIAL_RE, _SEP + "\\1" + _SEP)
        parts = tf.strings.split(marked, _SEP)  # ragged [B, P]
        texts = parts.flat_values
        is_image = tf.equal(texts, IMAGE_TOKEN)
        special = is_image | tf.equal(texts, EOC_TOKEN)
        tokens = tf.cast(self.tf_tokenizer.tokenize(tf.where(special, "", texts)), tf.int32)
        special_ids = tf.RaggedTensor.from_row_lengths(
            tf.boolean_mask(tf.where(is_image, self.image_id, self.eoc_id), special),
            tf.cast(special, tf.int64))
        per_part = tf.concat([tokens, special_ids], axis=1)  # ragged [sum P, None]
        lengths = tf.math.unsorted_segment_sum(per_part.row_lengths(), parts.value_rowids(),
                                               tf.shape(flat_in, out_type=tf.int64)[0])
        out = tf.RaggedTensor.from_row_lengths(per_part.flat_values, lengths)
        return out[0] if s.shape.rank == 0 else out

    def encode_text_tf(self, s):
        """In-graph encoding of text known to hold no special tokens (the pipelines strip
        them first): the plain SentencePiece ids, int32, scalar -> [n], [B] -> ragged."""
        return tf.cast(self.tf_tokenizer.tokenize(s), tf.int32)

    def _decode(self, ids):
        # seqio maps ids >= the proto's piece count to UNK; ours are all in the proto.
        return self.tokenizer.DecodeIds([int(i) for i in ids])

    def decode_with_special_tokens(self, ids) -> str:
        """Decodes every id, writing <BOS>/<EOS> out and dropping padding (for tests, logs)."""
        named = {self.bos_id: "<BOS>", self.eos_id: "<EOS>"}
        out, run = [], []  # run: consecutive ordinary ids, decoded together to keep spaces
        for i in (int(i) for i in ids):
            if i == self.pad_id:
                continue
            if i in named:
                if run:
                    out.append(self.tokenizer.DecodeIds(run))
                    run = []
                out.append(named[i])
            else:
                run.append(i)
        if run:
            out.append(self.tokenizer.DecodeIds(run))
        return "".join(out)

    def __str__(self) -> str:
        return (
            f"FlamingoVocabulary(file={self.sentencepiece_model_file}, "
            f"base_vocab_size={self.base_vocab_size}, image_id={self.image_id}, "
            f"eoc_id={self.eoc_id}, spm_md5={hashlib.md5(self.sp_model).hexdigest()})"
        )


@functools.lru_cache(maxsize=None)
def load_vocabulary(sentencepiece_model_file: str) -> FlamingoVocabulary:
    """The (cached, shared) FlamingoVocabulary of a SentencePiece model file."""
    vocab = FlamingoVocabulary(sentencepiece_model_file)
    vocab.load_model()
    return vocab
