"""``aquilachat serve``: defaults, a bad --model, and (slow) the real command end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from aquilachat.cli import build_parser, main
from tests.helpers import make_tiny_model
from tests.server_utils import free_port

REPO = Path(__file__).resolve().parents[1]


def test_defaults_bind_localhost_on_the_original_port():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 7000
    assert args.model == "aquila-tiny" and args.api_key is None and not args.log_prompts


def test_a_missing_model_fails_in_one_line_before_serving(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aquilachat serve: error:") and len(err.strip().splitlines()) == 1
    assert main(["serve", "--max-num-seqs", "0"]) == 1
    assert "--max-num-seqs" in capsys.readouterr().err
    # checked with the other engine sizes, not after the server started listening (in the loader)
    for value in ("0", "-2"):
        assert main(["serve", "--num-scheduler-steps", value, "--port", str(free_port())]) == 1
        err = capsys.readouterr().err
        assert err == f"aquilachat serve: error: --num-scheduler-steps must be >= 1, got {value}\n"


@pytest.mark.slow
def test_serve_command_end_to_end(tmp_path, byte_tokenizer_dir):
    make_tiny_model(tmp_path / "m", byte_tokenizer_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AQUILACHAT_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "aquilachat", "serve", "--model", str(tmp_path / "m"),
                             "--port", str(port), "--max-num-seqs", "4", "--served-model-name", "tiny"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.post(url + "/", json={"prompt": "你好"}, timeout=30).status_code == 401
        r = httpx.post(url + "/", json={"prompt": "你好", "max_new_tokens": 8},
                       headers={"Authorization": "Bearer k1"}, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out  # Ctrl-C: a clean shutdown, then the CLI's usual status
    assert "你好" not in out  # no prompt in the log
