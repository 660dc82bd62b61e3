"""The Flamingo vocabulary: <image>/<EOC> as single appended ids, Python == TF encoding."""

import io

import sentencepiece as spm
import tensorflow as tf

from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import train_tokenizer
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)

_TEXTS = [
    "a red circle<EOC><image> the blue square<EOC>",
    "<image> Question: What colour is the shape? Answer: green<EOC>",
    "plain text with no special tokens",
    "<image><image> two images in a row<EOC>",
]


def test_special_tokens_are_single_ids_appended_after_the_pretrained_vocab(data_world):
    vocab = data_world.vocab
    base = vocab.base_vocab_size
    assert vocab.image_id == base and vocab.eoc_id == base + 1
    assert vocab.vocab_size == base + 2 and vocab.num_extra_tokens == 2
    assert (vocab.pad_id, vocab.eos_id, vocab.bos_id) == (0, 1, 3)
    assert vocab.encode("<image>") == [vocab.image_id]
    assert vocab.encode("<EOC>") == [vocab.eoc_id]
    ids = vocab.encode(_TEXTS[0])
    assert ids.count(vocab.image_id) == 1 and ids.count(vocab.eoc_id) == 2
    # Text around special tokens is encoded as the pipelines encode chunks: on its own.
    assert vocab.encode("<image>Output: a cat<EOC>") == (
        [vocab.image_id] + vocab.encode("Output: a cat") + [vocab.eoc_id])
    # The pretrained pieces never produce the appended ids.
    assert max(vocab.encode(_TEXTS[2])) < base


def test_python_and_tensorflow_tokenizers_agree(data_world):
    vocab = data_world.vocab
    for text in _TEXTS:
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == vocab.encode(text)
        assert vocab.decode(vocab.encode(text)) == text
    batched = vocab.encode_tf(tf.constant(_TEXTS)).to_list()
    assert batched == [vocab.encode(t) for t in _TEXTS]


def test_decode_with_special_tokens_names_bos_eos_and_drops_padding(data_world):
    vocab = data_world.vocab
    ids = [vocab.bos_id] + vocab.encode("<image>a cat<EOC>") + [vocab.eos_id, 0, 0]
    assert vocab.decode_with_special_tokens(ids) == "<BOS><image> a cat<EOC><EOS>"


def test_model_that_already_has_the_tokens_gets_nothing_appended(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} about shapes and colours" for i in range(50)))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_writer=model, vocab_size=40, hard_vocab_limit=False,
        user_defined_symbols=["<image>", "<EOC>"], bos_id=3, eos_id=1, unk_id=2, pad_id=0,
        minloglevel=2)
    path = tmp_path / "with_tokens.model"
    path.write_bytes(model.getvalue())
    vocab = tokenizer_lib.FlamingoVocabulary(str(path))
    assert vocab.num_extra_tokens == 0
    assert vocab.image_id < vocab.base_vocab_size and vocab.eoc_id < vocab.base_vocab_size
    assert vocab.encode("<image>") == [vocab.image_id]


def test_train_tokenizer_command_writes_a_model(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a red circle number {i} <image> moving up" for i in range(30)))
    prefix = tmp_path / "out" / "spm"
    assert train_tokenizer.main(["--corpus", str(corpus), "--model_prefix", str(prefix),
                                 "--vocab_size", "60"]) == 0
    vocab = tokenizer_lib.FlamingoVocabulary(str(prefix) + ".model")
    assert f"image_id={vocab.image_id}" in capsys.readouterr().out
    # '<image>' in the corpus was not learnt as pieces: the tokens are still appended.
    assert vocab.num_extra_tokens == 2
    assert vocab.decode(vocab.encode("a red circle")) == "a red circle"
