"""What the engine says about its own start."""

from __future__ import annotations

import importlib.util
import os
import py_compile

from kiln.runtime.engine import uncached_bytecode_note


def test_a_start_without_bytecode_is_named(tmp_path):
    module = tmp_path / "some_module.py"
    module.write_text("x = 1\n")
    # Python writes no bytecode and none is cached: every start compiles the module again
    note = uncached_bytecode_note(dont_write_bytecode=True, module_file=str(module))
    assert note is not None and "PYTHONDONTWRITEBYTECODE" in note and "compileall" in note
    # writing allowed: the first start caches it
    assert uncached_bytecode_note(dont_write_bytecode=False, module_file=str(module)) is None
    # compiled beforehand: nothing to say
    py_compile.compile(str(module), cfile=importlib.util.cache_from_source(str(module)))
    assert os.path.exists(importlib.util.cache_from_source(str(module)))
    assert uncached_bytecode_note(dont_write_bytecode=True, module_file=str(module)) is None
