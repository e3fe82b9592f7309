"""`vitp tokenizer train`: bad lines are skipped and counted; no usable text or a too small vocabulary is refused."""

import pytest

from vitp.cli import main
from vitp.data.tokenizer import MIN_VOCAB_SIZE, train_tokenizer, train_tokenizer_on_meta
from vitp.errors import DataError

from data_testing import conversation, write_dataset
from vitp_testing import parser_refusal

LONE_SURROGATE = r'{"conversations": [{"from": "human", "value": "A \ud800"}, {"from": "gpt", "value": "a"}]}'


def test_bad_lines_are_skipped_and_counted(tmp_path, capsys):
    lines = [LONE_SURROGATE, "{broken", {"conversations": conversation("What is here?", "A harbour with boats.")}]
    meta_path = write_dataset(tmp_path, lines)
    tokenizer, skipped = train_tokenizer_on_meta(meta_path, vocab_size=300)
    assert skipped == {"invalid text": 1, "invalid JSON": 1}
    assert tokenizer.decode(tokenizer("A harbour")["input_ids"]) == "A harbour"
    assert main(["tokenizer", "train", "--meta_path", str(meta_path), "--output_dir", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 line(s): " in out and "invalid text 1" in out and (tmp_path / "tok" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "lines, reason",
    [
        ([], "no line of the annotation files has any text"),
        ([LONE_SURROGATE, "{broken"], "skipped 2 line(s): "),
    ],
)
def test_no_usable_text_is_refused(tmp_path, capsys, lines, reason):
    meta_path = write_dataset(tmp_path, lines)
    code = main(["tokenizer", "train", "--meta_path", str(meta_path), "--output_dir", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert code == 2 and "no usable conversation text to train a tokenizer on" in err and reason in err
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE - 1, 0, -5])
def test_vocab_size_below_bytes_and_specials_is_refused(tmp_path, capsys, vocab_size):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}])
    err = parser_refusal(["tokenizer", "train", "--meta_path", str(meta_path), "--output_dir", str(tmp_path / "tok"),
                          "--vocab_size", str(vocab_size)], capsys)
    assert f"argument --vocab_size: {vocab_size}: must be from {MIN_VOCAB_SIZE}" in err and "256 bytes" in err
    with pytest.raises(ValueError, match="vocab_size"):  # a Python caller
        train_tokenizer(["a harbour with boats"], vocab_size=vocab_size)


def test_the_minimum_vocab_size_gives_exactly_that_many_tokens():
    assert len(train_tokenizer(["a harbour with boats"] * 5, vocab_size=MIN_VOCAB_SIZE)) == MIN_VOCAB_SIZE
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "  "], vocab_size=MIN_VOCAB_SIZE)
