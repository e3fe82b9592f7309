"""Command-line values are checked where they are parsed: the argparse types and shared option groups."""

import argparse

import pytest

from vitp.cli import build_parser
from vitp.cli.types import (
    byte_size, fraction, int_at_least, json_object, non_negative_float, non_negative_int, port, positive_float, positive_int,
)
from vitp_testing import parser_refusal


@pytest.mark.parametrize(
    "parse, good, bad",
    [
        (positive_int, {"1": 1, "2048": 2048}, {"0": ">= 1", "-3": ">= 1", "1.5": "whole number", "x": "whole number"}),
        (non_negative_int, {"0": 0, "7": 7}, {"-1": ">= 0", "two": "whole number"}),
        (int_at_least(268, "bytes", most=300), {"268": 268, "300": 300}, {"267": "from 268 to 300", "301": "from 268"}),
        (positive_float, {"0.5": 0.5, "300": 300.0}, {"0": "> 0", "-1": "> 0", "nan": "> 0", "inf": "> 0", "x": "a number"}),
        (non_negative_float, {"0": 0.0, "3": 3.0}, {"-0.5": ">= 0", "inf": ">= 0", "x": "a number"}),
        (fraction, {"0": 0.0, "0.25": 0.25}, {"1": "[0, 1)", "-0.1": "[0, 1)", "nan": "[0, 1)"}),
        (port, {"0": 0, "65535": 65535}, {"65536": "between 0 and 65535", "-1": "between 0 and 65535"}),
        (byte_size, {"512MB": 512 * 2**20, "4GB": 4 * 2**30}, {"0GB": "more than 0 bytes", "lots": "lots"}),
        (json_object, {'{"nlist": 8}': {"nlist": 8}}, {"[1]": "JSON object", "{nlist": "not valid JSON"}),
    ],
)
def test_argument_types_read_good_values_and_refuse_bad_ones_saying_why(parse, good, bad):
    for text, value in good.items():
        assert parse(text) == value
    for text, phrase in bad.items():
        with pytest.raises(argparse.ArgumentTypeError, match=phrase.replace("[", r"\[").replace(")", r"\)")):
            parse(text)


def test_shared_option_groups_give_every_command_the_same_flags():
    parser = build_parser()
    for argv in (["features", "--image_dir", "d", "--output", "o.npz", "--vit_checkpoint", "c"],
                 ["search", "--index", "i", "--image", "q"]):
        args = parser.parse_args([*argv, "--device", "cpu", "--dtype", "bf16", "--batch_size", "4", "--num_workers", "0",
                                  "--no_progress"])
        assert (args.device, args.dtype, args.batch_size, args.num_workers, args.no_progress) == ("cpu", "bf16", 4, 0, True)
    # search and serve take the gallery's precision unless told; features picks one for the device
    assert parser.parse_args(["search", "--index", "i", "--image", "q"]).dtype is None
    assert parser.parse_args(["serve", "--index", "i"]).dtype is None
    assert parser.parse_args(["features", "--image_dir", "d", "--output", "o", "--vit_checkpoint", "c"]).dtype == "auto"
    for argv in (["serve", "--index", "i"], ["evaluate"], ["index", "build", "--features", "f", "--output", "o"]):
        assert parser.parse_args([*argv, "--faiss_device", "cpu"]).faiss_device == "cpu"


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["features", "--batch_size", "0"], "argument --batch_size: 0: must be >= 1"),
        (["features", "--num_workers", "-1"], "argument --num_workers: -1: must be >= 0"),
        (["features", "--max_pixels", "0"], "argument --max_pixels: 0: must be >= 1"),
        (["features", "--shard_size", "0"], "argument --shard_size"),
        (["features", "--store_shard_size", "0"], "argument --store_shard_size"),
    ],
)
def test_a_bad_extraction_value_is_refused_before_any_model_is_loaded(argv, phrase, tmp_path, capsys, monkeypatch):
    import vitp.retrieval.extract as extract

    def must_not_run(*args, **kwargs):
        raise AssertionError("extraction started with a value the parser should have refused")

    monkeypatch.setattr(extract, "extract_features", must_not_run)
    checkpoint = tmp_path / "vit.safetensors"  # never read
    err = parser_refusal([argv[0], "--image_dir", str(tmp_path), "--output", str(tmp_path / "f.npz"),
                          "--vit_checkpoint", str(checkpoint), *argv[1:]], capsys)
    assert phrase in err and "vitp features: error:" in err
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["search", "--index", "i", "--image", "q", "-k", "0"], "argument -k/--top_k: 0: must be >= 1"),
        (["search", "--index", "i", "--image", "q", "--show", "-1"], "argument --show: -1: must be >= 0"),
        (["search", "--index", "i", "--image", "q", "--nprobe", "0"], "argument --nprobe: 0: must be >= 1"),
        (["search", "--index", "i", "--image", "q", "--qe", "-2"], "argument --qe: -2: must be >= 0"),
        (["search", "--index", "i", "--query_features", "f", "--ef_search", "-1"], "argument --ef_search: -1: must be >= 1"),
        (["index", "build", "--features", "f", "--output", "o", "--nprobe", "0"], "argument --nprobe: 0: must be >= 1"),
        (["index", "build", "--features", "f", "--output", "o", "--dba", "-2"], "argument --dba: -2: must be >= 0"),
        (["evaluate", "--top_k", "1", "0"], "argument --top_k: 0: must be >= 1"),
        (["evaluate", "--ef_search", "0"], "argument --ef_search"),
        (["evaluate", "--pca", "0"], "argument --pca: 0: must be >= 1"),
        (["evaluate", "--dba", "-1"], "argument --dba: -1: must be >= 0"),
        (["evaluate", "--qe_alpha", "-1"], "argument --qe_alpha: -1: must be a number >= 0"),
        (["evaluate", "--dba_alpha", "-3"], "argument --dba_alpha"),
        (["index", "build", "--features", "f", "--output", "o", "--max_query_ms", "0"], "argument --max_query_ms"),
        (["serve", "--index", "i", "--port", "70000"], "argument --port: 70000: must be between 0 and 65535"),
        (["serve", "--index", "i", "--max_k", "0"], "argument --max_k"),
        (["data", "build", "--image_dir", "d", "--output_dir", "o", "--holdout_fraction", "1"], "--holdout_fraction"),
        (["demo", "--steps", "0"], "argument --steps: 0: must be >= 1"),
        (["convert-vit", "a", "b", "--to", "hf", "--num_heads", "0"], "argument --num_heads"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser_with_the_flag_named(argv, phrase, capsys):
    assert phrase in parser_refusal(argv, capsys)
