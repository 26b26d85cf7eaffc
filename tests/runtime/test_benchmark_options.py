"""The GPU benchmarks' options, checked on CPU: a GPU call that fails on its first line wastes the
lent machine's time (session 26's first TP=2 call did, on a VARIANTS option the parser had lost)."""

from __future__ import annotations

import importlib.util
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_out_variants_have_their_options():
    scale_out = _load("scale_out")
    args = scale_out.build_parser().parse_args([])
    missing = [option for option, *_ in scale_out.VARIANTS.values() if not hasattr(args, option)]
    assert not missing, f"VARIANTS names options the parser lacks: {missing}"
    # and a variant asked for reaches its switch
    args = scale_out.build_parser().parse_args(["--compare-tiles", "deep=4x2048x8", "--compare-norm-at-end"])
    assert scale_out.variant_switch("tp2-tiles", args) == ("KILN_GEMV_TILES", "deep=4x2048x8", "gemv tiles deep=4x2048x8")
    assert scale_out.variant_switch("tp2-norm-first", args)[:2] == ("KILN_NORM_AT_END", "0")


def _session_arguments(option: str) -> list[str]:
    """Every quoted value `gpu_session.sh` passes to `option` (on its line or the next), a
    `${NAME:-default}` value read as its default."""
    import re

    text = (BENCHMARKS / "gpu_session.sh").read_text()
    values = re.findall(rf'{option} (?:\\\n\s*)?"([^"]*)"', text)
    return [re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", v) for v in values]


def test_gpu_session_tiles_and_rows_parse():
    """gpu_session.sh's gemv tile specs parse, and the attention_chain rows it names exist (a row
    name with a comma in it would be split by --rows)."""
    from kiln.codegen.kernels.quant_gemm import parse_gemv_tiles

    specs = [s for arg in _session_arguments("--compare-gemv-tiles") for s in arg.split(";")]
    assert any("@" in s for s in specs), "the gemv-tiles section's quantized rows were not read"
    schemes = {s.rpartition("@")[0] for s in specs} - {""}
    assert schemes <= {"int8_weight_only", "fp8_weight_only", "int8", "fp8"}, schemes
    assert specs and all(parse_gemv_tiles(s.rpartition("@")[2]) for s in specs)
    chain = _load("attention_chain")
    known = [*chain.BOUNDARY_ROWS, *chain.ATTENTION_ROWS]
    assert not [r for r in known if "," in r], "a row name with a comma cannot be asked for"
    asked = [r for arg in _session_arguments("--rows") for r in arg.split(",")]
    assert not [r for r in asked if r not in known]


def test_cold_start_import_report_sums_packages_and_names_the_first_chain():
    cold_start = _load("cold_start")
    # `python -X importtime`: children before their parent, one indent (two spaces) deeper
    lines = ["import time: self [us] | cumulative | imported package",
             "import time:       300 |        300 |     sympy.core",
             "import time:       200 |        500 |   sympy",
             "import time:       100 |        600 | torch.fx",
             "import time:      1000 |       1000 | torch",
             "import time:        50 |         50 | sympy.polys",
             "unrelated stderr line"]
    report = cold_start.import_report(lines).splitlines()
    assert report[0] == "imports: 5 modules, 0.00 s in their own code"
    assert report[1].split()[3:5] == ["torch", "first"]  # 1100 us, more than sympy's 550
    assert report[2].endswith("sympy.core <- sympy <- torch.fx")
