"""`vitp convert-vit` as a user runs it."""

import subprocess
import sys
from pathlib import Path

import torch
from transformers import InternVLVisionModel

from vitp import load_vit, save_vit
from vitp.cli import main


def test_convert_hf_directory_to_vitp_file_and_back(tmp_path, tiny_vit, capsys):
    save_vit(tiny_vit, tmp_path / "hf", to="hf")
    assert main(["convert-vit", str(tmp_path / "hf"), str(tmp_path / "ViTP_ViT.safetensors"), "--to", "vitp"]) == 0
    out = capsys.readouterr().out
    assert "transformers InternVLVisionModel directory" in out
    assert "wrote  " + str(tmp_path / "ViTP_ViT.json") in out

    assert main(["convert-vit", str(tmp_path / "ViTP_ViT.safetensors"), str(tmp_path / "back"), "--to", "hf"]) == 0
    reloaded = InternVLVisionModel.from_pretrained(tmp_path / "back").eval()
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = tiny_vit(pixels)
        assert torch.allclose(reloaded(pixels).last_hidden_state, expected, atol=1e-5)


def test_convert_with_explicit_config_and_dtype(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "vit.safetensors", to="vitp")
    (tmp_path / "vit.json").unlink()
    code = main([
        "convert-vit", str(tmp_path / "vit.safetensors"), str(tmp_path / "bf16.safetensors"),
        "--to", "vitp", "--vit_config", "internvit-tiny", "--dtype", "bf16", "--key_prefix", "",
    ])
    assert code == 0
    model = load_vit(tmp_path / "bf16.safetensors", dtype=None)
    assert model.pos_embed.dtype == torch.bfloat16
    assert torch.equal(model.pos_embed, tiny_vit.pos_embed.to(torch.bfloat16))


def test_bad_input_is_one_clean_error_line(tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    assert main(["convert-vit", str(tmp_path / "broken.safetensors"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.safetensors" in err and "Traceback" not in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    vitp = Path(sys.prefix) / "bin" / "vitp"  # installed by `make test` (pip install -e .)
    assert vitp.is_file(), "the vitp console script is not installed in this environment"
    result = subprocess.run(
        [str(vitp), "convert-vit", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "vitp"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error: " in result.stderr and "no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_convert_is_upstreams_json2jsonl_keeping_the_system_turn(tmp_path, capsys):
    import json

    samples = [{"image": "a.jpg", "conversations": [{"from": "system", "value": "Sei breve."},
                                                    {"from": "human", "value": "<image>\n这是什么?"},
                                                    {"from": "gpt", "value": "港口"}]},
               {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]}]
    (tmp_path / "data.json").write_text(json.dumps(samples), encoding="utf-8")
    assert main(["data", "convert", str(tmp_path / "data.json")]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    text = (tmp_path / "data.jsonl").read_text(encoding="utf-8")
    assert "这是什么" in text  # non-ASCII kept as it is, as upstream writes it
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["conversations"][0] == {"from": "system", "value": "Sei breve."} and first["id"] == 0
    assert second["id"] == 1
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    assert main(["data", "convert", str(tmp_path / "bad.json")]) == 2
    assert "expected a JSON list of samples" in capsys.readouterr().err


def test_pretrain_help_lists_upstreams_flags(capsys):
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--TMAug_prob", "--conv_style", "--use_packed_ds", "--evaluation_strategy", "--use_llm_lora", "--config"):
        assert flag in out, flag


def test_the_command_line_starts_without_importing_transformers():
    code = "import sys; from vitp.cli import build_parser; build_parser(); print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """`vitp ... | head`: the reader closes the pipe; the command stops with 141 (as a shell reports
    SIGPIPE) and prints no traceback, not even Python's 'Exception ignored' at exit."""
    code = (
        "import argparse, sys\n"
        "import vitp.cli as cli\n"
        "def build_parser():\n"
        "    parser = argparse.ArgumentParser(prog='vitp')\n"
        "    parser.set_defaults(handler=lambda args: [print('result', i) for i in range(10**7)] and 0)\n"
        "    return parser\n"
        "cli.build_parser = build_parser\n"
        "sys.exit(cli.main([]))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "result 0\n"
    child.stdout.close()  # as `head -1` exits
    _, err = child.communicate(timeout=120)
    assert child.returncode == 141, err[-2000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
