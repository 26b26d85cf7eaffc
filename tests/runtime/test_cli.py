"""The `kiln` command line: `kiln serve` in a subprocess answers the openai client (also with two
tensor-parallel ranks); `kiln bench` finds the benchmark scripts."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest

from kiln.runtime.cli import BENCHMARKS, benchmark_path, main


@contextlib.contextmanager
def kiln_serve(llama_path, tmp_path, *flags):
    """`kiln serve` in a subprocess, healthy; yields an openai client for it."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln.runtime.cli", "serve", llama_path, "--port", str(port), "--served-model-name",
           "cli-model", "--api-key", "secret", "--max-model-len", "64", "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KILN_CACHE_DIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "kiln serve did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
    finally:
        proc.terminate()
        proc.wait(30)


def test_kiln_serve(llama_path, tmp_path):
    with kiln_serve(llama_path, tmp_path, "--async-scheduling") as client:  # (an engine overlapping its steps)
        assert [m.id for m in client.models.list().data] == ["cli-model"]
        out = client.completions.create(model="cli-model", prompt="Hello", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4


def test_kiln_serve_tensor_parallel(llama_path, tmp_path):
    """Two ranks (gloo) behind the server answer as one process does."""
    from kiln import LLM, SamplingParams

    want = LLM(llama_path, max_model_len=64).generate(
        "Hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    with kiln_serve(llama_path, tmp_path, "--tensor-parallel-size", "2", "--kv-cache-memory", str(1 << 22),
                    "--disable-custom-all-reduce") as client:
        out = client.completions.create(model="cli-model", prompt="Hello", max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want


def test_serve_needs_a_model_or_demo(capsys):
    assert main(["serve"]) == 2
    assert "give a MODEL or --demo" in capsys.readouterr().err


@pytest.mark.parametrize("name", BENCHMARKS)
def test_bench_finds_the_scripts(name, capsys):
    assert os.path.isfile(benchmark_path(name))
    assert main(["bench", name, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_kiln_models_lists_native_and_backend_architectures(capsys):
    from kiln.runtime.cli import main

    assert main(["models"]) == 0
    native = capsys.readouterr().out
    assert "LlamaForCausalLM" in native and "native (kiln.models.llama)" in native
    assert "transformers backend" not in native
    assert main(["models", "--all"]) == 0
    everything = capsys.readouterr().out
    assert "GPT2LMHeadModel" in everything and "transformers backend" in everything
    llama = [line for line in everything.splitlines() if line.split()[0] == "LlamaForCausalLM"]
    assert len(llama) == 1 and "native" in llama[0]  # a native architecture is listed once, as native


def test_kiln_compile_dumps_the_ir_before_and_after_each_pass(llama_path, tmp_path, capsys):
    """`kiln compile MODEL --dump-ir DIR` (the eager codegen here: no Inductor compile on a 2-core
    host) writes one file per pass, in pipeline order, and the files show the passes' work; an
    unknown pass is a clear error."""
    from kiln.passes import PIPELINE

    out = tmp_path / "ir"
    assert main(["compile", llama_path, "--dump-ir", str(out), "--backend", "eager", "--device", "cpu"]) == 0
    files = sorted(os.listdir(out / "graph0"))
    assert files == ["00-input.txt"] + [f"{i:02d}-{name}.txt" for i, name in enumerate(PIPELINE, start=1)]
    text = {f: (out / "graph0" / f).read_text() for f in files}
    assert "kiln.merged_linear" not in text["00-input.txt"] and "kiln.merged_linear" in text["01-merge_linears.txt"]
    after = {name: text[f"{i:02d}-{name}.txt"] for i, name in enumerate(PIPELINE, start=1)}
    rotary, rope = after["fuse_rotary_cache_write"], after["fuse_linear_rope"]
    assert "kiln.rotary_kv_write" in rotary and "kiln.rotary(" not in rotary
    assert "kiln.add_rms_norm_linear_rope" in rope and "kiln.rotary_kv_write" not in rope
    listing = capsys.readouterr().out
    counts = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in listing.splitlines()
              if line.strip().endswith(tuple("0123456789")) and line.strip().split()[0].endswith(".txt")}
    assert sorted(counts) == files
    assert counts[files[-1]][1] < counts["00-input.txt"][1]  # the fusions left fewer kiln ops
    subset = tmp_path / "subset"
    assert main(["compile", llama_path, "--dump-ir", str(subset), "--backend", "eager", "--device", "cpu",
                 "--passes", "merge_linears"]) == 0
    assert sorted(os.listdir(subset / "graph0")) == ["00-input.txt", "01-merge_linears.txt"]
    assert main(["compile", llama_path, "--passes", "fuse_everything", "--device", "cpu"]) == 1
    assert "unknown passes ['fuse_everything']" in capsys.readouterr().err
